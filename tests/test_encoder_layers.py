"""A BERT encoder's int8 N:M layers in one C call (sparsetx.kernels.encoder, nm_cpu.c encoder_layers)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_packed_bert
from sparsetx.kernels.loader import library

pytestmark = pytest.mark.skipif(library() is None, reason="C kernel could not be built here (no gcc?)")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_packed_bert(tmp_path_factory.mktemp("enc") / "m", 100, "int8", layers=3, pattern="1:8")


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (3, 37), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0   # a padded row: its padding keys must get no attention
    return ids, mask


def _without_plan(model):
    """The same model on its per-layer path (transformers' layers around the same kernels)."""
    del model.bert.encoder.forward
    del model.bert.forward
    return model


@pytest.mark.parametrize("bits", [16, 8])
def test_one_call_equals_the_layer_by_layer_path(folder, bits):
    """Three post-norm layers in one C call give the logits and hidden states the per-layer path
    gives on the same kernels (LayerNorm, residuals and attention in C; int8 activations too, where
    a rounding step can flip, hence their looser tolerance; at 8 bits both paths' attention is
    int8), padding masked, at 1 and 2 threads."""
    from sparsetx.formats.folder import load_packed

    fast = load_packed(folder, fast=True, activation_bits=bits)
    assert fast.bert.encoder.sparsetx_layers.attention_bits == (8 if bits == 8 else 32)   # int8 Q, K, V at 8
    slow = _without_plan(load_packed(folder, fast=True, activation_bits=bits))
    assert {m.sparsetx_attention_bits for m in (l.attention.self for l in slow.bert.encoder.layer)} == {bits * (bits == 8) or 32}
    ids, mask = _batch()
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                a, b = (m(input_ids=ids, attention_mask=mask) for m in (fast, slow))
            tol = 1e-4 if bits == 16 else 2e-2
            torch.testing.assert_close(a.logits, b.logits, atol=tol, rtol=0)
    finally:   # later tests compare runs bit for bit with subprocesses at the default thread count
        torch.set_num_threads(before)
    exact = load_packed(folder)
    with torch.inference_mode():
        want = exact(input_ids=ids, attention_mask=mask).logits
        got = fast(input_ids=ids, attention_mask=mask).logits
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999


def test_calls_it_cannot_take_run_the_model_s_own_forward(folder):
    """Hidden states asked for, a forward hook on a layer, gradients: each runs transformers' layers
    (so what they observe is real), and gives the same logits."""
    from sparsetx.formats.folder import load_packed

    fast = load_packed(folder, fast=True)
    plan = fast.bert.encoder.sparsetx_layers
    ids, mask = _batch()
    calls = []
    original = plan.original
    plan.original = lambda *a, **k: calls.append(1) or original(*a, **k)
    with torch.inference_mode():
        base = fast(input_ids=ids, attention_mask=mask).logits
        assert calls == []
        out = fast(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert len(out.hidden_states) == 4 and calls == [1]
        torch.testing.assert_close(out.logits, base, atol=1e-4, rtol=0)
        seen = []
        handle = fast.bert.encoder.layer[1].register_forward_hook(lambda m, i, o: seen.append(1))
        torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask).logits, base, atol=1e-4, rtol=0)
        handle.remove()
        assert seen == [1] and calls == [1, 1]


def test_models_it_cannot_run_keep_their_forward(tmp_path):
    """fp16 values (the fp32 engine), or a GELU left unfused: no one-call forward."""
    from sparsetx.formats.folder import load_packed
    from sparsetx.kernels.encoder import use_encoder_layers

    m = load_packed(tiny_packed_bert(tmp_path / "h", 100, "float16"), fast=True)
    assert not hasattr(m.bert.encoder, "sparsetx_layers")
    m = load_packed(tiny_packed_bert(tmp_path / "i", 100, "int8"), fast=True)
    del m.bert.encoder.forward
    m.bert.encoder.layer[0].intermediate.dense.activation = None
    assert use_encoder_layers(m) is False


def test_spatten_and_compile_still_work(folder):
    """SpAtten's runtime (its own forward over the weights) and torch.compile (which traces the
    model's layers, not the C call) both run on a model with the one-call encoder; leaving the
    SpAtten block gives the model its one-call forward back."""
    from sparsetx.attention.encoder import SpAttenConfig, spatten
    from sparsetx.models import load_model

    fast = load_model(folder, fast=True)
    ids, mask = _batch()
    with torch.inference_mode():
        base = fast(input_ids=ids, attention_mask=mask).logits
        plain = fast.bert.forward
        with spatten(fast, SpAttenConfig(token_keep=1.0)):
            kept = fast(input_ids=ids, attention_mask=mask).logits
        assert fast.bert.forward == plain   # the one-call forward is back, not transformers' (a shared model)
    torch.testing.assert_close(kept, base, atol=1e-3, rtol=0)
    compiled = load_model(folder, fast=True, compile=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask).logits, base, atol=1e-4, rtol=0)


def test_plain_calls_skip_transformers_plumbing_and_equal_it(folder):
    """The base model's plain call (ids, a 2-D padding mask, token types or not) runs embeddings,
    layers and pooler in one C call: its embeddings (no layers) and pooler equal BertEmbeddings'
    and BertPooler's within float rounding, and the logits equal transformers' own forward around
    the same C layers (int8 activations: a rounding step can flip, hence 2e-2); calls it does not
    take (positions given, a hook on the encoder or embeddings, a 4-D mask, an id beyond the
    vocabulary) go to that forward."""
    from sparsetx.formats.folder import load_packed
    from sparsetx.kernels.loader import library, ptr

    fast = load_packed(folder, fast=True, activation_bits=8)
    plan = fast.bert.encoder.sparsetx_layers
    ids, mask = _batch()
    types = (torch.arange(ids.shape[1]) > 10).long().expand_as(ids)
    calls = []
    original = plan.base_original
    plan.base_original = lambda *a, **k: calls.append(1) or original(*a, **k)
    emb, pool = fast.bert.embeddings, fast.bert.pooler
    tables = [emb.word_embeddings.weight, emb.token_type_embeddings.weight, emb.position_embeddings.weight,
              emb.LayerNorm.weight, emb.LayerNorm.bias, pool.dense.weight, pool.dense.bias]
    ptrs = torch.tensor([t.data_ptr() for t in tables], dtype=torch.int64)
    with torch.inference_mode():
        for tt in (None, types.contiguous()):
            b, t = ids.shape
            d = fast.config.hidden_size
            h, pooled = torch.empty(b, t, d), torch.empty(b, d)
            library().encoder_forward(ptr(plan.table), 0, b, t, d, plan.heads, plan.inter, plan.eps, ptr(ids),
                                      ptr(tt), ptr(ptrs),
                                      float(emb.LayerNorm.eps), ptr(h), None, ptr(pooled), 8, 2)
            torch.testing.assert_close(h, emb(input_ids=ids, token_type_ids=tt), atol=1e-6, rtol=0)
            torch.testing.assert_close(pooled, pool(h), atol=1e-6, rtol=0)
            got = fast(input_ids=ids, attention_mask=mask, token_type_ids=tt)
            assert calls == []
            want = original(ids, mask, tt)   # transformers' BertModel.forward, layers still in C
            torch.testing.assert_close(got.logits, fast.classifier(want.pooler_output), atol=2e-2, rtol=0)
        fast(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1])[None])
        assert calls == [1]
        handle = fast.bert.encoder.register_forward_hook(lambda m, i, o: calls.append(2))
        fast(input_ids=ids, attention_mask=mask)
        handle.remove()
        assert calls == [1, 1, 2]
        fast(input_ids=ids, attention_mask=mask[:, None, None, :].bool().expand(-1, 1, ids.shape[1], -1))
        assert calls == [1, 1, 2, 1]
        handle = emb.register_forward_hook(lambda m, i, o: calls.append(3))
        fast(input_ids=ids, attention_mask=mask)
        handle.remove()
        assert calls == [1, 1, 2, 1, 1, 3]
        with pytest.raises(IndexError):   # transformers' own error, never a read past the table
            fast(input_ids=ids.masked_fill(ids == ids[0, 0], 100), attention_mask=mask)


def test_pool_threads_give_the_same_bits_and_survive_threads_and_fork(folder):
    """The one-call encoder's phases run on its own thread pool (nm_cpu.c section 9): a chunk's
    result does not depend on the thread that runs it, so 1, 2 and 3 threads (more than this
    machine's cores) give the same logits bit for bit; two Python threads calling at once (one
    runs its phases alone) and a forked child (none of the parent's workers) give them too."""
    import os
    import pickle
    import threading

    from sparsetx.formats.folder import load_packed

    fast = load_packed(folder, fast=True, activation_bits=8)
    ids, mask = _batch()
    before = torch.get_num_threads()
    outs = {}
    try:
        with torch.inference_mode():
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                outs[threads] = fast(input_ids=ids, attention_mask=mask).logits
            assert torch.equal(outs[1], outs[2]) and torch.equal(outs[1], outs[3])
            torch.set_num_threads(2)
            got, errors = [], []

            def call():
                try:
                    with torch.inference_mode():
                        for _ in range(5):
                            got.append(fast(input_ids=ids, attention_mask=mask).logits)
                except Exception as e:   # noqa: BLE001 - reported below
                    errors.append(e)

            workers = [threading.Thread(target=call) for _ in range(2)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(60)
            assert not errors and len(got) == 10 and all(torch.equal(g, outs[1]) for g in got)
            # The forked child runs only the base model (the C encoder and pooler): torch's own
            # OpenMP (libgomp) cannot start a parallel region in a child forked after the parent's
            # team ran (MKL's sgemm for the classifier head hung there on an AMD EPYC).
            torch.set_num_threads(1)
            base = fast.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.set_num_threads(2)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:   # the child: compute, report, leave without running the parent's cleanup
                try:
                    with torch.inference_mode():
                        data = pickle.dumps(fast.base_model(input_ids=ids, attention_mask=mask).last_hidden_state)
                    os.write(w, data)
                finally:
                    os._exit(0)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                child = pickle.loads(f.read())
            os.waitpid(pid, 0)
            assert torch.equal(child, base)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("nap_ms", ["0", "50"])
def test_napping_and_sleeping_workers_give_the_same_bits(folder, nap_ms):
    """After POOL_SPIN_NS (2 ms) without work a pool worker naps 1 ms at a time for
    SPARSETX_POOL_NAP_MS, then sleeps on a condition variable: with naps off ("0") a call after
    20 ms idle finds it asleep, with "50" napping, and after 80 ms past its naps; every call's
    logits are those of one thread, bit for bit."""
    import os
    import pickle
    import subprocess
    import sys

    from sparsetx.formats.folder import load_packed

    ids, mask = _batch()
    with torch.inference_mode():
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            want = load_packed(folder, fast=True, activation_bits=8)(input_ids=ids, attention_mask=mask).logits
        finally:
            torch.set_num_threads(before)
    script = (
        "import pickle, sys, time, torch\n"
        "from sparsetx.formats.folder import load_packed\n"
        "torch.set_num_threads(2)\n"
        "ids, mask = pickle.loads(sys.stdin.buffer.read())\n"
        "m = load_packed(sys.argv[1], fast=True, activation_bits=8)\n"
        "out = []\n"
        "with torch.inference_mode():\n"
        "    for idle in (0, 0.02, 0, 0.08):\n"
        "        time.sleep(idle)\n"
        "        out.append(m(input_ids=ids, attention_mask=mask).logits)\n"
        "sys.stdout.buffer.write(pickle.dumps(out))\n")
    env = dict(os.environ, SPARSETX_POOL_NAP_MS=nap_ms)
    done = subprocess.run([sys.executable, "-c", script, str(folder)], input=pickle.dumps((ids, mask)),
                          capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    got = pickle.loads(done.stdout)
    assert len(got) == 4 and all(torch.equal(g, want) for g in got)

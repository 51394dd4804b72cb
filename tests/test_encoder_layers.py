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
    model's layers, not the C call) both run on a model with the one-call encoder."""
    from sparsetx.attention.encoder import SpAttenConfig, spatten
    from sparsetx.models import load_model

    fast = load_model(folder, fast=True)
    ids, mask = _batch()
    with torch.inference_mode():
        base = fast(input_ids=ids, attention_mask=mask).logits
        with spatten(fast, SpAttenConfig(token_keep=1.0)):
            kept = fast(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(kept, base, atol=1e-3, rtol=0)
    compiled = load_model(folder, fast=True, compile=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask).logits, base, atol=1e-4, rtol=0)


def test_plain_calls_skip_transformers_plumbing_and_equal_it(folder):
    """The base model's plain call (ids, a 2-D padding mask, token types or not) runs embeddings,
    the C layers and the pooler itself, and its output equals transformers' own forward around the
    same C layers bit for bit; calls it does not take (positions given, a hook on the encoder, a
    4-D mask) go to that forward."""
    from sparsetx.formats.folder import load_packed

    fast = load_packed(folder, fast=True, activation_bits=8)
    plan = fast.bert.encoder.sparsetx_layers
    ids, mask = _batch()
    types = (torch.arange(ids.shape[1]) > 10).long().expand_as(ids)
    calls = []
    original = plan.base_original
    plan.base_original = lambda *a, **k: calls.append(1) or original(*a, **k)
    with torch.inference_mode():
        for tt in (None, types):
            got = fast(input_ids=ids, attention_mask=mask, token_type_ids=tt)
            assert calls == []
            want = original(ids, mask, tt)   # transformers' BertModel.forward, layers still in C
            torch.testing.assert_close(fast.bert(input_ids=ids, attention_mask=mask, token_type_ids=tt).pooler_output,
                                       want.pooler_output, atol=0, rtol=0)
            torch.testing.assert_close(got.logits, fast.classifier(want.pooler_output), atol=0, rtol=0)
        fast(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1])[None])
        assert calls == [1]
        handle = fast.bert.encoder.register_forward_hook(lambda m, i, o: calls.append(2))
        fast(input_ids=ids, attention_mask=mask)
        handle.remove()
        assert calls == [1, 1, 2]
        fast(input_ids=ids, attention_mask=mask[:, None, None, :].bool().expand(-1, 1, ids.shape[1], -1))
        assert calls == [1, 1, 2, 1]

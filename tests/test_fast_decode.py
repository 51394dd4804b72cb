"""The decoder runtime's fast one-token step (sparsetx/attention/fast_decode.py): the same logits,
positions, importance and statistics as the full path on a tiny grouped-query Llama; the cases it
leaves to the full path; the stacked buffer's cut and growth; the C kernel's KV-head stride."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from sparsetx.adapters import family_of
from sparsetx.attention.decoder import DecoderConfig, spatten_decoder
from sparsetx.attention.decoder_eval import streaming_pass
from sparsetx.attention.fast_decode import StackedKV
from sparsetx.kernels.attention import reference_attention
from sparsetx.kernels.loader import library, ptr

needs_kernels = pytest.mark.skipif(library() is None, reason="the C kernels did not build here (no gcc?)")


def _ids(n, seed=0):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _fast_steps(runtime_holder, held=None):
    """Wrap the runtime's fast forward to count the steps it ran itself; ``held`` (a list) gets the
    set of positions cached at the start of each forward (after the previous one's cut)."""
    fast = runtime_holder.fast
    count = {"fast": 0, "full": 0}
    forward = fast.forward

    def counting(*args, **kwargs):
        if held is not None:
            held.append(set(runtime_holder.positions[0].tolist()))
        out = forward(*args, **kwargs)
        count["fast" if fast.stepped else "full"] += 1
        return out

    runtime_holder.base.forward = counting
    return count


@needs_kernels
@pytest.mark.parametrize("budget", [6, 12, 40])
def test_fast_step_equals_the_full_path(llama, budget):
    ids = _ids(48)
    full = streaming_pass(llama, ids, DecoderConfig(kv_budget=budget, fast_step=False), 10, keep_logits=True)
    fast = streaming_pass(llama, ids, DecoderConfig(kv_budget=budget), 10, keep_logits=True)
    torch.testing.assert_close(fast.logits, full.logits, atol=2e-5, rtol=1e-5)   # fp32, other summation order
    assert fast.preds == full.preds
    a, b = fast.runtime, full.runtime
    assert a.fast.kv is not None and b.fast is None      # the fast one ran its own steps
    # the same tokens in every layer (the fast step's slots are not in text order)
    assert [sorted(p.tolist()) for p in a.positions] == [sorted(p.tolist()) for p in b.positions]
    assert all(p.numel() <= budget for p in a.positions)
    torch.testing.assert_close(a.importance, b.importance, atol=1e-9 * 48 * 4, rtol=1e-6)
    torch.testing.assert_close(a.query_count, b.query_count)
    for la, lb in zip(a.layer_importance, b.layer_importance):
        torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-6)
    assert a.stats == b.stats


@needs_kernels
def test_generate_takes_the_fast_step_and_matches(llama):
    ids = _ids(20, seed=3)
    outs = {}
    for fast in (False, True):
        with torch.inference_mode(), spatten_decoder(llama, DecoderConfig(kv_budget=8, fast_step=fast)) as rt:
            held = []
            count = _fast_steps(rt, held) if fast else None
            outs[fast] = llama.generate(input_ids=ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
            if fast:
                cache_len = rt.fast.kv.length
                held_now = rt.positions[0].numel()
    assert torch.equal(outs[True], outs[False])
    assert count == {"fast": 11, "full": 1}          # the prompt on the full path, then 11 one-token steps
    assert cache_len == held_now == 8
    for before, after in zip(held[1:], held[2:]):   # after the prompt: at most 8, evicted never return
        newest = max(after)
        assert len(after) <= 8 and newest in after and after - {newest} <= before
    assert "forward" not in llama.model.__dict__     # the base model is itself again after the block


@needs_kernels
@pytest.mark.parametrize("config", [
    DecoderConfig(kv_budget=8, policy="h2o"),                  # per-layer scores
    DecoderConfig(kv_budget=8, head_keep=0.5),                 # head pruning
    DecoderConfig.quantized(kv_budget=8),                      # progressive quantization
    DecoderConfig(kv_budget=8, evict_after="layer"),
    DecoderConfig(kv_budget=[8, 8, 6, 6]),                     # budgets differ by layer
    DecoderConfig(kv_budget=8, token_keep=0.5),                # keep ratios differ by layer
])
def test_other_cases_take_the_full_path(llama, config):
    with torch.inference_mode(), spatten_decoder(llama, config) as rt:
        count = _fast_steps(rt)
        llama.generate(input_ids=_ids(16), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert count == {"fast": 0, "full": 5}


@needs_kernels
def test_a_full_forward_between_fast_steps(llama):
    """Several tokens at once in the middle of a sequence go the full path (transformers copies the
    cache out of the buffer); the next one-token step rebuilds the buffer from the cache."""
    ids = _ids(30, seed=5)
    logits = {}
    for fast in (False, True):
        with torch.inference_mode(), spatten_decoder(llama, DecoderConfig(kv_budget=10, fast_step=fast)) as rt:
            cache = DynamicCache()
            cache_kw = family_of(llama, decoder=True).cache_kwargs(llama, cache)
            seen = []
            for lo, hi in [(0, 12), (12, 13), (13, 14), (14, 18), (18, 19), (19, 20)]:
                pos = torch.arange(lo, hi).unsqueeze(0)
                seen.append(llama(input_ids=ids[:, lo:hi], position_ids=pos, use_cache=True, **cache_kw).logits)
            logits[fast] = torch.cat(seen, dim=1)
            if fast:
                assert cache.layers[0].keys.data_ptr() == rt.fast.kv.k.data_ptr()   # the buffer again
    torch.testing.assert_close(logits[True], logits[False], atol=2e-5, rtol=1e-5)


def test_stacked_cut_fills_holes_from_the_end():
    k = torch.arange(2 * 1 * 6 * 2, dtype=torch.float32).view(2, 1, 6, 2)
    kv = StackedKV([k[i:i + 1] for i in range(2)], [-k[i:i + 1] for i in range(2)])
    keep = torch.tensor([True, False, True, True, False, True])
    order = kv.drop(keep)
    assert order.tolist() == [0, 5, 2, 3]           # slot 1 (dropped) takes row 5, the last kept one
    assert kv.length == 4
    for i in range(2):
        k_view, v_view = kv.views(i)
        assert torch.equal(k_view[0], k[i][:, [0, 5, 2, 3]])
        assert torch.equal(v_view[0], -k[i][:, [0, 5, 2, 3]])
    kv.drop(torch.tensor([True, True, True, False]))   # dropping the last row moves nothing
    assert kv.length == 3 and torch.equal(kv.views(1)[0][0], k[1][:, [0, 5, 2]])


def test_stacked_buffer_grows_and_keeps_its_rows():
    k = torch.randn(3, 2, 5, 4)
    kv = StackedKV([k[i:i + 1] for i in range(3)], [k[i:i + 1] + 1 for i in range(3)])
    kv.length = kv.capacity                       # full
    kv.grow()
    assert kv.capacity == 2 * (5 + 64)
    assert torch.equal(kv.k[:, :, :5], k) and torch.equal(kv.v[:, :, :5], k + 1)


@needs_kernels
@pytest.mark.parametrize("rows, stride", [(7, 7), (7, 20), (70, 130)])
def test_attention_kernel_reads_heads_a_stride_apart(rows, stride):
    torch.manual_seed(rows)
    hq, hkv, d = 6, 2, 16
    q = torch.randn(hq, 1, d)
    buf_k, buf_v = torch.randn(hkv, stride, d), torch.randn(hkv, stride, d)
    out, received = torch.empty(hq, 1, d), torch.zeros(rows, dtype=torch.float64)
    library().attention_fused(ptr(q), ptr(buf_k), ptr(buf_v), hq, hkv, 1, rows, stride, d, 0.25, None, None,
                              ptr(out), ptr(received), 1)
    ref, ref_received = reference_attention(q, buf_k[:, :rows].contiguous(), buf_v[:, :rows].contiguous(), 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(received, ref_received, atol=1e-6, rtol=1e-6)


# --- the whole step in one C call (nm_cpu.c llama_step) ------------------------------------------

def _sparse_llama(llama):
    """The tiny Llama with every projection swapped for a packed N:M one the C step reads in each
    of its ways: int8 6:8 and 2:4 (mask layout), int8 1:8 (lane layout, too sparse for the mask
    one), fp32 2:8 (lane layout), and an int8 head."""
    import copy

    from sparsetx.formats.packed import pack_nm
    from sparsetx.kernels.int8_linear import Int8Linear
    from sparsetx.kernels.nm_linear import SparseLinear
    from sparsetx.nm.mask import magnitude_scores, nm_mask
    from sparsetx.nm.pattern import NMPattern

    model = copy.deepcopy(llama)
    kinds = {"q_proj": ("6:8", torch.int8), "k_proj": ("2:4", torch.int8), "v_proj": ("1:8", torch.int8),
             "o_proj": ("2:8", torch.float32), "gate_proj": ("6:8", torch.int8), "up_proj": ("4:8", torch.int8),
             "down_proj": ("6:8", torch.int8)}
    for name, module in list(model.model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in kinds:
            pattern, dtype = NMPattern.parse(kinds[leaf][0]), kinds[leaf][1]
            w = module.weight.detach()
            w = w * nm_mask(magnitude_scores(w), pattern)
            model.model.set_submodule(name, SparseLinear.from_packed(pack_nm(w, pattern, dtype)))
    model.lm_head = Int8Linear.from_linear(model.lm_head)
    return model


@needs_kernels
@pytest.mark.parametrize("sparse", [False, True])
def test_c_step_equals_the_python_step_and_the_full_path(llama, sparse, monkeypatch):
    from sparsetx.attention.fast_decode import NF, FastStep

    model = _sparse_llama(llama) if sparse else llama
    ids = _ids(40, seed=5)
    cfg = DecoderConfig(kv_budget=12)
    full = streaming_pass(model, ids, DecoderConfig(kv_budget=12, fast_step=False), 8, keep_logits=True)
    c_step = streaming_pass(model, ids, cfg, 8, keep_logits=True)
    plan = c_step.runtime.fast.plan()
    assert plan is not None                                   # the C step ran, not the Python one
    kinds = sorted({int(k) for k in plan[0][:, 2::NF].flatten()})
    assert kinds == ([2, 3] if sparse else [0])               # mask and lane layouts; dense fp32
    monkeypatch.setattr(FastStep, "use_c", False)
    python = streaming_pass(model, ids, cfg, 8, keep_logits=True)
    for other in (python, full):
        torch.testing.assert_close(c_step.logits, other.logits, atol=5e-5, rtol=1e-4)
        assert c_step.preds == other.preds
        assert [sorted(p.tolist()) for p in c_step.runtime.positions] == \
            [sorted(p.tolist()) for p in other.runtime.positions]
        torch.testing.assert_close(c_step.runtime.importance, other.runtime.importance, atol=1e-5, rtol=1e-5)
        assert c_step.runtime.stats == other.runtime.stats


@needs_kernels
@pytest.mark.parametrize("pattern", ["6:8", "4:8", "2:4", "8:8", "3:4"])
def test_mask_kernel_equals_the_dequantised_weight(pattern):
    from sparsetx.formats.packed import pack_nm
    from sparsetx.kernels.nm_linear import KernelWeight
    from sparsetx.nm.mask import magnitude_scores, nm_mask
    from sparsetx.nm.pattern import NMPattern

    g = torch.Generator().manual_seed(1)
    p = NMPattern.parse(pattern) if pattern != "8:8" else None
    w = torch.randn(37, 96, generator=g)
    if p is not None:
        w = w * nm_mask(magnitude_scores(w), p)
    if p is not None:
        kw = KernelWeight.from_packed(pack_nm(w, p, torch.int8))
    else:            # dense: every input kept (N = M), int8 rows
        from sparsetx.formats.packed import quantize_rows

        q, s = quantize_rows(w)
        kw = KernelWeight(q, torch.arange(96, dtype=torch.int32).expand(37, 96).contiguous(), 96, None, scales=s)
    vals, masks = kw.mask_layout
    assert masks.shape == (37, 12) and vals.numel() == 37 * 12 * kw.mask_n + 16
    assert all(bin(int(b)).count("1") == kw.mask_n for b in masks.flatten())   # exactly N8 of every 8
    x = torch.randn(96, generator=g)
    bias = torch.randn(37, generator=g)
    y = torch.empty(37)
    library().mask_linear(ptr(x), ptr(vals), ptr(masks), ptr(kw.scales), ptr(bias), ptr(y), 37, 96, kw.mask_n, 1)
    torch.testing.assert_close(y, kw.dense() @ x + bias, atol=1e-5, rtol=1e-5)


def test_mask_layout_only_for_int8_values_and_m_dividing_8():
    from sparsetx.formats.packed import pack_nm
    from sparsetx.kernels.nm_linear import KernelWeight
    from sparsetx.nm.mask import magnitude_scores, nm_mask
    from sparsetx.nm.pattern import NMPattern

    w = torch.randn(8, 48)
    for pattern, dtype, expect in (("2:4", torch.float32, False), ("2:6", torch.int8, False), ("2:4", torch.int8, True)):
        p = NMPattern.parse(pattern)
        kw = KernelWeight.from_packed(pack_nm(w * nm_mask(magnitude_scores(w), p), p, dtype))
        assert (kw.mask_layout is not None) == expect, pattern


@needs_kernels
def test_c_step_declines_what_it_does_not_read(llama):
    """A hook on a projection (the C step would skip it) or another MLP activation: no plan, and
    the step runs the layers through their modules (the hook fires once a layer and step)."""
    import copy

    from sparsetx.attention.fast_decode import FastStep

    model = copy.deepcopy(llama)
    calls = []
    handle = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: calls.append(1))
    ids = _ids(16, seed=2)
    out = streaming_pass(model, ids, DecoderConfig(kv_budget=6), 8)
    assert out.runtime.fast.plan() is None and out.runtime.fast.kv is not None
    assert len(calls) == 1 + 7                    # the prompt's forward, then 7 one-token steps
    handle.remove()
    model.config.hidden_act = "gelu"
    assert FastStep(out.runtime).plan() is None

"""Fused online-softmax attention and the runtime's top-k against their plain references."""
from __future__ import annotations

import pytest
import torch

from sparsetx.kernels.attention import fused_attention, reference_attention
from sparsetx.kernels.loader import library
from sparsetx.kernels.topk import topk_indices

# fp32 online softmax vs one softmax: differences are rounding only, |err| < 1e-5 for O(1) inputs
ATOL = 1e-5


BACKENDS = ["torch", pytest.param("c", marks=pytest.mark.skipif(library() is None, reason="no C kernel here"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [16, 128])
@pytest.mark.parametrize("lq", [1, 7, 40])
def test_fused_equals_reference_with_pruned_cache_and_gqa(rows, lq, backend):
    g = torch.Generator().manual_seed(lq)
    hq, hkv, lk, d = 6, 2, 153, 20  # d not a multiple of 8, keys across several blocks of 64
    q, k, v = (torch.randn(h, n, d, generator=g) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    # a KV cache after cascade pruning: kept positions with gaps; queries are the newest positions
    key_pos = torch.sort(torch.randperm(240, generator=g)[:lk]).values
    query_pos = key_pos[-lq:]
    out, received = fused_attention(q, k, v, 0.25, query_pos, key_pos, importance=True, rows=rows, backend=backend)
    ref_out, ref_received = reference_attention(q, k, v, 0.25, query_pos, key_pos)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(received, ref_received, atol=ATOL, rtol=0)
    # every query row's probabilities sum to 1: the received mass is heads x queries
    assert received.sum().item() == pytest.approx(hq * lq, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_without_mask_and_without_importance(backend):
    q, k, v = torch.randn(4, 9, 8), torch.randn(4, 300, 8), 3 * torch.randn(4, 300, 8)
    out, received = fused_attention(q, k, v, 8 ** -0.5, backend=backend)
    assert received is None
    torch.testing.assert_close(out, reference_attention(q, k, v, 8 ** -0.5)[0], atol=ATOL, rtol=0)
    # a later block with a much larger score rescales what the earlier blocks accumulated
    k2 = k.clone()
    k2[:, 250] = 40 * q[:, 0].mean(0)
    out, rec = fused_attention(q, k2, v, 8 ** -0.5, importance=True, backend=backend)
    ref, ref_rec = reference_attention(q, k2, v, 8 ** -0.5)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(rec, ref_rec, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="query heads do not divide"):
        fused_attention(torch.randn(3, 2, 8), k, v, 1.0)
    with pytest.raises(ValueError, match="both query_pos and key_pos"):
        fused_attention(q, k, v, 1.0, query_pos=torch.arange(9))


def stable_topk(scores, k):
    return torch.sort(-scores.double(), stable=True).indices[:k].sort().values


@pytest.mark.parametrize("backend", ["select", "torch"])
@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (257, 128), (1000, 999), (4096, 100)])
def test_topk_matches_a_stable_sort_including_ties(backend, n, k):
    if backend == "select" and library() is None:
        pytest.skip("C kernel could not be built here (no gcc?)")
    g = torch.Generator().manual_seed(n + k)
    scores = torch.randint(0, max(2, n // 4), (n,), generator=g).double()  # many ties
    got = topk_indices(scores, k, backend)
    assert torch.equal(got, stable_topk(scores, k))
    cont = torch.randn(n, generator=g, dtype=torch.float64)
    assert torch.equal(topk_indices(cont, k, backend), stable_topk(cont, k))


def test_topk_errors():
    with pytest.raises(ValueError, match="cannot keep 0 of 5"):
        topk_indices(torch.ones(5), 0)
    with pytest.raises(ValueError, match="NaN"):
        topk_indices(torch.tensor([1.0, float("nan")]), 1)
    with pytest.raises(ValueError, match="1-D"):
        topk_indices(torch.ones(2, 2), 1)


def _sparse_twin(model, pattern="2:8"):
    """(masked dense model, the same with SparseLinear layers)."""
    import copy

    from sparsetx.kernels.nm_linear import SparseLinear, to_sparse_linear
    from sparsetx.nm.prune import NMConfig, recorded_patterns, sparsify

    sparsify(model, NMConfig(pattern))
    fast = to_sparse_linear(copy.deepcopy(model), recorded_patterns(model))
    assert any(isinstance(m, SparseLinear) for m in fast.modules())
    return model, fast


def test_spatten_runtimes_run_on_sparse_linear_models_with_head_pruning():
    """Token and head pruning on N:M SparseLinear layers give what they give on the masked dense
    model (pruned heads' rows and columns handled without touching the packed weights)."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from sparsetx.attention.decoder import DecoderConfig, spatten_decoder
    from sparsetx.attention.encoder import SpAttenConfig, spatten

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=128)).eval()
    dense, fast = _sparse_twin(bert)
    cfg = SpAttenConfig(token_keep=[1, 1, 0.5, 0.5], head_keep=[1, 1, 0.5, 0.5])
    ids = torch.randint(5, 200, (1, 24))
    with torch.no_grad():
        with spatten(dense, cfg):
            ref = dense(input_ids=ids).last_hidden_state
        with spatten(fast, cfg):
            out = fast(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=96)).eval()
    dense, fast = _sparse_twin(llama)
    dcfg = DecoderConfig(kv_budget=12, head_keep=[1.0, 1.0, 0.5, 0.5])
    prompt = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with spatten_decoder(dense, dcfg):
            ref = dense.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        with spatten_decoder(fast, dcfg):
            out = fast.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=1e-4, rtol=0)


needs_c = pytest.mark.skipif(library() is None, reason="no C kernel here")


@needs_c
@pytest.mark.parametrize("d", [32, 24, 40])
@pytest.mark.parametrize("lq", [1, 7, 130])
def test_encoder_attention_equals_sdpa_with_padding_and_gqa(d, lq):
    """The blocked kernel (nm_cpu.c attention_encoder) on HF's strided (B, H, L, d) views: 6 query
    heads over 3 KV heads, keys not a multiple of 16, partial query blocks, d with a 32-wide tail of
    8 or 16, and padding keys (-inf bias), one batch row padded everywhere but one key, against
    SDPA with the same boolean mask."""
    from sparsetx.kernels.attention import encoder_attention

    g = torch.Generator().manual_seed(d + lq)
    b, h, hkv, lk = 3, 6, 3, 37
    q = torch.randn(b, lq, h, d, generator=g).transpose(1, 2)            # strided, as HF passes them
    kv = torch.randn(b, lk, 2, hkv, d, generator=g)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    keep = torch.ones(b, lk, dtype=torch.bool)
    keep[1, 20:] = False
    keep[2, 1:] = False
    bias = torch.zeros(b, lk).masked_fill_(~keep, -torch.inf)
    out, received = encoder_attention(q, k, v, 0.3, bias)
    assert received is None and out.shape == (b, lq, h, d) and out.is_contiguous()
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=keep[:, None, None, :], scale=0.3)
    torch.testing.assert_close(out, want.transpose(1, 2), atol=ATOL, rtol=0)
    # d not a multiple of 8: not this kernel's shape
    assert encoder_attention(q[..., :20], k[..., :20], v[..., :20], 0.3) is None


@needs_c
@pytest.mark.parametrize("d, lq, lk", [(32, 130, 37), (24, 7, 512), (40, 1, 16), (64, 13, 1100)])
def test_int8_attention_equals_its_reference_and_stays_near_fp32(d, lq, lk):
    """bits 8 (int8 Q, K per row, V per channel, 14-bit probabilities, integer products) equals
    its PyTorch twin within one probability step per key, on HF's strided views with GQA and
    padding keys (one row padded but for one key), d with a 32-wide tail, more than 1024 keys
    (the P V sums go in chunks of 1024 so int32 cannot overflow); and, for scores of unit spread,
    it stays within 1 % of the largest |v| of exact fp32 attention, cosine > 0.9998 (scores four
    times wider, a peakier softmax, measured 2.6 %). Every row's probabilities sum to one."""
    from sparsetx.kernels.attention import encoder_attention, reference_int8_attention

    g = torch.Generator().manual_seed(d + lq + lk)
    b, h, hkv = 2, 4, 2
    q = torch.randn(b, lq, h, d, generator=g).transpose(1, 2)
    kv = torch.randn(b, lk, 2, hkv, d, generator=g) * torch.tensor([1.0, 2.0])[:, None, None]
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    keep = torch.ones(b, lk, dtype=torch.bool)
    keep[1, 1:] = False
    bias = torch.zeros(b, lk).masked_fill_(~keep, -torch.inf)
    out, _ = encoder_attention(q, k, v, d ** -0.5, bias, bits=8)
    want = reference_int8_attention(q, k, v, d ** -0.5, bias).transpose(1, 2)
    vmax = v.abs().max().item()
    torch.testing.assert_close(out, want, atol=2e-3 * vmax, rtol=0)
    exact = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=keep[:, None, None, :], scale=d ** -0.5)
    exact = exact.transpose(1, 2)
    assert (out - exact).abs().max() < 0.01 * vmax
    assert torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.9998
    torch.testing.assert_close(out[1], v[1, :, :1].repeat_interleave(2, 0).transpose(0, 1).expand(lq, h, d),
                               atol=vmax / 254 + 1e-6, rtol=0)   # one key kept: its value, rounded to int8
    if lq > 1:
        _, received = encoder_attention(q[:1], k[:1], v[:1], d ** -0.5, None, importance=True, bits=8)
        assert abs(received.sum().item() - h * lq) < 1e-6 * h * lq


@needs_c
def test_int8_attention_bad_bits_and_a_row_masked_everywhere():
    from sparsetx.kernels.attention import encoder_attention

    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="attention bits 4"):
        encoder_attention(q, q, q, 0.3, bits=4)
    out, _ = encoder_attention(q, q, q, 0.3, torch.full((1, 5), -torch.inf), bits=8)
    assert torch.equal(out, torch.zeros_like(out))   # no key to attend to: zeros, as the fp32 kernel gives


@needs_c
def test_many_query_rows_without_mask_take_the_blocked_kernel_with_importance(monkeypatch):
    """fused_attention with many rows and no positions (SpAtten's encoder) runs encoder_attention,
    received probabilities included; its result equals the reference and the strips route."""
    from sparsetx.kernels import attention

    calls = []
    real = attention.encoder_attention
    monkeypatch.setattr(attention, "encoder_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(4, 50, 32, generator=g), torch.randn(4, 50, 32, generator=g), torch.randn(4, 50, 32, generator=g)
    out, received = attention.fused_attention(q, k, v, 0.2, importance=True)
    assert calls == [1]
    ref_out, ref_received = reference_attention(q, k, v, 0.2)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(received, ref_received, atol=ATOL, rtol=0)
    torch.testing.assert_close(attention.fused_attention(q, k, v, 0.2, importance=True, backend="torch")[0], out,
                               atol=ATOL, rtol=0)


@needs_c
def test_fast_encoder_uses_the_blocked_attention_and_equals_sdpa(tmp_path):
    """A packed BERT loaded fast switches to the "sparsetx" attention; with a padded batch its logits
    equal the same model on transformers' SDPA (fp32 values: nothing else differs), eager and
    under torch.compile without a graph break."""
    from torch._dynamo.utils import counters

    from conftest import tiny_packed_bert

    from sparsetx.models import load_model

    folder = tmp_path / "m"
    tiny_packed_bert(folder, 100, "float32")
    fast = load_model(folder, fast=True)
    assert fast.config._attn_implementation == "sparsetx"
    sdpa = load_model(folder, fast=True)
    sdpa.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 100, (3, 21))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, 4:] = 0
    with torch.inference_mode():
        want = sdpa(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask).logits, want, atol=ATOL, rtol=0)
        counters.clear()
        compiled = load_model(folder, fast=True, compile=True)
        torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask).logits, want, atol=ATOL, rtol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])


@needs_c
def test_causal_lms_keep_their_attention():
    """use_encoder_attention leaves a causal LM alone (its prefill is causal; its config does not
    say is_decoder) and switches an encoder."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from sparsetx.kernels.attention import use_encoder_attention

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = llama.config._attn_implementation
    assert not use_encoder_attention(llama) and llama.config._attn_implementation == before
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4))
    assert use_encoder_attention(bert) and bert.config._attn_implementation == "sparsetx"

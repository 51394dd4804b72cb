"""True positions under eviction: prefill, streamed evaluation and generate() give every token its
place in the sequence however many tokens the cache evicted, for Llama's RoPE and GPT-2's learned
positions. Before this was fixed, streamed tokens all sat at the pruned cache's length."""
from __future__ import annotations

import gc

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import needs_smollm2
from sparsetx.adapters import family_of
from sparsetx.attention.decoder import DecoderConfig, spatten_decoder
from sparsetx.attention.decoder_eval import streaming_pass


def _llama(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval().to(dtype)


def _gpt2(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_positions=128, n_embd=48, n_layer=3, n_head=4)
    return GPT2LMHeadModel(cfg).eval().to(dtype)


def _ids(n, seed=0, vocab=128):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


class PositionSpy:
    """Records the position ids each forward hands to the position source: Llama's rotary
    embedding (whose cos/sin the attention receives) or GPT-2's learned position table."""

    def __init__(self, model):
        base = family_of(model).base(model)
        self.calls: list[list[int]] = []
        source = base.rotary_emb if hasattr(base, "rotary_emb") else base.wpe
        self.handle = source.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        ids = kwargs.get("position_ids", args[-1] if args else kwargs.get("input"))
        self.calls.append(ids.reshape(-1).tolist())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _generate(model, ids, config, new):
    """Greedy generate() under the runtime; returns (tokens, per-step logits, positions, runtime)."""
    with PositionSpy(model) as spy, torch.no_grad(), spatten_decoder(model, config) as rt:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.cat(out.logits), spy.calls, rt


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_streamed_equals_full_forward_when_nothing_is_evicted(make):
    """(a) Budget >= context: the streamed runtime equals the model's one full forward. In float64
    only summation order differs (measured ~1e-12), so 1e-8 is tight; fp32 gets 1e-4."""
    for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 1e-4)):
        model = make(dtype)
        ids = _ids(40, seed=1)
        with torch.no_grad():
            full = model(input_ids=ids).logits[0, 9:-1]
        for policy in ("cascade", "h2o", "window", "sink"):
            got = streaming_pass(model, ids, DecoderConfig(kv_budget=40, policy=policy), prefill=10, keep_logits=True)
            torch.testing.assert_close(got.logits, full, atol=tol, rtol=tol)
            assert all(s["tokens_after"] == s["tokens"] for step in got.runtime.stats for s in step)


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_streamed_positions_equal_generate_positions_under_eviction(make):
    """(b) With a budget of 8 after a 20-token prompt, generate() and the streamed evaluation hand
    the same true positions (0..19, then 20, 21, ...) to RoPE / the position table, and so compute
    the same logits, while the caches hold 8 tokens."""
    model = make()
    prompt, new = _ids(20, seed=2), 10
    config = DecoderConfig(kv_budget=8, policy="cascade")
    tokens, gen_logits, gen_positions, rt = _generate(model, prompt, config, new)
    assert max(s["tokens_after"] for s in rt.stats[-1]) == 8                  # eviction happened
    expected = [list(range(20))] + [[t] for t in range(20, 20 + new - 1)]
    assert gen_positions == expected
    assert [q.tolist() for q in rt.query_positions] == expected

    with PositionSpy(model) as spy:
        streamed = streaming_pass(model, tokens, config, prefill=20, keep_logits=True)
    assert spy.calls == expected
    torch.testing.assert_close(streamed.logits, gen_logits, atol=1e-5, rtol=1e-5)  # same code, same tokens
    assert streamed.preds == tokens[0, 20:].tolist()


def test_sink_with_budget_at_least_the_context_is_exactly_dense():
    """(c) StreamingLLM's sink policy with a budget that holds the whole context evicts nothing:
    bit-identical to the unpruned runtime, and generate() gives the dense model's tokens."""
    model = _llama()
    ids = _ids(24, seed=3)
    with torch.no_grad():
        dense = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                               do_sample=False, pad_token_id=0)
    sink, _, _, rt = _generate(model, ids, DecoderConfig(kv_budget=32, policy="sink", sink_tokens=4), 8)
    assert torch.equal(sink, dense)
    assert all(s["tokens_after"] == s["tokens"] for step in rt.stats for s in step)
    a = streaming_pass(model, dense, DecoderConfig(kv_budget=32, policy="sink"), prefill=24, keep_logits=True)
    b = streaming_pass(model, dense, DecoderConfig(), prefill=24, keep_logits=True)
    assert torch.equal(a.logits, b.logits)


def test_sink_under_eviction_keeps_true_positions():
    """The sink policy at a small budget: the kept tokens are the sinks and the newest, and each
    new token still sits at its true position (the old bug put every streamed token at the budget)."""
    model = _llama()
    ids = _ids(30, seed=4)
    with PositionSpy(model) as spy:
        out = streaming_pass(model, ids, DecoderConfig(kv_budget=8, policy="sink", sink_tokens=2), prefill=10)
    assert spy.calls == [list(range(10))] + [[t] for t in range(10, 29)]
    assert all(sorted(p.tolist()) == [0, 1, 23, 24, 25, 26, 27, 28] for p in out.runtime.positions)  # slots: any order


def test_a_new_cache_is_a_new_sequence_even_when_python_reuses_its_id():
    model = _llama()
    seen = []
    with torch.no_grad(), spatten_decoder(model, DecoderConfig(kv_budget=6)) as rt:
        for n in (12, 5, 9):
            cache = DynamicCache()
            kw = family_of(model).cache_kwargs(model, cache)
            model(input_ids=_ids(n, seed=n), use_cache=True, **kw)
            model(input_ids=_ids(1, seed=99), use_cache=True, **kw)
            seen.append((rt.seen, [q.tolist() for q in rt.query_positions], len(rt.stats)))
            del cache, kw
            gc.collect()
    assert seen == [(13, [list(range(12)), [12]], 2), (6, [list(range(5)), [5]], 2), (10, [list(range(9)), [9]], 2)]


def test_a_cache_filled_without_the_runtime_continues_at_its_length():
    model = _llama()
    ids = _ids(16, seed=5)
    cache = DynamicCache()
    kw = family_of(model).cache_kwargs(model, cache)
    with torch.no_grad():
        model(input_ids=ids[:, :12], use_cache=True, **kw)
        ref = model(input_ids=ids[:, 12:], use_cache=True, **{**kw}).logits
    cache = DynamicCache()
    kw = family_of(model).cache_kwargs(model, cache)
    with torch.no_grad():
        model(input_ids=ids[:, :12], use_cache=True, **kw)
        with spatten_decoder(model, DecoderConfig()) as rt:
            got = model(input_ids=ids[:, 12:], use_cache=True, **kw).logits
    assert rt.query_positions[0].tolist() == [12, 13, 14, 15]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_padding_and_batches_are_refused():
    model = _llama()
    with torch.no_grad(), spatten_decoder(model):
        with pytest.raises(ValueError, match="padding"):
            model(input_ids=_ids(6), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]))
        with pytest.raises(ValueError, match="batch size 1"):
            model(input_ids=torch.zeros(2, 4, dtype=torch.long))


@needs_smollm2
@pytest.mark.integration
def test_smollm2_positions_and_full_forward():
    """SmolLM2-135M: (a) budget >= context equals the full forward: float64 within 1e-4 (measured
    ~1e-10); fp32 within 5e-4, since transformers' own cached path differs from its full forward by
    1.4e-4 on this text (30 layers of fp32); a position off by one moves logits by > 0.1.
    (b) streamed positions and logits equal generate()'s under a budget of 12."""
    from test_smollm2 import TEXT

    from sparsetx.models import load_model, load_tokenizer

    model, tok = load_model("smollm2"), load_tokenizer("smollm2")
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :40]
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, 15:-1]
    got = streaming_pass(model, ids, DecoderConfig(kv_budget=40), prefill=16, keep_logits=True)
    torch.testing.assert_close(got.logits, full, atol=5e-4, rtol=1e-4)

    tokens, gen_logits, gen_positions, rt = _generate(model, ids[:, :24], DecoderConfig(kv_budget=12), 8)
    assert gen_positions == [list(range(24))] + [[t] for t in range(24, 31)]
    with PositionSpy(model) as spy:
        streamed = streaming_pass(model, tokens, DecoderConfig(kv_budget=12), prefill=24, keep_logits=True)
    assert spy.calls == gen_positions
    torch.testing.assert_close(streamed.logits, gen_logits, atol=1e-4, rtol=1e-4)

    model = model.double()
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, 15:-1]
    got = streaming_pass(model, ids, DecoderConfig(kv_budget=40), prefill=16, keep_logits=True)
    torch.testing.assert_close(got.logits, full, atol=1e-4, rtol=1e-4)

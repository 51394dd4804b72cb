"""SpAtten decoder runtime on a tiny grouped-query Llama: identity, KV-cache eviction during
generate(), the cascade, baselines, progressive quantization, errors."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsetx.attention.decoder import DecoderConfig, SpAttenDecoder, spatten_decoder
from sparsetx.attention.importance import select_kept


def _prompt(n=20, seed=0):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_unpruned_equals_the_model(llama):
    ids = _prompt()
    with torch.no_grad():
        ref_logits = llama(input_ids=ids).logits
        ref = llama.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
        with spatten_decoder(llama, DecoderConfig()):
            logits = llama(input_ids=ids).logits
            out = llama.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)  # fp32, other op order
    assert torch.equal(out, ref)
    assert all("forward" not in m.self_attn.__dict__ for m in llama.model.layers)  # model unchanged


def test_cache_shrinks_during_generate_and_cascade_holds(llama):
    ids = _prompt(20)
    snapshots = []
    with spatten_decoder(llama, DecoderConfig(kv_budget=8, fast_step=False)) as rt:   # per layer (fast: test_fast_decode.py)
        original = rt._evict

        def spy(layer, cache, idx, q_pos):
            original(layer, cache, idx, q_pos)
            assert cache.layers[idx].keys.shape[-2] == rt.positions[layer].numel()
            if layer == len(rt.attn) - 1:
                snapshots.append([set(p.tolist()) for p in rt.positions])

        rt._evict = spy
        llama.generate(input_ids=ids, max_new_tokens=6, do_sample=True, top_k=5)
    assert len(snapshots) == 6  # prompt + 5 decode forwards (the 6th token needs no forward)
    for step, sets in enumerate(snapshots):
        assert all(len(s) <= 8 for s in sets)
        for upper, lower in zip(sets, sets[1:]):
            assert lower <= upper  # cascade: a token dropped at layer i is absent from later layers
    for before, after in zip(snapshots, snapshots[1:]):
        newest = max(max(s) for s in after)
        for b, a in zip(before, after):
            assert a - {newest} <= b  # evicted tokens never come back
            assert newest in a        # the newest token is always kept


def test_window_and_sink_policies(llama):
    ids = _prompt(16)
    with torch.no_grad():
        with spatten_decoder(llama, DecoderConfig(kv_budget=6, policy="window")) as rt:
            llama(input_ids=ids, use_cache=True)
        assert all(p.tolist() == list(range(10, 16)) for p in rt.positions)
        with spatten_decoder(llama, DecoderConfig(kv_budget=6, policy="sink", sink_tokens=2)) as rt:
            llama(input_ids=ids, use_cache=True)
        assert all(p.tolist() == [0, 1, 12, 13, 14, 15] for p in rt.positions)


def test_h2o_is_per_layer_and_cascade_is_shared(llama):
    ids = _prompt(24, seed=3)
    with torch.no_grad(), spatten_decoder(llama, DecoderConfig(kv_budget=10, policy="h2o")) as rt:
        llama(input_ids=ids, use_cache=True)
    h2o_sets = [set(p.tolist()) for p in rt.positions]
    assert all(len(s) == 10 for s in h2o_sets)
    with torch.no_grad(), spatten_decoder(llama, DecoderConfig(kv_budget=10)) as rt:
        llama(input_ids=ids, use_cache=True)
    # cumulative importance: layer 0's choice is by its own scores, later ones by the sum over layers
    assert torch.allclose(rt.importance, sum(rt.layer_importance))
    assert rt.importance.sum().item() == pytest.approx(4 * 4 * 24, rel=1e-6)  # layers x heads x queries


def test_progressive_quantization_counts(llama):
    ids = _prompt(12)
    with torch.no_grad():
        with spatten_decoder(llama, DecoderConfig.quantized(requant_threshold=0.0)) as rt:
            llama(input_ids=ids, use_cache=True)
        s = rt.stats[0][0]
        assert s["rows_refetched"] == 0 and s["k_bytes_lsb_refetch"] == 0
        assert s["k_bytes_msb"] == 2 * 12 * 16 * 8 / 8  # kv heads x tokens x head dim x 8 MSB bits
        assert s["v_bytes"] == 2 * 12 * 16 * 8 / 8
        assert s["kv_bytes_fp16"] == 2 * 2 * 2 * 12 * 16
        with spatten_decoder(llama, DecoderConfig.quantized(requant_threshold=1.0)) as rt:
            full = llama(input_ids=ids, use_cache=True).logits
        s = rt.stats[0][0]
        # every row but the first query's (it attends to one token: max probability exactly 1.0)
        assert s["rows"] == 12 * 4 and s["rows_refetched"] == 12 * 4 - 4
        assert s["k_bytes_lsb_refetch"] == 2 * 12 * 16 * 4 / 8
        ref = llama(input_ids=ids).logits
    # 12-bit keys and 8-bit values: close to fp32, not equal
    assert 0 < (full - ref).abs().max() < 0.05


def test_bad_inputs(llama):
    with pytest.raises(ValueError, match="outside"):
        DecoderConfig(token_keep=1.5)
    with pytest.raises(ValueError, match="kv_budget"):
        DecoderConfig(kv_budget=1)
    with pytest.raises(ValueError, match="unknown policy"):
        DecoderConfig(policy="lru")
    with pytest.raises(ValueError, match="lsb_bits"):
        DecoderConfig(k_bits=4, lsb_bits=4)
    with pytest.raises(ValueError, match="no adapter for Sequential"):
        SpAttenDecoder(torch.nn.Sequential(torch.nn.Linear(2, 2)), DecoderConfig())
    with pytest.raises(ValueError, match="batch size 1"), torch.no_grad(), spatten_decoder(llama):
        llama(input_ids=torch.zeros(2, 4, dtype=torch.long), use_cache=True)


def test_gpt2_from_config():
    """GPT-2 (random weights from its config, as the simulators use it): identity and eviction."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=128, n_embd=48, n_layer=3, n_head=4)).eval()
    ids = _prompt(18, seed=5)
    with torch.no_grad():
        ref = gpt2.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        ref_logits = gpt2(input_ids=ids).logits
        with spatten_decoder(gpt2, DecoderConfig()):
            out = gpt2.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
            logits = gpt2(input_ids=ids).logits
        with spatten_decoder(gpt2, DecoderConfig(kv_budget=6)) as rt:
            gpt2.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert all(s["tokens_after"] <= 6 for step in rt.stats for s in step)
    assert rt.stats_document()["model"]["family"] == "gpt2"


def test_head_pruning_shrinks_cache_heads_and_cascades(llama):
    ids = _prompt(16, seed=7)
    cfg = DecoderConfig(head_keep=[1.0, 1.0, 0.5, 0.5])   # 2 KV heads -> 1 in layers 2 and 3
    with torch.no_grad(), spatten_decoder(llama, cfg) as rt:
        llama.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert [len(a) for a in rt.alive] == [2, 2, 1, 1]
    assert set(rt.alive[3].tolist()) <= set(rt.alive[2].tolist())   # cascade over layers
    last = rt.stats[-1]
    assert [s["heads"] for s in last] == [4, 4, 2, 2]                # query heads = KV heads x group of 2
    assert [s["kv_heads"] for s in last] == [2, 2, 1, 1]
    # GQA pooling: a KV head's score is the summed output magnitude of the query heads that share it
    assert rt.head_scores.shape == (2,) and (rt.head_scores > 0).all()
    kept = int(rt.alive[2][0])
    assert rt.head_scores[kept] >= rt.head_scores[1 - kept]


def test_head_pruned_cache_tensors(llama):
    from transformers import DynamicCache

    from sparsetx.adapters import family_of

    cache = DynamicCache()
    kw = family_of(llama).cache_kwargs(llama, cache)
    with torch.no_grad(), spatten_decoder(llama, DecoderConfig(head_keep=[1.0, 0.5, 0.5, 0.5])):
        llama(input_ids=_prompt(10), use_cache=True, **kw)
        llama(input_ids=_prompt(1, seed=9), use_cache=True, **kw)
    assert [layer.keys.shape[1] for layer in cache.layers] == [2, 1, 1, 1]


def test_local_value_pruning_in_decoder(llama):
    """Layer 0's attention output under local value pruning equals a hand computation from
    transformers' own pieces (RoPE, GQA repeat): per query row, only the V rows of the
    ceil(0.25 x 20) = 5 most probable keys enter P V."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    ids = _prompt(20)
    attn = llama.model.layers[0].self_attn
    seen = {}
    handle = attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=kwargs["hidden_states"], out=out[0]),
                                        with_kwargs=True)
    try:
        with torch.no_grad():
            ref = llama(input_ids=ids).logits
            with spatten_decoder(llama, DecoderConfig(value_topk=0.25)) as rt:
                got = llama(input_ids=ids, use_cache=True).logits
    finally:
        handle.remove()
    s = rt.stats[0][1]
    assert s["values_fetched_rows"] == 5 * 20 * 4   # ceil(0.25 * 20) rows x 20 queries x 4 query heads
    x, d = seen["x"], attn.head_dim
    with torch.no_grad():
        q, k, v = (lin(x).view(1, 20, -1, d).transpose(1, 2) for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
        cos, sin = llama.model.rotary_emb(x, torch.arange(20)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        scores = (q @ k.transpose(-1, -2)) * d ** -0.5
        probs = scores.masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), -torch.inf).softmax(-1)
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, probs.topk(5, dim=-1).indices, True)
        expected = attn.o_proj(((probs * keep) @ v).transpose(1, 2).reshape(1, 20, -1))
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)
    assert (got - ref).abs().max() > 1e-3           # and it is an approximation: the logits move


def test_long_prompt_is_chunked_and_exact():
    """A prompt longer than the query chunk (128) gives the same logits and importance as one chunk."""
    import sparsetx.attention.decoder as dec

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with spatten_decoder(model, DecoderConfig()) as rt:
            got = model(input_ids=ids, use_cache=True).logits
        chunked = rt.importance.clone()
        old, dec.QUERY_CHUNK = dec.QUERY_CHUNK, 1024
        try:
            with spatten_decoder(model, DecoderConfig()) as rt:
                model(input_ids=ids, use_cache=True)
        finally:
            dec.QUERY_CHUNK = old
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # fp32 column sums taken per chunk vs at once: summation order only (~1e-7 relative)
    torch.testing.assert_close(chunked, rt.importance, atol=1e-5, rtol=1e-6)


def test_policy_objects_counts_and_recent_window(llama):
    """Policies as objects: query counts by hand, normalised importance, a protected recent window."""
    from sparsetx.attention.policies import Cascade, H2O, Sink, resolve_policy

    ids = _prompt(16, seed=11)
    with torch.no_grad(), spatten_decoder(llama, DecoderConfig(kv_budget=6, policy=Cascade(normalize=True))) as rt:
        llama(input_ids=ids, use_cache=True)
    # during the prompt each token t is seen by the 16 - t queries at or after it, in each layer it
    # sits in before eviction: all four (eviction comes after each layer's attention)
    torch.testing.assert_close(rt.query_count, (16 - torch.arange(16)).double() * 4)
    normalised = rt.importance / rt.query_count
    assert set(rt.positions[0].tolist()) - {15} <= set(normalised.topk(7).indices.tolist())
    with torch.no_grad(), spatten_decoder(llama, DecoderConfig(kv_budget=6, policy=Cascade(recent=4))) as rt:
        llama(input_ids=ids, use_cache=True)
    assert all({12, 13, 14, 15} <= set(p.tolist()) for p in rt.positions)       # the 4 newest always stay
    with torch.no_grad(), spatten_decoder(llama, DecoderConfig(kv_budget=6, policy=H2O(recent=2))) as rt:
        llama(input_ids=ids, use_cache=True)
    assert all({14, 15} <= set(p.tolist()) and len(p) == 6 for p in rt.positions)
    assert resolve_policy("sink", sink_tokens=2) == Sink(sink_tokens=2)
    with pytest.raises(ValueError, match="recent window -1"):
        Cascade(recent=-1)


def test_evict_after_forward_ranks_by_every_layer():
    """evict_after="forward" (the default): the cut comes after all layers, so even layer 0 keeps
    the top tokens of the importance over every layer; "layer" cuts layer 0 by its own scores. The
    default cascade ranks per query that saw a token; normalize=False ranks by the raw sum. A model
    with peaked random attention (init 0.5) makes the four choices differ."""
    from sparsetx.attention.policies import Cascade

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, initializer_range=0.5)
    model = LlamaForCausalLM(cfg).eval()
    ids = _prompt(24, seed=12)
    chosen = {}
    for evict_after in ("forward", "layer"):
        for normalize in (True, False):
            config = DecoderConfig(kv_budget=8, evict_after=evict_after, policy=Cascade(normalize=normalize))
            with torch.no_grad(), spatten_decoder(model, config) as rt:
                model(input_ids=ids, use_cache=True)
            # the whole prompt is new: nothing protected; the cascade with a constant budget keeps
            # layer 0's set in every layer
            assert all(torch.equal(p, rt.positions[0]) for p in rt.positions)
            if evict_after == "forward":
                scores = rt.importance / rt.query_count if normalize else rt.importance
            else:
                scores = rt.layer_importance[0] / rt.layer_query_count[0] if normalize else rt.layer_importance[0]
            assert rt.positions[0].tolist() == select_kept(scores, 8).tolist()
            chosen[evict_after, normalize] = tuple(rt.positions[0].tolist())
            assert [s["tokens_after"] for s in rt.stats[0]] == [8] * 4 and [s["tokens"] for s in rt.stats[0]] == [24] * 4
    assert len(set(chosen.values())) == 4
    assert DecoderConfig().evict_after == "forward" and Cascade().normalize


def test_per_layer_budgets(llama):
    ids = _prompt(20, seed=13)
    cache_budgets = [12, 10, 8, 6]
    with torch.no_grad(), spatten_decoder(llama, DecoderConfig(kv_budget=cache_budgets)) as rt:
        llama.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert [len(p) for p in rt.positions] == cache_budgets
    for upper, lower in zip(rt.positions, rt.positions[1:]):
        assert set(lower.tolist()) <= set(upper.tolist())
    with pytest.raises(ValueError, match="3 budgets for a model with 4 layers"):
        SpAttenDecoder(llama, DecoderConfig(kv_budget=[8, 8, 8]))
    with pytest.raises(ValueError, match="evict_after"):
        DecoderConfig(evict_after="step")

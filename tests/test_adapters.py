"""The family adapters: where each supported family keeps its blocks, the transformers-version
differences handled in one place, and clear errors for families sparsetx does not run."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, DynamicCache, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, MPNetConfig, MPNetModel)

from sparsetx.adapters import (UnsupportedModelError, config_gated_ffn, config_is_decoder, family_of, find_family,
                               model_task)
from sparsetx.attention.decoder import DecoderConfig, spatten_decoder
from sparsetx.attention.encoder import SpAttenConfig, spatten
from sparsetx.hw.workload import ModelShape
from sparsetx.nm.select import block_linears


def _bert():
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64)).eval()


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48)).eval()


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()


def _mpnet():
    return MPNetModel(MPNetConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64)).eval()


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, head_dim=8, intermediate_size=48)).eval()


def test_each_family_knows_where_its_blocks_and_attention_live():
    bert, llama, gpt2 = _bert(), _llama(), _gpt2()
    assert family_of(bert).block_list(bert)[0] == "bert.encoder.layer"
    assert family_of(llama).block_list(llama)[0] == "model.layers"
    assert family_of(gpt2).block_list(gpt2)[0] == "transformer.h"
    assert family_of(llama.model).block_list(llama.model)[0] == "layers"        # a bare body too
    blocks = family_of(bert).encoder_blocks(bert)
    assert blocks[1].q is bert.bert.encoder.layer[1].attention.self.query
    assert blocks[1].ffn_out is bert.bert.encoder.layer[1].output.dense
    fam = family_of(llama)
    assert fam.attention_modules(llama) == [layer.self_attn for layer in llama.model.layers]
    assert fam.heads(llama.model.layers[0].self_attn) == (4, 2, 8)
    assert fam.positions == "rope" and family_of(gpt2).positions == "absolute"
    assert family_of(gpt2).heads(gpt2.transformer.h[0].attn) == (4, 4, 8)
    # the N:M default layers come from the same block lists
    assert block_linears(llama)[:4] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    assert len(block_linears(llama)) == 2 * 7 and len(block_linears(bert)) == 2 * 6


def test_gpt2_scale_is_derived_from_the_config():
    """transformers 5.0's GPT2Attention has no ``scaling`` attribute; the adapter derives it from
    the config. The reference is transformers' eager attention: 5.0's sdpa path ignores
    ``scale_attn_by_inverse_layer_idx`` (later releases fixed it), eager applies it in every release."""
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=3, n_head=4, scale_attn_by_inverse_layer_idx=True)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").eval()
    fam = family_of(model)
    assert [fam.scaling(a) for a in fam.attention_modules(model)] == pytest.approx(
        [8 ** -0.5 / (i + 1) for i in range(3)])
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with spatten_decoder(model):
            got = model(input_ids=ids, use_cache=True).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_cache_keyword_follows_the_installed_transformers():
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; the adapter picks the name the
    installed release takes, so sparsetx's own calls raise no deprecation warning on either."""
    model = _llama()
    cache = DynamicCache()
    kw = family_of(model).cache_kwargs(model, cache)
    params = inspect.signature(model.model.forward).parameters
    assert list(kw) == ["cache" if "cache" in params else "past_key_values"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **kw)
    assert family_of(model).cache_length(cache, 0) == 3
    assert family_of(model).cache_of({"past_key_values": cache}) is cache
    assert family_of(model).cache_of({"cache": cache, "past_key_values": None}) is cache


def test_unsupported_families_fail_clearly():
    mpnet, gemma = _mpnet(), _gemma3()
    with pytest.raises(UnsupportedModelError, match=r"no adapter for MPNetModel \(model_type 'mpnet'\); "
                                                     r"supported families: bert \(encoder\), llama \(decoder\), gpt2"):
        with spatten(mpnet, SpAttenConfig(token_keep=0.5)):
            pass
    with pytest.raises(UnsupportedModelError, match=r"no adapter for Gemma3ForCausalLM"):
        with spatten_decoder(gemma, DecoderConfig(kv_budget=8)):
            pass
    with pytest.raises(UnsupportedModelError, match=r"BertForSequenceClassification is a bert encoder; this needs a decoder"):
        spatten_decoder(_bert()).__enter__()
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM is a llama decoder; this needs an encoder"):
        spatten(_llama()).__enter__()
    assert find_family(mpnet) is None and find_family(gemma.config) is None
    # N:M pruning does not need a family: MPNet's block Linears are found by the generic rule
    assert block_linears(mpnet)[0].startswith("encoder.layer.0.")


def test_model_tasks_and_simulator_shapes():
    assert (model_task(_bert()), model_task(_llama()), model_task(_gpt2()), model_task(_mpnet())) == \
        ("classifier", "causal-lm", "causal-lm", "encoder")
    from transformers import ViTConfig

    assert config_is_decoder(LlamaConfig()) and config_is_decoder(GPT2Config())
    assert not config_is_decoder(BertConfig()) and not config_is_decoder(ViTConfig())
    assert config_gated_ffn(LlamaConfig()) and not config_gated_ffn(GPT2Config())
    shape = ModelShape.from_config(_llama().config)
    assert shape.decoder and shape.gated_ffn and shape.kv_heads == 2

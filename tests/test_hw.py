"""Simulator foundations: exact operation counts from configs; the top-k engine's cycles."""
from __future__ import annotations

import math

import numpy as np
import pytest
from transformers import BertConfig, GPT2Config

from sparsetx.hw.topk import TopKEngine
from sparsetx.hw.workload import ModelShape, model_ops, weight_bytes


def test_bert_base_macs_by_hand():
    shape = ModelShape.from_config(BertConfig())  # 12 x 768, 12 heads, FFN 3072
    assert shape == ModelShape.from_config("bert-base")
    ops = model_ops(shape, tokens=128)
    per_layer_linear = 128 * (4 * 768 * 768 + 2 * 768 * 3072)
    per_layer_attn = 2 * 12 * 128 * 128 * 64
    assert sum(o.macs for o in ops if o.kind != "softmax") == 12 * (per_layer_linear + per_layer_attn)
    sparse = model_ops(shape, tokens=128, pattern="2:8")
    assert sum(o.macs for o in sparse if o.kind == "sparse_dense") == 12 * per_layer_linear // 4
    assert sum(o.macs for o in sparse if o.kind == "dense_dense") == 12 * per_layer_attn


def test_gpt2_medium_from_config_and_token_keep():
    shape = ModelShape.from_config(GPT2Config(n_embd=1024, n_layer=24, n_head=16))
    assert shape == ModelShape.from_config("gpt2-medium") and shape.decoder
    ops = model_ops(shape, 100, token_keep=[1.0] * 12 + [0.5] * 12)
    assert {o.m for o in ops if o.layer == 0} == {100} and {o.m for o in ops if o.layer == 23} == {50}
    with pytest.raises(ValueError, match="not divisible by M=7"):
        model_ops(shape, 10, pattern="2:7")
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelShape.from_config("gpt5")


def test_weight_bytes_packed():
    shape = ModelShape.from_config("bert-base")
    dense = weight_bytes(shape)
    assert dense == 12 * (4 * 768 * 768 + 2 * 768 * 3072) * 2
    assert dense / weight_bytes(shape, "1:8") == pytest.approx(6.74, abs=0.01)


def test_topk_hand_worked_case():
    """n = 8, P = 4: values 8..1 reversed order, k = 3; pivots chosen by a fixed generator."""
    eng = TopKEngine(comparators=4)
    values = np.array([3, 8, 1, 6, 5, 2, 7, 4])

    class Pivots:  # always pick the first candidate as pivot
        def integers(self, n):
            return 0

    idx, cycles = eng.select(values, 3, Pivots())
    assert values[idx].tolist() == [8, 6, 7]  # the 3 largest, original order
    # round 1: 8 candidates, pivot 3 -> 5 greater: recurse into [8, 6, 5, 7, 4] (2 + 3 cycles)
    # round 2: 5 candidates, pivot 8 -> 0 greater, 1 equal, recurse smaller [6, 5, 7, 4] for rank 2 (2 + 3)
    # round 3: 4 candidates, pivot 6 -> 1 greater (7), equal 6: threshold found (1 + 3)
    # final pass over 8: 2 + 3
    assert cycles == (2 + 3) + (2 + 3) + (1 + 3) + (2 + 3)


def test_topk_ties_and_errors():
    eng = TopKEngine()
    idx, _ = eng.select(np.array([1.0, 2.0, 2.0, 2.0, 0.5]), 2, np.random.default_rng(0))
    assert idx.tolist() == [1, 2]  # first ties in order
    with pytest.raises(ValueError, match="k=9"):
        eng.select(np.zeros(4), 9, np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least 1 comparator"):
        TopKEngine(comparators=0)


def test_topk_average_matches_the_paper():
    """SEEDS.md: n = 1024, k = 512, P = 16: about 250 cycles on average."""
    rounds = TopKEngine().mean_cycles(1024, 512, trials=300, final_pass=False)
    # the rounds alone: measured 259-263 here, 4-5 % above the reported ~250 (pivot details unknown)
    assert rounds == pytest.approx(250, rel=0.08)
    total = TopKEngine().mean_cycles(1024, 512, trials=300)
    assert total == pytest.approx(rounds + 67, abs=1e-9)
    assert math.ceil(1024 / 16) + 3 == 67  # one full round


def test_vit_deit_and_llama_from_configs():
    from transformers import LlamaConfig, ViTConfig

    assert ModelShape.from_config(ViTConfig()) == ModelShape.from_config("vit-base")
    deit = ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)
    assert ModelShape.from_config(deit) == ModelShape.from_config("deit-small")
    llama = ModelShape.from_config(LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                               num_key_value_heads=3, intermediate_size=1536))  # SmolLM2-135M
    assert llama.decoder and llama.head_dim == 64 and llama.kv_dim == 192 and llama.gated_ffn
    ops = {o.name: o for o in model_ops(llama, 10) if o.layer == 0}
    assert (ops["k"].n, ops["v"].n, ops["q"].n) == (192, 192, 576) and ops["ffn_gate"].n == 1536
    # q, o: 576 x 576; k, v: 192 x 576; gate, up: 1536 x 576; down: 576 x 1536 -- by hand, fp16
    per_layer = 2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576
    assert weight_bytes(llama) == 30 * per_layer * 2

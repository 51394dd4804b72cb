"""Int8Linear (kernels/int8_linear.py): the C product equals the dequantised weight's, the weight's
error is at most half a step per row, the many-token path, bad input, and load_model(int8_head=True)
on a tiny tied Llama (the embedding stays fp32; logits close to the fp32 head's)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from sparsetx.kernels.int8_linear import C_MAX_TOKENS, Int8Linear
from sparsetx.kernels.loader import library
from sparsetx.models import load_model


@pytest.mark.parametrize("shape, tokens, bias", [((96, 64), 1, False), ((50, 37), 3, True), ((130, 576), C_MAX_TOKENS, False),
                                                 ((33, 23), C_MAX_TOKENS + 1, True)])
def test_product_equals_the_dequantised_weight(shape, tokens, bias):
    torch.manual_seed(sum(shape) + tokens)
    lin = torch.nn.Linear(shape[1], shape[0], bias=bias)
    head = Int8Linear.from_linear(lin)
    step = head.scales[:, None]
    assert bool(((head.dense() - lin.weight.detach()).abs() <= step / 2 + 1e-7).all())   # round to nearest
    assert int(head.qweight.abs().max()) == 127                                        # the row's max -> 127
    x = torch.randn(2, tokens, shape[1]) if tokens > 1 else torch.randn(1, 1, shape[1])
    got = head(x)
    ref = F.linear(x.double(), head.dense().double(), None if lin.bias is None else lin.bias.double())
    assert got.shape == (*x.shape[:-1], shape[0])
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


def test_c_kernel_is_used_for_a_token(monkeypatch):
    if library() is None:
        pytest.skip("the C kernels did not build here")
    head = Int8Linear(torch.randn(40, 48))
    monkeypatch.setattr(F, "linear", lambda *a, **k: pytest.fail("the one-token path fell back to F.linear"))
    head(torch.randn(1, 48))


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        Int8Linear(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D float"):
        Int8Linear(torch.ones(3, dtype=torch.int64).view(1, 3))
    with pytest.raises(ValueError, match="expects 48 input features"):
        Int8Linear(torch.randn(4, 48))(torch.randn(1, 47))
    with pytest.raises(ValueError, match="no Linear LM head"):
        load_model("minilm", int8_head=True)


def test_load_model_int8_head_keeps_the_embedding(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, max_position_embeddings=64, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    dense, q = load_model(tmp_path), load_model(tmp_path, int8_head=True)
    assert isinstance(q.lm_head, Int8Linear) and q.model.embed_tokens.weight.dtype == torch.float32
    torch.testing.assert_close(q.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        a, b = dense(input_ids=ids).logits, q(input_ids=ids).logits
    # per-row int8: each logit moves by at most sum_k |x_k| * step / 2 of its row
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())
    assert torch.equal(a[0, -1].argmax(), b[0, -1].argmax())

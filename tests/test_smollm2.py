"""Integration: the real SmolLM2-135M (Llama, 9 query heads over 3 KV heads) under SpAtten."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import needs_smollm2
from sparsetx.attention.decoder import DecoderConfig
from sparsetx.attention.decoder_eval import DecoderEvalConfig, decoder_eval, streaming_pass
from sparsetx.attention.trace import read_spatten_csv, read_stats
from sparsetx.cli import main

pytestmark = [needs_smollm2, pytest.mark.integration]
TEXT = ("When shall we three meet again in thunder, lightning, or in rain? When the hurlyburly's done, "
        "when the battle's lost and won. That will be ere the set of sun. Where the place? Upon the heath. "
        "There to meet with Macbeth. I come, Graymalkin! Paddock calls. Anon. Fair is foul, and foul is fair: "
        "hover through the fog and filthy air.")


@pytest.fixture(scope="module")
def smollm2():
    from sparsetx.models import load_model, load_tokenizer

    return load_model("smollm2"), load_tokenizer("smollm2")


def test_streaming_matches_full_forward_and_budget_costs(smollm2):
    model, tok = smollm2
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :64]
    nll_dense = streaming_pass(model, ids, None, prefill=16).nll
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    full = torch.nn.functional.cross_entropy(logits[15:-1], ids[0, 16:], reduction="none")
    torch.testing.assert_close(torch.tensor(nll_dense), full, atol=2e-3, rtol=1e-3)  # cache vs one pass, fp32
    nll_same = streaming_pass(model, ids, DecoderConfig(), prefill=16).nll
    torch.testing.assert_close(torch.tensor(nll_same), torch.tensor(nll_dense), atol=2e-3, rtol=1e-3)
    rt = streaming_pass(model, ids, DecoderConfig(kv_budget=12), prefill=16).runtime
    assert all(s["tokens_after"] <= 12 for step in rt.stats for s in step)
    assert math.exp(sum(nll_dense) / len(nll_dense)) < 200  # a real LM on real English, not noise


def test_decoder_eval_small(smollm2, tmp_path):
    cfg = DecoderEvalConfig(context=48, prefill=16, budgets=(12,), policies=("cascade", "window"),
                            quant=((12, 4, 8),), thresholds=(0.1,), out=str(tmp_path), texts={"macbeth": TEXT})
    result = decoder_eval(cfg)
    kv = {r["policy"]: r for r in result["kv"]}
    assert kv["dense"]["top1_agreement"] == 1.0
    # the table's figures are those of the streamed passes, recomputed here
    model, tok = smollm2
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :48]
    dense = streaming_pass(model, ids, None, prefill=16)
    for policy in ("cascade", "window"):
        pruned = streaming_pass(model, ids, DecoderConfig(kv_budget=12, policy=policy), prefill=16)
        agree = sum(a == b for a, b in zip(pruned.preds, dense.preds)) / len(dense.preds)
        assert kv[policy]["top1_agreement"] == agree < 1.0      # a budget of 12 of 48 changes predictions
        assert kv[policy]["perplexity"] == pytest.approx(math.exp(sum(pruned.nll) / len(pruned.nll)), rel=1e-9)
        assert kv[policy]["perplexity"] > kv["dense"]["perplexity"] and kv[policy]["kv_budget"] == 12
    q = [r for r in result["quant"] if r["threshold"] == 0.1][0]
    # K: 8 MSB bits (+4 on refetch), V: 8 bits, vs 16 + 16: between 16/32 and 20/32 of fp16 bytes
    assert q["bytes_msb_only_vs_fp16"] == pytest.approx(0.5)
    assert 0.5 <= q["bytes_vs_fp16"] <= 0.625
    assert (tmp_path / "decoder_eval.png").exists()


def test_generate_cli_writes_stats_and_trace(tmp_path):
    argv = ["generate", "--prompt", TEXT[:120], "--max-new-tokens", "6", "--spatten", "--kv-budget", "10", "--quant",
            "--stats", str(tmp_path / "s.json"), "--trace", str(tmp_path / "t.csv")]
    assert main(argv) == 0
    doc = read_stats(tmp_path / "s.json")
    assert doc["model"]["kv_heads"] == 3 and doc["model"]["heads"] == 9 and doc["model"]["layers"] == 30
    assert all(s["tokens_after"] <= 10 for step in doc["steps"][1:] for s in step)
    rows, config = read_spatten_csv(tmp_path / "t.csv")
    assert config.startswith("sparsetx:smollm2")
    assert len(rows) == len(doc["steps"]) * 30 * 9
    assert {r.quant_key_bit for r in rows} == {8} and {r.auto_requant_incre for r in rows} == {4}

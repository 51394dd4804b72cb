"""The trace schema: the official SpAtten CSVs round-trip; runtime stats validate and convert."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED, tiny_spatten_stats
from sparsetx.attention.trace import (CSV_COLUMNS, TraceError, encoder_trace_rows, read_spatten_csv, read_stats,
                                      write_spatten_csv, write_stats)

TRACES = SHARED / "spatten-traces"
needs_traces = pytest.mark.skipif(not TRACES.exists(), reason="../shared/spatten-traces not present")


@needs_traces
def test_official_traces_round_trip(tmp_path):
    for name in ("small.csv", "summary-gpt2-small-wikitext2-per8.csv"):
        rows, config = read_spatten_csv(TRACES / name)
        assert config and config.startswith("configs/gpt2/")
        write_spatten_csv(tmp_path / name, rows, config)
        assert (tmp_path / name).read_text() == (TRACES / name).read_text()


@needs_traces
def test_gpt2_small_trace_contents():
    """SEEDS.md: keys kept per layer 921, 716, 204 x4, 102 x6 (of ~994), 27.6 % of dense fetches."""
    rows, _ = read_spatten_csv(TRACES / "summary-gpt2-small-wikitext2-per8.csv")
    prompt = [r for r in rows if r.iteration_id == 0 and r.head_id == 0]
    assert [r.key_fetch_num for r in prompt] == [993] * 12  # summarization stage: all keys, ~20 % of values
    assert {r.value_fetch_num for r in prompt} == {204}
    step1 = [r for r in rows if r.iteration_id == 1 and r.head_id == 0]  # generation: cascade token pruning
    assert [r.key_fetch_num for r in step1] == [921, 716] + [204] * 4 + [102] * 6
    assert {r.quant_key_bit for r in rows} == {6} and {r.auto_requant_incre for r in rows} == {4}
    assert len(rows) == 32 * 12 * 12


def test_bad_csv(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(TraceError, match="not the SpAtten trace header"):
        read_spatten_csv(bad)
    bad.write_text(",".join(CSV_COLUMNS) + "\n0,0,0,64.0,10,10,6,16,0.05,maybe,4,2,6,True,False,False,-1\n")
    with pytest.raises(TraceError, match="column if_requant has 'maybe'"):
        read_spatten_csv(bad)


def test_runtime_stats_document(tmp_path):
    doc = tiny_spatten_stats((2, 16))
    write_stats(tmp_path / "s.json", doc)
    back = read_stats(tmp_path / "s.json")
    assert back["model"] == {"layers": 3, "heads": 4, "head_dim": 8, "family": "bert"}
    assert [l["tokens"] for l in back["sequences"][0]["layers"]] == [16, 8, 8]
    assert back["sequences"][0]["layers"][1]["values_fetched_rows"] == 4 * 8 * 4  # ceil(0.5 * 8) rows x 8 queries x 4 heads
    rows = encoder_trace_rows(back["sequences"][0]["layers"], head_dim=8)
    assert len(rows) == 3 * 4 and rows[4].key_fetch_num == 8 and rows[4].value_fetch_num == 4
    del doc["sequences"][0]["layers"][0]["topk"]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(TraceError, match=r"sequence 0 layer 0 lacks \['topk'\]"):
        read_stats(tmp_path / "bad.json")
    doc["version"] = 7
    (tmp_path / "v7.json").write_text(json.dumps(doc))
    with pytest.raises(TraceError, match="v7"):
        read_stats(tmp_path / "v7.json")


def test_decoder_stats_document(tmp_path):
    """A decoder run's document has 'steps', validated against its own required keys."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsetx.attention.decoder import DecoderConfig, spatten_decoder

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=48)).eval()
    with torch.no_grad(), spatten_decoder(llama, DecoderConfig(kv_budget=4)) as rt:
        llama.generate(input_ids=torch.randint(0, 64, (1, 8)), max_new_tokens=3, do_sample=False)
    write_stats(tmp_path / "d.json", rt.stats_document())
    doc = read_stats(tmp_path / "d.json")
    assert doc["model"]["kv_heads"] == 2 and len(doc["steps"]) == 3  # prompt + 2 decode forwards
    assert [s["tokens_after"] for s in doc["steps"][-1]] == [4, 4]
    del doc["steps"][1][0]["kv_heads"]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(TraceError, match=r"step 1 layer 0 lacks \['kv_heads'\]"):
        read_stats(tmp_path / "bad.json")


def test_decoder_trace_describes_the_work_done(tmp_path):
    """After head pruning the CSV has rows only for the query heads computed (original ids);
    value_fetch_num is the V rows one query read under local value pruning; if_requant marks the
    heads whose rows refetched LSBs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsetx.attention.decoder import DecoderConfig, spatten_decoder
    from sparsetx.attention.trace import decoder_trace_rows, write_spatten_csv

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=48)).eval()
    cfg = DecoderConfig(head_keep=[1.0, 0.5, 0.5], value_topk=0.25)
    with torch.no_grad(), spatten_decoder(llama, cfg) as rt:
        llama.generate(input_ids=torch.randint(0, 64, (1, 12)), max_new_tokens=3, do_sample=False)
    rows = decoder_trace_rows(rt.stats_document())
    kept_kv = int(rt.alive[1][0])
    for step in range(3):
        heads = {layer: sorted(r.head_id for r in rows if r.iteration_id == step and r.layer_id == layer)
                 for layer in range(3)}
        assert heads[0] == [0, 1, 2, 3]
        assert heads[1] == heads[2] == [2 * kept_kv, 2 * kept_kv + 1]     # the 2 query heads of the kept KV head
    last = [r for r in rows if r.iteration_id == 2]
    # step 2: 14 keys in the cache (12 prompt + 2 generated), ceil(0.25 x 14) = 4 V rows per query
    assert {r.key_fetch_num for r in last} == {14} and {r.value_fetch_num for r in last} == {4}
    assert {r.sentence_length_L for r in last} == {14}
    write_spatten_csv(tmp_path / "t.csv", rows)
    back, _ = read_spatten_csv(tmp_path / "t.csv")
    assert back == rows
    with torch.no_grad(), spatten_decoder(llama, DecoderConfig.quantized(requant_threshold=1.0)) as rt:
        llama(input_ids=torch.randint(0, 64, (1, 6)), use_cache=True)
    rows = decoder_trace_rows(rt.stats_document())
    assert all(r.if_requant for r in rows) and {r.quant_key_bit for r in rows} == {8}

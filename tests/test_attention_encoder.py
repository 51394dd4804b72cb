"""SpAtten encoder runtime: importance by hand, the cascade, exact keep counts, padding, identity."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from conftest import needs_sentiment
from sparsetx.attention.encoder import SpAttenConfig, SpAttenEncoder, spatten
from sparsetx.attention.importance import (join_msb_lsb, keep_count, keep_schedule, local_value_mask, quantize,
                                           select_kept, split_msb_lsb, token_importance)


def test_token_importance_two_layers_by_hand():
    # layer 1: 1 head, 2 queries over 3 keys; layer 2: 2 heads, 1 query
    p1 = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]])
    p2 = torch.tensor([[[0.2, 0.2, 0.6]], [[0.0, 0.5, 0.5]]])
    s = token_importance(p1) + token_importance(p2)
    assert torch.allclose(s, torch.tensor([0.6 + 0.2, 1.05 + 0.7, 0.35 + 1.1]))
    assert select_kept(s, 2).tolist() == [1, 2]
    assert select_kept(s, 2, protected=torch.tensor([True, False, False])).tolist() == [0, 1]  # 1.75 > 1.45


def test_keep_schedule_and_counts():
    assert keep_schedule(0.5, 4, 1) == [1.0, 1.0 - 0.5 / 3, 1.0 - 1.0 / 3, 0.5]
    assert keep_schedule([1, 0.5, 0.5], 3, 0) == [1.0, 0.5, 0.5]
    assert keep_count(10, 0.35) == 3 and keep_count(10, 0.01) == 1
    with pytest.raises(ValueError, match="outside"):
        keep_schedule([1, 1.5], 2, 0)
    with pytest.raises(ValueError, match="3 ratios for a model with 2 layers"):
        keep_schedule([1, 1, 1], 2, 0)


def test_local_value_mask():
    p = torch.tensor([[0.1, 0.5, 0.3, 0.1]])
    assert local_value_mask(p, 2).tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("total, lsb", [(8, 4), (12, 4), (10, 4), (6, 2)])
def test_msb_lsb_split_reassembles_exactly(total, lsb):
    x = torch.randn(7, 64)
    q, scale = quantize(x, total)
    assert q.min() >= -(2 ** (total - 1)) and q.max() <= 2 ** (total - 1) - 1
    msb, low = split_msb_lsb(q, total, lsb)
    assert low.min() >= 0 and low.max() < 2 ** lsb
    assert msb.min() >= -(2 ** (total - lsb - 1)) and msb.max() <= 2 ** (total - lsb - 1) - 1
    assert torch.equal(join_msb_lsb(msb, low, lsb), q)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=200, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=64)
    return BertModel(cfg, add_pooling_layer=True).eval()


def _ids(n, seed):
    return torch.randint(5, 200, (n,), generator=torch.Generator().manual_seed(seed))


def test_keep_one_equals_unmodified_model(tiny):
    ids = _ids(20, 0)[None]
    with torch.no_grad():
        ref = tiny(input_ids=ids)
        with spatten(tiny, SpAttenConfig()):
            out = tiny(input_ids=ids)
    # same maths in another operation order: fp32 rounding only
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=2e-5, rtol=1e-5)
    assert "forward" not in tiny.__dict__  # the model is unchanged afterwards


def test_cascade_keep_counts_and_cls(tiny):
    length = 30
    rt = SpAttenEncoder(tiny, SpAttenConfig(token_keep=[1.0, 0.8, 0.5, 0.3], head_keep=[1, 1, 0.75, 0.5]))
    h, pos, stats = rt.encode(_ids(length, 1))
    assert [s["tokens"] for s in stats] == [30, 24, 15, 9]  # floor(L * ratio), exactly
    assert [s["heads"] for s in stats] == [4, 4, 3, 2]
    assert h.shape[0] == 9 and pos[0] == 0 and pos[-1] == length - 1  # [CLS] and [SEP] kept
    assert torch.equal(pos, pos.sort().values)


def test_dropped_tokens_never_come_back(tiny, monkeypatch):
    """Record the kept positions at every layer: each set is a subset of the previous one."""
    import sparsetx.attention.encoder as enc

    seen = []
    real = enc.select_kept

    def spy(scores, k, protected=None):
        out = real(scores, k, protected)
        seen.append((len(scores), out.clone()))
        return out

    monkeypatch.setattr(enc, "select_kept", spy)
    rt = SpAttenEncoder(tiny, SpAttenConfig(token_keep=[1.0, 0.7, 0.5, 0.25]))
    _, pos, _ = rt.encode(_ids(24, 2))
    kept = torch.arange(24)
    for n, idx in seen:
        assert n == len(kept)
        kept = kept[idx]  # indices refer to the survivors of the layer before
    assert torch.equal(kept, pos)


def test_batch_with_padding_equals_each_sequence_alone(tiny):
    a, b = _ids(18, 3), _ids(11, 4)
    ids = torch.zeros(2, 18, dtype=torch.long)
    ids[0], ids[1, :11] = a, b
    mask = (torch.arange(18)[None] < torch.tensor([[18], [11]])).long()
    cfg = SpAttenConfig(token_keep=0.5, head_keep=0.5, value_topk=0.5)
    with torch.no_grad(), spatten(tiny, cfg):
        both = tiny(input_ids=ids, attention_mask=mask)
        alone_a = tiny(input_ids=a[None])
        alone_b = tiny(input_ids=b[None])
    na, nb = int(both.attention_mask[0].sum()), int(both.attention_mask[1].sum())
    torch.testing.assert_close(both.last_hidden_state[0, :na], alone_a.last_hidden_state[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(both.last_hidden_state[1, :nb], alone_b.last_hidden_state[0], atol=1e-6, rtol=0)
    assert na == 9 and nb == 5


@pytest.mark.parametrize("policy", ["local", "random", "first"])
def test_baseline_policies_have_the_same_budget(tiny, policy):
    cfg = SpAttenConfig(token_keep=[1, 0.5, 0.5, 0.5], token_policy=policy)
    _, pos, stats = SpAttenEncoder(tiny, cfg).encode(_ids(20, 5))
    assert [s["tokens"] for s in stats] == [20, 10, 10, 10]
    if policy == "first":
        assert pos.tolist() == list(range(9)) + [19]


def test_bad_configs():
    with pytest.raises(ValueError, match="outside"):
        SpAttenConfig(token_keep=0.0)
    with pytest.raises(ValueError, match="outside"):
        SpAttenConfig(head_keep=[1.0, 1.2])
    with pytest.raises(ValueError, match="value_topk"):
        SpAttenConfig(value_topk=2.0)
    with pytest.raises(ValueError, match="no adapter for Sequential"):
        SpAttenEncoder(torch.nn.Sequential(torch.nn.Linear(2, 2)), SpAttenConfig())


@needs_sentiment
@pytest.mark.integration
def test_attention_eval_command(tiny_bert, tmp_path):
    """The evaluation command end to end on the real MiniLM (embeddings) and a tiny classifier."""
    from sparsetx.cli import main

    out = tmp_path / "ae"
    argv = ["attention-eval", "--classifier", str(tiny_bert), "--token-keep", "1.0,0.3", "--head-keep", "1.0,0.5",
            "--policies", "cascade,first", "--examples", "16", "--passages", "4", "--out", str(out)]
    assert main(argv) == 0
    import json
    result = json.loads((out / "encoder_eval.json").read_text())
    rows = {(r["method"], r["token_keep"], r["head_keep"]): r for r in result["rows"]}
    assert set(rows) == {("cascade", 1.0, 1.0), ("cascade", 0.3, 1.0), ("first", 1.0, 1.0), ("first", 0.3, 1.0),
                         ("cascade", 1.0, 0.5)}
    # keep ratio 1.0 is the unpruned model: embeddings identical up to fp32 rounding
    assert rows[("cascade", 1.0, 1.0)]["embedding_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rows[("cascade", 1.0, 1.0)]["accuracy"] == result["dense_accuracy"]
    assert rows[("cascade", 0.3, 1.0)]["embedding_cosine"] < 0.999
    assert (out / "encoder_eval.png").stat().st_size > 10_000


def test_topk_larger_than_sequence_is_an_error():
    with pytest.raises(ValueError, match="cannot keep 5 of 3"):
        select_kept(torch.rand(3), 5)
    with pytest.raises(ValueError, match="protected tokens do not fit"):
        select_kept(torch.rand(4), 1, protected=torch.tensor([True, False, False, True]))

"""Layer selection and the errors a user meets when asking for something that cannot be."""
from __future__ import annotations

import pytest
import torch

from sparsetx.nm.prune import NMConfig, sparsify, sparsity_report
from sparsetx.nm.select import block_linears


def _tiny():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=2))


def test_default_layers_are_the_block_linears():
    names = block_linears(_tiny())
    assert len(names) == 12  # 2 blocks x (Q, K, V, attn out, FFN in, FFN out)
    assert all(n.startswith("bert.encoder.layer.") for n in names)
    assert not any("pooler" in n or "classifier" in n for n in names)


def test_one_shot_report_and_per_layer_patterns():
    model = _tiny()
    masks = sparsify(model, NMConfig("2:4", overrides={r"intermediate\.dense": "1:8"}))
    report = {r["layer"]: r for r in sparsity_report(model)}
    assert all(r["nm_ok"] for r in report.values())
    assert report["bert.encoder.layer.0.attention.self.query"]["kept"] == 0.5
    assert report["bert.encoder.layer.1.intermediate.dense"]["kept"] == 0.125
    assert report["bert.encoder.layer.1.intermediate.dense"]["pattern"] == "1:8"
    assert set(masks) == set(report)
    assert (model.classifier.weight != 0).all()  # the task head stays dense


@pytest.mark.parametrize("config, message", [
    (dict(pattern="2:4", overrides={"encoder.layer.9.output": "2:4"}), "matches no Linear layer"),
    (dict(pattern="2:4", overrides={"query": "5:4"}), "layer 'query': N:M pattern 5:4"),
    (dict(pattern="2:4", overrides={"query": "2/4"}), "cannot parse"),
    (dict(pattern="2:4", include=["attention"], exclude=["nothing_like_this"]), "exclude regex"),
    (dict(pattern="1:3"), "input size 32 is not divisible by M=3"),
])
def test_bad_layer_configs(config, message):
    with pytest.raises(ValueError, match=message):
        sparsify(_tiny(), NMConfig(**config))


def test_bad_criterion_and_missing_calibration():
    with pytest.raises(ValueError, match="unknown criterion"):
        NMConfig("2:4", criterion="random")
    with pytest.raises(ValueError, match="calibration"):
        sparsify(_tiny(), NMConfig("2:4", criterion="activation"))


def test_activation_criterion_uses_calibration():
    """Wanda's score |W_ij| * ||X_j||_2: the kept weights of a layer are, group by group, the two
    largest scores computed here by hand from the layer's recorded inputs, and they differ from
    what plain magnitude keeps (so the test cannot pass with magnitude pruning)."""
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 100, (4, 10), generator=g)} for _ in range(2)]
    name = "bert.encoder.layer.1.intermediate.dense"
    layer, seen = model.get_submodule(name), []
    handle = layer.register_forward_hook(lambda _m, args, _o: seen.append(args[0].reshape(-1, 32)))
    with torch.no_grad():
        for b in batches:
            model.eval()(**b)
    handle.remove()
    norms = torch.cat(seen).pow(2).sum(0).sqrt()                       # ||X_j||_2 over every token
    w = layer.weight.detach().clone()
    scores = (w.abs() * norms).view(w.shape[0], -1, 4)
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, dim=-1).indices, True)
    magnitude = torch.zeros_like(expected).scatter_(-1, w.abs().view_as(scores).topk(2, dim=-1).indices, True)
    assert (expected != magnitude).any()
    masks = sparsify(model, NMConfig("2:4", criterion="activation"), calibration=batches)
    assert torch.equal(masks[name].view_as(expected), expected)
    assert torch.equal(layer.weight.detach(), w * expected.view_as(w))
    assert all(r["nm_ok"] and r["kept"] == 0.5 for r in sparsity_report(model))


def test_model_without_linears():
    with pytest.raises(ValueError, match="no nn.Linear"):
        NMConfig("2:4").layers(torch.nn.Sequential(torch.nn.ReLU()))

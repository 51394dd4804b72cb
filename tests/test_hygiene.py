"""What a library owes its caller: importing changes nothing, saving leaves the caller's objects
alone, a missing tokenizer is an error, folders are written whole, output stays sparsetx's own."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from conftest import needs_smollm2
from sparsetx.atomic import atomic_dir, recover_dir


def test_importing_sparsetx_sets_no_environment_variables():
    code = ("import os, json; before = dict(os.environ); "
            "import sparsetx.models, sparsetx.cli, sparsetx.attention.decoder, sparsetx.attention.encoder, "
            "sparsetx.hw.run, sparsetx.train; "
            "print(json.dumps({k: v for k, v in os.environ.items() if before.get(k) != v}))")
    env = {k: v for k, v in os.environ.items() if "OFFLINE" not in k}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


def _tiny_classifier():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=32)).eval()


def test_a_folder_without_its_tokenizer_is_an_error(tmp_path):
    from sparsetx.models import load_tokenizer

    _tiny_classifier().save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=r"m: no usable tokenizer in the folder"):
        load_tokenizer(tmp_path / "m")


def test_save_packed_leaves_the_callers_config_alone(tmp_path):
    from sparsetx.formats.folder import load_packed, save_packed
    from sparsetx.nm.prune import NMConfig, sparsify

    model = _tiny_classifier()
    patterns = sparsify(model, NMConfig("2:4")) and NMConfig("2:4").layers(model)
    before = model.config.to_dict()
    save_packed(model, tmp_path / "p", patterns, "float32")
    assert model.config.to_dict() == before
    assert load_packed(tmp_path / "p").config.sparsetx["packed"] is True


def test_atomic_dir_keeps_the_old_folder_on_error_and_recovers_after_a_kill(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("two, half written")
        raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]            # no temporary left behind
    # A kill between the two renames: the old folder moved aside, the new one complete beside it.
    os.replace(target, tmp_path / ".ckpt.old-123")
    (tmp_path / ".ckpt.tmp-abc").mkdir()
    recover_dir(target)
    assert (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    import sparsetx.train as train

    model = _tiny_classifier()
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    ckpt = tmp_path / "checkpoint"
    train.save_checkpoint(ckpt, model, opt, 5, [{"stage": "dense"}])

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(train, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(ckpt, model, opt, 10, [])
    assert json.loads((ckpt / "trainer.json").read_text())["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    step, history = train.load_checkpoint(ckpt, _tiny_classifier(), torch.optim.AdamW(model.parameters()))
    assert (step, history) == (5, [{"stage": "dense"}])


def test_transformers_progress_bars_stay_out_of_sparsetx_output(tmp_path, capfd, tiny_bert):
    """``sparsetx unpack`` saves through transformers, whose "Writing model shards" bar used to leak."""
    from sparsetx.cli import main

    assert main(["prune", "--model", str(tiny_bert), "--pattern", "2:4", "--out", str(tmp_path / "p")]) == 0
    capfd.readouterr()
    assert main(["unpack", "--model", str(tmp_path / "p"), "--out", str(tmp_path / "dense")]) == 0
    out = capfd.readouterr()
    assert "Writing model shards" not in out.out + out.err and "Loading weights" not in out.out + out.err
    assert (tmp_path / "dense" / "model.safetensors").exists()


@pytest.mark.integration
@needs_smollm2
def test_first_use_conversion_of_smollm2_prints_no_foreign_progress_bar(tmp_path, capfd, monkeypatch):
    """transformers' GGUF reader draws a tqdm bar outside its logging switches; the conversion
    that a fresh machine runs on first use must keep it out of sparsetx's output."""
    from sparsetx.models import smollm2_path

    monkeypatch.setenv("SPARSETX_ASSETS", str(tmp_path))
    capfd.readouterr()
    folder = smollm2_path()
    out = capfd.readouterr()
    assert (folder / "config.json").exists() and folder.parent == tmp_path
    assert "de-quantizing" not in out.out + out.err and out.err.strip() == ""

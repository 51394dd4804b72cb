"""Training: resume equivalence, IDP inheritance end to end, and a two-process (DDP, gloo) run."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import needs_sentiment
from sparsetx import train as train_mod
from sparsetx.formats.folder import read_packed
from sparsetx.formats.packed import unpack_nm
from sparsetx.train import RunSpec, Stage, TrainConfig, run

pytestmark = needs_sentiment
TINY = dict(batch_size=8, max_length=16, train_examples=64, eval_examples=16, checkpoint_every=2, lr=1e-3, warmup_steps=1)


def _tensors(folder):
    dense, packed, _ = read_packed(folder)
    return dense, {k: unpack_nm(p) for k, p in packed.items()}


def test_resume_gives_the_same_result(tiny_bert, tmp_path, monkeypatch):
    stages = [Stage("2:4", 3), Stage("1:4", 3)]
    full = run(RunSpec(str(tiny_bert), str(tmp_path / "full"), stages, TrainConfig(**TINY)), progress=False)

    real = train_mod.batch_indices

    def killed_at_5(step, n, cfg):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")
        return real(step, n, cfg)

    monkeypatch.setattr(train_mod, "batch_indices", killed_at_5)
    with pytest.raises(KeyboardInterrupt):
        run(RunSpec(str(tiny_bert), str(tmp_path / "cut"), stages, TrainConfig(**TINY)), progress=False)
    assert not (tmp_path / "cut" / "candidate-1_4").exists()
    monkeypatch.setattr(train_mod, "batch_indices", real)
    resumed = run(RunSpec(str(tiny_bert), str(tmp_path / "cut"), stages, TrainConfig(**TINY)), progress=False)

    assert [s["test_acc"] for s in resumed["stages"]] == [s["test_acc"] for s in full["stages"]]
    for stage in ("2_4", "1_4"):
        a_dense, a_packed = _tensors(tmp_path / "full" / f"candidate-{stage}")
        b_dense, b_packed = _tensors(tmp_path / "cut" / f"candidate-{stage}")
        for k in a_dense:
            assert torch.equal(a_dense[k], b_dense[k]), k
        for k in a_packed:
            assert torch.equal(a_packed[k], b_packed[k]), k


def test_idp_candidates_are_nested(tiny_bert, tmp_path):
    stages = [Stage("4:8", 2), Stage("2:8", 2), Stage("1:8", 2)]
    result = run(RunSpec(str(tiny_bert), str(tmp_path / "idp"), stages, TrainConfig(**TINY)), progress=False)
    assert [s["pattern"] for s in result["stages"]] == ["4:8", "2:8", "1:8"]
    assert all(s.get("next_mask_inside", 1.0) == 1.0 for s in result["stages"])
    masks = []
    for stage in ("4_8", "2_8", "1_8"):
        _, packed = _tensors(tmp_path / "idp" / f"candidate-{stage}")
        masks.append({k: v != 0 for k, v in packed.items()})
    for denser, sparser in zip(masks, masks[1:]):
        for k in sparser:
            assert (sparser[k] <= denser[k]).all(), k  # each candidate inherits the previous sparsity


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(tiny_bert, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): same global batch, so the same model up to float rounding."""
    args = ["prune", "--method", "srste", "--model", str(tiny_bert), "--pattern", "2:4", "--steps", "3",
            "--batch-size", "8", "--max-length", "16", "--train-examples", "64", "--eval-examples", "16",
            "--lr", "1e-4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "sparsetx.cli", *args, "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "sparsetx.cli", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    import json
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["world_size"] == 2
    a_dense, a_packed = _tensors(tmp_path / "ddp" / "candidate-2_4")
    b_dense, b_packed = _tensors(tmp_path / "one" / "candidate-2_4")
    # Tolerance: the two runs differ only in the order of the gradient sum (two half-batch means
    # averaged vs one mean), i.e. fp32 rounding, amplified by at most 3 Adam steps at lr 1e-4.
    for k in a_dense:
        torch.testing.assert_close(a_dense[k], b_dense[k], atol=1e-5, rtol=1e-4, msg=k)
    for k in a_packed:
        torch.testing.assert_close(a_packed[k], b_packed[k], atol=1e-5, rtol=1e-4, msg=k)


def test_cli_idp_value_dtype_repacks_the_trained_candidates(tiny_bert, tmp_path):
    """`sparsetx prune --method idp --value-dtype int8`: the candidates end packed with int8 values
    (per-row scales), their weights those of the fp32 candidate rounded to int8 (the flag was once
    accepted and silently ignored: candidates stayed fp32)."""
    from sparsetx.cli import main
    from sparsetx.formats.folder import read_header

    flags = ["--steps", "2", "--batch-size", "8", "--max-length", "16", "--train-examples", "64",
             "--eval-examples", "16", "--checkpoint-every", "2"]
    base = ["prune", "--method", "idp", "--model", str(tiny_bert), "--series", "2:8,1:8", *flags]
    assert main([*base, "--out", str(tmp_path / "fp32")]) == 0
    assert main([*base, "--value-dtype", "int8", "--out", str(tmp_path / "int8")]) == 0
    for stage in ("2_8", "1_8"):
        assert read_header(tmp_path / "fp32" / f"candidate-{stage}")["value_dtype"] == "float32"
        folder = tmp_path / "int8" / f"candidate-{stage}"
        assert read_header(folder)["value_dtype"] == "int8"
        _, exact = _tensors(tmp_path / "fp32" / f"candidate-{stage}")
        _, rounded = _tensors(folder)
        for name, w in exact.items():
            step = w.abs().amax(1, keepdim=True) / 127
            assert ((rounded[name] - w).abs() <= step / 2 + 1e-7).all()
            assert ((rounded[name] != 0) <= (w != 0)).all()   # the N:M mask kept (a tiny weight may round to 0)

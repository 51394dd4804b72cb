"""Interruptions and concurrency: kills at any moment of an IDP run (one in the middle of a
checkpoint write, one between the finished temporary and the swap, one in a candidate's write,
and SIGKILLs at random times) resume bit-exactly; two writers of one --out; the kernel cache
with a garbage or truncated library, without gcc, and two processes building into an empty cache."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import needs_sentiment
from sparsetx.atomic import FolderInUse, out_lock
from sparsetx.kernels import loader

ROOT = Path(__file__).resolve().parents[1]

# --- kills during an IDP run ------------------------------------------------------------------

TINY = dict(batch_size=8, max_length=16, train_examples=64, eval_examples=16, checkpoint_every=1, lr=1e-3,
            warmup_steps=1)
RUN = textwrap.dedent("""
    import os, sys
    from sparsetx import atomic, train
    from sparsetx.formats import folder
    from sparsetx.train import RunSpec, Stage, TrainConfig, run

    model, out, mode = sys.argv[1:4]
    calls = [0]

    def nth(n):
        calls[0] += 1
        return calls[0] == n

    if mode == "in-file":          # die half-way through writing the 3rd checkpoint's tensors
        real_save = train.save_file
        def save_file(tensors, path, **kw):
            real_save(tensors, path, **kw)
            if nth(3):
                data = open(path, "rb").read()
                open(path, "wb").write(data[: len(data) // 2])
                os._exit(9)
        train.save_file = save_file
    elif mode == "in-swap":        # die with the 4th checkpoint whole in its temporary, before the swap
        real_exchange = atomic.exchange
        def exchange(a, b):
            if nth(3):
                os._exit(9)
            return real_exchange(a, b)
        atomic.exchange = exchange
    elif mode == "in-candidate":   # die while the first candidate's packed file is written
        real_candidate = folder.save_file
        def candidate_file(tensors, path, **kw):
            real_candidate(tensors, path, **kw)
            os._exit(9)
        folder.save_file = candidate_file
    run(RunSpec(model, out, [Stage("2:4", 3), Stage("1:4", 3)], TrainConfig(**%r)), progress=False)
""" % TINY)


def _tensors(folder):
    from sparsetx.formats.folder import read_packed
    from sparsetx.formats.packed import unpack_nm

    dense, packed, _ = read_packed(folder)
    return {**dense, **{k: unpack_nm(p) for k, p in packed.items()}}


def _start(model, out, mode):
    return subprocess.Popen([sys.executable, "-c", RUN, str(model), str(out), mode], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@needs_sentiment
def test_kills_at_any_moment_resume_bit_exactly(tiny_bert, tmp_path):
    from sparsetx.train import RunSpec, Stage, TrainConfig, run

    stages = [Stage("2:4", 3), Stage("1:4", 3)]
    full = run(RunSpec(str(tiny_bert), str(tmp_path / "full"), stages, TrainConfig(**TINY)), progress=False)

    cut = tmp_path / "cut"
    for mode in ("in-file", "in-swap", "in-candidate"):
        proc = _start(tiny_bert, cut, mode)
        assert proc.wait(timeout=300) == 9, proc.stderr.read().decode()[-2000:]
        ckpt = cut / "checkpoint"
        assert (ckpt / "trainer.json").exists() and (ckpt / "state.safetensors").exists(), mode
    leftovers = [p.name for p in cut.iterdir() if p.name.startswith(".")]
    assert leftovers, "the simulated kills should have left temporaries behind"
    rng = random.Random(0)
    for _ in range(3):   # SIGKILL at random moments (start-up included)
        proc = _start(tiny_bert, cut, "plain")
        time.sleep(rng.uniform(1.0, 12.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    proc = _start(tiny_bert, cut, "plain")
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]

    assert not [p.name for p in cut.iterdir() if p.name.startswith(".") and ".tmp-" in p.name or ".old-" in p.name]
    import json
    resumed = json.loads((cut / "results.json").read_text())
    assert [s["test_acc"] for s in resumed["stages"]] == [s["test_acc"] for s in full["stages"]]
    for stage in ("2_4", "1_4"):
        a, b = _tensors(tmp_path / "full" / f"candidate-{stage}"), _tensors(cut / f"candidate-{stage}")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (stage, k)


# --- one writer per --out -----------------------------------------------------------------------

def test_second_writer_of_the_same_out_gets_a_clear_error(tmp_path, capsys):
    from sparsetx.cli import main

    out = tmp_path / "m"
    with out_lock(out):
        with pytest.raises(FolderInUse, match=f"pid {os.getpid()}"):
            with out_lock(out):
                pass
        assert main(["sim", "sweep", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "being written by another sparsetx process" in err and len(err.strip().splitlines()) == 1
        assert not out.exists()
    with out_lock(out):   # released: free again
        pass


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    out = tmp_path / "m"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from sparsetx.atomic import out_lock
        with out_lock({str(out)!r}):
            print("held", flush=True)
            time.sleep(60)
    """)], cwd=ROOT, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    with pytest.raises(FolderInUse):
        with out_lock(out):
            pass
    holder.kill()
    holder.wait()
    with out_lock(out):
        pass


# --- the kernel cache ----------------------------------------------------------------------------

def _kernel_agrees_with_torch() -> bool:
    from sparsetx.kernels.nm_linear import KernelWeight, nm_linear
    from sparsetx.nm.mask import apply_mask, nm_mask

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g)
    w = apply_mask(w, nm_mask(w.abs(), "2:8"))
    from sparsetx.formats.packed import pack_nm

    kw = KernelWeight.from_packed(pack_nm(w, "2:8", torch.float32))
    x = torch.randn(5, 64, generator=g)
    return all(torch.allclose(nm_linear(xi, kw), torch.nn.functional.linear(xi, w), atol=1e-5)
               for xi in (x, x[:1]))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSETX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPARSETX_NO_KERNELS", raising=False)
    loader.library.cache_clear()
    yield tmp_path / "cache" / "kernels"
    loader.library.cache_clear()


def _needs_gcc():
    if loader.shutil.which("gcc") is None:
        pytest.skip("gcc not on PATH")


CHECK = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    from sparsetx.kernels.loader import library
    from test_reliability import _kernel_agrees_with_torch
    assert library() is not None, "no kernel library"
    assert _kernel_agrees_with_torch()
""")


def _in_fresh_processes(cache: Path, count: int = 1) -> None:
    """Load (building if needed) the kernel in ``count`` new processes at once, each checking it
    against PyTorch: a library this process has mapped must not be damaged under its feet."""
    env = {**os.environ, "SPARSETX_CACHE": str(cache.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", CHECK], cwd=ROOT, env=env, stderr=subprocess.PIPE)
             for _ in range(count)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no checksum"])
def test_damaged_cached_library_is_rebuilt(fresh_cache, damage):
    _needs_gcc()
    _in_fresh_processes(fresh_cache)
    (so,) = fresh_cache.glob("*.so")
    good = len(so.read_bytes())
    if damage == "garbage":
        so.write_bytes(os.urandom(good))
    elif damage == "truncated":
        so.write_bytes(so.read_bytes()[: good // 3])
    else:
        Path(f"{so}.sha256").unlink()
    _in_fresh_processes(fresh_cache)
    assert loader._load(so) is not None   # whole again, checksum and all


def test_without_gcc_one_warning_and_correct_numbers(fresh_cache, monkeypatch):
    monkeypatch.setenv("CC", "/no/such/compiler")
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert loader.library() is None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # once per process: the fallback does not warn again
        assert _kernel_agrees_with_torch()


def test_two_processes_building_into_an_empty_cache(fresh_cache):
    _needs_gcc()
    _in_fresh_processes(fresh_cache, count=2)
    assert len(list(fresh_cache.glob("*.so"))) == 1
    assert not [p for p in fresh_cache.iterdir() if p.name.startswith("tmp")]

"""Property-based fuzzing of the packed-folder loader (bounded to about a minute).

Whatever is done to a good packed folder (bit flips in header and data, truncation, edits of the
JSON header with arbitrary JSON values, re-hashed tampering of the packed tensors, config.json
edits, files swapped for directories, FIFOs or links), the only acceptable outcomes of loading it
are the correct model or a ``PackedFormatError``: never another exception, never wrong numbers.
The long run with counts is ``python scripts/fuzz_packed.py``.
"""
from __future__ import annotations

import json
import shutil
import signal
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import packed_mutants as pm

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return pm.make_folder(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(autouse=True)
def no_hang():
    """A load that blocks (a FIFO opened for reading) fails the test instead of hanging the suite."""
    def hang(*_):
        raise TimeoutError("loading a mutant hung for 20 s")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _check(good, tmp_path, kind, seed, mode):
    folder, truth = good
    target, desc = pm.mutant(folder, tmp_path, kind, seed)
    try:
        outcome = pm.judge(target, truth, mode, rehashed=kind == "re-hashed tamper")
    finally:
        shutil.rmtree(target, ignore_errors=True)
    assert outcome in ("ok", "refused"), f"{kind} ({desc}), {mode}: {outcome}"
    return outcome


def test_good_folder_loads_exactly(good):
    folder, truth = good
    for mode in ("load", "fast", "info"):
        assert pm.judge(folder, truth, mode) == "ok"


@FUZZ
@given(kind=st.sampled_from(sorted(pm.MUTATIONS)), seed=st.integers(0, 2 ** 32 - 1),
       mode=st.sampled_from(["load", "fast", "info"]))
def test_any_mutation_loads_correctly_or_is_refused(good, tmp_path, kind, seed, mode):
    _check(good, tmp_path, kind, seed, mode)


@FUZZ
@given(value=JSON, seed=st.integers(0, 2 ** 32 - 1))
def test_header_field_set_to_any_json(good, tmp_path, value, seed):
    folder, truth = good
    target = tmp_path / "h"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target)
    desc = pm.header_edit(target, __import__("random").Random(seed), value=value, use_value=True)
    outcome = pm.judge(target, truth)
    assert outcome in ("ok", "refused"), f"{desc}: {outcome}"


def test_each_structural_defect_is_named(good, tmp_path):
    """Re-hashed tampering that the checksums cannot see is caught by the structure, by name."""
    folder, _ = good
    layer = "bert.encoder.layer.0.attention.self.query.weight"
    cases = {"nm_values": (b"\x00\x7c", "NaN or infinite"),          # +inf in fp16
             "nm_indices": (b"\xff", "strictly increasing positions")}
    for suffix, (payload, message) in cases.items():
        pm.expect_refusal(folder, tmp_path / suffix, f"{layer}.{suffix}", payload, message)


def test_fifo_and_links(good, tmp_path):
    import os

    from sparsetx.formats.folder import load_packed
    from sparsetx.formats.packed import PackedFormatError

    folder, truth = good
    fifo = tmp_path / "fifo"
    shutil.copytree(folder, fifo)
    (fifo / pm.WEIGHTS).unlink()
    os.mkfifo(fifo / pm.WEIGHTS)
    result = []     # in a daemon thread: an open() that blocks on the FIFO would not heed an alarm
    worker = threading.Thread(target=lambda: result.append(pm.judge(fifo, truth)), daemon=True)
    worker.start()
    worker.join(20)
    assert result == ["refused"], "loading a folder whose weights file is a FIFO hung or was not refused"
    with pytest.raises(PackedFormatError, match="FIFO"):
        load_packed(fifo)
    out = tmp_path / "out"
    shutil.copytree(folder, out)
    shutil.copy(out / pm.WEIGHTS, tmp_path / "elsewhere.safetensors")
    (out / pm.WEIGHTS).unlink()
    os.symlink(tmp_path / "elsewhere.safetensors", out / pm.WEIGHTS)
    with pytest.raises(PackedFormatError, match="out of the folder"):
        load_packed(out)
    inside = tmp_path / "inside"
    shutil.copytree(folder, inside)
    (inside / "blobs").mkdir()
    os.replace(inside / pm.WEIGHTS, inside / "blobs" / pm.WEIGHTS)
    os.symlink(Path("blobs") / pm.WEIGHTS, inside / pm.WEIGHTS)
    assert pm.judge(inside, truth) == "ok"


def test_config_that_disagrees_with_the_header(good, tmp_path):
    from sparsetx.formats.folder import load_packed
    from sparsetx.formats.packed import PackedFormatError

    folder, _ = good
    for name, edit, message in [
        ("arch", lambda c: c.update(architectures=["BertModel"]), "differ from the packed header"),
        ("huge", lambda c: c.update(hidden_size=2 ** 40), "config.json"),
        ("garbage", None, "config.json: transformers cannot read it"),
    ]:
        target = tmp_path / name
        shutil.copytree(folder, target)
        if edit is None:
            (target / pm.CONFIG).write_text("{")
        else:
            config = json.loads((target / pm.CONFIG).read_text())
            edit(config)
            (target / pm.CONFIG).write_text(json.dumps(config))
        with pytest.raises(PackedFormatError, match=message):
            load_packed(target)


@pytest.fixture(scope="module")
def good_int8(tmp_path_factory):
    return pm.make_folder(tmp_path_factory.mktemp("fuzz8"), "int8")


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(pm.MUTATIONS)), seed=st.integers(0, 2 ** 32 - 1),
       mode=st.sampled_from(["load", "fast", "info"]))
def test_any_mutation_of_an_int8_folder_loads_correctly_or_is_refused(good_int8, tmp_path, kind, seed, mode):
    """The same promise for int8 values, whose per-row scales are one more tensor to get wrong."""
    _check(good_int8, tmp_path, kind, seed, mode)

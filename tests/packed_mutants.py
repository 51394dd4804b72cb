"""Damaged copies of a packed folder, and the judge of what loading one did.

Shared by tests/test_packed_fuzz.py (hypothesis, bounded) and scripts/fuzz_packed.py (the long
run with counts). Every mutation edits a copy of a good folder in place and returns a one-line
description; :func:`judge` loads the copy and classifies the outcome:

* ``"ok"``: it loaded, and every weight equals the original's bit for bit (or, for a re-hashed
  tampering, every packed weight is finite and really N:M);
* ``"refused"``: :class:`PackedFormatError` (the only acceptable failure);
* ``"raw <Type>"``: any other exception (a raw traceback for a user);
* ``"wrong"``: it loaded, with numbers that differ from the file's truth.
Hangs are the caller's to catch (scripts/fuzz_packed.py runs each load under an alarm).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
from pathlib import Path

import torch

WEIGHTS, CONFIG = "sparsetx.safetensors", "config.json"


def make_folder(root: Path, value_dtype: str = "float16") -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny 2-layer BERT, 2:8 (one layer 1:4), packed with fp16 (or ``value_dtype``) values;
    (folder, its state)."""
    from transformers import BertConfig, BertForSequenceClassification

    from sparsetx.formats.folder import load_packed, save_packed
    from sparsetx.nm.prune import NMConfig, recorded_patterns, sparsify

    torch.manual_seed(0)
    config = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config).eval()
    sparsify(model, NMConfig("2:8", overrides={r"layer\.1\.output\.dense": "1:4"}))
    folder = save_packed(model, root / "good", recorded_patterns(model), value_dtype)
    return folder, {k: v.clone() for k, v in load_packed(folder).state_dict().items()}


def overwrite_tensor_bytes(folder: Path, key: str, payload: bytes, rehash: bool = True) -> None:
    """Write ``payload`` over the first bytes of tensor ``key`` of a folder's weights file; with
    ``rehash`` the header's SHA-256 of that tensor is updated, so only the structure checks see it."""
    path = folder / WEIGHTS
    header, data = split(path.read_bytes())
    start, end = header[key]["data_offsets"]
    data = data[:start] + payload + data[start + len(payload):]
    path.write_bytes(join(header, data))
    if rehash:
        digest = hashlib.sha256(data[start:end]).hexdigest()
        edit_meta(folder, lambda m: m["sha256"].update({key: digest}))


def expect_refusal(folder: Path, target: Path, key: str, payload: bytes, message: str, rehash: bool = True) -> None:
    """A copy of ``folder`` at ``target`` with ``payload`` over tensor ``key`` is refused, naming
    ``message`` (a regular expression)."""
    import pytest

    from sparsetx.formats.folder import load_packed
    from sparsetx.formats.packed import PackedFormatError

    shutil.copytree(folder, target)
    overwrite_tensor_bytes(target, key, payload, rehash)
    with pytest.raises(PackedFormatError, match=message):
        load_packed(target)


# --- the safetensors file: 8-byte header length, JSON header, data ------------------------------

def split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def edit_meta(folder: Path, edit) -> None:
    """Apply ``edit`` to the parsed sparsetx header (or, if it returns a string, use that text)."""
    path = folder / WEIGHTS
    header, data = split(path.read_bytes())
    meta = json.loads(header["__metadata__"]["sparsetx"])
    out = edit(meta)
    header["__metadata__"]["sparsetx"] = out if isinstance(out, str) else json.dumps(meta)
    path.write_bytes(join(header, data))


# --- mutations: (folder, rng) -> description ----------------------------------------------------

def flip_bit(folder: Path, rng: random.Random, where: str = "any") -> str:
    path = folder / WEIGHTS
    raw = bytearray(path.read_bytes())
    n = 8 + struct.unpack("<Q", raw[:8])[0]
    lo, hi = {"header": (0, n), "data": (n, len(raw)), "any": (0, len(raw))}[where]
    i, b = rng.randrange(lo, hi), rng.randrange(8)
    raw[i] ^= 1 << b
    path.write_bytes(bytes(raw))
    return f"flip bit {b} of byte {i} ({where})"


def truncate(folder: Path, rng: random.Random) -> str:
    path = folder / WEIGHTS
    raw = path.read_bytes()
    cut = rng.choice([0, 1, 7, 8, 9, rng.randrange(len(raw)), len(raw) - 1, len(raw) - rng.randrange(1, 64)])
    path.write_bytes(raw[:cut])
    return f"truncate to {cut} of {len(raw)} bytes"


ODD_VALUES = [None, True, False, 0, -1, 1, 3, 2 ** 31, 2 ** 62, -2 ** 63, 1.5, float("nan"), 1e308, "", "x",
              "2:8", "3:2", "0:4", "1:1000", "a:b", "2:4:8", "float64", "rank", [], [1], [0, 0], [8, 1.5],
              [2 ** 30, 2 ** 30], ["32", "32"], {}, {"pattern": "2:8"}, [[[[[]]]]], "0" * 64]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def set_path(obj, path, value, op: str = "set"):
    """Replace (``set``) or delete (``del``) the element at ``path``; returns the new root."""
    if not path:
        return value
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if op == "del":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


def header_edit(folder: Path, rng: random.Random, value=None, use_value: bool = False) -> str:
    """One edit of the JSON header: a field replaced by an odd value, deleted, or a field added;
    or the whole header replaced by deep nesting or a huge text."""
    choice = rng.random()
    if choice < 0.04:
        depth = rng.choice([100, 10_000, 200_000])
        edit_meta(folder, lambda m: "[" * depth + "]" * depth)
        return f"header nested {depth} deep"
    if choice < 0.06:
        edit_meta(folder, lambda m: json.dumps({**m, "junk": "x" * 20_000_000}))
        return "header of 20 MB"
    desc = []

    def edit(meta):
        paths = list(_paths(meta))
        path = rng.choice(paths[1:])
        r = rng.random()
        if r < 0.2 and path:
            set_path(meta, path, None, "del")
            desc.append(f"delete {path}")
            return meta
        new = value if use_value else rng.choice(ODD_VALUES)
        if r < 0.3 and isinstance(meta.get("layers"), dict) and meta["layers"]:
            name = rng.choice(list(meta["layers"]))
            meta["layers"][name + rng.choice(["", "x", ".0"])] = new
            desc.append(f"layer entry {name!r} -> {new!r:.60}")
            return meta
        set_path(meta, path, new)
        desc.append(f"set {path} = {new!r:.60}")
        return meta

    edit_meta(folder, edit)
    return "header: " + "; ".join(desc)


def _tensor_span(folder: Path, rng: random.Random, packed_only: bool = True) -> tuple[str, int, int, str]:
    header, _ = split((folder / WEIGHTS).read_bytes())
    keys = [k for k in header if k != "__metadata__" and (not packed_only or ".nm_" in k)]
    key = rng.choice(sorted(keys))
    start, end = header[key]["data_offsets"]
    return key, start, end, header[key]["dtype"]


def rehash_tamper(folder: Path, rng: random.Random) -> str:
    """Change a packed tensor's bytes (index codes out of order or range, values to NaN/inf/other
    numbers) and re-hash it in the header: only the structure can give it away."""
    path = folder / WEIGHTS
    key, start, end, dtype = _tensor_span(folder, rng)
    raw = bytearray(path.read_bytes())
    base = 8 + struct.unpack("<Q", raw[:8])[0]
    kind = rng.choice(["random bytes", "nan", "inf", "zero", "ff"])
    i = rng.randrange(start, end)
    if kind == "random bytes":
        for j in range(rng.randrange(1, 9)):
            raw[base + min(i + j, end - 1)] = rng.randrange(256)
    elif kind in ("nan", "inf") and dtype == "F16":
        i -= (i - start) % 2
        raw[base + i:base + i + 2] = struct.pack("<e", float(kind))
    else:
        raw[base + i] = 0 if kind == "zero" else 0xFF
    data_bytes = bytes(raw[base + start:base + end])
    digest = hashlib.sha256(data_bytes).hexdigest()
    path.write_bytes(bytes(raw))
    edit_meta(folder, lambda m: m["sha256"].update({key: digest}))
    return f"re-hashed {kind} at byte {i - start} of {key}"


def config_edit(folder: Path, rng: random.Random) -> str:
    path = folder / CONFIG
    r = rng.random()
    if r < 0.15:
        path.write_bytes(rng.choice([b"", b"{", b"\xff\xfe\x00", b"[]", b"null", b'{"model_type": 3}']))
        return "config.json replaced by garbage"
    config = json.loads(path.read_text())
    key = rng.choice(sorted(config))
    if r < 0.3:
        del config[key]
        desc = f"config: delete {key}"
    elif r < 0.45:
        config["architectures"] = rng.choice([["GPT2LMHeadModel"], ["NoSuchModel"], "BertModel", [3], []])
        desc = f"config: architectures = {config['architectures']!r}"
    elif r < 0.6:
        big = rng.choice(["hidden_size", "vocab_size", "num_hidden_layers", "intermediate_size"])
        config[big] = rng.choice([2 ** 40, 10 ** 7, 0, -4, 33])
        desc = f"config: {big} = {config[big]}"
    else:
        config[key] = rng.choice(ODD_VALUES)
        desc = f"config: {key} = {config[key]!r:.60}"
    path.write_text(json.dumps(config))
    return desc


def replace_file(folder: Path, rng: random.Random) -> str:
    name = rng.choice([WEIGHTS, CONFIG])
    path = folder / name
    kind = rng.choice(["directory", "fifo", "empty", "link out", "link in", "broken link", "missing"])
    if kind == "link in":   # a link to a file inside the folder: allowed, must load
        inner = folder / "inner"
        inner.mkdir()
        os.replace(path, inner / name)
        os.symlink(Path("inner") / name, path)
    elif kind == "link out":
        outside = folder.parent / f"{folder.name}-outside-{name}"
        shutil.copy(path, outside)
        path.unlink()
        os.symlink(outside, path)
    else:
        path.unlink()
        if kind == "directory":
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "broken link":
            os.symlink(folder / "nowhere", path)
    return f"{name}: {kind}"


MUTATIONS = {
    "flip header bit": lambda f, r: flip_bit(f, r, "header"),
    "flip data bit": lambda f, r: flip_bit(f, r, "data"),
    "truncate": truncate,
    "header edit": header_edit,
    "re-hashed tamper": rehash_tamper,
    "config edit": config_edit,
    "file replaced": replace_file,
}


# --- the judge -----------------------------------------------------------------------------------

def _nm_ok(weight: torch.Tensor, pattern) -> bool:
    groups = weight.reshape(weight.shape[0], -1, pattern.m)
    return bool(torch.isfinite(weight).all()) and int((groups != 0).sum(-1).max()) <= pattern.n


def judge(folder: Path, truth: dict[str, torch.Tensor], mode: str = "load", rehashed: bool = False) -> str:
    """Load ``folder`` (``mode``: "load", "fast" or "info") and classify the outcome (module doc)."""
    from sparsetx.formats.folder import folder_report, load_packed
    from sparsetx.formats.packed import PackedFormatError

    try:
        if mode == "info":
            folder_report(folder)
            return "ok"
        model, packed = load_packed(folder, with_sparse=True, fast=mode == "fast")
    except PackedFormatError:
        return "refused"
    except Exception as err:   # noqa: BLE001 - classifying what escaped is the point
        return f"raw {type(err).__name__}"
    if mode == "fast":
        from sparsetx.kernels.nm_linear import SparseLinear

        state = {k: v for k, v in model.state_dict().items() if k in truth}
        for name, p in packed.items():
            module = model.get_submodule(name)
            if not isinstance(module, SparseLinear):
                return "wrong"
            state[f"{name}.weight"] = module.weight_nm.dense()
    else:
        state = model.state_dict()
    if set(state) != set(truth):
        return "wrong"
    for key, want in truth.items():
        got = state[key].to(want.dtype)
        name = key.removesuffix(".weight")
        if rehashed and name in packed:
            if not _nm_ok(got, packed[name].pattern):
                return "wrong"
        elif got.shape != want.shape or not torch.equal(got, want):
            return "wrong"
    return "ok"


def mutant(good: Path, work: Path, kind: str, seed: int) -> tuple[Path, str]:
    """A fresh copy of ``good`` under ``work``, mutated by ``kind`` with ``seed``."""
    target = work / f"m{seed}"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(good, target)
    desc = MUTATIONS[kind](target, random.Random(seed))
    return target, desc

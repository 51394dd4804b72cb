"""A pruned model as a folder: Hugging Face config + one safetensors file of packed tensors.

``sparsetx.safetensors`` holds every tensor of the model's state dict; the weight of each N:M
layer ``L`` is replaced by ``L.weight.nm_values`` and ``L.weight.nm_indices`` (see
:mod:`sparsetx.formats.packed` for their layout). The safetensors metadata key ``sparsetx`` holds
a JSON header::

    {"format": "sparsetx-nm", "version": 1, "encoding": "index", "value_dtype": "float16",
     "layers": {"L": {"pattern": "2:4", "shape": [out, in], "index_bits": 2}},
     "tied": {"lm_head.weight": "model.embed_tokens.weight"},
     "sha256": {tensor key: hex digest of its raw bytes}}

Loading verifies the header against the tensors (names, shapes, dtypes, checksums, index codes)
and raises :class:`PackedFormatError` naming the problem. Saving writes into a temporary sibling
folder and renames it into place (:func:`sparsetx.atomic.atomic_dir`), so a killed save leaves
no half-written folder. No pickle.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_dir
from ..nm.pattern import NMPattern
from .packed import VALUE_DTYPES, PackedFormatError, PackedNM, index_bits, pack_nm, unpack_nm

FORMAT = "sparsetx-nm"
VERSION = 1
WEIGHTS = "sparsetx.safetensors"
VALUES, INDICES = ".nm_values", ".nm_indices"


def _sha256(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()


def is_packed_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / WEIGHTS).exists()


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without aliases (tied weights are stored once and recorded in ``tied``)."""
    state, tied, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
            state[name] = tensor
    return state, tied


def pack_state(model: nn.Module, patterns: dict[str, NMPattern], value_dtype: str = "float16",
               encoding: str = "index") -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and header for ``model`` with the weights of ``patterns`` packed."""
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value dtype {value_dtype!r} not supported; valid: {', '.join(VALUE_DTYPES)}")
    state, tied = _unique_state(model)
    tensors, layers = {}, {}
    for name, pattern in patterns.items():
        key = f"{name}.weight"
        if key not in state:
            raise ValueError(f"layer {name} has no weight in the model's state dict")
        packed = pack_nm(state.pop(key), pattern, VALUE_DTYPES[value_dtype], encoding, name=name)
        tensors[key + VALUES], tensors[key + INDICES] = packed.values, packed.indices
        layers[name] = {"pattern": str(pattern), "shape": list(packed.shape), "index_bits": index_bits(pattern, encoding)}
    tensors.update({k: v.detach().contiguous() for k, v in state.items()})
    header = {"format": FORMAT, "version": VERSION, "encoding": encoding, "value_dtype": value_dtype,
              "layers": layers, "tied": tied, "sha256": {k: _sha256(v) for k, v in tensors.items()}}
    return tensors, header


def save_packed(model: nn.Module, folder: str | os.PathLike, patterns: dict[str, NMPattern],
                value_dtype: str = "float16", encoding: str = "index", tokenizer=None,
                overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Save ``model`` as a packed folder, atomically. Returns the folder."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    tensors, header = pack_state(model, patterns, value_dtype, encoding)
    config = copy.deepcopy(model.config)   # the caller's model keeps its own config
    config.sparsetx = {"patterns": {n: str(p) for n, p in patterns.items()}, "packed": True}
    config.architectures = [type(model).__name__]
    with atomic_dir(folder) as tmp:
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        save_file(tensors, tmp / WEIGHTS, metadata={"sparsetx": json.dumps(header)})
    return folder


def read_header(folder: str | os.PathLike) -> dict:
    path = Path(folder) / WEIGHTS
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise PackedFormatError(f"{path}: not a readable safetensors file ({err}); truncated or corrupted?") from None
    if "sparsetx" not in meta:
        raise PackedFormatError(f"{path}: no sparsetx header; not a sparsetx packed file")
    try:
        header = json.loads(meta["sparsetx"])
    except json.JSONDecodeError as err:
        raise PackedFormatError(f"{path}: the sparsetx header is not valid JSON ({err})") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise PackedFormatError(f"{path}: format {header.get('format')!r} version {header.get('version')!r}; "
                                f"this sparsetx reads {FORMAT!r} version {VERSION}")
    return header


def read_packed(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, PackedNM], dict]:
    """Verified contents of a packed folder: (dense tensors, packed layers, header)."""
    path = Path(folder) / WEIGHTS
    header = read_header(folder)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise PackedFormatError(f"{path}: cannot read tensors ({err}); truncated or corrupted?") from None
    sums = header.get("sha256", {})
    if set(sums) != set(tensors):
        raise PackedFormatError(f"{path}: header lists tensors {sorted(set(sums) ^ set(tensors))[:4]} "
                                "that the file does not hold (or the reverse)")
    for key, tensor in tensors.items():
        if _sha256(tensor) != sums[key]:
            raise PackedFormatError(f"{path}: checksum mismatch for tensor {key!r}: the file is corrupted")
    value_dtype = VALUE_DTYPES.get(header.get("value_dtype"))
    packed = {}
    for name, info in header["layers"].items():
        key = f"{name}.weight"
        if key + VALUES not in tensors or key + INDICES not in tensors:
            raise PackedFormatError(f"{path}: layer {name} is in the header but its packed tensors are missing")
        try:
            pattern = NMPattern.parse(info["pattern"])
        except ValueError as err:
            raise PackedFormatError(f"{path}: layer {name}: {err}") from None
        p = PackedNM(pattern, tuple(info["shape"]), tensors.pop(key + VALUES), tensors.pop(key + INDICES),
                     header.get("encoding", "index"))
        if p.values.dtype != value_dtype:
            raise PackedFormatError(f"{path}: layer {name} values are {p.values.dtype}, header says {header.get('value_dtype')}")
        if len(p.shape) != 2 or p.shape[1] % pattern.m or info.get("index_bits") != index_bits(pattern, p.encoding):
            raise PackedFormatError(f"{path}: layer {name}: shape {p.shape} / index bits do not fit pattern {pattern}")
        p.validate(f"{path}: layer {name}")
        packed[name] = p
    return tensors, packed, header


def load_packed(folder: str | os.PathLike, with_sparse: bool = False, fast: bool = False):
    """Rebuild the model of a packed folder with bit-identical (unpacked) weights, in eval mode.

    The values are upcast to the model's fp32 weights (exact for fp16/bf16). ``fast=True`` swaps
    each packed layer for a :class:`sparsetx.kernels.nm_linear.SparseLinear` that computes from the
    packed weights with the N:M CPU kernel (inference only).
    """
    from ..models import model_class  # models imports this module lazily; no cycle at import time

    from transformers import AutoConfig

    folder = Path(folder)
    tensors, packed, header = read_packed(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = model_class(config)._from_config(config, dtype=torch.float32)
    state = dict(tensors)
    for name, p in packed.items():
        state[f"{name}.weight"] = unpack_nm(p).float()
    expected = model.state_dict()
    tied = header.get("tied", {})
    for key, tensor in state.items():
        if key not in expected:
            raise PackedFormatError(f"{folder}: tensor {key!r} does not belong to a {type(model).__name__}")
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise PackedFormatError(f"{folder}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                    f"the model expects {tuple(expected[key].shape)}")
    missing = set(expected) - set(state) - set(tied)
    if missing:
        raise PackedFormatError(f"{folder}: tensors missing from the file: {sorted(missing)[:4]}")
    model.load_state_dict(state, strict=False)
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    if fast:
        from ..kernels.nm_linear import SparseLinear  # kernels sit above formats: imported on demand

        for name, p in packed.items():  # from the packed values as stored: no repacking of the masked weight
            model.set_submodule(name, SparseLinear.from_packed(p, model.get_submodule(name).bias))
    return (model, packed) if with_sparse else model


def folder_report(folder: str | os.PathLike) -> dict:
    """Bytes per packed layer and for the model, against dense fp32 and fp16."""
    tensors, packed, header = read_packed(folder)
    rows = []
    for name, p in packed.items():
        numel = p.shape[0] * p.shape[1]
        rows.append({"layer": name, "pattern": str(p.pattern), "shape": list(p.shape), "packed_bytes": p.nbytes,
                     "fp32_bytes": numel * 4, "fp16_bytes": numel * 2})
    other = sum(t.numel() * t.element_size() for t in tensors.values())
    other_fp32 = sum(t.numel() * 4 for t in tensors.values())
    total_packed = sum(r["packed_bytes"] for r in rows)
    return {"header": {k: v for k, v in header.items() if k != "sha256"}, "layers": rows,
            "pruned_layers": {"packed": total_packed, "fp32": sum(r["fp32_bytes"] for r in rows),
                              "fp16": sum(r["fp16_bytes"] for r in rows)},
            "model": {"packed": total_packed + other, "fp32": sum(r["fp32_bytes"] for r in rows) + other_fp32,
                      "fp16": sum(r["fp16_bytes"] for r in rows) + other_fp32 // 2}}

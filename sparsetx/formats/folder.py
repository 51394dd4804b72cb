"""A pruned model as a folder: Hugging Face config + one safetensors file of packed tensors.

``sparsetx.safetensors`` holds every tensor of the model's state dict; the weight of each N:M
layer ``L`` is replaced by ``L.weight.nm_values`` and ``L.weight.nm_indices``, and with int8
values by ``L.weight.nm_scales`` too (see :mod:`sparsetx.formats.packed` for their layout). The safetensors metadata key ``sparsetx`` holds
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
import mmap
import os
import re
import stat
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_dir
from ..nm.pattern import NMPattern
from .packed import ENCODINGS, VALUE_DTYPES, PackedFormatError, PackedNM, index_bits, pack_nm, unpack_nm

FORMAT = "sparsetx-nm"
VERSION = 1
WEIGHTS = "sparsetx.safetensors"
VALUES, INDICES, SCALES = ".nm_values", ".nm_indices", ".nm_scales"
CONFIG = "config.json"
MAX_HEADER_CHARS = 16 << 20        # the JSON header; a real one is a few hundred bytes per layer
MAX_DIM = 1 << 31                  # one side of a weight
HEADER_KEYS = {"format", "version", "encoding", "value_dtype", "layers", "tied", "sha256", "architecture"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


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
               encoding: str = "index", clamp: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and header for ``model`` with the weights of ``patterns`` packed. Non-finite
    tensors, and packed weights beyond the value dtype's range, are refused (``clamp``: clamped)."""
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value dtype {value_dtype!r} not supported; valid: {', '.join(VALUE_DTYPES)}")
    state, tied = _unique_state(model)
    tensors, layers = {}, {}
    for name, pattern in patterns.items():
        key = f"{name}.weight"
        if key not in state:
            raise ValueError(f"layer {name} has no weight in the model's state dict")
        packed = pack_nm(state.pop(key), pattern, VALUE_DTYPES[value_dtype], encoding, name=name, clamp=clamp)
        tensors[key + VALUES], tensors[key + INDICES] = packed.values, packed.indices
        if packed.scales is not None:
            tensors[key + SCALES] = packed.scales
        layers[name] = {"pattern": str(pattern), "shape": list(packed.shape), "index_bits": index_bits(pattern, encoding)}
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{key}: NaN or infinite values; refusing to pack a diverged model")
    tensors.update({k: v.detach().contiguous() for k, v in state.items()})
    header = {"format": FORMAT, "version": VERSION, "encoding": encoding, "value_dtype": value_dtype,
              "architecture": type(model).__name__, "layers": layers, "tied": tied,
              "sha256": {k: _sha256(v) for k, v in tensors.items()}}
    return tensors, header


def save_packed(model: nn.Module, folder: str | os.PathLike, patterns: dict[str, NMPattern],
                value_dtype: str = "float16", encoding: str = "index", tokenizer=None,
                overwrite: bool = False, extra_files: dict[str, str] | None = None, clamp: bool = False) -> Path:
    """Save ``model`` as a packed folder, atomically. Returns the folder. Weights that are not
    finite, or beyond the value dtype's range, are refused (``clamp=True``: clamped, with a warning)."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    tensors, header = pack_state(model, patterns, value_dtype, encoding, clamp)
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


def regular_file(folder: str | os.PathLike, name: str) -> Path:
    """``folder/name`` if it is a regular file inside ``folder`` (a symlink is followed only when it
    stays inside the folder); anything else (missing, a directory, a FIFO, a device, a link out of
    the folder) is a :class:`PackedFormatError`, raised before the file is opened (a FIFO would hang)."""
    folder = Path(folder)
    path = folder / name
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            real, root = path.resolve(strict=True), folder.resolve(strict=True)
            if root not in real.parents:
                raise PackedFormatError(f"{path}: a symbolic link out of the folder (to {real}); refused")
            mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise PackedFormatError(f"{path}: missing (or a broken link)") from None
    except (OSError, RuntimeError) as err:   # RuntimeError: a symlink loop
        raise PackedFormatError(f"{path}: cannot be read ({err})") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise PackedFormatError(f"{path}: {kind}; a packed folder holds regular files only")
    return path


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_header(header, where: str = "header") -> dict[str, NMPattern]:
    """Validate a header's structure before anything is allocated from it; returns the patterns.

    Types and ranges of every field: ``layers`` maps a name to a pattern 1 <= N < M <= 32, a shape
    [out, in] of positive ints below 2^31 with ``in`` divisible by M, and the index width of the
    pattern and encoding; ``tied`` maps names to names; ``sha256`` maps tensor names to 64 hex
    digits. Raises :class:`PackedFormatError` naming the field."""
    def bad(msg: str):
        raise PackedFormatError(f"{where}: {msg}")

    if not isinstance(header, dict):
        bad(f"expected a JSON object, got {type(header).__name__}")
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        bad(f"format {header.get('format')!r} version {header.get('version')!r}; this sparsetx reads {FORMAT!r} version {VERSION}")
    unknown = sorted(set(header) - HEADER_KEYS)
    if unknown:
        bad(f"unknown fields {unknown[:4]}")
    encoding = header.get("encoding", "index")
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        bad(f"encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")
    if not isinstance(header.get("value_dtype"), str) or header["value_dtype"] not in VALUE_DTYPES:
        bad(f"value_dtype {header.get('value_dtype')!r}; valid: {', '.join(VALUE_DTYPES)}")
    if "architecture" in header and not isinstance(header["architecture"], str):
        bad("architecture must be a string")
    layers, tied, sums = header.get("layers"), header.get("tied", {}), header.get("sha256")
    if not isinstance(layers, dict):
        bad("layers must be an object")
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        bad("tied must map tensor names to tensor names")
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) and _HEX64.match(v)
                                             for k, v in sums.items()):
        bad("sha256 must map tensor names to 64 lower-case hex digits")
    patterns = {}
    for name, info in layers.items():
        if not name or not isinstance(info, dict) or set(info) != {"pattern", "shape", "index_bits"}:
            bad(f"layer {name!r}: expected an object with pattern, shape and index_bits")
        if not isinstance(info["pattern"], str):
            bad(f"layer {name}: pattern must be a string such as '2:8'")
        try:
            pattern = NMPattern.parse(info["pattern"])
        except ValueError as err:
            bad(f"layer {name}: {err}")
        shape = info["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and 0 < d < MAX_DIM for d in shape)):
            bad(f"layer {name}: shape {shape!r} is not [out, in] of positive integers below 2^31")
        if shape[1] % pattern.m:
            bad(f"layer {name}: input size {shape[1]} is not divisible by M={pattern.m}")
        if not _is_int(info["index_bits"]) or info["index_bits"] != index_bits(pattern, encoding):
            bad(f"layer {name}: index_bits {info['index_bits']!r}, {pattern} with {encoding!r} codes needs "
                f"{index_bits(pattern, encoding)}")
        patterns[name] = pattern
    return patterns


def read_header(folder: str | os.PathLike) -> dict:
    """The validated sparsetx header of a packed folder's weights file."""
    return _read_header(regular_file(folder, WEIGHTS))[0]


def _read_header(path: Path) -> tuple[dict, dict[str, NMPattern], dict[str, tuple[tuple[int, ...], str]]]:
    """(header, patterns, declared tensors: name -> (shape, safetensors dtype)) of a weights file
    already checked to be a regular file; the file is opened once for all three."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            declared = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise PackedFormatError(f"{path}: not a readable safetensors file ({err}); truncated or corrupted?") from None
    if "sparsetx" not in meta:
        raise PackedFormatError(f"{path}: no sparsetx header; not a sparsetx packed file")
    if len(meta["sparsetx"]) > MAX_HEADER_CHARS:
        raise PackedFormatError(f"{path}: the sparsetx header is {len(meta['sparsetx']):,} characters "
                                f"(at most {MAX_HEADER_CHARS:,})")
    try:
        header = json.loads(meta["sparsetx"])
    except (ValueError, RecursionError) as err:   # RecursionError: nesting deeper than the parser goes
        raise PackedFormatError(f"{path}: the sparsetx header is not valid JSON ({type(err).__name__}: {err})") from None
    return header, check_header(header, f"{path}: header"), declared


_DTYPE_NAMES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8, "I8": torch.int8}


_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
CHUNK = 1 << 20   # bytes hashed at a time: a multiple of every element size


def _finite(buf: bytes, dtype: str) -> bool:
    if dtype == "BF16":   # numpy has no bfloat16: its bits are the top half of an fp32's
        return bool(np.isfinite((np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32)).all())
    if dtype in ("F64", "F32", "F16"):
        return bool(np.isfinite(np.frombuffer(buf, _NP_DTYPES[dtype])).all())
    return True


def _map_verified(path: Path, sums: dict[str, str]) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, checked against its recorded SHA-256 and (floating
    point) for NaN/inf by streaming the file a chunk at a time, then returned as copy-on-write
    memory maps, one a tensor: pages are read when a tensor is first touched and count in the
    process's memory only then (an embedding table costs the rows a batch looks up), a tensor's
    mapping goes when the tensor does, and a write copies a page instead of changing the file."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        layout = json.loads(fh.read(size))
        start = 8 + size
        entries = sorted(((k, v) for k, v in layout.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
        tensors = {}
        for key, info in entries:
            dtype = _NP_DTYPES.get(info["dtype"])
            if dtype is None:
                raise PackedFormatError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which sparsetx does not read")
            begin, end = start + info["data_offsets"][0], start + info["data_offsets"][1]
            fh.seek(begin)
            digest, left = hashlib.sha256(), end - begin
            while left:
                buf = fh.read(min(CHUNK, left))
                if not buf:
                    raise PackedFormatError(f"{path}: tensor {key!r} ends past the end of the file: truncated?")
                digest.update(buf)
                if not _finite(buf, info["dtype"]):
                    raise PackedFormatError(f"{path}: tensor {key!r} holds NaN or infinite values")
                left -= len(buf)
            if digest.hexdigest() != sums[key]:
                raise PackedFormatError(f"{path}: checksum mismatch for tensor {key!r}: the file is corrupted")
            count = (end - begin) // np.dtype(dtype).itemsize
            if count == 0:
                arr = np.zeros(0, dtype)
            else:
                page = begin - begin % mmap.ALLOCATIONGRANULARITY
                mapped = mmap.mmap(fh.fileno(), end - page, access=mmap.ACCESS_COPY, offset=page)
                arr = np.frombuffer(mapped, dtype, count=count, offset=begin - page)
                if begin % np.dtype(dtype).itemsize:   # torch wants aligned elements: copy this one
                    arr = arr.copy()
            t = torch.from_numpy(arr.reshape(info["shape"]))
            tensors[key] = t.view(torch.bfloat16) if info["dtype"] == "BF16" else t
    return tensors


def read_packed(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, PackedNM], dict]:
    """Verified contents of a packed folder: (dense tensors, packed layers, header).

    Order of checks: the file is a regular file; the header's schema; the tensor names, shapes and
    dtypes the file declares against the header (nothing is read yet); checksums; then the structure
    the checksums cannot vouch for (a re-hashed file): index codes in range and strictly increasing,
    finite values."""
    path = regular_file(folder, WEIGHTS)
    header, patterns, declared = _read_header(path)
    encoding = header.get("encoding", "index")
    value_dtype = VALUE_DTYPES[header["value_dtype"]]
    sums = header["sha256"]
    try:
        if set(sums) != set(declared):
            raise PackedFormatError(f"{path}: header lists tensors {sorted(set(sums) ^ set(declared))[:4]} "
                                    "that the file does not hold (or the reverse)")
        for name, pattern in patterns.items():
            key = f"{name}.weight"
            out, inp = header["layers"][name]["shape"]
            groups = out * (inp // pattern.m)
            codes = groups * pattern.n if encoding == "index" else groups
            expect = {key + VALUES: ((out, inp // pattern.m * pattern.n), value_dtype),
                      key + INDICES: (((codes * index_bits(pattern, encoding) + 7) // 8,), torch.uint8)}
            if value_dtype == torch.int8:
                expect[key + SCALES] = ((out,), torch.float32)
            for k, (shape, dtype) in expect.items():
                if k not in declared:
                    raise PackedFormatError(f"{path}: layer {name} is in the header but tensor {k} is missing")
                got_shape, got_dtype = declared[k]
                if got_shape != shape or _DTYPE_NAMES.get(got_dtype) != dtype:
                    want = next(n for n, d in _DTYPE_NAMES.items() if d == dtype)
                    raise PackedFormatError(f"{path}: layer {name}: tensor {k} has shape {list(got_shape)} "
                                            f"({got_dtype}); a {out}x{inp} {pattern} layer needs {list(shape)} ({want})")
    except (ValueError, TypeError) as err:   # a header whose layer entries do not add up
        if isinstance(err, PackedFormatError):
            raise
        raise PackedFormatError(f"{path}: cannot read tensors ({err}); truncated or corrupted?") from None
    try:
        tensors = _map_verified(path, sums)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        if isinstance(err, PackedFormatError):
            raise
        raise PackedFormatError(f"{path}: cannot read tensors ({type(err).__name__}: {err}); truncated or corrupted?") from None
    packed = {}
    for name, pattern in patterns.items():
        key = f"{name}.weight"
        p = PackedNM(pattern, tuple(header["layers"][name]["shape"]), tensors.pop(key + VALUES),
                     tensors.pop(key + INDICES), encoding, tensors.pop(key + SCALES, None))
        p.validate(f"{path}: layer {name}")
        packed[name] = p
    return tensors, packed, header


def read_config(folder: str | os.PathLike, header: dict | None = None):
    """The folder's Hugging Face config, checked against the packed header: a config.json that
    transformers cannot read, or that names another architecture than the header records, is a
    :class:`PackedFormatError` naming the file."""
    from transformers import AutoConfig

    path = regular_file(folder, CONFIG)
    try:
        config = AutoConfig.from_pretrained(Path(folder), local_files_only=True)
    except Exception as err:   # transformers raises anything from OSError to TypeError on a bad file
        raise PackedFormatError(f"{path}: transformers cannot read it ({type(err).__name__}: {err})") from None
    archs = getattr(config, "architectures", None)
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise PackedFormatError(f"{path}: architectures must be a list of class names, got {archs!r}")
    if header is not None and "architecture" in header and archs != [header["architecture"]]:
        raise PackedFormatError(f"{path}: architectures {archs!r} differ from the packed header's "
                                f"{header['architecture']!r}")
    recorded = getattr(config, "sparsetx", None)
    if header is not None and isinstance(recorded, dict) and isinstance(recorded.get("patterns"), dict):
        if {k: str(v) for k, v in recorded["patterns"].items()} != {k: v["pattern"] for k, v in header["layers"].items()}:
            raise PackedFormatError(f"{path}: its sparsetx patterns differ from the packed header's layers")
    return config


def _build_model(folder: Path, config, tensors: dict[str, torch.Tensor], packed: dict[str, PackedNM], header: dict):
    """The config's model, with every file tensor checked against it on the meta device first, so
    a config that declares huge sizes fails before anything is allocated."""
    from ..models import model_class  # models imports this module lazily; no cycle at import time

    path = folder / CONFIG
    layers = getattr(config, "num_hidden_layers", None)
    if not (isinstance(layers, int) and 0 < layers <= len(tensors) + len(packed)):
        # every layer stores tensors of its own: more layers than tensors is a bad config, and
        # building millions of (meta) layers would take hours
        raise PackedFormatError(f"{path}: num_hidden_layers = {layers!r} does not fit a file of "
                                f"{len(tensors) + len(packed)} tensors")
    try:
        cls = model_class(config)
        with torch.device("meta"):
            skeleton = cls._from_config(config, dtype=torch.float32)
    except Exception as err:   # noqa: BLE001 - whatever transformers raises on a config it cannot build
        raise PackedFormatError(f"{path}: transformers cannot build a model from it ({type(err).__name__}: {err})") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    shapes.update({f"{name}.weight": p.shape for name, p in packed.items()})
    for key, shape in shapes.items():
        if key not in expected:
            raise PackedFormatError(f"{folder}: tensor {key!r} does not belong to a {type(skeleton).__name__}")
        if expected[key] != shape:
            raise PackedFormatError(f"{folder}: tensor {key!r} has shape {shape}, the model expects {expected[key]}")
    tied = header.get("tied", {})
    missing = set(expected) - set(shapes) - set(tied)
    if missing:
        raise PackedFormatError(f"{folder}: tensors missing from the file: {sorted(missing)[:4]}")
    bad_ties = {k: v for k, v in tied.items()
                if k in shapes or k not in expected or v not in shapes or expected[k] != shapes[v]}
    if bad_ties:
        raise PackedFormatError(f"{folder}: tied entries that do not fit the model: {dict(list(bad_ties.items())[:2])}")
    del skeleton
    from accelerate import init_empty_weights

    # parameters on the meta device (every one is assigned from the file), buffers built for real
    # (position ids, rotary frequencies are not stored): no dense memory is written or even allocated
    with init_empty_weights(include_buffers=False):
        return cls._from_config(config, dtype=torch.float32)


def load_packed(folder: str | os.PathLike, with_sparse: bool = False, fast: bool = False, activation_bits: int = 16):
    """Rebuild the model of a packed folder with bit-identical (unpacked) weights, in eval mode.

    The values are upcast to the model's fp32 weights (exact for fp16/bf16; int8: values times
    their row's scale). ``fast=True`` swaps each packed layer for a
    :class:`sparsetx.kernels.nm_linear.SparseLinear` that computes from the packed weights with the
    N:M CPU kernel (inference only), and sets the process's malloc thresholds for inference
    (:func:`sparsetx.kernels.allocator.tune_allocator`; ``SPARSETX_MALLOC=default`` opts out); an
    encoder's self-attention then runs on the blocked C kernel
    (:func:`sparsetx.kernels.attention.use_encoder_attention`) and a GELU after an N:M layer inside
    it (:func:`sparsetx.kernels.nm_linear.fuse_activations`), and an encoder of int8 N:M layers runs
    them all in one C call (:func:`sparsetx.kernels.encoder.use_encoder_layers`). ``activation_bits`` (``fast``, int8
    values): the integer kernels round activations per token to int16 (16) or int8 (8, STA's
    fixed-point datapath; the faster select kernel, on AVX2 or AVX-512 VBMI + VNNI); 8 also
    puts a BERT-family encoder's attention on int8 Q, K, V and 14-bit probabilities (SpAtten's
    low-bit attention; :func:`sparsetx.kernels.attention.encoder_attention`).
    """
    from ..kernels.nm_linear import check_activation_bits   # kernels sit above formats: imported on demand

    check_activation_bits(activation_bits)   # before anything is read
    folder = Path(folder)
    if not folder.is_dir():
        raise PackedFormatError(f"{folder}: not a folder")
    tensors, packed, header = read_packed(folder)
    config = read_config(folder, header)
    model = _build_model(folder, config, tensors, packed, header)
    state = dict(tensors)
    if fast:
        from ..kernels.allocator import trim_heap, tune_allocator
        from ..kernels.nm_linear import SparseLinear  # kernels sit above formats: imported on demand

        # straight from the packed values as stored, before any dense weight of these layers is
        # written: their (uninitialised) dense memory is freed untouched, so loading never holds a
        # dense copy of a packed layer
        for name in list(packed):
            # a layer's packed tensors (memory-mapped) are let go once its layout is built, unless
            # the caller asked for them: their pages leave the process's memory with them
            p = packed[name] if with_sparse else packed.pop(name)
            model.set_submodule(name, SparseLinear.from_packed(p, state.pop(f"{name}.bias", None), activation_bits))
            del p
            trim_heap()   # the layer's decoding intermediates: see kernels/allocator.py
    else:
        for name, p in packed.items():
            state[f"{name}.weight"] = unpack_nm(p).float()   # int8: values x row scales
    tied = header.get("tied", {})
    # assign: the model's tensors become the file's memory-mapped ones (no copy; untouched pages
    # of an embedding table are never read), each in the dtype the model built it with, as a
    # copying load would give (an integer buffer stays integer; .to is a no-op when they agree)
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in state.items()},
                          strict=False, assign=True)
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    loaded = model.state_dict()
    for key, source in tied.items():   # a header that claims a tie the model does not make
        if not torch.equal(loaded[key], loaded[source]):
            raise PackedFormatError(f"{folder}: the header ties {key!r} to {source!r}, but the model does not "
                                    "share them (config.json and header disagree)")
    model.eval()
    if fast:   # inference from here on: keep freed activations' memory for reuse (process-wide)
        from ..kernels.attention import use_encoder_attention
        from ..kernels.encoder import use_encoder_layers
        from ..kernels.nm_linear import fuse_activations

        tune_allocator()
        use_encoder_attention(model, 8 if activation_bits == 8 else 32)   # an encoder's attention in C
        fuse_activations(model)        # BERT's GELU inside the N:M layer before it
        use_encoder_layers(model)      # int8 N:M encoder layers: all in one C call
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

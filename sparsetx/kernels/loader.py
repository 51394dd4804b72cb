"""Build the C kernel once per machine (gcc, cached across processes) and load it with ctypes.

The shared object lands in ``$SPARSETX_CACHE`` (default ``~/.cache/sparsetx/kernels``), named by a
hash of the source and the flags, with a ``.sha256`` of its bytes beside it. Builds hold an
exclusive lock on the cache (two processes starting on an empty cache build once); the library is
written to a temporary file and renamed into place. A cached file that does not match its
checksum, or does not load (truncated, garbage), is rebuilt. Without gcc, or if the build fails,
:func:`library` returns None with one warning, and sparsetx uses its pure-PyTorch path.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).with_name("nm_cpu.c")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


ISAS = ("native", "avx2", "portable")


def compile_flags() -> list[str]:
    """gcc's flags for this CPU. ``SPARSETX_KERNEL_ISA`` narrows them: ``avx2`` (no AVX-512, as
    on an AVX2-only CPU: runs that build's kernels on a newer CPU), ``portable`` (no SIMD flags)."""
    isa = os.environ.get("SPARSETX_KERNEL_ISA", "native") or "native"
    if isa not in ISAS:
        raise ValueError(f"SPARSETX_KERNEL_ISA={isa!r}: expected one of {', '.join(ISAS)}")
    flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-pthread", "-std=c11"]
    cpu = set() if isa == "portable" else _cpu_flags()
    if isa == "avx2":
        cpu = {f for f in cpu if not f.startswith("avx512")}
    if {"avx2", "fma"} <= cpu:
        flags += ["-mavx2", "-mfma"]
        if "f16c" in cpu:
            flags.append("-mf16c")
        if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= cpu:   # the pair kernel's zmm path
            flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
            if "avx512vbmi" in cpu:   # vpermb: the select kernel on zmm (AVX2 has its vpshufb one)
                flags.append("-mavx512vbmi")
    return flags


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSETX_CACHE", Path.home() / ".cache" / "sparsetx")) / "kernels"


def _fallback(reason: str) -> None:
    warnings.warn(f"sparsetx: the C kernels are not available ({reason}); using the PyTorch path "
                  "(correct, slower)", RuntimeWarning, stacklevel=3)
    return None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(cc: str, flags: list[str], target: Path) -> str | None:
    """Compile into ``target`` (with its checksum file); returns an error text, or None."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
        sums = Path(tmp + ".sha256")
        sums.write_text(_digest(Path(tmp)))
        os.replace(tmp, target)                      # the library first: a missing or stale
        os.replace(sums, f"{target}.sha256")         # checksum only means one more rebuild
        return None
    except subprocess.CalledProcessError as err:
        return f"gcc failed: {err.stderr.decode(errors='replace').strip().splitlines()[-1:]}"
    except (subprocess.TimeoutExpired, OSError) as err:
        return f"build failed: {err}"
    finally:
        Path(tmp).unlink(missing_ok=True)
        Path(tmp + ".sha256").unlink(missing_ok=True)


def _load(target: Path) -> ctypes.CDLL | None:
    """The library at ``target`` with its signatures bound, or None if it is not whole."""
    sums = Path(f"{target}.sha256")
    try:
        if not target.is_file() or not sums.is_file() or _digest(target) != sums.read_text().strip():
            return None
        lib = ctypes.CDLL(str(target))
        i, i64, p = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
        lib.nm_linear_tokens.argtypes = [p, i64, i, i, p, p, i, i, i, i, i, p, p, i, p, i]
        lib.nm_linear_vector.argtypes = [p, p, p, i, i, i, i, i, p, p, i, p, i]
        lib.nm_linear_pairs.argtypes = [p, i64, i, i, p, p, p, p, i, i, i, i, p, p, p, i, i, i]
        lib.nm_linear_pairs.restype = None
        lib.nm_linear_select.argtypes = [p, i64, i, i, p, p, p, p, i, i, i, p, p, p, i, i]
        lib.nm_linear_select.restype = None
        lib.has_select.argtypes, lib.has_select.restype = [], i
        lib.encoder_layers.argtypes = [p, i, i, i, i, i, i, ctypes.c_float, p, p, i, i]
        lib.encoder_forward.argtypes = [p, i, i, i, i, i, i, ctypes.c_float, p, p, p, ctypes.c_float, p, p, p, i, i]
        lib.encoder_forward.restype = None
        lib.encoder_layers.restype = None
        lib.has_f16c.argtypes, lib.has_f16c.restype = [], i
        lib.nm_linear_tokens.restype = lib.nm_linear_vector.restype = None
        lib.attention_fused.argtypes = [p, p, p, i, i, i, i, i64, i, ctypes.c_float, p, p, p, p, i]
        lib.attention_fused.restype = None
        lib.attention_encoder.argtypes = [p, p, p, i, i, i, i, i, i] + [i64] * 9 + [ctypes.c_float, p, p] + [i64] * 3 + [p, i, i]
        lib.attention_encoder.restype = None
        lib.int8_linear.argtypes = [p, i, p, p, p, p, i, i, i]
        lib.int8_linear.restype = None
        f = ctypes.c_float
        lib.mask_linear.argtypes = [p, p, p, p, p, p, i, i, i, i]
        lib.mask_linear.restype = None
        lib.llama_step.argtypes = [p, i, i, i, i, i, i, f, f, p, p, i64, i, p, p, p, p, i]
        lib.llama_step.restype = None
        lib.topk_select.argtypes = [p, i, i, p, p]
        lib.topk_select.restype = ctypes.c_int
        return lib
    except (OSError, AttributeError):   # not a loadable library, or an old one without a symbol
        return None


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it cannot be built here (fallback: PyTorch)."""
    if os.environ.get("SPARSETX_NO_KERNELS"):
        return None
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        return _fallback(f"no C compiler {os.environ.get('CC', 'gcc')!r} on PATH")
    flags = compile_flags()
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir() / f"nm_cpu-{key}.so"
    lib = _load(target)
    if lib is not None:
        return lib
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)   # one builder; the others wait, then load its result
            lib = _load(target)
            if lib is None:
                error = _build(cc, flags, target)
                if error:
                    return _fallback(error)
                lib = _load(target)
    except OSError as err:
        return _fallback(f"cache {target.parent}: {err}")
    return lib if lib is not None else _fallback(f"{target} does not load after a fresh build")


def ptr(t) -> ctypes.c_void_p | None:
    """A tensor's data pointer for a ctypes call (None stays None: a NULL argument)."""
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def backend_library(backend: str, native: str = "c") -> ctypes.CDLL | None:
    """The library for ``backend``: "auto" (the C kernel where it built, else None: PyTorch),
    ``native`` (the C kernel, or an error saying why not) or "torch" (None)."""
    if backend not in ("auto", native, "torch"):
        raise ValueError(f"unknown backend {backend!r}; valid: auto, {native}, torch")
    lib = library() if backend != "torch" else None
    if backend == native and lib is None:
        raise RuntimeError("the C kernel is not available on this machine (no gcc, or the build failed)")
    return lib

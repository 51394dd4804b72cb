"""The N:M CPU kernel: equal to the dense product of the unpacked weight, fast path and fallback."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetx.formats.packed import pack_nm
from sparsetx.kernels.loader import library
from sparsetx.kernels.nm_linear import KernelWeight, SparseLinear, nm_linear
from sparsetx.nm.mask import apply_mask, nm_mask
from sparsetx.nm.pattern import NMPattern
from conftest import assert_within_pair_bound, tiny_packed_bert

needs_c = pytest.mark.skipif(library() is None, reason="C kernel could not be built here (no gcc?)")
PATTERNS = [NMPattern(2, 4), NMPattern(1, 4), NMPattern(4, 8), NMPattern(2, 8), NMPattern(1, 8), NMPattern(1, 16),
            NMPattern(3, 8), NMPattern(5, 16), NMPattern(3, 5), NMPattern(7, 12), NMPattern(2, 32)]
# Tolerance: fp32 sums of up to 256 products in a different order: |err| <= 1e-4 for O(1) inputs.
ATOL = 1e-4


def nm_weight(out, inp, pattern, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    return apply_mask(w, nm_mask(w.abs(), pattern))


@needs_c
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 12, 31, 32, 33, 130])
def test_every_pattern_and_odd_token_counts(pattern, tokens):
    """Every tile width (8, 16, 32 tokens), partial tiles, the one-token lane path (vpermps for
    M <= 8, two registers for M <= 16, a gather beyond), M not a power of two, and N = M."""
    inp = 64 if 64 % pattern.m == 0 else pattern.m * 12
    w = nm_weight(24, inp, pattern, seed=tokens)
    b = torch.randn(24)
    kw = KernelWeight.from_packed(pack_nm(w, pattern))
    x = torch.randn(tokens, inp)
    ref = nn.functional.linear(x, w, b)
    fast = nm_linear(x, kw, b, backend="c")
    slow = nm_linear(x, kw, b, backend="torch")
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(slow, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(fast, slow, atol=ATOL, rtol=0)


@needs_c
@pytest.mark.parametrize("threads", [1, 2])
def test_one_output_batched_noncontiguous_threads(threads):
    p = NMPattern(2, 8)
    w = nm_weight(1, 32, p)  # one output row
    kw = KernelWeight.from_packed(pack_nm(w, p))
    x = torch.randn(3, 40, 64)[:, ::2, ::2]  # batched, non-contiguous view (3, 20, 32)
    assert not x.is_contiguous()
    torch.testing.assert_close(nm_linear(x, kw, threads=threads, backend="c"), x @ w.t(), atol=ATOL, rtol=0)
    w2 = nm_weight(70, 96, p, seed=3)
    kw2 = KernelWeight.from_packed(pack_nm(w2, p))
    x2 = torch.randn(2, 50, 96)
    torch.testing.assert_close(nm_linear(x2, kw2, threads=threads, backend="c"), x2 @ w2.t(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("tokens", [1, 40])
def test_dense_through_the_same_engine(tokens):
    """Dense x dense (N = M, e.g. Q K^T with K as the 'weight') runs through the same kernel."""
    k = torch.randn(48, 64)
    q = torch.randn(tokens, 64)
    kw = KernelWeight.from_dense(k)
    torch.testing.assert_close(nm_linear(q, kw), q @ k.t(), atol=ATOL, rtol=0)
    torch.testing.assert_close(nm_linear(q, kw, backend="torch"), q @ k.t(), atol=ATOL, rtol=0)


def test_sparse_linear_from_linear_and_errors():
    torch.manual_seed(0)
    lin = nn.Linear(64, 10)
    with torch.no_grad():
        lin.weight.copy_(apply_mask(lin.weight, nm_mask(lin.weight.abs(), NMPattern(1, 4))))
    sl = SparseLinear.from_linear(lin, "1:4")
    x = torch.randn(4, 7, 64)
    torch.testing.assert_close(sl(x), lin(x), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="expects 64"):
        sl(torch.randn(2, 63))
    with pytest.raises(ValueError, match="is not 1:4"):
        SparseLinear.from_linear(nn.Linear(8, 2), "1:4")  # a dense weight is not 1:4


def test_compiled_library_is_cached(tmp_path, monkeypatch):
    import sparsetx.kernels.loader as loader

    if library() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("SPARSETX_CACHE", str(tmp_path))
    loader.library.cache_clear()
    try:
        assert loader.library() is not None
        built = list((tmp_path / "kernels").glob("nm_cpu-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        loader.library.cache_clear()
        loader.library()  # a new process would find the same file and not rebuild
        assert built[0].stat().st_mtime_ns == stamp
    finally:
        loader.library.cache_clear()


def test_kernel_isa_setting_narrows_the_build(monkeypatch):
    """SPARSETX_KERNEL_ISA: avx2 drops every AVX-512 flag (the AVX2 build's kernels, testable on a
    newer CPU), portable drops every -m flag, a bad value is refused by name."""
    from sparsetx.kernels import loader

    monkeypatch.setattr(loader, "_cpu_flags", lambda: {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                                       "avx512_vnni", "avx512vbmi"})
    monkeypatch.delenv("SPARSETX_KERNEL_ISA", raising=False)
    assert "-mavx512vbmi" in loader.compile_flags() and "-mavx2" in loader.compile_flags()
    monkeypatch.setenv("SPARSETX_KERNEL_ISA", "avx2")
    flags = loader.compile_flags()
    assert "-mavx2" in flags and "-mfma" in flags and not [f for f in flags if "512" in f]
    monkeypatch.setenv("SPARSETX_KERNEL_ISA", "portable")
    assert not [f for f in loader.compile_flags() if f.startswith("-m")]
    monkeypatch.setenv("SPARSETX_KERNEL_ISA", "sse9")
    with pytest.raises(ValueError, match="SPARSETX_KERNEL_ISA='sse9'"):
        loader.compile_flags()


def test_packed_folder_loads_as_fast_model(tmp_path):
    """A model loaded from a packed folder with fast=True (SparseLinear layers) gives the same
    outputs as the masked dense model."""
    from transformers import BertConfig, BertForSequenceClassification

    from sparsetx.formats.folder import load_packed, save_packed
    from sparsetx.nm.prune import NMConfig, recorded_patterns, sparsify

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=128)).eval()
    sparsify(model, NMConfig("2:8", overrides={"intermediate": "1:8"}))
    save_packed(model, tmp_path / "m", recorded_patterns(model), "float16")
    dense = load_packed(tmp_path / "m")
    import sparsetx.formats.folder as folder

    def no_unpack(*_):   # a fast load builds no dense copy of a packed layer
        raise AssertionError("fast load unpacked a layer to a dense weight")

    real, folder.unpack_nm = folder.unpack_nm, no_unpack
    try:
        fast = load_packed(tmp_path / "m", fast=True)
    finally:
        folder.unpack_nm = real
    assert sum(isinstance(m, SparseLinear) for m in fast.modules()) == 12
    ids = torch.randint(0, 100, (3, 21))
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-4, rtol=0)


@needs_c
@pytest.mark.parametrize("pattern", [NMPattern(2, 8), NMPattern(3, 16), NMPattern(1, 32)], ids=str)
def test_fp16_values_one_token_path_is_exact(pattern):
    """Packed fp16 values reach the one-token kernel as fp16 (F16C converts them in registers):
    the same numbers as the fp32 path, since fp16 -> fp32 is exact."""
    w = nm_weight(40, 128, pattern, seed=5).half().float()
    packed = pack_nm(w, pattern, torch.float16)
    kw16 = KernelWeight.from_packed(packed)
    assert kw16.half
    kw32 = KernelWeight(kw16.values, kw16.indices, 128, pattern)
    x, b = torch.randn(1, 128), torch.randn(40)
    torch.testing.assert_close(nm_linear(x, kw16, b), nm_linear(x, kw32, b), atol=0, rtol=0)
    torch.testing.assert_close(nm_linear(x, kw16, b), x @ w.t() + b, atol=ATOL, rtol=0)


@needs_c
def test_one_token_input_stays_alive_during_the_c_call(monkeypatch):
    """A non-contiguous one-token input is copied; the copy must still be alive when the C kernel
    reads it (a pointer to a freed temporary reads whatever is there next)."""
    import weakref

    import sparsetx.kernels.nm_linear as nl

    p = NMPattern(2, 8)
    w = nm_weight(16, 64, p)
    kw = KernelWeight.from_packed(pack_nm(w, p))
    kw.lane_args  # the weight's pointers are made (and kept alive by the weight) beforehand
    handed, lib = [], library()
    real_ptr = nl.ptr

    def spy_ptr(t):
        if t is not None:
            handed.append(weakref.ref(t))
        return real_ptr(t)

    class CheckingLib:
        def __getattr__(self, name):
            def call(*args):
                assert all(r() is not None for r in handed), "a tensor handed to C was freed before the call"
                return getattr(lib, name)(*args)
            return call

    monkeypatch.setattr(nl, "ptr", spy_ptr)
    monkeypatch.setattr(nl, "backend_library", lambda *a, **k: CheckingLib())
    x = torch.randn(1, 128)[:, ::2]
    assert not x.is_contiguous()
    torch.testing.assert_close(nl.nm_linear(x, kw), x @ w.t(), atol=ATOL, rtol=0)


@needs_c
def test_largest_k_block_keeps_16_bit_offsets_in_range(monkeypatch):
    """K blocks are doubled for sparse patterns; at SPARSETX_K_BLOCK=2048 that would be 4096 columns,
    past what 16-bit offsets (column x 32) can address. The block is capped at 2048 columns."""
    import sparsetx.kernels.nm_linear as nl

    monkeypatch.setattr(nl, "K_BLOCK", 2048)
    p = NMPattern(1, 8)
    w = nm_weight(6, 4096, p, seed=2)
    kw = KernelWeight.from_packed(pack_nm(w, p))
    assert kw.k_block == 2048
    x = torch.randn(40, 4096)
    torch.testing.assert_close(nm_linear(x, kw, backend="c"), x @ w.t(), atol=5e-4, rtol=0)  # 512-term sums


def test_k_block_setting_is_validated(monkeypatch):
    import sparsetx.kernels.nm_linear as nl

    for bad in ("0", "4096", "big"):
        monkeypatch.setenv("SPARSETX_K_BLOCK", bad)
        with pytest.raises(ValueError, match="SPARSETX_K_BLOCK"):
            nl._k_block_setting()
    monkeypatch.setenv("SPARSETX_K_BLOCK", "256")
    assert nl._k_block_setting() == 256


def test_fallback_gathers_a_bounded_block_of_rows_at_a_time(monkeypatch):
    """The PyTorch path once gathered tokens x out x kept inputs at once (more than the dense
    weight); it now works through blocks of output rows within FALLBACK_ELEMENTS."""
    import sparsetx.kernels.nm_linear as nl

    p = NMPattern(2, 8)
    w = nm_weight(96, 256, p, seed=4)
    kw = KernelWeight.from_packed(pack_nm(w, p))
    x = torch.randn(50, 256)
    monkeypatch.setattr(nl, "FALLBACK_ELEMENTS", 50 * 64 * 10)   # 10 rows of 64 kept inputs per block
    sizes, real = [], torch.einsum

    def spy(eq, a, b):
        sizes.append(a.numel())
        return real(eq, a, b)

    monkeypatch.setattr(nl.torch, "einsum", spy)
    y = nm_linear(x, kw, torch.ones(96), backend="torch")
    monkeypatch.setattr(nl.torch, "einsum", real)
    torch.testing.assert_close(y, x @ w.t() + 1, atol=ATOL, rtol=0)
    assert len(sizes) == 10 and max(sizes) <= 50 * 64 * 10


@needs_c
@pytest.mark.parametrize("pattern", [NMPattern(2, 8), NMPattern(1, 8), NMPattern(3, 16), NMPattern(2, 4)], ids=str)
def test_compact_weight_keeps_only_the_fp16_layout_and_computes_the_same(pattern):
    """compact(): the many-token layout is the only stored form, fp16 values stay fp16 in it (the
    kernel converts them once a call), and the canonical values / indices rebuilt from the layout
    are bit-identical to the packed ones, so every path (kernel, fallback, dense()) agrees."""
    w = nm_weight(67, 256, pattern, seed=7).half().float()     # 67 rows: padded row groups
    packed = pack_nm(w, pattern, torch.float16)
    full = KernelWeight.from_packed(packed)
    kw = KernelWeight.from_packed(packed, compact=True)
    assert kw._canonical is None and set(kw.__dict__) >= {"group_layout"}
    vals, offs = kw.group_layout
    assert vals.dtype == torch.float16
    assert kw.nbytes == vals.numel() * 2 + offs.numel() * 2
    assert torch.equal(kw.values, full.values) and torch.equal(kw.indices, full.indices)
    torch.testing.assert_close(kw.dense(), w, atol=0, rtol=0)
    for t in (5, 40, 130):
        x, b = torch.randn(t, 256), torch.randn(67)
        ref = x @ w.t() + b
        y = nm_linear(x, kw, b)
        torch.testing.assert_close(y, nm_linear(x, full, b), atol=0, rtol=0)   # same fp32 arithmetic
        torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(nm_linear(x, kw, b, backend="torch"), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(nm_linear(x[:1], kw, b), ref[:1], atol=ATOL, rtol=0)   # lane layout from it


@needs_c
def test_fp16_layout_converts_subnormals_and_the_tail_exactly():
    """The kernel's fp16 -> fp32 conversion (F16C eight at a time, by hand for the tail) is exact
    for normal, subnormal, zero and signed values: one output row reads one value at a time."""
    p = NMPattern(1, 8)
    specials = torch.tensor([1.0, -2.5, 6e-8, -6e-8, 3e-5, 65504.0, -0.0, 1e-7], dtype=torch.float16)
    w = torch.zeros(len(specials), 8)
    w[:, 3] = specials.float()
    kw = KernelWeight.from_packed(pack_nm(w, p, torch.float16), compact=True)
    x = torch.zeros(3, 8)
    x[:, 3] = 1.0
    y = nm_linear(x, kw)
    torch.testing.assert_close(y, specials.float().expand(3, -1), atol=0, rtol=0)


def test_unpack_bits_in_chunks_round_trips(monkeypatch):
    """unpack_bits decodes a chunk of codes at a time; chunks that end mid-byte for odd widths
    must not shift any code."""
    import numpy as np

    import sparsetx.formats.packed as pk

    monkeypatch.setattr(pk, "UNPACK_CODES", 24)
    rng = np.random.default_rng(0)
    for bits in (1, 3, 5, 8, 13):
        codes = rng.integers(0, 2 ** bits, size=101).astype(np.uint64)
        assert np.array_equal(pk.unpack_bits(pk.pack_bits(codes, bits), bits, 101), codes)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")
def test_packed_load_maps_the_file_instead_of_copying_it(tmp_path):
    """A packed folder's dense tensors become copy-on-write memory maps of the file (an embedding
    table costs the pages a batch touches), and writing to one changes neither the file nor a
    later load."""
    from sparsetx.formats.folder import WEIGHTS, load_packed

    tiny_packed_bert(tmp_path / "m", 3000, "float16")
    fast = load_packed(tmp_path / "m", fast=True)
    emb = fast.bert.embeddings.word_embeddings.weight
    address = emb.data_ptr()
    mapped_from = None
    for line in open("/proc/self/maps"):
        parts = line.split()
        lo, hi = (int(v, 16) for v in parts[0].split("-"))
        if lo <= address < hi:
            mapped_from = parts[-1] if len(parts) >= 6 else None
    assert mapped_from is not None and mapped_from.endswith(WEIGHTS)
    expect = emb.detach().clone()
    with torch.no_grad():
        emb[0].fill_(7.0)
    again = load_packed(tmp_path / "m", fast=True)
    assert torch.equal(again.bert.embeddings.word_embeddings.weight, expect)


@needs_c
def test_compiled_sparse_model_equals_eager(tmp_path):
    """load_model(compile=True): torch.compile traces the N:M kernel as one custom operator (its
    fake implementation gives the shapes) and computes what the eager model computes, for two
    input shapes (the second recompiles with a dynamic dimension)."""
    from sparsetx.models import load_model

    tiny_packed_bert(tmp_path / "m", 100, "int8")
    eager = load_model(tmp_path / "m", fast=True)
    compiled = load_model(tmp_path / "m", fast=True, compile=True)
    assert not any(p.requires_grad for p in compiled.parameters())
    from torch._dynamo.utils import counters

    counters.clear()
    for shape in ((2, 9), (3, 21)):
        ids = torch.randint(0, 100, shape)
        with torch.inference_mode():
            torch.testing.assert_close(compiled(input_ids=ids).logits, eager(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])


def test_allocator_tuning_is_once_and_can_be_refused(monkeypatch):
    """tune_allocator sets glibc's thresholds once a process (a no-op without glibc), and
    SPARSETX_MALLOC=default leaves them alone."""
    from sparsetx.kernels import allocator

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(allocator, "_libc", lambda: FakeLibc())
    allocator.tune_allocator.cache_clear()
    monkeypatch.setenv("SPARSETX_MALLOC", "default")
    assert allocator.tune_allocator() is False and calls == []
    allocator.tune_allocator.cache_clear()
    monkeypatch.delenv("SPARSETX_MALLOC")
    assert allocator.tune_allocator() is True and allocator.tune_allocator() is True
    assert calls == [(allocator.M_MMAP_THRESHOLD, 64 << 20), (allocator.M_TRIM_THRESHOLD, 128 << 20)]
    allocator.trim_heap()
    assert calls[-1] == ("trim", 0)
    allocator.tune_allocator.cache_clear()


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_many_rows_span_several_row_panels(dtype, threads):
    """More rows than one panel of partial sums (512 row groups = 1536 rows) per thread, with a
    partial last panel and a partial row group: every value type, 1 and 2 threads."""
    p = NMPattern(2, 8)
    w = nm_weight(3203, 64, p, seed=9)
    kw = KernelWeight.from_packed(pack_nm(w, p, dtype), compact=True)
    x, b = torch.randn(37, 64), torch.randn(3203)
    y, ref = nm_linear(x, kw, b, threads=threads), x @ kw.dense().t() + b
    if dtype == torch.int8:   # the pair kernel: int16 activations
        assert_within_pair_bound(y, ref, kw, x)
    else:
        torch.testing.assert_close(y, ref, atol=ATOL, rtol=0)


@needs_c
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("tokens", [2, 31, 65])
def test_pair_kernel_every_pattern_within_its_bound(pattern, tokens):
    """int8 weights, many tokens: the pair kernel (a partial row group, K of 3 blocks with a partial
    last one, odd kept counts paired with a zero partner, partial 32-token tiles) stays within
    pair_error_bound of the dequantised product, and the compact pair layout gives back the packed
    values and indices bit for bit."""
    k = 8 * pattern.m + 2 * pattern.m     # not a whole number of 64-column blocks for M <= 32
    w = nm_weight(37, k, pattern, seed=11)
    packed = pack_nm(w, pattern, torch.int8)
    loose, kw = KernelWeight.from_packed(packed), KernelWeight.from_packed(packed, compact=True)
    assert kw.pair_layout is not None and kw._canonical is None
    for a, b in zip(loose.canonical(), kw.canonical()):
        assert torch.equal(a, b)
    x, bias = torch.randn(tokens, k), torch.randn(37)
    for threads in (1, 2):
        assert_within_pair_bound(nm_linear(x, kw, bias, threads=threads), x @ kw.dense().t() + bias, kw, x)


@needs_c
def test_pair_kernel_sums_cannot_overflow_int32():
    """The worst case qmax allows: 7:8 over 4096 inputs, every weight at +127 and every input at the
    token's maximum; and a token of zeros (scale 0) gives the bias alone."""
    p = NMPattern(7, 8)
    w = torch.ones(6, 4096) * nm_mask(torch.rand(6, 4096), p)
    w[3] *= -1
    kw = KernelWeight.from_packed(pack_nm(w, p, torch.int8), compact=True)
    assert kw.pair_args[-1] < 32767          # qmax shrunk for the 1792 pairs a row
    x = torch.full((3, 4096), 2.5)
    x[1] = 0.0
    y = nm_linear(x, kw, torch.arange(6.0))
    want = torch.tensor([3584 * 2.5] * 3 + [-3584 * 2.5] + [3584 * 2.5] * 2) + torch.arange(6.0)
    torch.testing.assert_close(y[0], want, rtol=1e-6, atol=0)
    torch.testing.assert_close(y[1], torch.arange(6.0))


@needs_c
def test_pair_layout_declines_too_many_distinct_pairs():
    """A block with 1024 or more distinct pairs (16-bit offsets) keeps the row-group layout."""
    p = NMPattern(3, 32)   # a 64-column block pairs across its two groups: up to 2016 pairs
    w = nm_weight(2000, 64, p, seed=2)
    kw = KernelWeight.from_packed(pack_nm(w, p, torch.int8), compact=True)
    assert kw.pair_layout is None and "group_layout" in kw.__dict__
    x = torch.randn(5, 64)
    torch.testing.assert_close(nm_linear(x, kw), x @ kw.dense().t(), atol=ATOL, rtol=0)


needs_select = pytest.mark.skipif(library() is None or not library().has_select(),
                                  reason="the select kernel needs AVX2 (and the C build)")


@needs_c
@pytest.mark.parametrize("pattern,inp", [("2:8", 128), ("1:8", 192), ("4:8", 96), ("2:4", 64), ("1:16", 160),
                                         ("3:32", 64), ("5:8", 40)])
def test_select_layout_round_trips_bit_exactly(pattern, inp):
    """An int8 weight stored only as the select layout (activation_bits 8) gives back its canonical
    values and indices bit for bit (a partial last block of 64 where 64 does not divide the input)."""
    p = NMPattern.parse(pattern)
    packed = pack_nm(nm_weight(37, inp, p, seed=3), p, torch.int8)
    want = KernelWeight.from_packed(packed).canonical()
    kw = KernelWeight.from_packed(packed)
    assert kw.select_layout is not None
    kw._canonical = None   # what compact(8) leaves: the select layout alone
    assert "pair_layout" not in kw.__dict__ and "group_layout" not in kw.__dict__
    got = kw.canonical()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_c
def test_select_layout_declines_groups_straddling_blocks():
    """M not dividing 64 (e.g. 2:6): a 64-column block would cut groups; the pair layout serves."""
    p = NMPattern(2, 6)
    kw = KernelWeight.from_packed(pack_nm(nm_weight(5, 96, p), p, torch.int8))
    assert kw.select_layout is None
    x = torch.randn(40, 96)
    y = nm_linear(x, kw, activation_bits=8)   # the pair kernel at 8-bit activations
    assert_within_pair_bound(y, x @ kw.dense().T, kw, x, activation_bits=8)
    assert (y - nm_linear(x, kw)).abs().max() > 1e-3   # and really rounded to 8 bits


@needs_select
@pytest.mark.parametrize("pattern", ["2:8", "1:8", "4:8", "2:4", "1:16"])
def test_select_kernel_within_the_int8_activation_bound(pattern):
    """The select kernel (int8 activations; vpermb + vpdpbusd on AVX-512, vpshufb + vpsignb +
    vpmaddubsw on AVX2, one or two shuffles a quad) is within its stated rounding bound of x W^T
    (qmax 127), with and without bias and GELU, for rows not filling a lane group, partial token
    tiles and both thread splits; and its integer sums are those of the pair kernel run at qmax
    127, so the two agree to fp32 rounding."""
    from sparsetx.kernels.nm_linear import _pairs, _select, pair_error_bound

    p = NMPattern.parse(pattern)
    kw = KernelWeight.from_packed(pack_nm(nm_weight(77, 192, p, seed=6), p, torch.int8))
    bias = torch.randn(77)
    lib = library()
    for tokens, threads in ((37, 1), (37, 2), (5, 2), (128, 2)):
        x = torch.randn(tokens, 192, generator=torch.Generator().manual_seed(tokens))
        want = x @ kw.dense().T + bias
        bound = pair_error_bound(kw, x, activation_bits=8) + 1e-4
        y = _select(lib, x, kw.select_layout, kw.select_geometry, kw.select_scales, bias, 77, threads)
        assert ((y - want).abs() <= bound).all()
        assert (y - want).abs().max() > 1e-4   # it really rounds to 8 bits (the int16 kernel is ~100x closer)
        w, off, cols, starts, kb, _ = kw.pair_args
        y16 = _pairs(lib, x, (w, off, cols, starts, kb, 127), kw.group_scales, bias, 77, p.n, p.m, threads)
        torch.testing.assert_close(y, y16, atol=1e-5, rtol=1e-5)
        g = _select(lib, x, kw.select_layout, kw.select_geometry, kw.select_scales, bias, 77, threads, 1)
        assert ((g - torch.nn.functional.gelu(want)).abs() <= 1.13 * bound).all()


@needs_select
def test_select_geometry_follows_the_cpu_and_the_pattern():
    """AVX-512 VBMI: 16 rows a lane group, blocks of 64; AVX2: 8 rows, blocks of 16 where a
    pattern keeps at least 3 inputs of 16 (one shuffle a quad), else 32 (two); M dividing neither
    block width: no select layout (the pair kernel serves)."""
    lanes = library().has_select()
    assert lanes in (8, 16)
    for pattern, avx2 in (("2:8", (8, 16)), ("4:8", (8, 16)), ("2:4", (8, 16)), ("1:8", (8, 32)),
                          ("1:16", (8, 32)), ("3:32", (8, 32))):
        p = NMPattern.parse(pattern)
        kw = KernelWeight.from_packed(pack_nm(nm_weight(8, 64, p), p, torch.int8))
        assert kw.select_geometry == (avx2 if lanes == 8 else (16, 64)), pattern
        g, width = kw.select_geometry
        idx, w, starts, _ = kw.select_layout
        assert idx.numel() == w.numel() == 4 * g * int(starts[-1])   # one lane group (8 rows padded to G)
        assert int(idx.max()) < width
    p = NMPattern(2, 6)
    assert KernelWeight.from_packed(pack_nm(nm_weight(8, 96, p), p, torch.int8)).select_geometry is None


@needs_select
def test_int8_activation_model_eager_compiled_and_close_to_exact(tmp_path):
    """load_model(activation_bits=8): every N:M layer stores the select layout (less memory than the
    pair layout), the compiled model (the select kernel as a custom operator, no graph break) equals
    the eager one, and both stay close to the int16 model's logits; bad bits are refused."""
    from sparsetx.formats.folder import load_packed
    from sparsetx.models import load_model

    tiny_packed_bert(tmp_path / "m", 100, "int8")
    m8 = load_model(tmp_path / "m", fast=True, activation_bits=8)
    m16 = load_model(tmp_path / "m", fast=True)
    layers8 = [m for m in m8.modules() if isinstance(m, SparseLinear)]
    layers16 = [m for m in m16.modules() if isinstance(m, SparseLinear)]
    assert layers8 and all(m.select_weights is not None and m.pair_weights is None for m in layers8)
    assert sum(m.weight_nm.nbytes for m in layers8) < sum(m.weight_nm.nbytes for m in layers16)
    compiled = load_model(tmp_path / "m", fast=True, compile=True, activation_bits=8)
    from torch._dynamo.utils import counters

    counters.clear()
    ids = torch.randint(0, 100, (3, 40))
    with torch.inference_mode():
        a, b, c = (m(input_ids=ids).logits for m in (m8, compiled, m16))
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.nn.functional.cosine_similarity(a.flatten(), c.flatten(), dim=0) > 0.999
    with pytest.raises(ValueError, match="activation_bits"):
        load_packed(tmp_path / "m", fast=True, activation_bits=4)


@pytest.fixture(scope="module")
def portable_lib(tmp_path_factory):
    """nm_cpu.c built without AVX2/FMA/F16C: what a CPU that lacks them runs (the scalar paths)."""
    import shutil

    from sparsetx.kernels import loader

    cc = shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    target = tmp_path_factory.mktemp("portable") / "nm_cpu-portable.so"
    assert loader._build(cc, [f for f in loader.compile_flags() if not f.startswith("-m")], target) is None
    lib = loader._load(target)
    assert lib is not None and lib.has_f16c() == 0
    return lib


def test_portable_build_without_simd_computes_the_same(portable_lib):
    """The one-token, many-token, mask, int8 and attention kernels of the portable build give the
    reference products."""
    from sparsetx.formats.packed import quantize_rows
    from sparsetx.kernels.attention import reference_attention, reference_int8_attention
    from sparsetx.kernels.loader import ptr
    from sparsetx.kernels.nm_linear import VTYPES, pair_error_bound

    lib = portable_lib
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 64, generator=g)
    for pattern, dtype in ((NMPattern(2, 8), torch.float32), (NMPattern(6, 8), torch.int8)):
        kw = KernelWeight.from_packed(pack_nm(nm_weight(21, 64, pattern, seed=5), pattern, dtype))
        want = x @ kw.dense().T
        vals, pos = kw.lane_layout
        y = torch.empty(vals.shape[0] * 8)
        lib.nm_linear_vector(ptr(x[0]), ptr(vals), ptr(pos), 21, y.numel(), 64, pattern.n, pattern.m, None, ptr(y),
                             VTYPES[vals.dtype], ptr(kw.lane_scales), 1)
        torch.testing.assert_close(y[:21], want[0], atol=ATOL, rtol=1e-5)
        gv, go = kw.group_layout
        y = torch.empty(3, 21)
        lib.nm_linear_tokens(ptr(x), 64, 3, 64, ptr(gv), ptr(go), 21, gv.shape[1], pattern.n, pattern.m, kw.k_block,
                             None, ptr(y), VTYPES[gv.dtype], ptr(kw.group_scales), 2)
        torch.testing.assert_close(y, want, atol=ATOL, rtol=1e-5)
        if dtype == torch.int8:
            w8, off, cols, starts = kw.pair_layout
            y = torch.empty(3, 21)
            _, _, _, _, kb, qmax = kw.pair_args
            lib.nm_linear_pairs(ptr(x), 64, 3, 64, ptr(w8), ptr(off), ptr(cols), ptr(starts), 21, pattern.n,
                                pattern.m, kb, ptr(kw.group_scales), None, ptr(y), qmax, 0, 2)
            assert_within_pair_bound(y, want, kw, x)
            lib.nm_linear_pairs(ptr(x), 64, 3, 64, ptr(w8), ptr(off), ptr(cols), ptr(starts), 21, pattern.n,
                                pattern.m, kb, ptr(kw.group_scales), None, ptr(y), qmax, 1, 2)   # with GELU (erff)
            assert ((y - torch.nn.functional.gelu(want)).abs() <= 1.13 * pair_error_bound(kw, x) + 1e-5).all()
            idx, sw, sst, wsum = kw.select_layout   # the scalar select kernel (never called where has_select is 0)
            y = torch.empty(3, 21)
            lib.nm_linear_select(ptr(x), 64, 3, 64, ptr(idx), ptr(sw), ptr(sst), ptr(wsum), 21, *kw.select_geometry,
                                 ptr(kw.select_scales), None, ptr(y), 0, 1)
            assert ((y - want).abs() <= pair_error_bound(kw, x, activation_bits=8) + 1e-5).all()
            mv, mm = kw.mask_layout
            y = torch.empty(21)
            lib.mask_linear(ptr(x[1]), ptr(mv), ptr(mm), ptr(kw.scales), None, ptr(y), 21, 64, kw.mask_n, 1)
            torch.testing.assert_close(y, want[1], atol=ATOL, rtol=1e-5)
    q8, s8 = quantize_rows(torch.randn(10, 64, generator=g))
    y = torch.empty(3, 10)
    lib.int8_linear(ptr(x), 3, ptr(q8), ptr(s8), None, ptr(y), 10, 64, 1)
    torch.testing.assert_close(y, x @ (q8.float() * s8[:, None]).T, atol=ATOL, rtol=1e-5)
    q, k, v = (torch.randn(h, n, 16, generator=g) for h, n in ((4, 1), (2, 70), (2, 70)))
    out, received = torch.empty(4, 1, 16), torch.zeros(70, dtype=torch.float64)
    lib.attention_fused(ptr(q), ptr(k), ptr(v), 4, 2, 1, 70, 70, 16, 0.25, None, None, ptr(out), ptr(received), 2)
    ref_out, ref_received = reference_attention(q, k, v, 0.25)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(received, ref_received, atol=1e-6, rtol=1e-5)
    # the blocked many-query kernel: 2 query heads a KV head, 9 queries, d = 40 (a 32 + 8 split)
    q, k, v = (torch.randn(h, n, 40, generator=g) for h, n in ((4, 9), (2, 70), (2, 70)))
    out, received = torch.empty(9, 4, 40), torch.zeros(70, dtype=torch.float64)
    lib.attention_encoder(ptr(q), ptr(k), ptr(v), 1, 4, 2, 9, 70, 40, 0, 9 * 40, 40, 0, 70 * 40, 40, 0, 70 * 40, 40, 0.25,
                          None, ptr(out), 0, 40, 160, ptr(received), 32, 2)
    ref_out, ref_received = reference_attention(q, k, v, 0.25)
    torch.testing.assert_close(out.transpose(0, 1), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(received, ref_received, atol=1e-6, rtol=1e-5)
    # int8 attention (bits 8): the scalar integer path against its PyTorch twin
    lib.attention_encoder(ptr(q), ptr(k), ptr(v), 1, 4, 2, 9, 70, 40, 0, 9 * 40, 40, 0, 70 * 40, 40, 0, 70 * 40, 40, 0.25,
                          None, ptr(out), 0, 40, 160, None, 8, 2)
    want = reference_int8_attention(q[None], k[None], v[None], 0.25)[0]
    torch.testing.assert_close(out.transpose(0, 1), want, atol=2e-3 * v.abs().max().item(), rtol=0)


@pytest.mark.parametrize("pattern", ["2:8", "1:8", "3:4", "6:8"])
def test_pair_kernel_avx512_path_equals_the_avx2_one(pattern, tmp_path_factory):
    """On a CPU with AVX-512 VNNI the pair kernel multiplies on zmm registers (vpdpwssd, 12 rows a
    step); its integer sums are exact, so its output must equal the AVX2 build's bit for bit, for
    row counts that leave a remainder of row groups, a partial token tile, and both thread splits."""
    import shutil

    from sparsetx.kernels import loader
    from sparsetx.kernels.nm_linear import _pairs

    flags = loader.compile_flags()
    if "-mavx512vnni" not in flags:
        pytest.skip("this CPU has no AVX-512 VNNI: the default build is the AVX2 one")
    cc = shutil.which("gcc")
    target = tmp_path_factory.mktemp("avx2") / "nm_cpu-avx2.so"
    assert loader._build(cc, [f for f in flags if "512" not in f], target) is None
    avx2, default = loader._load(target), loader.library()
    p = NMPattern.parse(pattern)
    kw = KernelWeight.from_packed(pack_nm(nm_weight(77, 128, p, seed=8), p, torch.int8))
    bias = torch.randn(77)
    for tokens, threads in ((70, 1), (70, 2), (33, 2), (5, 1)):
        x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(tokens))
        ys = [_pairs(lib, x, kw.pair_args, kw.group_scales, bias, 77, p.n, p.m, threads) for lib in (avx2, default)]
        assert torch.equal(ys[0], ys[1])
        assert_within_pair_bound(ys[1] - bias, x @ kw.dense().T, kw, x)


def test_portable_build_runs_the_whole_decode_step(portable_lib, llama, monkeypatch):
    """The decode step's C layer loop (llama_step) of the portable build: the same logits as the
    full path on the tiny Llama."""
    from sparsetx.attention import fast_decode
    from sparsetx.attention.decoder import DecoderConfig
    from sparsetx.attention.decoder_eval import streaming_pass

    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(7))
    full = streaming_pass(llama, ids, DecoderConfig(kv_budget=10, fast_step=False), 8, keep_logits=True)
    monkeypatch.setattr(fast_decode, "library", lambda: portable_lib)
    c_step = streaming_pass(llama, ids, DecoderConfig(kv_budget=10), 8, keep_logits=True)
    assert c_step.runtime.fast.lib is portable_lib and c_step.runtime.fast.plan() is not None
    torch.testing.assert_close(c_step.logits, full.logits, atol=5e-5, rtol=1e-4)
    assert c_step.preds == full.preds


@needs_c
@pytest.mark.parametrize("dtype", [torch.int8, torch.float32], ids=str)
def test_gelu_inside_the_layer_equals_gelu_after_it(dtype):
    """activation="gelu": int8 weights get it in the pair kernel's output pass (within the kernel's
    bound, GELU's slope is below 1.13), other weights after the product (exactly F.gelu); one token
    and the PyTorch route too; an unknown activation is an error."""
    import torch.nn.functional as F

    from sparsetx.kernels.nm_linear import pair_error_bound

    p = NMPattern(2, 8)
    w = nm_weight(45, 128, p, seed=3)
    kw = KernelWeight.from_packed(pack_nm(w, p, dtype), compact=True)
    x, b = 3 * torch.randn(70, 128), torch.randn(45)
    plain = nm_linear(x, kw, b)
    got = nm_linear(x, kw, b, activation="gelu")
    ref = F.gelu(x @ kw.dense().t() + b)
    if dtype == torch.int8:
        slack = 1.13 * pair_error_bound(kw, x) + 1e-5
        assert ((got - ref).abs() <= slack).all()
        assert ((got - F.gelu(plain)).abs() <= 1e-5).all()     # the in-kernel erf against torch's
    else:
        assert torch.equal(got, F.gelu(plain))
    torch.testing.assert_close(nm_linear(x[:1], kw, b, activation="gelu"), F.gelu(nm_linear(x[:1], kw, b)))
    torch.testing.assert_close(nm_linear(x, kw, b, activation="gelu", backend="torch"), ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="activation 'relu'"):
        nm_linear(x, kw, b, activation="relu")


@needs_c
@pytest.mark.parametrize("value_dtype", ["int8", "float32"])
def test_fast_bert_carries_its_gelu_inside_the_n_m_layer(tmp_path, value_dtype):
    """load_model(fast=True) moves BERT's intermediate GELU into the SparseLinear before it (an
    identity in its place) and computes what the model computes with the GELU as a module."""
    from transformers.activations import GELUActivation

    from sparsetx.kernels.nm_linear import fuse_activations
    from sparsetx.models import load_model

    tiny_packed_bert(tmp_path / "m", 100, value_dtype)
    fused = load_model(tmp_path / "m", fast=True)
    block = fused.bert.encoder.layer[0].intermediate
    assert block.dense.activation == "gelu" and isinstance(block.intermediate_act_fn, nn.Identity)
    assert fuse_activations(fused) == 0                      # nothing left to fuse
    plain = load_model(tmp_path / "m", fast=True)
    pb = plain.bert.encoder.layer[0].intermediate
    pb.dense.activation, pb.intermediate_act_fn = None, GELUActivation()
    ids = torch.randint(0, 100, (2, 33))
    with torch.inference_mode():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=0)

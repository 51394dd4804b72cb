"""int8 values with per-row scales: the packed format's fourth value type, through the kernels.

Quantisation is symmetric per output row (scale = max |w| / 127); the error of each kept weight is
at most half its row's scale, packing a dequantised weight again gives the same bytes, and every
path (file, fast load, kernel, fallback) computes with the dequantised weight."""
from __future__ import annotations

import shutil

import pytest
import torch

import packed_mutants as pm
from conftest import assert_within_pair_bound
from sparsetx.formats.packed import PackedFormatError, pack_nm, unpack_nm
from sparsetx.kernels.loader import library
from sparsetx.kernels.nm_linear import KernelWeight, nm_linear
from sparsetx.nm.mask import apply_mask, nm_mask
from sparsetx.nm.pattern import NMPattern

needs_c = pytest.mark.skipif(library() is None, reason="C kernel could not be built here (no gcc?)")
ATOL = 1e-4   # fp32 sums of a few hundred products in another order


def nm_weight(out, inp, pattern, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    return apply_mask(w, nm_mask(w.abs(), pattern))


@pytest.mark.parametrize("pattern", ["2:8", "1:4", "3:16"])
def test_int8_quantisation_error_and_bit_exact_round_trip(pattern):
    p = NMPattern.parse(pattern)
    w = nm_weight(37, 64, p, seed=1)
    w[5] = 0.0                                  # an all-zero row: scale 0, values 0
    packed = pack_nm(w, p, torch.int8)
    assert packed.values.dtype == torch.int8 and packed.scales.shape == (37,)
    assert packed.scales[5] == 0 and int(packed.values.abs().max()) == 127
    assert packed.nbytes == packed.values.numel() + packed.indices.numel() + 4 * 37
    deq = unpack_nm(packed)
    assert deq.dtype == torch.float32
    err = (deq - w).abs()
    assert bool((err <= packed.scales.view(-1, 1) / 2 + 1e-7).all())   # round to nearest
    assert bool(((deq != 0) <= (w != 0)).all())                          # nothing appears where w is pruned
    again = pack_nm(deq, p, torch.int8)
    assert torch.equal(again.values, packed.values) and torch.equal(again.indices, packed.indices)
    assert torch.equal(again.scales, packed.scales)


def test_int8_validation_names_the_defect():
    p = NMPattern(2, 8)
    packed = pack_nm(nm_weight(4, 16, p), p, torch.int8)
    bad = pack_nm(nm_weight(4, 16, p), p, torch.int8)
    bad.scales = None
    with pytest.raises(PackedFormatError, match="per-row scales"):
        bad.validate()
    packed.values[0, 0] = -128
    with pytest.raises(PackedFormatError, match="symmetric range"):
        packed.validate()


@needs_c
@pytest.mark.parametrize("pattern", ["2:8", "1:8", "2:4", "3:16"])
@pytest.mark.parametrize("tokens", [1, 7, 40, 130])
def test_int8_kernel_equals_the_dequantised_product(pattern, tokens):
    """67 rows (a partial row group) and 96 inputs (kn not a multiple of 8 for 3:16: the
    conversion's scalar tail): the kernel's int8 -> fp32 conversion applies each row's scale."""
    p = NMPattern.parse(pattern)
    w = nm_weight(67, 96, p, seed=3)
    kw = KernelWeight.from_packed(pack_nm(w, p, torch.int8), compact=True)
    assert kw.pair_layout is not None and "group_layout" not in kw.__dict__   # int8: the pair layout is stored
    deq = kw.dense()
    x, b = torch.randn(tokens, 96), torch.randn(67)
    ref = x @ deq.t() + b
    if tokens == 1:
        torch.testing.assert_close(nm_linear(x, kw, b), ref, atol=ATOL, rtol=0)
    else:   # many tokens: int16 activations, within the stated bound (and not exact: the int path ran)
        y = nm_linear(x, kw, b)
        assert_within_pair_bound(y, ref, kw, x)
        assert (y - ref).abs().max() > 1e-6
    torch.testing.assert_close(nm_linear(x, kw, b, backend="torch"), ref, atol=ATOL, rtol=0)
    if tokens == 1:   # the one-token kernel reads int8 lanes and scales the sums
        assert kw.lane_layout[0].dtype == torch.int8 and kw.lane_scales.numel() == 72


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory):
    return pm.make_folder(tmp_path_factory.mktemp("int8"), "int8")


def test_int8_folder_loads_slow_and_fast_alike(int8_folder):
    from sparsetx.formats.folder import load_packed, read_header

    folder, truth = int8_folder
    assert read_header(folder)["value_dtype"] == "int8"
    for mode in ("load", "fast", "info"):
        assert pm.judge(folder, truth, mode) == "ok"
    slow, fast = load_packed(folder), load_packed(folder, fast=True)
    ids = torch.randint(0, 96, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, slow(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_int8_scales_are_checksummed_and_checked(int8_folder, tmp_path):
    """A flipped scale byte is a checksum mismatch; a re-hashed NaN or negative scale, and a
    re-hashed -128 value, are refused by name."""
    folder, _ = int8_folder
    layer = "bert.encoder.layer.0.attention.self.query.weight"
    cases = {("nm_scales", b"\x00\x00\xc0\x7f", True): "NaN or infinite",        # NaN fp32
             ("nm_scales", b"\x00\x00\x80\xbf", True): "finite and non-negative",  # -1.0
             ("nm_values", b"\x80", True): "symmetric range",                      # -128
             ("nm_scales", b"\x01", False): "checksum mismatch"}
    for i, ((suffix, payload, rehash), message) in enumerate(cases.items()):
        pm.expect_refusal(folder, tmp_path / f"c{i}", f"{layer}.{suffix}", payload, message, rehash)


def test_int8_folder_without_scales_is_refused(int8_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    from sparsetx.formats.folder import load_packed

    folder, _ = int8_folder
    target = tmp_path / "noscales"
    shutil.copytree(folder, target)
    path = target / pm.WEIGHTS
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    key = "bert.encoder.layer.0.attention.self.query.weight.nm_scales"
    del tensors[key]
    import json
    header = json.loads(meta["sparsetx"])
    del header["sha256"][key]
    save_file(tensors, path, metadata={"sparsetx": json.dumps(header)})
    with pytest.raises(PackedFormatError, match="nm_scales is missing"):
        load_packed(target)

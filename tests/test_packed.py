"""Packed N:M format: bit-exact round trips, sizes, and clear errors on damaged files."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch

from sparsetx.formats import folder as folder_mod
from sparsetx.formats.folder import WEIGHTS, load_packed, read_packed, save_packed
from sparsetx.formats.packed import (PackedFormatError, index_bits, pack_bits, pack_nm, packed_bytes, rank_decode,
                                     rank_encode, unpack_bits, unpack_nm)
from sparsetx.nm.mask import apply_mask, nm_mask
from sparsetx.nm.pattern import NMPattern

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
ALL_PATTERNS = [NMPattern(n, m) for m in (4, 8, 16, 32) for n in range(1, m)]


def nm_weight(pattern: NMPattern, out: int = 5, groups: int = 3, seed: int = 0) -> torch.Tensor:
    w = torch.randn(out, groups * pattern.m, generator=torch.Generator().manual_seed(seed))
    return apply_mask(w, nm_mask(w.abs(), pattern))


@pytest.mark.parametrize("pattern", ALL_PATTERNS, ids=str)
@pytest.mark.parametrize("encoding", ["index", "rank"])
def test_round_trip_bit_exact_every_pattern_and_dtype(pattern, encoding):
    w = nm_weight(pattern, seed=pattern.n * 100 + pattern.m)
    for dtype in DTYPES:
        packed = pack_nm(w, pattern, dtype, encoding)
        back = unpack_nm(packed)
        assert back.dtype == dtype
        assert torch.equal(back.view(BITS[dtype]), w.to(dtype).view(BITS[dtype]))  # bit for bit, signs of zero too
        bits = dtype.itemsize * 8
        assert packed.nbytes == packed_bytes(tuple(w.shape), pattern, bits, encoding)


def test_sizes_match_the_papers_arithmetic():
    """b = 16-bit values with per-value indices: M*16 / (N*(16 + ceil(log2 M))) smaller than dense fp16.

    SEEDS.md lists 4:16 -> 3.56x; its own formula gives 256 / (4 * 20) = 3.20x (3.56x would need
    2-bit indices), so 3.20 is asserted here.
    """
    for (n, m), ratio in {(2, 4): 1.78, (1, 4): 3.56, (2, 8): 3.37, (1, 8): 6.74, (4, 16): 3.20}.items():
        shape = (768, 768)
        dense = shape[0] * shape[1] * 2
        assert dense / packed_bytes(shape, NMPattern(n, m), 16) == pytest.approx(ratio, abs=0.01)
    assert index_bits(NMPattern(2, 4)) == 2 and index_bits(NMPattern(3, 8)) == 3
    assert index_bits(NMPattern(2, 4), "rank") == 3 and index_bits(NMPattern(16, 32), "rank") == math.ceil(math.log2(math.comb(32, 16)))


def test_bitstream_layout_little_endian():
    # codes 1, 2, 3 at 3 bits: bits 100 010 110 (LSB first) -> byte0 = 0b11010001, byte1 = 0b0
    assert pack_bits([1, 2, 3], 3).tolist() == [0b11010001, 0b0]
    assert unpack_bits(pack_bits([5, 0, 7, 2], 3), 3, 4).tolist() == [5, 0, 7, 2]
    pos = torch.tensor([[0, 1], [0, 3], [2, 3], [1, 2]]).numpy()
    assert rank_decode(rank_encode(pos, 4), 4, 2).tolist() == pos.tolist()


def test_fewer_nonzeros_than_n_and_zero_groups():
    w = torch.zeros(2, 8)
    w[0, 5] = -1.5
    back = unpack_nm(pack_nm(w, NMPattern(2, 4)))
    assert torch.equal(back, w)


def test_pack_rejects_non_nm_weight():
    w = torch.ones(2, 8)
    with pytest.raises(ValueError, match="is not 2:4: row 0, group 0 has 4 non-zeros"):
        pack_nm(w, NMPattern(2, 4), name="layer.x")
    with pytest.raises(ValueError, match="not divisible by M=8"):
        pack_nm(torch.zeros(2, 12), NMPattern(2, 8))


def test_corrupted_index_codes_are_detected():
    w = nm_weight(NMPattern(2, 4))
    packed = pack_nm(w, NMPattern(2, 4))
    packed.indices[0] = 0  # positions (0, 0): not strictly increasing
    with pytest.raises(PackedFormatError, match="corrupted indices"):
        unpack_nm(packed)
    short = pack_nm(w, NMPattern(2, 4))
    short.indices = short.indices[:-1]
    with pytest.raises(PackedFormatError, match="expected"):
        unpack_nm(short)


# --- folders -----------------------------------------------------------------------------------

@pytest.fixture
def pruned_bert(tiny_bert):
    from sparsetx.models import load_model
    from sparsetx.nm.prune import NMConfig, sparsify

    model = load_model(tiny_bert)
    sparsify(model, NMConfig("2:8", overrides={r"layer\.1\.output\.dense": "1:4"}))
    return model


@pytest.mark.parametrize("value_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("encoding", ["index", "rank"])
def test_folder_round_trip(pruned_bert, tmp_path, value_dtype, encoding):
    from sparsetx.nm.prune import recorded_patterns

    patterns = recorded_patterns(pruned_bert)
    assert str(patterns["bert.encoder.layer.1.output.dense"]) == "1:4"
    save_packed(pruned_bert, tmp_path / "m", patterns, value_dtype, encoding)
    loaded = load_packed(tmp_path / "m")
    dtype = getattr(torch, value_dtype)
    for key, ref in pruned_bert.state_dict().items():
        got = loaded.state_dict()[key]
        is_packed = key.removesuffix(".weight") in patterns and key.endswith(".weight")
        want = ref.to(dtype).float() if is_packed else ref
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), key
    x = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        if value_dtype == "float32":
            assert torch.equal(loaded(input_ids=x).logits, pruned_bert(input_ids=x).logits)


def test_save_is_atomic(pruned_bert, tmp_path, monkeypatch):
    from sparsetx.nm.prune import recorded_patterns

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(folder_mod, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_packed(pruned_bert, tmp_path / "m", recorded_patterns(pruned_bert))
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary left behind
    monkeypatch.undo()
    save_packed(pruned_bert, tmp_path / "m", recorded_patterns(pruned_bert))
    with pytest.raises(FileExistsError, match="overwrite"):
        save_packed(pruned_bert, tmp_path / "m", recorded_patterns(pruned_bert))


@pytest.fixture
def saved(pruned_bert, tmp_path):
    from sparsetx.nm.prune import recorded_patterns

    return save_packed(pruned_bert, tmp_path / "m", recorded_patterns(pruned_bert), "float16")


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["sparsetx"])
    edit(meta)
    header["__metadata__"]["sparsetx"] = json.dumps(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def test_truncated_file(saved):
    f = saved / WEIGHTS
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(PackedFormatError, match="truncated or corrupted"):
        load_packed(saved)


def test_flipped_byte_fails_checksum(saved):
    f = saved / WEIGHTS
    raw = bytearray(f.read_bytes())
    raw[-100] ^= 0x40
    f.write_bytes(bytes(raw))
    with pytest.raises(PackedFormatError, match="checksum mismatch"):
        load_packed(saved)


def test_tampered_pattern_in_header(saved):
    layer = "bert.encoder.layer.0.attention.self.query"
    _rewrite_header(saved / WEIGHTS, lambda m: m["layers"][layer].update(pattern="1:8"))
    with pytest.raises(PackedFormatError, match=f"layer {layer}"):
        load_packed(saved)


def test_header_shape_mismatch(saved):
    layer = "bert.encoder.layer.0.attention.self.query"
    _rewrite_header(saved / WEIGHTS, lambda m: m["layers"][layer].update(shape=[16, 64]))
    with pytest.raises(PackedFormatError, match=f"layer {layer}: tensor .* has shape"):
        load_packed(saved)


def test_header_lists_missing_tensor(saved):
    _rewrite_header(saved / WEIGHTS, lambda m: m["sha256"].update({"ghost.weight": "0" * 64}))
    with pytest.raises(PackedFormatError, match="ghost.weight"):
        load_packed(saved)


def test_wrong_format_version(saved):
    _rewrite_header(saved / WEIGHTS, lambda m: m.update(version=99))
    with pytest.raises(PackedFormatError, match="version 99"):
        read_packed(saved)


def test_no_pickle_anywhere():
    """The package never pickles: no torch.save/torch.load/pickle in its source."""
    root = Path(__file__).resolve().parents[1] / "sparsetx"
    for path in root.rglob("*.py"):
        text = path.read_text()
        for banned in ("torch.save(", "torch.load(", "import pickle"):
            assert banned not in text, f"{path} uses {banned}"


# --- numbers the value dtype cannot hold ------------------------------------------------------

def test_non_finite_weights_are_refused_naming_the_layer(pruned_bert, tmp_path):
    from sparsetx.nm.prune import NMConfig, recorded_patterns, sparsify

    layer = "bert.encoder.layer.0.intermediate.dense"
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="NaN or infinite"):
            pack_nm(torch.tensor([[bad, 0.0, 0.0, 1.0]]), "2:4", name=layer)
        with torch.no_grad():
            saved = pruned_bert.get_submodule(layer).weight[0, 0].item()
            pruned_bert.get_submodule(layer).weight[0, 0] = bad
        try:
            with pytest.raises(ValueError, match=f"{layer}: 1 NaN or infinite"):
                save_packed(pruned_bert, tmp_path / "m", recorded_patterns(pruned_bert))
            with pytest.raises(ValueError, match=f"{layer}: 1 NaN or infinite"):
                sparsify(pruned_bert, NMConfig("2:8"))
        finally:
            with torch.no_grad():
                pruned_bert.get_submodule(layer).weight[0, 0] = saved
    assert not (tmp_path / "m").exists()


def test_values_beyond_fp16_are_refused_or_clamped_on_request():
    w = torch.tensor([[7e4, 0.0, 0.0, 1.0], [0.0, -1e5, 2.0, 0.0]])
    with pytest.raises(ValueError, match=r"2 weight\(s\) beyond the float16 range"):
        pack_nm(w, "2:4", torch.float16, name="big")
    with pytest.warns(UserWarning, match=r"big: 2 clamped to \+-65504"):
        p = pack_nm(w, "2:4", torch.float16, name="big", clamp=True)
    assert unpack_nm(p).float().tolist() == [[65504.0, 0.0, 0.0, 1.0], [0.0, -65504.0, 2.0, 0.0]]
    # bfloat16 holds them (fp32's range): no error, no warning
    assert unpack_nm(pack_nm(w, "2:4", torch.bfloat16)).float()[0, 0].item() == 70144.0   # 7e4 rounded to 8 bits
    # too small for fp16: rounds to 0 like any rounding, counted in a warning (1e-9 < fp16's 6e-8)
    with pytest.warns(UserWarning, match="1 too small for float16 became 0"):
        tiny = pack_nm(torch.tensor([[1e-9, 0.0, 0.0, 1.0]]), "2:4", torch.float16, name="tiny")
    assert unpack_nm(tiny).tolist() == [[0.0, 0.0, 0.0, 1.0]]

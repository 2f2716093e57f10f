"""GGUF reader: metadata and tensor table, dequantization of every supported type against an
independent reference (`gguf.quants`, plus hand-computed blocks), and hostile or corrupt files."""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter

from rtserve.model.gguf import GGML_TYPES, GGUFFile

# Byte offsets of the fp16 scale fields in each block (random bytes there could be inf/NaN).
F16_FIELDS = {QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q5_1: [0, 2], QT.Q8_0: [0],
              QT.Q4_K: [0, 2], QT.Q5_K: [0, 2], QT.Q6_K: [208]}


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, QT | None]], kv=None) -> None:
    """A GGUF file via the reference writer; quantized tensors are given as raw uint8 rows."""
    w = GGUFWriter(str(path), "llama")
    for key, (value, vtype) in (kv or {}).items():
        w.add_key_value(key, value, vtype, sub_type=gguf.GGUFValueType.get_type(value[0])
                        if vtype == gguf.GGUFValueType.ARRAY else None)
    for name, (array, qtype) in tensors.items():
        w.add_tensor(name, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def random_blocks(qtype: QT, num_rows: int, blocks_per_row: int, rng) -> np.ndarray:
    """Random quantized rows [num_rows, blocks_per_row * block_nbytes] with finite fp16 scales,
    among them the edge values zero, -0, fp16 subnormals and the largest finite fp16."""
    block_len, block_nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(num_rows * blocks_per_row, block_nbytes), dtype=np.uint8)
    edges = np.array([0.0, -0.0, 6e-8, -3e-5, 65504.0, -65504.0], np.float16)
    for at in F16_FIELDS[qtype]:
        scale = rng.uniform(-2.0, 2.0, size=len(raw)).astype(np.float16)
        scale[rng.integers(0, len(raw), size=len(edges))] = edges
        raw[:, at:at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(num_rows, -1)


def assert_bit_identical(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == expected.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
def test_quantized_types_match_reference(tmp_path, qtype):
    """Random blocks (every bit pattern of the quants, edge-case scales): our dequantization is
    bit-identical to the gguf package's numpy dequantizer."""
    rng = np.random.default_rng(int(qtype))
    raw = random_blocks(qtype, num_rows=48, blocks_per_row=4, rng=rng)
    path = tmp_path / "q.gguf"
    write_gguf(path, {"w": (raw, qtype)})
    f = GGUFFile(str(path))
    block_len = gguf.GGML_QUANT_SIZES[qtype][0]
    info = f.tensors["w"]
    assert info.shape == (48, 4 * block_len) and info.ggml_type == int(qtype)
    assert info.type_name == qtype.name and info.nbytes == raw.nbytes
    np.testing.assert_array_equal(f.raw("w"), raw.reshape(-1))
    expected = gguf.quants.dequantize(raw, qtype)  # [48, 4 * block_len]
    got = f.dequantize("w")
    assert got.dtype == torch.float32 and tuple(got.shape) == (48, 4 * block_len)
    assert_bit_identical(got.numpy(), expected)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.BF16],
                         ids=lambda q: q.name)
def test_types_quantized_by_the_reference_round_trip(tmp_path, qtype):
    """Blocks the gguf package quantizes itself from weights (the k-quants it cannot quantize are
    covered by random blocks above): bit-identical dequantization, close to the weights."""
    values = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    stored = gguf.quants.quantize(values, qtype)
    path = tmp_path / "r.gguf"
    write_gguf(path, {"w": (stored, qtype)})
    got = GGUFFile(str(path)).dequantize("w").numpy()
    assert_bit_identical(got, gguf.quants.dequantize(stored, qtype))
    assert np.abs(got - values).max() < 0.5


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.Q3_K, QT.IQ4_NL, QT.IQ4_XS], ids=lambda q: q.name)
def test_unsupported_type_is_a_clear_error(tmp_path, qtype):
    block_len, block_nbytes = gguf.GGML_QUANT_SIZES[qtype]
    path = tmp_path / "u.gguf"
    write_gguf(path, {"ok": (np.ones((2, 32), np.float32), None),
                      "blk.3.ffn_down.weight": (np.zeros((2, block_nbytes), np.uint8), qtype)})
    f = GGUFFile(str(path))
    f.check_types(("ok",))
    with pytest.raises(ValueError) as err:
        f.check_types()
    message = str(err.value)
    assert "'blk.3.ffn_down.weight'" in message and f"type {qtype.name}," in message
    assert "supported types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K" in message
    with pytest.raises(NotImplementedError, match=qtype.name):
        f.dequantize("blk.3.ffn_down.weight")


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16], ids=lambda q: q.name)
def test_float_types(tmp_path, qtype):
    values = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    if qtype == QT.F32:
        stored, raw_dtype = values, None
    elif qtype == QT.F16:
        stored, raw_dtype = values.astype(np.float16), None
    else:
        stored, raw_dtype = gguf.quants.quantize(values, QT.BF16), QT.BF16
    path = tmp_path / "f.gguf"
    write_gguf(path, {"w": (stored, raw_dtype)})
    got = GGUFFile(str(path)).dequantize("w")
    expected = gguf.quants.dequantize(stored, qtype) if qtype == QT.BF16 else stored.astype(np.float32)
    assert tuple(got.shape) == (2, 3, 8)
    np.testing.assert_array_equal(got.numpy(), expected.reshape(2, 3, 8))
    got[0, 0, 0] = 1.0  # a fresh, writable tensor even for F32 (not the read-only map)


def test_hand_computed_q4_1_and_q8_0(tmp_path):
    # Q4_1: w = d * q + m; byte j holds q_j (low nibble) and q_{j+16} (high nibble).
    q = np.arange(32) % 16
    qs = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    q4_1 = np.concatenate([np.array([0.5, -1.0], np.float16).view(np.uint8), qs])[None, :]
    # Q8_0: w = d * q with int8 q.
    q8 = np.arange(-16, 16, dtype=np.int8)
    q8_0 = np.concatenate([np.array([0.25], np.float16).view(np.uint8), q8.view(np.uint8)])[None, :]
    path = tmp_path / "h.gguf"
    write_gguf(path, {"a": (q4_1, QT.Q4_1), "b": (q8_0, QT.Q8_0)})
    f = GGUFFile(str(path))
    np.testing.assert_array_equal(f.dequantize("a").numpy()[0], 0.5 * q - 1.0)
    np.testing.assert_array_equal(f.dequantize("b").numpy()[0], 0.25 * q8.astype(np.float32))


def test_metadata_and_tensor_table(tmp_path):
    V = gguf.GGUFValueType
    kv = {"u8": (7, V.UINT8), "i32": (-5, V.INT32), "u64": (1 << 40, V.UINT64), "f32": (0.5, V.FLOAT32),
          "f64": (0.1, V.FLOAT64), "flag": (True, V.BOOL), "s": ("héllo ✓", V.STRING),
          "ints": ([1, 2, 3], V.ARRAY), "strs": (["a", "", "日本"], V.ARRAY)}
    path = tmp_path / "m.gguf"
    write_gguf(path, {"x": (np.ones((4, 32), np.float32), None), "y": (np.zeros(5, np.float32), None)}, kv)
    f = GGUFFile(str(path))
    assert f.version == 3 and f.metadata["general.architecture"] == "llama"
    expected = {"u8": 7, "i32": -5, "u64": 1 << 40, "f32": 0.5, "f64": 0.1, "flag": True,
                "s": "héllo ✓", "ints": [1, 2, 3], "strs": ["a", "", "日本"]}
    assert {k: f.metadata[k] for k in expected} == expected
    assert list(f.tensors) == ["x", "y"]
    x, y = f.tensors["x"], f.tensors["y"]
    assert x.shape == (4, 32) and y.shape == (5,) and x.num_elements == 128
    assert x.offset % f.alignment == 0 and y.offset >= x.offset + x.nbytes
    with pytest.raises(KeyError):
        f.raw("nope")


def test_every_known_type_has_the_reference_block_size():
    for type_id, t in GGML_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[QT(type_id)] == (t.block_len, t.block_nbytes), t.name


# --- Corrupt and hostile files: a minimal hand-rolled writer, so each field can be broken ------

def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def build(kv: list[bytes] = (), tensors: list[tuple] = (), *, version=3, magic=b"GGUF",
          num_tensors=None, num_kv=None, data_nbytes=None) -> bytes:
    """GGUF bytes. `kv`: encoded key/value entries; `tensors`: (name, ne, type_id, offset)."""
    head = magic + struct.pack("<IQQ", version, len(tensors) if num_tensors is None else num_tensors,
                               len(kv) if num_kv is None else num_kv)
    body = b"".join(kv)
    for name, ne, type_id, offset in tensors:
        body += _str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        body += struct.pack("<IQ", type_id, offset)
    out = head + body
    out += b"\0" * (-len(out) % 32)
    return out + b"\1" * (data_nbytes if data_nbytes is not None else 4 * 32 * 2)


def kv_u32(key: str, value: int) -> bytes:
    return _str(key) + struct.pack("<II", 4, value)


GOOD_TENSORS = [("a", (32,), 0, 0), ("b", (32,), 0, 128)]


def open_bytes(tmp_path, data: bytes) -> GGUFFile:
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    return GGUFFile(str(path))


def test_hand_rolled_file_is_valid(tmp_path):
    f = open_bytes(tmp_path, build([kv_u32("k", 1)], GOOD_TENSORS))
    assert f.metadata == {"k": 1} and f.tensors["b"].nbytes == 128
    assert f.dequantize("a").numpy().view(np.uint32)[0] == 0x01010101


@pytest.mark.parametrize("data, match", [
    (b"", "too small"),
    (build(magic=b"GGML"), "magic"),
    (build(version=1), "version 1"),
    (build(version=4), "version 4"),
    (build(version=0x03000000), "big-endian"),
    (build(num_kv=1 << 40), "implausible"),
    (build(num_tensors=1 << 40), "implausible"),
    (build([_str("k") + struct.pack("<I", 99)]), "unknown value type"),
    (build([struct.pack("<Q", 1 << 62) + b"k"]), "exceeds cap"),
    (build([struct.pack("<Q", 1000) + b"k"]), "truncated"),
    (build([_str(b"\xff\xfe") + struct.pack("<II", 4, 1)]), "UTF-8"),
    (build([_str("k") + struct.pack("<IQ", 8, 1 << 40)]), "exceeds cap"),
    (build([_str("k") + struct.pack("<IIQ", 9, 4, 1 << 27)]), "truncated"),
    (build([_str("k") + struct.pack("<IIQ", 9, 4, 1 << 60)]), "exceeds cap"),
    (build([_str("k") + struct.pack("<IIQ", 9, 8, 1 << 26)]), "cannot fit"),
    (build([_str("k") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1) * 8]), "deeper"),
    (build([kv_u32("k", 1), kv_u32("k", 2)]), "duplicate metadata"),
    (build([kv_u32("general.alignment", 24)]), "power of two"),
    (build(tensors=[("a", (32,), 0, 0), ("a", (32,), 0, 128)]), "duplicate tensor"),
    (build(tensors=[("a", (32,), 0, 0), ("b", (32,), 0, 64)]), "overlap"),
    (build(tensors=[("a", (32,), 0, 8)]), "misaligned"),
    (build(tensors=[("a", (32,), 0, 1 << 20)]), "outside the file"),
    (build(tensors=[("a", (1 << 62,), 0, 0)]), "invalid shape"),
    (build(tensors=[("a", (1 << 10, 1 << 10), 0, 0)]), "outside the file"),
    (build(tensors=[("a", (32, 0), 0, 0)]), "invalid shape"),
    (build(tensors=[("a", (1,) * 5, 0, 0)]), "dims"),
    (build(tensors=[("a", (32,), 77, 0)]), "unknown ggml type"),
    (build(tensors=[("a", (16,), 8, 0)]), "multiple of"),
    (build(tensors=[("a", (64,), 8, 0)], data_nbytes=67), "outside the file"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_corrupt_files_raise_value_error(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        open_bytes(tmp_path, data)


def test_every_truncation_raises(tmp_path):
    data = build([kv_u32("k", 1), _str("s") + struct.pack("<I", 8) + _str("text")], GOOD_TENSORS)
    end = len(data)  # the last tensor ends exactly at the end of the file
    for size in range(end):
        with pytest.raises(ValueError):
            open_bytes(tmp_path, data[:size])


def test_random_mutations_raise_only_value_error(tmp_path):
    data = bytearray(build([kv_u32("k", 1), _str("arr") + struct.pack("<IIQ", 9, 8, 2)
                            + _str("x") + _str("yz")], GOOD_TENSORS))
    header_len = len(data) - 256
    rng = np.random.default_rng(0)
    for _ in range(400):
        mutated = bytearray(data)
        for at in rng.integers(0, header_len, size=rng.integers(1, 4)):
            mutated[at] = rng.integers(0, 256)
        try:
            f = open_bytes(tmp_path, bytes(mutated))
        except ValueError:
            continue
        for name in f.tensors:  # whatever parsed must be readable within the file
            assert f.raw(name).size == f.tensors[name].nbytes

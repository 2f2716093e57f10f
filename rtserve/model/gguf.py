"""A bounds-checked reader for GGUF v2/v3 files (llama.cpp's single-file model format).

Contract: `GGUFFile(path)` parses the header, metadata and tensor table eagerly and validates every
count, length, offset and size against the file size and fixed caps before allocating anything; a
corrupt, truncated or hostile file raises `ValueError` naming what is wrong. Tensor data is never read
until asked for: `raw()` returns a read-only view of the memory-mapped bytes, `dequantize()` a new
float32 tensor. Nothing is unpickled. Little-endian files only (what every llama.cpp build writes).
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from rtserve.config import default_cache_dir  # noqa: F401 - where the caches derived from GGUF files live

if TYPE_CHECKING:  # torch is imported lazily: the tokenizer reads GGUF metadata without it
    import torch

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
CACHE_FORMAT_VERSION = "1"  # bump when a conversion derived from GGUF files changes
# Sane caps; the file size bounds everything too, these just fail hostile files early and clearly.
MAX_KV_COUNT = 1 << 20
MAX_TENSOR_COUNT = 1 << 20
MAX_KEY_LEN = 1 << 16
MAX_STRING_LEN = 1 << 26
MAX_ARRAY_LEN = 1 << 28
MAX_ARRAY_DEPTH = 4
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME_LEN = 1 << 10


@dataclass(frozen=True)
class GGMLType:
    """A ggml tensor type: `block_len` elements are stored in `block_nbytes` bytes."""

    name: str
    type_id: int
    block_len: int
    block_nbytes: int


_K = 256  # QK_K: super-block length of the k-quants
GGML_TYPES: dict[int, GGMLType] = {t.type_id: t for t in (
    GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2), GGMLType("Q4_0", 2, 32, 18),
    GGMLType("Q4_1", 3, 32, 20), GGMLType("Q5_0", 6, 32, 22), GGMLType("Q5_1", 7, 32, 24),
    GGMLType("Q8_0", 8, 32, 34), GGMLType("Q8_1", 9, 32, 40), GGMLType("Q2_K", 10, _K, 84),
    GGMLType("Q3_K", 11, _K, 110), GGMLType("Q4_K", 12, _K, 144), GGMLType("Q5_K", 13, _K, 176),
    GGMLType("Q6_K", 14, _K, 210), GGMLType("Q8_K", 15, _K, 292), GGMLType("IQ4_NL", 20, 32, 18),
    GGMLType("IQ4_XS", 23, _K, 136), GGMLType("I8", 24, 1, 1), GGMLType("I16", 25, 1, 2),
    GGMLType("I32", 26, 1, 4), GGMLType("I64", 27, 1, 8), GGMLType("F64", 28, 1, 8),
    GGMLType("BF16", 30, 1, 2),
)}
GGML_TYPE_IDS: dict[str, int] = {t.name: t.type_id for t in GGML_TYPES.values()}

# Metadata value types: scalar struct formats and numpy dtypes (for arrays).
_STRING, _ARRAY = 8, 9
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B",
                   10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {k: np.dtype(v) for k, v in {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4",
                                            5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
                                            12: "<f8"}.items()}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's table entry. `shape` is PyTorch order (ggml's `ne` reversed); `offset` is the
    absolute byte offset of its data in the file; `nbytes` is its stored (quantized) size."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type].name

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Sequential little-endian reads from a buffer; every read is bounds-checked."""

    def __init__(self, buf: memoryview, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, num_bytes: int, what: str) -> int:
        """Reserve `num_bytes` at the cursor; returns their start. Raises if past the end."""
        if num_bytes < 0 or num_bytes > self.size - self.pos:
            raise ValueError(f"GGUF truncated: {what} needs {num_bytes} bytes at offset {self.pos}, "
                             f"file has {self.size}")
        start = self.pos
        self.pos += num_bytes
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, max_len: int, what: str) -> str:
        n = self.scalar("<Q", f"{what} length")
        if n > max_len:
            raise ValueError(f"GGUF {what} length {n} exceeds cap {max_len}")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"GGUF {what} at offset {start} is not valid UTF-8") from e


def _read_value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> Any:
    if vtype in _SCALAR_FORMATS:
        value = cur.scalar(_SCALAR_FORMATS[vtype], f"value of {key!r}")
        return bool(value) if vtype == 7 else value
    if vtype == _STRING:
        return cur.string(MAX_STRING_LEN, f"string value of {key!r}")
    if vtype != _ARRAY:
        raise ValueError(f"GGUF metadata {key!r} has unknown value type {vtype}")
    if depth >= MAX_ARRAY_DEPTH:
        raise ValueError(f"GGUF metadata {key!r} nests arrays deeper than {MAX_ARRAY_DEPTH}")
    item_type = cur.scalar("<I", f"array type of {key!r}")
    count = cur.scalar("<Q", f"array length of {key!r}")
    if count > MAX_ARRAY_LEN:
        raise ValueError(f"GGUF metadata {key!r} array length {count} exceeds cap {MAX_ARRAY_LEN}")
    if item_type in _ARRAY_DTYPES:
        dtype = _ARRAY_DTYPES[item_type]
        start = cur.take(count * dtype.itemsize, f"array {key!r}")
        values = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=start)
        return values.astype(bool).tolist() if item_type == 7 else values.tolist()
    # Strings take >= 8 bytes each, nested arrays >= 12: check the count can fit before looping.
    if count * 8 > cur.size - cur.pos:
        raise ValueError(f"GGUF truncated: array {key!r} of {count} items cannot fit in the file")
    return [_read_value(cur, item_type, key, depth + 1) for _ in range(count)]


class GGUFFile:
    """A parsed GGUF file: `.metadata`, `.tensors` (in file order), and memory-mapped tensor data."""

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self.file_size = os.path.getsize(self.path)
        if self.file_size < 24:
            raise ValueError(f"{self.path}: too small to be a GGUF file ({self.file_size} bytes)")
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self._mm), self.file_size)
        if bytes(cur.buf[0:4]) != GGUF_MAGIC:
            raise ValueError(f"{self.path}: not a GGUF file (bad magic {bytes(cur.buf[0:4])!r})")
        cur.pos = 4
        self.version = cur.scalar("<I", "version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (big-endian files are not supported)" if self.version >= 1 << 16 else ""
            raise ValueError(f"{self.path}: unsupported GGUF version {self.version}{hint}")
        num_tensors = cur.scalar("<Q", "tensor count")
        num_kv = cur.scalar("<Q", "metadata count")
        if num_tensors > MAX_TENSOR_COUNT or num_kv > MAX_KV_COUNT:
            raise ValueError(f"{self.path}: implausible counts ({num_tensors} tensors, {num_kv} keys)")
        self.metadata: dict[str, Any] = self._read_metadata(cur, num_kv)
        self.alignment = self._alignment()
        entries = [self._read_tensor_entry(cur) for _ in range(num_tensors)]
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, GGUFTensorInfo] = self._check_tensors(entries)

    def _read_metadata(self, cur: _Cursor, num_kv: int) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = cur.string(MAX_KEY_LEN, "metadata key")
            if key in metadata:
                raise ValueError(f"{self.path}: duplicate metadata key {key!r}")
            metadata[key] = _read_value(cur, cur.scalar("<I", f"type of {key!r}"), key)
        return metadata

    def _alignment(self) -> int:
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"{self.path}: general.alignment {alignment!r} is not a power of two")
        return alignment

    def _read_tensor_entry(self, cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name = cur.string(MAX_TENSOR_NAME_LEN, "tensor name")
        num_dims = cur.scalar("<I", f"dims of {name!r}")
        if not 1 <= num_dims <= MAX_DIMS:
            raise ValueError(f"{self.path}: tensor {name!r} has {num_dims} dims (1..{MAX_DIMS})")
        ne = tuple(cur.scalar("<Q", f"shape of {name!r}") for _ in range(num_dims))
        ggml_type = cur.scalar("<I", f"type of {name!r}")
        offset = cur.scalar("<Q", f"offset of {name!r}")
        return name, ne, ggml_type, offset

    def _check_tensors(self, entries: list) -> dict[str, GGUFTensorInfo]:
        """Validates types, shapes, alignment and bounds; rejects duplicates and overlaps."""
        tensors: dict[str, GGUFTensorInfo] = {}
        for name, ne, ggml_type, offset in entries:
            if name in tensors:
                raise ValueError(f"{self.path}: duplicate tensor {name!r}")
            if ggml_type not in GGML_TYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has unknown ggml type {ggml_type}")
            gtype = GGML_TYPES[ggml_type]
            if any(n <= 0 or n > self.file_size * _K for n in ne):
                raise ValueError(f"{self.path}: tensor {name!r} has an invalid shape {ne}")
            if ne[0] % gtype.block_len:
                raise ValueError(f"{self.path}: tensor {name!r} row length {ne[0]} is not a multiple "
                                 f"of the {gtype.name} block length {gtype.block_len}")
            num_elements = 1
            for n in ne:  # Python ints: no overflow; the bound below makes the product harmless
                num_elements *= n
            nbytes = num_elements // gtype.block_len * gtype.block_nbytes
            start = self.data_offset + offset
            if offset % self.alignment:
                raise ValueError(f"{self.path}: tensor {name!r} data at {offset} is misaligned")
            if nbytes > self.file_size or start + nbytes > self.file_size:
                raise ValueError(f"{self.path}: tensor {name!r} data [{offset}, +{nbytes}) is outside the "
                                 f"file ({self.file_size} bytes): truncated or corrupt")
            tensors[name] = GGUFTensorInfo(name, tuple(reversed(ne)), ggml_type, start, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise ValueError(f"{self.path}: tensors {a!r} and {b!r} overlap")
        return tensors

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes: a read-only uint8 view of the mapped file (no copy)."""
        info = self._info(name)
        return self._mm[info.offset:info.offset + info.nbytes].view(np.ndarray)

    def dequantize(self, name: str) -> "torch.Tensor":
        """A new float32 tensor in PyTorch shape. Raises NotImplementedError for unsupported types."""
        import torch

        info = self._info(name)
        fn = _DEQUANTIZERS.get(info.ggml_type)
        if fn is None:
            raise NotImplementedError(f"dequantizing {info.type_name} ({name!r}) is not supported; "
                                      f"supported types: {', '.join(SUPPORTED_TYPE_NAMES)}")
        gtype = GGML_TYPES[info.ggml_type]
        blocks = self.raw(name).reshape(-1, gtype.block_nbytes)  # [num_blocks, block_nbytes]
        values = np.ascontiguousarray(fn(blocks), dtype=np.float32)
        if not values.flags.writeable:  # F32 is a view of the read-only map: own a copy instead
            values = values.copy()
        return torch.from_numpy(values.reshape(info.shape))

    def check_types(self, names: tuple[str, ...] | None = None) -> None:
        """Raises ValueError at start-up when a tensor (of `names`, default all) has a type that
        cannot be dequantized, naming the tensor, its type and what is supported."""
        for name in self.tensors if names is None else names:
            info = self._info(name)
            if info.ggml_type not in _DEQUANTIZERS:
                others = sum(1 for t in self.tensors.values() if t.ggml_type not in _DEQUANTIZERS) - 1
                more = f" (and {others} more tensors of unsupported types)" if others else ""
                raise ValueError(f"{self.path}: tensor {name!r} has type {info.type_name}, which is not "
                                 f"supported{more}; supported types: {', '.join(SUPPORTED_TYPE_NAMES)}")

    def _info(self, name: str) -> GGUFTensorInfo:
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self.tensors[name]


# --- Dequantization: blocks [n, block_nbytes] uint8 -> values [n, block_len] float32 -------------
# Each mirrors ggml's reference `dequantize_row_*`; all vectorized across blocks.

def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of every block, as float32 [n, 1]."""
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, m] packed bytes -> [n, 2m]: all low nibbles first, then all high nibbles (ggml order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits(qh32: np.ndarray, width: int) -> np.ndarray:
    """Bit j (j < width) of each block's little-endian uint32 -> [n, width] uint8."""
    word = qh32.copy().view("<u4")  # [n, 1]
    return ((word >> np.arange(width, dtype=np.uint32)) & 1).astype(np.uint8)


def _deq_q4_0(b: np.ndarray) -> np.ndarray:
    return (_nibbles(b[:, 2:]).astype(np.int8) - 8).astype(np.float32) * _f16(b, 0)


def _deq_q4_1(b: np.ndarray) -> np.ndarray:
    return _nibbles(b[:, 4:]).astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def _deq_q5_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4)
    return (q.astype(np.int8) - 16).astype(np.float32) * _f16(b, 0)


def _deq_q5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4)
    return q.astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def _deq_q8_0(b: np.ndarray) -> np.ndarray:
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16(b, 0)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K packed 6-bit scales [n, 12] -> (scale, min), each [n, 8] float32."""
    lo, hi, mix = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = np.concatenate([lo & 63, (mix & 0x0F) | ((lo >> 6) << 4)], axis=1)
    minimum = np.concatenate([hi & 63, (mix >> 4) | ((hi >> 6) << 4)], axis=1)
    return scale.astype(np.float32), minimum.astype(np.float32)


def _deq_q4_k(b: np.ndarray) -> np.ndarray:
    scale, minimum = _k_scales(b[:, 4:16])
    qs = b[:, 16:144].reshape(-1, 4, 32)  # 4 chunks of 32 bytes -> sub-blocks 2c (low), 2c+1 (high)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    y = (_f16(b, 0) * scale)[:, :, None] * q - (_f16(b, 2) * minimum)[:, :, None]
    return y.reshape(-1, _K)


def _deq_q5_k(b: np.ndarray) -> np.ndarray:
    scale, minimum = _k_scales(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:176].reshape(-1, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # sub-block s: bit s
    q = (q | (high << 4)).astype(np.float32)
    y = (_f16(b, 0) * scale)[:, :, None] * q - (_f16(b, 2) * minimum)[:, :, None]
    return y.reshape(-1, _K)


def _deq_q6_k(b: np.ndarray) -> np.ndarray:
    ql = b[:, 0:128].reshape(-1, 2, 2, 32)   # [n, half, (l, l+32), 32]
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)  # [n, half, 1, 32]
    scales = b[:, 192:208].view(np.int8).astype(np.float32).reshape(-1, 2, 4, 2, 1)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [n, half, 4 groups, 32]
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3
    q = ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32).reshape(-1, 2, 4, 2, 16)
    return (_f16(b, 208)[:, :, None, None, None] * scales * q).reshape(-1, _K)


def _deq_bf16(b: np.ndarray) -> np.ndarray:
    return (b.copy().view("<u2").astype(np.uint32) << 16).view(np.float32)


_DEQUANTIZERS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    0: lambda b: b.view("<f4"), 1: lambda b: b.view("<f2").astype(np.float32), 30: _deq_bf16,
    2: _deq_q4_0, 3: _deq_q4_1, 6: _deq_q5_0, 7: _deq_q5_1, 8: _deq_q8_0,
    12: _deq_q4_k, 13: _deq_q5_k, 14: _deq_q6_k,
}

SUPPORTED_TYPE_NAMES: tuple[str, ...] = tuple(GGML_TYPES[i].name for i in _DEQUANTIZERS)


# Control tokens that end a turn in the chat formats in use; llama.cpp stops on these by their text
# too, since many files name only one EOS (Gemma's `<end_of_turn>`, Llama 3's `<|eot_id|>`).
END_OF_TURN_TEXTS = frozenset({"<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>"})
_CONTROL_TOKEN = 3  # tokenizer.ggml.token_type


def end_of_turn_token_ids(metadata: dict[str, Any]) -> tuple[int, ...]:
    """EOS first, then the other end-of-turn/-message ids the metadata names, then the control
    tokens spelled as in `END_OF_TURN_TEXTS` (deduplicated)."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if type(value) is int and value not in ids:
            ids.append(value)
    tokens, types = metadata.get("tokenizer.ggml.tokens"), metadata.get("tokenizer.ggml.token_type")
    if isinstance(tokens, list) and isinstance(types, list) and len(types) == len(tokens):
        ids += [i for i, (text, kind) in enumerate(zip(tokens, types))
                if kind == _CONTROL_TOKEN and text in END_OF_TURN_TEXTS and i not in ids]
    return tuple(ids)


def cache_key(path: str) -> str:
    """A hex digest naming this version of a file: absolute path, size, mtime_ns, format version."""
    st = os.stat(path)
    ident = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{CACHE_FORMAT_VERSION}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]

"""GGUF tensors of every type llama.cpp writes, as the exact float values llama.cpp computes with.

`mx.load` reads F32, F16, Q4_0, Q4_1 and Q8_0 exactly (the Q blocks as MLX quantized tensors). Any other type
either fails the whole file (Q5_0, Q5_1, IQ4_NL...) or comes back rounded to float16 (Q4_K, Q6_K, BF16...:
MLX converts them with gguflib's `gguf_tensor_to_f16`), which is not what llama.cpp computes with. Such a file
is read here instead: a small header parser (gguf.GGUFReader builds a Python object per tokenizer string,
seconds for a 49k vocabulary), the tensor bytes memory-mapped, and each tensor decoded by
`gguf.quants.dequantize`, whose numpy decoders follow ggml's reference ones (`dequantize_row_*`). Every product
in those decoders (a float16 scale times small integers) is exact in float32, so the order of operations
cannot change a bit; tests/test_quant_types.py checks bit equality against llama.cpp's own decoding.

Q4_0 / Q4_1 / Q8_0 tensors of such a file are repacked into MLX's quantized layout, as mx.load would give
them, and Q4_K / Q5_0 / Q5_1 / Q5_K tensors (also affine in groups of 32) into MLX 4- and 5-bit groups with
float32 scales, so `student.weights = "quantized"` keeps them quantized.
"""

from __future__ import annotations

import mmap
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pudl.errors import UserError

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K = 0, 1, 2, 3, 6, 7, 8, 12, 13  # ggml type ids (ggml.h)
MX_EXACT = frozenset({F32, F16, Q4_0, Q4_1, Q8_0})  # what mx.load reads without rounding
# affine in groups of 32 (scale * code + bias): repacked into MLX's quantized layout at group size 32
MX_PACKED = frozenset({Q4_0, Q4_1, Q8_0, Q4_K, Q5_0, Q5_1, Q5_K})
SMALL_ARRAY = 64  # metadata arrays longer than this (tokenizer tables) are skipped, not decoded
PROGRESS_AFTER_S = 2.0  # a load that takes longer shows which tensor it is at

# GGUF metadata value types: struct format of the scalars (8 = string, 9 = array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: ggml type id, numpy-order shape, absolute byte offset and size."""

    name: str
    qtype: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        """The ggml type's name (Q4_K, IQ4_NL...), or its id where gguf-py does not know it."""
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.qtype).name
        except ValueError:
            return f"ggml type {self.qtype}"


class _Cursor:
    """Sequential little-endian reads over the file's bytes."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise UserError(f"student.model: {self.path} is truncated (GGUF header ends early)")
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = bytes(self.buf[self.pos: self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        """One metadata value; long arrays are skipped (None), short ones become lists."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype != 9:
            raise UserError(f"student.model: {self.path} has an unknown GGUF metadata type {vtype}")
        etype, n = self.unpack("<I"), self.unpack("<Q")
        if etype in _SCALARS:
            size = struct.calcsize(_SCALARS[etype])
            start, self.pos = self.pos, self.pos + n * size
            if n > SMALL_ARRAY:
                return None
            return list(struct.unpack_from("<" + _SCALARS[etype][1] * n, self.buf, start))
        values = [self.value(etype) for _ in range(n)]
        return values if n <= SMALL_ARRAY else None


def read_header(path: Path) -> tuple[dict, list[TensorInfo]]:
    """A GGUF's metadata (scalars, strings, short arrays) and tensor table, without reading tensor data."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf, path)
        if cur.unpack("<4s") != b"GGUF":
            raise UserError(f"student.model: {path} is not a GGUF file")
        version, n_tensors, n_kv = cur.unpack("<I"), cur.unpack("<Q"), cur.unpack("<Q")
        if version < 2:
            raise UserError(f"student.model: {path} is GGUF version {version}; only 2 and 3 are read")
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            value = cur.value(cur.unpack("<I"))
            if value is not None:
                meta[key] = value
        raw = []
        for _ in range(n_tensors):
            name, n_dims = cur.string(), cur.unpack("<I")
            ne = [cur.unpack("<Q") for _ in range(n_dims)]
            raw.append((name, cur.unpack("<I"), tuple(reversed(ne)), cur.unpack("<Q")))
        align = int(meta.get("general.alignment", 32))
        data_start = -(-cur.pos // align) * align
        size = len(buf)
    tensors = []
    for name, qtype, shape, offset in raw:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise UserError(f"student.model: tensor {name} of {path} has ggml type {qtype}, which this gguf-py "
                            "(the `gguf` package) does not know; requantize it with llama-quantize (e.g. Q4_K_M)") from None
        n = int(np.prod(shape)) if shape else 1
        info = TensorInfo(name, qtype, shape, data_start + offset, n // block * type_size)
        if info.offset + info.nbytes > size:
            raise UserError(f"student.model: {path} is truncated (tensor {name} ends past the end of the file)")
        tensors.append(info)
    return meta, tensors


def needs_exact_reader(tensors: list[TensorInfo]) -> bool:
    """Whether mx.load would fail on or round some tensor of the file."""
    return any(t.qtype not in MX_EXACT for t in tensors)


def dequantize(data: np.ndarray, info: TensorInfo) -> np.ndarray:
    """A tensor's float32 values from its raw bytes (gguf-py's decoders, ggml's arithmetic)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    rows = np.asarray(data).reshape(-1, data.size // max(1, int(np.prod(info.shape[:-1]))))
    return gguf_dequantize(rows, GGMLQuantizationType(info.qtype)).reshape(info.shape)


def mlx_packed(data: np.ndarray, info: TensorInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_0 / Q4_1 / Q8_0 (and Q4_K, see _q4_k_packed) blocks as MLX's (weight uint32, scales, biases) at group size 32, as mx.load reads them.

    MLX computes scale * code + bias per group of 32: Q4_0 is d * (code - 8) (bias -8d), Q4_1 d * code + m,
    Q8_0 d * q with q = code - 128. The float16 scale times a small integer is exact, so are the biases."""
    rows = int(np.prod(info.shape[:-1]))
    if info.qtype == Q4_K:
        return _q4_k_packed(data, rows)
    if info.qtype in (Q5_0, Q5_1, Q5_K):
        return _q5_packed(data, info.qtype, rows)
    per_row = info.shape[-1] // 32
    blocks = data.reshape(rows, per_row, -1)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    if info.qtype == Q8_0:
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return codes.reshape(rows, -1).view(np.uint32), d, (d.astype(np.float32) * -128).astype(np.float16)
    if info.qtype == Q4_0:
        qs, bias = blocks[..., 2:], (d.astype(np.float32) * -8).astype(np.float16)
    else:  # Q4_1
        qs, bias = blocks[..., 4:], blocks[..., 2:4].copy().view(np.float16)[..., 0]
    # a block's 16 bytes hold element i in the low nibble and element i + 16 in the high one; MLX packs
    # element k of each 8 into bits 4k of a uint32 (two elements per byte, low nibble first)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return _pack_nibbles(codes, rows), d, bias


def _pack_nibbles(codes: np.ndarray, rows: int) -> np.ndarray:
    """4-bit codes (..., 32 per group) packed as MLX does: element k of each 8 at bits 4k of a uint32."""
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return packed.reshape(rows, -1).view(np.uint32)


def _q4_k_packed(data: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks (256 values: 8 groups of 32 with 6-bit scales and mins) as MLX 4-bit groups of 32 with
    float32 scale d*sc and bias -dmin*m: ggml computes d*sc*q - dmin*m, and both products are exact in float32,
    so MLX's scale*q + bias gives the same bits (float16 scales could not hold d*sc)."""
    from gguf.quants import Q4_K as GgufQ4K

    blocks = data.reshape(-1, 144)
    n = blocks.shape[0]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = GgufQ4K.get_scale_min(blocks[:, 4:16])
    scales = (d * sc.astype(np.float32)).reshape(rows, -1)
    biases = -(dmin * m.astype(np.float32)).reshape(rows, -1)
    # each 32 bytes hold 64 values: group 2j in the low nibbles, group 2j + 1 in the high ones
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & 0x0F).reshape(n, 8, 32)
    return _pack_nibbles(codes, rows), scales, biases


def _pack_5bit(codes: np.ndarray, rows: int) -> np.ndarray:
    """5-bit codes (..., 32 per group) packed as MLX does: a little-endian bit stream, 8 codes in 5 bytes."""
    eights = codes.reshape(-1, 8).astype(np.uint64) << np.arange(0, 40, 5, dtype=np.uint64)
    stream = np.bitwise_or.reduce(eights, axis=-1).view(np.uint8).reshape(-1, 8)[:, :5]
    return np.ascontiguousarray(stream).reshape(rows, -1).view(np.uint32)


def _q5_packed(data: np.ndarray, qtype: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q5_0 (d * (code - 16)), Q5_1 (d * code + m) and Q5_K (d*sc * code - dmin*m over 8 groups of 32) as MLX
    5-bit groups of 32 with float32 scales and biases; each product is exact in float32, as in _q4_k_packed."""
    from gguf.quants import Q4_K as GgufQ4K

    if qtype == Q5_K:
        blocks = data.reshape(-1, 176)
        n = blocks.shape[0]
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = GgufQ4K.get_scale_min(blocks[:, 4:16])
        scales, biases = d * sc.astype(np.float32), -(dmin * m.astype(np.float32))
        # 128 bytes of low nibbles as in Q4_K; 32 bytes of high bits: bit g of byte i is group g's element i
        low = (blocks[:, 48:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        high = (blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        codes = low.reshape(n, 8, 32) | (high << 4)
    else:
        head = 2 if qtype == Q5_0 else 4
        blocks = data.reshape(-1, head + 20)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
        scales = d
        biases = d * -16 if qtype == Q5_0 else blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
        qh = np.unpackbits(blocks[:, head:head + 4], axis=-1, bitorder="little")  # bit j -> element j
        qs = blocks[:, head + 4:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1) | (qh << 4)
    return _pack_5bit(codes, rows), scales.reshape(rows, -1), biases.reshape(rows, -1)


class _Progress:
    """A one-line progress count on stderr, shown only when a load turns out slow and stderr is a terminal."""

    def __init__(self, path: Path, total: int):
        self.path, self.total, self.t0, self.shown = path, total, time.perf_counter(), False

    def update(self, done: int):
        if not sys.stderr.isatty() or time.perf_counter() - self.t0 < PROGRESS_AFTER_S:
            return
        self.shown = True
        print(f"\rdequantizing {self.path.name}: {100 * done // max(1, self.total)} %", end="", file=sys.stderr,
              flush=True)

    def close(self):
        if self.shown:
            print(f"\rdequantized {self.path.name} in {time.perf_counter() - self.t0:.1f} s", file=sys.stderr)


def read_tensors(path: Path, tensors: list[TensorInfo], keep_packed: bool, dtype) -> dict:
    """The tensors as mx.load names them: floats cast to `dtype`, or, when `keep_packed`, the MX_PACKED types
    as name.weight / name.scales / name.biases (MLX quantized layout)."""
    import mlx.core as mx

    from gguf.quants import _type_traits

    decodable = {F32, F16} | {int(t) for t in _type_traits}
    for info in tensors:  # before any work: one line naming the first tensor of a type gguf-py cannot decode
        if info.qtype not in decodable:
            raise UserError(f"student.model: tensor {info.name} of {path} has type {info.type_name}, which gguf-py "
                            "(the `gguf` package) cannot dequantize; requantize the model with llama-quantize "
                            "(e.g. Q4_K_M)")
    out = {}
    progress = _Progress(path, sum(t.nbytes for t in tensors))
    done = 0
    buf = np.memmap(path, np.uint8, mode="r")
    for info in tensors:
        data = buf[info.offset: info.offset + info.nbytes]
        if keep_packed and info.qtype in MX_PACKED and info.name.endswith(".weight"):
            stem = info.name[: -len(".weight")]
            weight, scales, biases = mlx_packed(data, info)
            out[info.name] = mx.array(weight)
            out[stem + ".scales"], out[stem + ".biases"] = mx.array(scales), mx.array(biases)
        else:
            out[info.name] = mx.array(dequantize(data, info)).astype(dtype)
        mx.eval(out)  # each tensor's float32 numpy copy is freed before the next one is decoded
        done += info.nbytes
        progress.update(done)
    progress.close()
    return out

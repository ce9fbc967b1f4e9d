"""Byte-range access to safetensors files: read one expert's rows without touching the rest.

``mx.load`` materialises a whole tensor on first use (3.4 GiB for one 397B layer's fused experts);
the converter must stay bounded, so it reads exactly the bytes of the experts it packs.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import CheckpointError, open_regular

ST_DTYPES = {  # safetensors dtype -> (numpy storage dtype, our dtype name)
    "F32": (np.float32, "float32"),
    "F16": (np.float16, "float16"),
    "BF16": (np.uint16, "bfloat16"),
    "U32": (np.uint32, "uint32"),
    "I32": (np.int32, "int32"),
    "I64": (np.int64, "int64"),
    "U8": (np.uint8, "uint8"),
    "F64": (np.float64, "float64"),
}


# Bytes per element of every byte-sized safetensors dtype: a header is checked against these even where
# flash_moe cannot compute on the dtype (``ST_DTYPES``), so a valid file is never called malformed.
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "I16": 2, "F16": 2,
            "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
HEADER_LIMIT = 100 << 20  # the largest header we parse; real ones are a few MiB at most


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def name(self) -> str:
        return ST_DTYPES[self.dtype][1] if self.dtype in ST_DTYPES else self.dtype.lower()


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise CheckpointError(f"key {k!r} appears twice")
        seen[k] = v
    return seen


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; every error is a ``CheckpointError`` naming the file.

    Checked (the header only, no tensor data is read): the file is a regular file; the header length fits
    the file; the header is a JSON object without duplicate keys; each tensor has a known dtype, a shape of
    non-negative ints and integer ``data_offsets`` [begin, end] with end - begin = prod(shape) * itemsize and
    0 <= begin <= end <= data size; sorted by offset, the tensors cover the data section exactly (no overlap,
    no gap, nothing past the end).
    """
    path = Path(path)
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, 8, 0)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short for a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, HEADER_LIMIT):
            raise CheckpointError(f"{path}: bad safetensors header length {n} (file has {size} bytes)")
        text = os.pread(fd, n, 8)
    finally:
        os.close(fd)
    if len(text) != n:
        raise CheckpointError(f"{path}: safetensors header cut short ({len(text)} of {n} bytes; file changed?)")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: safetensors header: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    base, data = 8 + n, size - 8 - n
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            if not isinstance(meta, (dict, type(None))):  # mx.save_safetensors writes null when given none
                raise CheckpointError(f"{path}: safetensors __metadata__ is not an object")
            continue
        out[key] = _tensor(path, key, meta, base, data)
    # Sorted by start, each tensor must begin where the previous ended: overlaps (two tensors reading the same
    # bytes) and gaps (bytes no tensor owns: a shifted offset) are both refused, as the safetensors format says.
    # Overlaps are looked for first: a shifted tensor leaves a gap on one side and an overlap on the other.
    ordered = sorted(out.values(), key=lambda t: (t.start, t.nbytes, t.key))
    for p, t in zip(ordered, ordered[1:]):
        if t.start < p.start + p.nbytes:
            raise CheckpointError(f"{path}: tensors {p.key!r} and {t.key!r} overlap (bytes {t.start - base}.."
                                  f"{p.start + p.nbytes - base} of the data belong to both)")
    pos, prev = 0, None
    for t in ordered:
        begin = t.start - base
        if begin > pos:
            after = f"after tensor {prev.key!r}" if prev else "at the start of the data"
            raise CheckpointError(f"{path}: {begin - pos} bytes {after} belong to no tensor (tensor {t.key!r} "
                                  f"starts at {begin}, not {pos}): shifted offsets?")
        pos, prev = begin + t.nbytes, t
    if pos != data:
        raise CheckpointError(f"{path}: the tensors cover {pos} bytes of a {data}-byte data section"
                              + (" (trailing bytes belong to no tensor)" if pos < data else ""))
    return out


def _tensor(path: Path, key: str, meta, base: int, data: int) -> TensorInfo:
    where = f"{path}: tensor {key!r}"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: entry is a JSON {type(meta).__name__}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in meta]
    if missing:
        raise CheckpointError(f"{where}: no {', '.join(missing)}")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise CheckpointError(f"{where}: unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    want = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != want:
        raise CheckpointError(f"{where} is {dtype} {shape} ({want} bytes), but its data_offsets span {end - begin} "
                              "bytes")
    if not 0 <= begin <= end <= data:  # a negative or huge offset never becomes a read or a buffer
        raise CheckpointError(f"{where}: data_offsets point outside the file's data (bytes {begin}..{end} of "
                              f"{data})")
    return TensorInfo(key, path, dtype, tuple(shape), base + begin, end - begin)


class SafetensorsIndex:
    """All tensors of a checkpoint (one or many files), read by byte range with positioned reads."""

    def __init__(self, files: list[Path]):
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            self.tensors.update(read_header(Path(f)))
        self._fds: dict[Path, int] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self):
        return self.tensors.keys()

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = open_regular(path)
        return self._fds[path]

    def read_bytes(self, key: str, first: int = 0, count: int | None = None) -> bytes:
        """Raw bytes of rows [first, first+count) along axis 0 (all rows if count is None)."""
        t = self.tensors[key]
        row = t.nbytes // t.shape[0] if t.shape else t.nbytes
        count = (t.shape[0] - first) if count is None else count
        offset, n = t.start + first * row, count * row
        data = os.pread(self._fd(t.file), n, offset)
        if len(data) != n:
            raise OSError(f"{t.file}: short read of tensor {key!r} at offset {offset} ({len(data)} of {n} bytes)")
        return data

    def read(self, key: str, first: int = 0, count: int | None = None) -> np.ndarray:
        """Rows of a tensor as numpy (bf16 comes back as float32)."""
        t = self.tensors[key]
        if t.dtype not in ST_DTYPES:
            raise CheckpointError(f"{t.file}: tensor {key!r} has dtype {t.dtype}, which flash_moe cannot convert")
        data = self.read_bytes(key, first, count)
        rows = (t.shape[0] - first) if count is None else count
        arr = np.frombuffer(data, ST_DTYPES[t.dtype][0]).reshape((rows, *t.shape[1:]) if t.shape else ())
        if t.dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

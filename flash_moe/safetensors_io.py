"""Byte-range access to safetensors files: read one expert's rows without touching the rest.

``mx.load`` materialises a whole tensor on first use (3.4 GiB for one 397B layer's fused experts);
the converter must stay bounded, so it reads exactly the bytes of the experts it packs.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import open_regular

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
        return np.dtype(ST_DTYPES[self.dtype][0]).itemsize

    @property
    def name(self) -> str:
        return ST_DTYPES[self.dtype][1]


def read_header(path: Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: too short for a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"{path}: bad safetensors header length {n} (file has {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
    base = 8 + n
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if meta["dtype"] not in ST_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {meta['dtype']}")
        a, b = meta["data_offsets"]
        if base + b > size:
            raise ValueError(f"{path}: tensor {key!r} ends at byte {base + b}, past the end of the file ({size})")
        out[key] = TensorInfo(key, path, meta["dtype"], tuple(meta["shape"]), base + a, b - a)
    return out


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

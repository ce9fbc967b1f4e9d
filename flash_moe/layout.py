"""The packed expert format: one definition, shared by the converter and the ExpertStore.

A layer file holds its experts back to back, expert ``e`` at ``e * stride``. Inside one
expert come gate_proj, up_proj and down_proj, each as ``weight`` then (when quantized)
``scales`` then ``biases``: exactly the arrays ``mx.quantize`` returns, in C order.
Every tensor starts on a 64-byte boundary; ``stride`` is a multiple of 16 KiB.
docs/format.md specifies it byte by byte.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .files import CheckpointError, read_json

FORMAT_VERSION = 1
# Alignments, in one place. In the file: every tensor on TENSOR_ALIGN, every expert on STRIDE_ALIGN.
TENSOR_ALIGN = 64
STRIDE_ALIGN = 16 * 1024
# Direct reads (O_DIRECT) want buffers, offsets and lengths on the device's logical block: 4 KiB covers all.
DIRECT_ALIGN = 4096
# Slot buffers in memory: flash-moe measured 2 MB-aligned read destinations 3.6x faster than 16 KB-aligned
# (macOS, warm); each tensor's slots start on SLOT_TENSOR_ALIGN inside a set.
SLOT_SET_ALIGN = 2 << 20
SLOT_TENSOR_ALIGN = 16 << 10
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# The dtypes of stored tensors, with their bytes per element. bfloat16 has no numpy dtype: it is stored and
# read as uint16, and shown to MLX as bfloat16 through a view (which shares the buffer).
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "uint32": 4}
STORAGE_DTYPE = {"bfloat16": "uint16", "float16": "float16", "float32": "float32", "uint32": "uint32"}


def numpy_dtype(dtype: str):
    """The numpy dtype that holds a stored ``dtype``'s bytes (uint16 for bfloat16)."""
    import numpy as np

    return np.dtype(STORAGE_DTYPE[dtype])


def mlx_dtype(dtype: str, storage: bool = False):
    """The MLX dtype of a stored ``dtype``; ``storage=True``: the one its bytes are written through."""
    import mlx.core as mx

    return getattr(mx, STORAGE_DTYPE[dtype] if storage else dtype)
QUANT_BITS = (2, 3, 4, 5, 6, 8)
FLOAT_DTYPES = ("bfloat16", "float16", "float32")  # of scales, biases and unquantized weights


def expert_checksum(data) -> str:
    """The per-expert checksum recorded in layout.json: blake2b-128 (hex) of the expert's bytes, no padding."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class TensorSpec:
    name: str  # e.g. "gate_proj.scales"
    shape: tuple[int, ...]
    dtype: str
    offset: int  # byte offset inside one expert

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class ExpertLayout:
    """Byte layout of one routed expert (SwiGLU: gate, up (I x D) and down (D x I)).

    bits 16 means unquantized: each projection is one ``weight`` in ``dtype``.
    Otherwise weights are uint32 words (``32 // bits`` values each, least-significant
    bits first, as ``mx.quantize`` packs them) and scales/biases are in ``dtype``.
    """

    hidden: int
    intermediate: int
    bits: int = 4
    group_size: int = 64
    dtype: str = "bfloat16"

    def __post_init__(self):
        for name in ("hidden", "intermediate", "bits", "group_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.bits != 16 and self.bits not in QUANT_BITS:
            raise ValueError(f"bits must be 16 or one of {QUANT_BITS}, got {self.bits}")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}, got {self.dtype!r}")
        if self.bits != 16:
            for dim in (self.hidden, self.intermediate):
                if dim % self.group_size or (dim * self.bits) % 32:
                    raise ValueError(
                        f"dimension {dim} is not a multiple of group size {self.group_size} "
                        f"(and of 32/bits words) at {self.bits} bits"
                    )

    @property
    def quantized(self) -> bool:
        return self.bits != 16

    def shapes(self, proj: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """Per-tensor (shape, dtype) of one projection of one expert."""
        out_dim, in_dim = (
            (self.hidden, self.intermediate) if proj == "down_proj" else (self.intermediate, self.hidden)
        )
        if not self.quantized:
            return {"weight": ((out_dim, in_dim), self.dtype)}
        groups = (out_dim, in_dim // self.group_size)
        return {
            "weight": ((out_dim, in_dim * self.bits // 32), "uint32"),
            "scales": (groups, self.dtype),
            "biases": (groups, self.dtype),
        }

    @property
    def tensors(self) -> list[TensorSpec]:
        specs, offset = [], 0
        for proj in PROJECTIONS:
            for kind, (shape, dtype) in self.shapes(proj).items():
                offset = _align(offset, TENSOR_ALIGN)
                spec = TensorSpec(f"{proj}.{kind}", shape, dtype, offset)
                specs.append(spec)
                offset += spec.nbytes
        return specs

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's data (what one read fetches): 7,077,888 at 397B 4-bit."""
        last = self.tensors[-1]
        return last.offset + last.nbytes

    @property
    def stride(self) -> int:
        """Distance between consecutive experts in a layer file (multiple of 16 KiB)."""
        return _align(self.expert_bytes, STRIDE_ALIGN)

    def tensor(self, name: str) -> TensorSpec:
        for spec in self.tensors:
            if spec.name == name:
                return spec
        raise KeyError(name)


@dataclass
class ModelLayout:
    """What ``layout.json`` records: the expert layout, where the layer files are, checksums."""

    expert: ExpertLayout
    num_experts: int
    moe_layers: list[int]  # decoder-layer indices that have a layer file
    checksums: dict[int, list[str]] = field(default_factory=dict)  # layer -> per-expert hex digest
    checksum: str = "blake2b-128"
    version: int = FORMAT_VERSION

    @staticmethod
    def layer_file(layer: int) -> str:
        return f"experts/layer_{layer:03d}.bin"

    def layer_bytes(self) -> int:
        return self.num_experts * self.expert.stride

    def to_json(self) -> dict:
        e = self.expert
        return {
            "format": "flash_moe.experts",
            "version": self.version,
            "expert": asdict(e),
            "expert_bytes": e.expert_bytes,
            "stride": e.stride,
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "offset": t.offset, "nbytes": t.nbytes}
                for t in e.tensors
            ],
            "num_experts": self.num_experts,
            "layers": {
                str(layer): {
                    "file": self.layer_file(layer),
                    "bytes": self.layer_bytes(),
                    "checksums": self.checksums.get(layer, []),
                }
                for layer in self.moe_layers
            },
            "checksum": self.checksum,
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "layout.json") -> "ModelLayout":
        """Parse and check ``layout.json``'s content; every error is a ``CheckpointError`` naming ``source`` and
        the field. Checks types and ranges, and that every redundant field (``expert_bytes``, ``stride``,
        ``tensors``, each layer's ``file`` and ``bytes``) equals what ``expert`` and ``num_experts`` imply."""
        def bad(msg: str):
            return CheckpointError(f"{source}: {msg}")

        if not isinstance(data, dict):
            raise bad(f"a JSON {type(data).__name__}, not an object")
        if data.get("format") != "flash_moe.experts":
            raise bad(f"not a flash_moe expert layout (format={data.get('format')!r})")
        version = data.get("version")
        if not (type(version) is int and version == FORMAT_VERSION):
            raise bad(f"format version {version!r} is not supported (this flash_moe reads version "
                      f"{FORMAT_VERSION}, the integer); reconvert the model")
        fields = {"hidden", "intermediate", "bits", "group_size", "dtype"}
        e = data.get("expert")
        if not isinstance(e, dict) or set(e) != fields:
            have = sorted(e) if isinstance(e, dict) else type(e).__name__
            raise bad(f"expert must be an object with exactly {sorted(fields)}, got {have}")
        try:
            expert = ExpertLayout(**e)
        except ValueError as err:
            raise bad(f"expert: {err}") from None
        for key, want in (("expert_bytes", expert.expert_bytes), ("stride", expert.stride)):
            if type(data.get(key)) is not int or data[key] != want:
                raise bad(f"{key} {data.get(key)!r} disagrees with the layout computed from expert ({want})")
        if "tensors" in data and data["tensors"] != cls(expert, 1, []).to_json()["tensors"]:
            raise bad("tensors disagree with the layout computed from expert (edited by hand?)")
        num_experts = data.get("num_experts")
        if type(num_experts) is not int or num_experts < 1:
            raise bad(f"num_experts must be a positive integer, got {num_experts!r}")
        checksum = data.get("checksum", "blake2b-128")
        if checksum != "blake2b-128":
            raise bad(f"unknown checksum {checksum!r} (this flash_moe knows blake2b-128)")
        layers_in = data.get("layers")
        if not isinstance(layers_in, dict):
            raise bad(f"layers must be an object, got {type(layers_in).__name__}")
        out = cls(expert=expert, num_experts=num_experts, moe_layers=[], version=version)
        for key, entry in layers_in.items():
            if not (key.isascii() and key.isdigit()) or len(key) > 6:
                raise bad(f"layers: {key!r} is not a layer number")
            layer = int(key)
            where = f"layer {layer}"
            if not isinstance(entry, dict):
                raise bad(f"{where}: entry is a JSON {type(entry).__name__}, not an object")
            if entry.get("file") != cls.layer_file(layer):
                raise bad(f"{where}: file {entry.get('file')!r}, expected {cls.layer_file(layer)!r}")
            if type(entry.get("bytes")) is not int or entry["bytes"] != out.layer_bytes():
                raise bad(f"{where}: bytes {entry.get('bytes')!r} disagree with num_experts x stride "
                          f"({num_experts} x {expert.stride} = {out.layer_bytes()})")
            sums = entry.get("checksums")
            if not isinstance(sums, list) or len(sums) != num_experts:
                got = len(sums) if isinstance(sums, list) else "no list of"
                raise bad(f"{where} has {got} checksums, expected {num_experts}")
            if not all(map(_is_digest, sums)):
                e = next(i for i, d in enumerate(sums) if not _is_digest(d))
                raise bad(f"{where} expert {e}: checksum {sums[e]!r:.40} is not a 32-character hex digest")
            out.checksums[layer] = list(sums)
        out.moe_layers = sorted(out.checksums)
        return out

    @classmethod
    def read(cls, folder: str | Path) -> "ModelLayout":
        path = Path(folder) / "layout.json"
        try:
            data = read_json(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing; is {folder} a converted flash_moe model?") from None
        return cls.from_json(data, str(path))


_DIGEST = re.compile("[0-9a-f]{32}")


def _is_digest(s) -> bool:
    return isinstance(s, str) and _DIGEST.fullmatch(s) is not None

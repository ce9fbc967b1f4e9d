"""The packed expert format: one definition, shared by the converter and the ExpertStore.

A layer file holds its experts back to back, expert ``e`` at ``e * stride``. Inside one
expert come gate_proj, up_proj and down_proj, each as ``weight`` then (when quantized)
``scales`` then ``biases``: exactly the arrays ``mx.quantize`` returns, in C order.
Every tensor starts on a 64-byte boundary; ``stride`` is a multiple of 16 KiB.
docs/format.md specifies it byte by byte.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
TENSOR_ALIGN = 64
STRIDE_ALIGN = 16 * 1024
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "uint32": 4}
QUANT_BITS = (2, 3, 4, 5, 6, 8)


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
        if self.bits != 16 and self.bits not in QUANT_BITS:
            raise ValueError(f"bits must be 16 or one of {QUANT_BITS}, got {self.bits}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype}")
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
        if data.get("format") != "flash_moe.experts":
            raise ValueError(f"{source}: not a flash_moe expert layout (format={data.get('format')!r})")
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{source}: format version {data.get('version')} is not supported "
                f"(this flash_moe reads version {FORMAT_VERSION}); reconvert the model"
            )
        expert = ExpertLayout(**data["expert"])
        if data.get("expert_bytes") != expert.expert_bytes or data.get("stride") != expert.stride:
            raise ValueError(
                f"{source}: expert_bytes/stride ({data.get('expert_bytes')}/{data.get('stride')}) disagree "
                f"with the layout computed from its shapes ({expert.expert_bytes}/{expert.stride})"
            )
        layers = {int(k): v for k, v in data["layers"].items()}
        return cls(
            expert=expert,
            num_experts=int(data["num_experts"]),
            moe_layers=sorted(layers),
            checksums={k: list(v.get("checksums", [])) for k, v in layers.items()},
            checksum=data.get("checksum", "blake2b-128"),
            version=data["version"],
        )

    @classmethod
    def read(cls, folder: str | Path) -> "ModelLayout":
        path = Path(folder) / "layout.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing; is {folder} a converted flash_moe model?") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(data, str(path))

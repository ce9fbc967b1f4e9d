"""Convert a Hugging Face or mlx-community checkpoint into flash_moe's streaming format.

DST gets ``resident.safetensors`` (every non-expert weight), ``experts/layer_NNN.bin`` (packed
experts, see docs/format.md), the config and tokenizer files, and ``layout.json`` last. Memory stays
bounded: experts are read a few at a time by byte range. An interrupted run resumes: finished
layers are re-verified against their checksums and skipped; a half-written layer only ever exists
as ``*.partial`` and is redone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

from .checkpoint import CheckpointError, read_config, safetensors_files
from .families import is_family
from .layout import ExpertLayout, ModelLayout, expert_checksum as checksum
from .model import ModelArgs, _rename, sanitize
from .safetensors_io import SafetensorsIndex

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
PROGRESS = "progress.json"
BATCH = 8  # experts quantized per call: bounds RAM to a few experts' source tensors


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a)


class ExpertSource:
    """Where one MoE layer's experts sit in the source checkpoint (fused, per-expert or MLX-packed)."""

    def __init__(self, index: SafetensorsIndex, layer: int, num_experts: int):
        self.index, self.num_experts = index, num_experts
        for prefix in (f"model.language_model.layers.{layer}.mlp.", f"model.layers.{layer}.mlp.",
                       f"language_model.model.layers.{layer}.mlp."):
            if f"{prefix}experts.gate_up_proj" in index:
                self.kind, self.prefix = "fused", prefix + "experts."
                return
            if f"{prefix}experts.0.gate_proj.weight" in index:
                self.kind, self.prefix = "per_expert", prefix + "experts."
                return
            if f"{prefix}switch_mlp.gate_proj.scales" in index:
                self.kind, self.prefix = "mlx", prefix + "switch_mlp."
                return
            if f"{prefix}switch_mlp.gate_proj.weight" in index:
                self.kind, self.prefix = "stacked", prefix + "switch_mlp."
                return
        raise CheckpointError(f"layer {layer}: no routed-expert tensors found (looked for mlp.experts.* / switch_mlp.*)")

    def keys(self) -> list[str]:
        if self.kind == "fused":
            return [self.prefix + "gate_up_proj", self.prefix + "down_proj"]
        if self.kind == "per_expert":
            return [f"{self.prefix}{e}.{p}.weight" for e in range(self.num_experts) for p in ("gate_proj", "up_proj", "down_proj")]
        suffixes = ("weight", "scales", "biases") if self.kind == "mlx" else ("weight",)
        return [f"{self.prefix}{p}.{s}" for p in ("gate_proj", "up_proj", "down_proj") for s in suffixes]

    def read_float(self, first: int, count: int) -> dict[str, np.ndarray]:
        """float32 (count, out, in) per projection."""
        idx = self.index
        if self.kind == "fused":
            gu = idx.read(self.prefix + "gate_up_proj", first, count)
            half = gu.shape[1] // 2
            return {"gate_proj": gu[:, :half], "up_proj": gu[:, half:], "down_proj": idx.read(self.prefix + "down_proj", first, count)}
        if self.kind == "stacked":
            return {p: idx.read(f"{self.prefix}{p}.weight", first, count) for p in ("gate_proj", "up_proj", "down_proj")}
        return {
            p: np.stack([idx.read(f"{self.prefix}{e}.{p}.weight") for e in range(first, first + count)])
            for p in ("gate_proj", "up_proj", "down_proj")
        }

    def read_packed(self, first: int, count: int) -> dict[str, bytes]:
        """Raw bytes of MLX-quantized experts (count experts back to back) per tensor name."""
        return {
            f"{p}.{s}": self.index.read_bytes(f"{self.prefix}{p}.{s}", first, count)
            for p in ("gate_proj", "up_proj", "down_proj") for s in ("weight", "scales", "biases")
        }


def _pack_float(layout: ExpertLayout, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Quantize (or cast) a batch of experts into the layout's tensors: name -> (count, *shape) array."""
    dtype = getattr(mx, layout.dtype)
    out = {}
    for proj, w in weights.items():
        w = mx.array(w).astype(dtype)
        if not layout.quantized:
            out[f"{proj}.weight"] = _to_numpy(w)
            continue
        q, scales, biases = mx.quantize(w, group_size=layout.group_size, bits=layout.bits)
        out[f"{proj}.weight"], out[f"{proj}.scales"], out[f"{proj}.biases"] = map(_to_numpy, (q, scales, biases))
    return out


def _write_layer(source: ExpertSource, layout: ExpertLayout, num_experts: int, path: Path, desc: str, progress: bool) -> list[str]:
    """Pack one layer into ``path`` (written as path.partial, renamed when complete); returns checksums."""
    from tqdm.auto import tqdm

    partial = path.with_name(path.name + ".partial")
    specs = layout.tensors
    sums = []
    packed_src = source.kind == "mlx"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, num_experts * layout.stride)
        with tqdm(total=num_experts, desc=desc, unit="expert", disable=not progress, leave=False) as bar:
            for first in range(0, num_experts, BATCH):
                count = min(BATCH, num_experts - first)
                if packed_src:
                    raw = source.read_packed(first, count)
                    chunks = {s.name: np.frombuffer(raw[s.name], np.uint8).reshape(count, -1) for s in specs}
                else:
                    arrays = _pack_float(layout, source.read_float(first, count))
                    chunks = {s.name: arrays[s.name].reshape(count, -1).view(np.uint8) for s in specs}
                for i in range(count):
                    buf = bytearray(layout.expert_bytes)
                    for s in specs:
                        row = chunks[s.name][i]
                        if row.size != s.nbytes:
                            raise CheckpointError(
                                f"{desc}: expert {first + i} tensor {s.name} has {row.size} bytes, layout expects {s.nbytes}"
                            )
                        buf[s.offset : s.offset + s.nbytes] = row.tobytes()
                    os.pwrite(fd, buf, (first + i) * layout.stride)
                    sums.append(checksum(buf))
                bar.update(count)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)
    return sums


def _verify_layer(path: Path, layout: ExpertLayout, num_experts: int, sums: list[str]) -> bool:
    if not path.exists() or path.stat().st_size != num_experts * layout.stride or len(sums) != num_experts:
        return False
    with open(path, "rb") as f:
        for e in range(num_experts):
            f.seek(e * layout.stride)
            if checksum(f.read(layout.expert_bytes)) != sums[e]:
                return False
    return True


def _resident_quant(name: str, w: mx.array, bits: int, group_size: int) -> int | None:
    """Bits for a resident matrix, or None to keep it float. Router and shared gate stay >= 8 bits."""
    if not name.endswith(".weight") or w.ndim != 2 or w.shape[-1] % group_size or "norm" in name:
        return None
    if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
        return max(bits, 8)
    return bits


def _write_resident(index: SafetensorsIndex, files: list[Path], expert_keys: set, args: ModelArgs, dst: Path,
                    hf_norms: bool, dtype: str, bits: int | None, group_size: int, src_quant: dict | None) -> dict | None:
    """Non-expert weights -> resident.safetensors; returns the config "quantization" block (or None)."""
    raw = {}
    for f in files:
        for k, v in mx.load(str(f)).items():  # lazy: each tensor is read when evaluated below
            if k not in expert_keys and _rename(k) is not None:
                raw[k] = v
    weights, _ = sanitize(raw, args, hf_norms=hf_norms)
    target = getattr(mx, dtype)
    quant = {"group_size": group_size, "bits": bits, "mode": "affine"} if bits else None
    out = {}
    for name in sorted(weights):
        w, added = weights[name], [name]
        if name.endswith("A_log"):
            out[name] = w.astype(mx.float32)
        elif w.dtype == mx.uint32 or name.endswith((".scales", ".biases")):
            out[name] = w  # already quantized (mlx-community source)
        elif mx.issubdtype(w.dtype, mx.floating):
            w = w.astype(target)
            b = _resident_quant(name, w, bits, group_size) if bits else None
            if b:
                path = name[: -len(".weight")]
                out[name], out[path + ".scales"], out[path + ".biases"] = mx.quantize(w, group_size=group_size, bits=b)
                added += [path + ".scales", path + ".biases"]
                if b != bits:
                    quant[path] = {"group_size": group_size, "bits": b}
            else:
                out[name] = w
        else:
            out[name] = w
        mx.eval([out[k] for k in added])  # one source tensor in flight at a time
    if src_quant:  # mlx-community source: resident matrices were already quantized; carry their settings over
        quant = {k: v for k, v in src_quant.items() if not isinstance(v, dict)}
        for k, v in src_quant.items():
            if isinstance(v, dict) and _rename(k + ".weight"):
                quant[_rename(k + ".weight")[: -len(".weight")]] = v
    partial = dst / "resident.partial.safetensors"  # mx.save_safetensors wants the suffix
    mx.save_safetensors(str(partial), out, metadata={"format": "mlx", "producer": "flash_moe"})
    os.replace(partial, dst / "resident.safetensors")
    return quant


SOURCE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"]


def resolve_source(src: str | Path, revision: str | None = None) -> Path:
    """A local folder, or a Hugging Face hub id downloaded with only the files conversion needs."""
    from .load import resolve

    return resolve(src, revision, SOURCE_PATTERNS)


def convert(src: str | Path, dst: str | Path, *, bits: int = 4, group_size: int = 64, dtype: str = "bfloat16",
            resident_bits: int | None = None, progress: bool = True, revision: str | None = None) -> Path:
    """Convert SRC (local folder or hub id) into a streamable flash_moe model folder DST.

    Args:
        bits: expert bits (2, 3, 4, 8; 16 keeps them unquantized in ``dtype``).
        group_size: quantization group size (32, 64, 128).
        dtype: dtype of scales/biases, float weights and resident floats.
        resident_bits: quantize big non-expert matrices to 4 or 8 bits (router and shared-expert gate
            stay at >= 8); None keeps them in ``dtype``.
    Returns:
        the DST path.
    """
    from tqdm.auto import tqdm

    src_path, dst = resolve_source(src, revision), Path(dst).expanduser()
    config = read_config(src_path)
    if is_family(config):  # a model mlx-lm implements: its sanitize names the experts
        from .convert_families import convert_family

        return convert_family(src_path, dst, config, bits=bits, group_size=group_size, dtype=dtype,
                              resident_bits=resident_bits, progress=progress)
    args = ModelArgs.from_config(config)
    files = safetensors_files(src_path)
    index = SafetensorsIndex(files)
    layout = ExpertLayout(args.hidden_size, args.moe_intermediate_size, bits, group_size, dtype)
    moe_layers = [i for i in range(args.num_hidden_layers) if args.is_moe(i)]
    sources = {i: ExpertSource(index, i, args.num_experts) for i in moe_layers}
    src_quant = config.get("quantization")
    for i, s in sources.items():
        if s.kind == "mlx":
            q = (src_quant or {})
            if (q.get("bits"), q.get("group_size")) != (bits, group_size) and not _layer_quant_matches(q, s, bits, group_size, index, args):
                raise CheckpointError(
                    f"{src_path}: layer {i} experts are MLX-quantized at bits={q.get('bits')} group_size="
                    f"{q.get('group_size')}; convert with --bits {q.get('bits')} --group-size {q.get('group_size')} "
                    "to repack them without requantizing"
                )
            scales_dtype = index.tensors[s.prefix + "gate_proj.scales"].name
            if scales_dtype != dtype:
                raise CheckpointError(
                    f"{src_path}: layer {i} experts are MLX-quantized with {scales_dtype} scales; convert with "
                    f"--dtype {scales_dtype} to repack them without requantizing"
                )

    settings = {"bits": bits, "group_size": group_size, "dtype": dtype, "resident_bits": resident_bits,
                "num_experts": args.num_experts, "layers": moe_layers}
    (dst / "experts").mkdir(parents=True, exist_ok=True)
    done = _previous_checksums(dst, settings, layout)

    checksums = {}
    for layer in tqdm(moe_layers, desc="layers", unit="layer", disable=not progress):
        path = dst / ModelLayout.layer_file(layer)
        if layer in done and _verify_layer(path, layout, args.num_experts, done[layer]):
            checksums[layer] = done[layer]
            continue
        checksums[layer] = _write_layer(sources[layer], layout, args.num_experts, path, f"layer {layer}", progress)
        _atomic_write_json(dst / PROGRESS, {"settings": settings, "layers": {str(k): v for k, v in checksums.items()}})

    expert_keys = {k for s in sources.values() for k in s.keys()}
    hf_norms = not src_quant and not any(k.startswith("language_model.") for k in index.keys())
    quant = _write_resident(index, files, expert_keys, args, dst, hf_norms, dtype, resident_bits, group_size,
                            src_quant if any(s.kind == "mlx" for s in sources.values()) else None)
    index.close()

    out_config = dict(config)
    out_config.pop("quantization_config", None)
    out_config.pop("quantization", None)
    if quant:
        out_config["quantization"] = quant
    out_config["flash_moe"] = {"expert_bits": bits, "expert_group_size": group_size, "dtype": dtype}
    _atomic_write_json(dst / "config.json", out_config)
    for name in TOKENIZER_FILES:
        if (src_path / name).exists():
            shutil.copyfile(src_path / name, dst / name)
    model_layout = ModelLayout(layout, args.num_experts, moe_layers, checksums)
    _atomic_write_json(dst / "layout.json", model_layout.to_json())
    (dst / PROGRESS).unlink(missing_ok=True)
    return dst


def _layer_quant_matches(q: dict, source: ExpertSource, bits: int, group_size: int, index, args) -> bool:
    shape_w = index.tensors[source.prefix + "gate_proj.weight"].shape
    shape_s = index.tensors[source.prefix + "gate_proj.scales"].shape
    return shape_w[-1] * 32 // bits == args.hidden_size and shape_s[-1] * group_size == args.hidden_size


def _previous_checksums(dst: Path, settings: dict, layout: ExpertLayout) -> dict[int, list[str]]:
    """Checksums of layers an earlier run finished (from progress.json, or a complete layout.json)."""
    progress, final = dst / PROGRESS, dst / "layout.json"
    if progress.exists():
        data = json.loads(progress.read_text())
        if data.get("settings") != settings:
            raise CheckpointError(
                f"{dst}: holds an unfinished conversion with other settings ({data.get('settings')}); "
                "remove it or choose another destination"
            )
        return {int(k): v for k, v in data["layers"].items()}
    if final.exists():
        old = ModelLayout.read(dst)
        if old.expert != layout or old.num_experts != settings["num_experts"]:
            raise CheckpointError(f"{dst}: already holds a model converted with other settings; choose another destination")
        # Until layout.json is rewritten the folder must not look complete; progress.json keeps the
        # finished layers known if this run stops before that.
        _atomic_write_json(progress, {"settings": settings, "layers": {str(k): v for k, v in old.checksums.items()}})
        final.unlink()
        return old.checksums
    return {}

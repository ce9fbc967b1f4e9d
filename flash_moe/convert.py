"""Convert a Hugging Face or mlx-community checkpoint into flash_moe's streaming format.

DST gets ``resident.safetensors`` (every non-expert weight), ``experts/layer_NNN.bin`` (packed
experts, see docs/format.md), the config and tokenizer files, and ``layout.json`` last. Memory stays
bounded: experts are read a few at a time by byte range. An interrupted run resumes: finished
layers are re-verified against their checksums and skipped; a half-written layer only ever exists
as ``*.partial`` and is redone.

DST is convert's alone while it runs (a lock file holding our pid), never written through a link planted
in it (files.py), and never mixes two models: progress.json and layout.json record the source and the
settings, and another source is refused unless ``overwrite`` starts over. Every source tensor's header
is checked, and resident.safetensors written, before the first expert layer: a broken checkpoint fails
before the long expert packing starts, not after it.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .checkpoint import (CheckpointError, build_model, load_weights, read_config, read_tensors,
                         safetensors_files)
from .families import is_family
from .files import JSON_LIMIT, atomic_write_json, copy_file, create_new, open_regular, read_bytes
from .conversion_folder import PROGRESS, RESIDENT, TOKENIZER_FILES, destination, file_size
from .layout import ExpertLayout, ModelLayout, expert_checksum as checksum
from .model import ModelArgs, WeightError, checkpoint_name, sanitize
from .safetensors_io import SafetensorsIndex

INDEX = "model.safetensors.index.json"
BATCH = 8  # experts quantized per call: bounds RAM to a few experts' source tensors
HEADER_LIMIT = 100 << 20  # the bound safetensors_io.read_header uses: headers are KiB, a few MiB at most
FLOAT_CODES = ("F32", "F16", "BF16", "F64")


def _to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a)


class ExpertSource:
    """Where one MoE layer's experts sit in the source checkpoint (fused, per-expert or MLX-packed)."""

    def __init__(self, index: SafetensorsIndex, layer: int, num_experts: int):
        self.index, self.layer, self.num_experts = index, layer, num_experts
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

    def check(self, hidden: int, intermediate: int, layout: ExpertLayout) -> None:
        """Each source tensor of this layer's experts has the shape (and kind of dtype) the config implies:
        checked from the headers, before any expert is read."""
        E, D, I = self.num_experts, hidden, intermediate
        if self.kind == "mlx":  # already packed: each expert's bytes must be what the layout holds
            specs = {s.name: s for s in layout.tensors}
            for key in self.keys():
                t, spec = self._tensor(key), specs[key[len(self.prefix):]]
                if not t.shape or t.shape[0] != E or t.nbytes != E * spec.nbytes:
                    raise CheckpointError(
                        f"{t.file}: tensor {key!r} is {t.dtype} {list(t.shape)}; expected {E} experts of "
                        f"{spec.dtype} {list(spec.shape)} (num_experts, hidden_size, moe_intermediate_size in config.json)"
                    )
            return
        proj = {"gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I)}
        if self.kind == "fused":
            want = {"gate_up_proj": (E, 2 * I, D), "down_proj": (E, D, I)}
        elif self.kind == "stacked":
            want = {f"{p}.weight": (E, *shape) for p, shape in proj.items()}
        else:
            want = {f"{e}.{p}.weight": shape for e in range(E) for p, shape in proj.items()}
        for name, shape in want.items():
            t = self._tensor(self.prefix + name)
            if t.shape != shape or t.dtype not in FLOAT_CODES:
                raise CheckpointError(
                    f"{t.file}: tensor {t.key!r} is {t.dtype} {list(t.shape)}; expected a float tensor of shape "
                    f"{list(shape)} (num_experts {E}, hidden_size {D}, moe_intermediate_size {I} in config.json)"
                )

    def _tensor(self, key: str):
        if key not in self.index:
            raise CheckpointError(f"layer {self.layer}: routed-expert tensor {key!r} is missing from the checkpoint")
        return self.index.tensors[key]

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
    from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

    partial = path.with_name(path.name + ".partial")
    specs = layout.tensors
    sums = []
    packed_src = source.kind == "mlx"
    with create_new(partial) as f:  # a new file: never through a link planted at that name
        fd = f.fileno()
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
    os.replace(partial, path)
    return sums


def verify_layer(path: Path, layout: ExpertLayout, num_experts: int, sums: list[str]) -> bool:
    """Does the finished layer file hold exactly the experts of these checksums? (Anything else is redone.)"""
    if os.path.islink(path) or len(sums) != num_experts:
        return False
    try:
        fd = open_regular(path)
    except (FileNotFoundError, CheckpointError):
        return False
    try:
        if os.fstat(fd).st_size != num_experts * layout.stride:
            return False
        return all(checksum(os.pread(fd, layout.expert_bytes, e * layout.stride)) == sums[e] for e in range(num_experts))
    finally:
        os.close(fd)


def resident_quant(name: str, w: mx.array, bits: int, group_size: int) -> int | None:
    """Bits for a resident matrix, or None to keep it float. Router and shared gate stay >= 8 bits."""
    if not name.endswith(".weight") or w.ndim != 2 or w.shape[-1] % group_size or "norm" in name:
        return None
    if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
        return max(bits, 8)
    return bits


def _resident_source(src_path: Path, files: list[Path], expert_keys: set, args: ModelArgs, hf_norms: bool,
                     quant: dict | None) -> dict[str, mx.array]:
    """The non-expert weights under the model's names, lazy (nothing read yet), each checked against the
    shape the model gives it: a missing or misshaped tensor is found before anything is written."""
    tensors, where = read_tensors(files)  # lazy: each tensor is read when evaluated
    raw = {k: v for k, v in tensors.items() if k not in expert_keys and checkpoint_name(k) is not None}
    for key, w in raw.items():  # every weight is floating point, or a quantized (uint32) matrix
        packed = w.dtype == mx.uint32 and key.endswith(".weight") and key[: -len("weight")] + "scales" in raw
        if not (mx.issubdtype(w.dtype, mx.floating) or packed):
            kind = str(w.dtype).split(".")[-1]
            raise CheckpointError(f"{src_path / where[key]}: tensor {key!r} is {kind}, not a floating-point weight")
    try:
        weights, origin = sanitize(raw, args, hf_norms=hf_norms)
    except WeightError as e:
        raise CheckpointError(f"{src_path / where.get(e.key, '')}: {e}") from None
    model = build_model(args, quant, set(weights), lambda layer: nn.Module())  # no routed experts here
    load_weights(model, weights, origin, where, src_path)  # raises naming the source tensor and file
    return weights


def _write_resident(weights: dict[str, mx.array], dst: Path, dtype: str, bits: int | None, group_size: int,
                    src_quant: dict | None) -> dict | None:
    """Non-expert weights -> resident.safetensors; returns the config "quantization" block (or None)."""
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
            b = resident_quant(name, w, bits, group_size) if bits else None
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
            if isinstance(v, dict) and checkpoint_name(k + ".weight"):
                quant[checkpoint_name(k + ".weight")[: -len(".weight")]] = v
    partial = dst / "resident.partial.safetensors"
    with create_new(partial) as f:  # a new file: never through a link planted at that name
        mx.save_safetensors(f, out, metadata={"format": "mlx", "producer": "flash_moe"})
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, dst / RESIDENT)
    return quant


SOURCE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*"]


def resolve_source(src: str | Path, revision: str | None = None) -> Path:
    """A local folder, or a Hugging Face hub id downloaded with only the files conversion needs."""
    from .load import resolve

    return resolve(src, revision, SOURCE_PATTERNS)


def convert(src: str | Path, dst: str | Path, *, bits: int | None = None, group_size: int | None = None,
            dtype: str | None = None, resident_bits: int | None = None, progress: bool = True,
            revision: str | None = None, overwrite: bool = False) -> Path:
    """Convert SRC (local folder or hub id) into a streamable flash_moe model folder DST.

    An MLX-quantized source is repacked, never requantized: ``bits``, ``group_size`` and ``dtype`` default to
    its own (its config's quantization and its scales' dtype); other values are refused.

    Args:
        bits: expert bits (2, 3, 4, 8; 16 keeps them unquantized in ``dtype``). Default 4.
        group_size: quantization group size (32, 64, 128). Default 64.
        dtype: dtype of scales/biases, float weights and resident floats. Default bfloat16.
        resident_bits: quantize big non-expert matrices to 4 or 8 bits (router and shared-expert gate
            stay at >= 8); None keeps them in ``dtype``.
        overwrite: start over: remove what an earlier conversion left in DST (convert's own files only)
            instead of resuming it, or refusing it when it came from another source or other settings.
    Returns:
        the DST path.
    """
    from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

    src_path, dst = resolve_source(src, revision), Path(dst).expanduser()
    if dst.resolve() == src_path.resolve():
        raise CheckpointError(f"{dst}: is the source folder; convert into another folder")
    config_bytes = _read_source_file(src_path / "config.json")  # before read_config: a FIFO must not block
    config = read_config(src_path)
    family = is_family(config)  # a model mlx-lm implements: its sanitize names the experts
    if not family:
        try:
            args = ModelArgs.from_config(config)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{src_path / 'config.json'}: {e}") from None
    files = safetensors_files(src_path)
    source, data_starts = _identify(src, src_path, revision, config_bytes, files)
    index = SafetensorsIndex(files)
    try:
        _check_tensors(index, data_starts)
        if family:
            from .convert_families import convert_family

            return convert_family(src_path, dst, config, source, bits=bits, group_size=group_size, dtype=dtype,
                                  resident_bits=resident_bits, progress=progress, overwrite=overwrite)
        moe_layers = [i for i in range(args.num_hidden_layers) if args.is_moe(i)]
        sources = {i: ExpertSource(index, i, args.num_experts) for i in moe_layers}
        src_quant = config.get("quantization")
        packed = next((s for s in sources.values() if s.kind == "mlx"), None)
        if packed is not None:  # the source's own settings, so that its experts are copied as they are
            bits = bits or (src_quant or {}).get("bits")
            group_size = group_size or (src_quant or {}).get("group_size")
            dtype = dtype or index.tensors[packed.prefix + "gate_proj.scales"].name
        bits, group_size, dtype = bits or 4, group_size or 64, dtype or "bfloat16"
        layout = ExpertLayout(args.hidden_size, args.moe_intermediate_size, bits, group_size, dtype)
        for i, s in sources.items():
            if s.kind == "mlx":
                _check_mlx_source(src_path, i, s, src_quant or {}, bits, group_size, dtype, index, args)
            s.check(args.hidden_size, args.moe_intermediate_size, layout)
        expert_keys = {k for s in sources.values() for k in s.keys()}
        hf_norms = not src_quant and not any(k.startswith("language_model.") for k in index.keys())
        resident_weights = _resident_source(src_path, files, expert_keys, args, hf_norms, src_quant)

        settings = {"bits": bits, "group_size": group_size, "dtype": dtype, "resident_bits": resident_bits,
                    "num_experts": args.num_experts, "layers": moe_layers}
        with destination(dst, settings, source, layout, overwrite) as state:

            # Resident weights first: every non-expert tensor is read (and a broken one found) before hours
            # of expert packing; a resumed run keeps the finished file.
            resident = dst / RESIDENT
            if state["resident"] is None or file_size(resident) != state["resident"]:
                quant = _write_resident(resident_weights, dst, dtype, resident_bits, group_size,
                                        src_quant if any(s.kind == "mlx" for s in sources.values()) else None)
                state.update(resident=os.stat(resident).st_size, quantization=quant)
                atomic_write_json(dst / PROGRESS, state)

            checksums, done = {}, {int(k): v for k, v in state["layers"].items()}
            for layer in tqdm(moe_layers, desc="layers", unit="layer", disable=not progress):
                path = dst / ModelLayout.layer_file(layer)
                if layer in done and verify_layer(path, layout, args.num_experts, done[layer]):
                    checksums[layer] = done[layer]
                    continue
                checksums[layer] = _write_layer(sources[layer], layout, args.num_experts, path, f"layer {layer}", progress)
                state["layers"] = {str(k): v for k, v in checksums.items()}
                atomic_write_json(dst / PROGRESS, state)

            out_config = dict(config)
            out_config.pop("quantization_config", None)
            out_config.pop("quantization", None)
            if state["quantization"]:
                out_config["quantization"] = state["quantization"]
            out_config["flash_moe"] = {"expert_bits": bits, "expert_group_size": group_size, "dtype": dtype}
            atomic_write_json(dst / "config.json", out_config)
            for name in TOKENIZER_FILES:
                if (src_path / name).exists():
                    copy_file(src_path / name, dst / name)
            record = ModelLayout(layout, args.num_experts, moe_layers, checksums).to_json()
            record["conversion"] = {"source": source, "settings": settings}  # ModelLayout ignores it
            atomic_write_json(dst / "layout.json", record)
            (dst / PROGRESS).unlink()
    finally:
        index.close()
    return dst


def _check_mlx_source(src_path: Path, layer: int, source: ExpertSource, q: dict, bits: int, group_size: int,
                      dtype: str, index: SafetensorsIndex, args: ModelArgs) -> None:
    """MLX-quantized experts are repacked as they are, never requantized: the settings must match them."""
    if (q.get("bits"), q.get("group_size")) != (bits, group_size) and not _layer_quant_matches(q, source, bits, group_size, index, args):
        raise CheckpointError(
            f"{src_path}: layer {layer} experts are MLX-quantized at bits={q.get('bits')} group_size="
            f"{q.get('group_size')}; convert with --bits {q.get('bits')} --group-size {q.get('group_size')} "
            "to repack them without requantizing"
        )
    scales_dtype = index.tensors[source.prefix + "gate_proj.scales"].name
    if scales_dtype != dtype:
        raise CheckpointError(
            f"{src_path}: layer {layer} experts are MLX-quantized with {scales_dtype} scales; convert with "
            f"--dtype {scales_dtype} to repack them without requantizing"
        )


def _layer_quant_matches(q: dict, source: ExpertSource, bits: int, group_size: int, index, args) -> bool:
    shape_w = index.tensors[source.prefix + "gate_proj.weight"].shape
    shape_s = index.tensors[source.prefix + "gate_proj.scales"].shape
    return shape_w[-1] * 32 // bits == args.hidden_size and shape_s[-1] * group_size == args.hidden_size


# ---------------------------------------------------------------- the source: identity and headers


def _read_source_file(path: Path) -> bytes | None:
    """A small source file's bytes (regular files only, bounded), or None when it is missing."""
    try:
        return read_bytes(path, JSON_LIMIT)
    except FileNotFoundError:
        return None


def _identify(src, src_path: Path, revision: str | None, config_bytes: bytes | None,
              files: list[Path]) -> tuple[dict, dict[Path, int]]:
    """The source's identity (where it is, and a fingerprint of its config, index and safetensors headers,
    not of the data), and where each shard's data starts."""
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(f"{label}\0{len(data)}\0".encode())
        h.update(data)

    add("config.json", config_bytes or b"")
    add(INDEX, _read_source_file(src_path / INDEX) or b"")
    data_starts = {}
    for f in files:
        header, size = _header_bytes(f)
        add(f"{f.relative_to(src_path)}:{size}", header)
        data_starts[f] = 8 + len(header)
    source = {"path": str(src_path.resolve()), "fingerprint": "sha256:" + h.hexdigest()}
    if not Path(src).expanduser().is_dir():  # a hub id: say which, as the user wrote it
        source.update(hub_id=str(src), revision=revision)
    return source, data_starts


def _header_bytes(path: Path) -> tuple[bytes, int]:
    """A safetensors file's JSON header (bytes) and the file's size."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, 8, 0)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 <= n <= min(size - 8, HEADER_LIMIT):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        header = os.pread(fd, n, 8)
        if len(header) != n:
            raise CheckpointError(f"{path}: short read of the safetensors header")
        return header, size
    finally:
        os.close(fd)


def _check_tensors(index: SafetensorsIndex, data_starts: dict[Path, int]) -> None:
    """Every source tensor's bytes lie in its file's data section, are as many as its dtype and shape say,
    and belong to no other tensor: no read can run off a file, ask for a buffer of the wrong (or a huge)
    size, or take a neighbour's bytes."""
    sizes = {f: os.stat(f).st_size for f in data_starts}
    for t in index.tensors.values():
        where = f"{t.file}: tensor {t.key!r}"
        if not all(type(d) is int and d >= 0 for d in t.shape):
            raise CheckpointError(f"{where} has an invalid shape {list(t.shape)}")
        expected = math.prod(t.shape) * t.itemsize
        if t.nbytes != expected:
            raise CheckpointError(f"{where} is {t.dtype} {list(t.shape)} ({expected} bytes), but its "
                                  f"data_offsets span {t.nbytes} bytes")
        if t.start < data_starts[t.file] or t.start + t.nbytes > sizes[t.file]:
            raise CheckpointError(f"{where}: data_offsets point outside the file's data (bytes {t.start}.."
                                  f"{t.start + t.nbytes} of {sizes[t.file]})")
    previous: dict[Path, object] = {}
    for t in sorted((t for t in index.tensors.values() if t.nbytes), key=lambda t: (str(t.file), t.start)):
        p = previous.get(t.file)
        if p is not None and t.start < p.start + p.nbytes:
            raise CheckpointError(f"{t.file}: tensors {p.key!r} and {t.key!r} overlap (bytes {t.start}.."
                                  f"{p.start + p.nbytes})")
        previous[t.file] = t


# ---------------------------------------------------------------- the destination

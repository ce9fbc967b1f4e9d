"""Convert a Hugging Face checkpoint of a family mlx-lm implements into flash_moe's streaming format.

mlx-lm's model class names and stacks the experts (its ``sanitize``); flash_moe packs them
(docs/format.md). One decoder layer at a time: the layer's source tensors are sanitized alone, its
stacked experts are packed, one projection in memory at a time, and its other tensors join the
resident weights. Peak memory is about one layer's experts plus the resident weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from .checkpoint import read_tensors, safetensors_files
from .files import CheckpointError, atomic_write_json, copy_file, create_new, open_regular
from .layout import PROJECTIONS, ExpertLayout, ModelLayout, expert_checksum
from .families import architecture, build, expert_shape, layer_of, switches

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
BATCH = 8  # experts quantized per call


def _storage(a: mx.array) -> np.ndarray:
    """Host bytes of an array (bfloat16 as its uint16 storage: numpy has no bfloat16)."""
    return np.array(a.view(mx.uint16)) if a.dtype == mx.bfloat16 else np.array(a)


def pack_experts(stacked: dict[str, mx.array], layout: ExpertLayout, path: Path) -> list[str]:
    """Write one layer file from the stacked ``"{proj}.weight"`` (E, out, in) floats, quantized (or cast) as
    ``layout`` says, or from an MLX-quantized source's ``"{proj}.weight|scales|biases"``, repacked as they are.
    Written as ``path.partial``, renamed when complete; returns the checksums.

    Projection by projection: only one stacked projection is evaluated at a time."""
    num_experts = stacked["gate_proj.weight"].shape[0]
    dtype = getattr(mx, layout.dtype)
    partial = path.with_name(path.name + ".partial")
    with create_new(partial) as f:  # a new file: never through a link planted at that name
        fd = f.fileno()
        os.ftruncate(fd, num_experts * layout.stride)
        for proj in PROJECTIONS:
            src = {kind: stacked.pop(f"{proj}.{kind}") for kind in ("weight", "scales", "biases")
                   if f"{proj}.{kind}" in stacked}
            src = {k: v if v.dtype == mx.uint32 else v.astype(dtype) for k, v in src.items()}
            mx.eval(src)
            for first in range(0, num_experts, BATCH):
                part = {k: v[first : first + BATCH] for k, v in src.items()}
                if layout.quantized and "scales" not in part:
                    part = dict(zip(("weight", "scales", "biases"),
                                    mx.quantize(part["weight"], group_size=layout.group_size, bits=layout.bits)))
                for kind, a in part.items():
                    spec = layout.tensor(f"{proj}.{kind}")
                    rows = _storage(a).reshape(a.shape[0], -1).view(np.uint8)
                    if rows.shape[1] != spec.nbytes:
                        raise CheckpointError(f"{path.name}: {proj}.{kind} has {rows.shape[1]} bytes an expert, "
                                              f"the layout expects {spec.nbytes}")
                    for i, row in enumerate(rows):
                        os.pwrite(fd, row.tobytes(), (first + i) * layout.stride + spec.offset)
            del src
        os.fsync(fd)
    fd = open_regular(partial)  # each expert was written in pieces: its checksum from the bytes on disk
    try:
        sums = [expert_checksum(os.pread(fd, layout.expert_bytes, e * layout.stride)) for e in range(num_experts)]
    finally:
        os.close(fd)
    os.replace(partial, path)
    return sums


def dequantize_mxfp4(stacked: dict) -> None:
    """Experts shipped in mxfp4 (gpt-oss: e2m1 values, a power-of-two uint8 scale per 32 inputs, no affine
    bias) to floats, in place: they are then packed at --bits like any float source. Exact: every mxfp4
    value is a bfloat16."""
    for proj in PROJECTIONS:
        scales = stacked.get(f"{proj}.scales")
        if scales is not None and scales.dtype == mx.uint8 and f"{proj}.biases" not in stacked:
            stacked[f"{proj}.weight"] = mx.dequantize(stacked[f"{proj}.weight"], stacked.pop(f"{proj}.scales"),
                                                      group_size=32, bits=4, mode="mxfp4")


def check_source_quant(stacked: dict, layout: ExpertLayout, where: str) -> None:
    """An MLX-quantized source's experts are repacked, never requantized: --bits, --group-size and --dtype
    must be the source's own."""
    w, scales = stacked["gate_proj.weight"], stacked.get("gate_proj.scales")
    if scales is None:
        return
    if w.dtype != mx.uint32 or "gate_proj.biases" not in stacked:
        raise CheckpointError(f"{where}: experts are quantized in a mode other than MLX affine; not supported")
    bits, group = w.shape[-1] * 32 // layout.hidden, layout.hidden // scales.shape[-1]
    dtype = str(scales.dtype).split(".")[-1]
    if (bits, group, dtype) != (layout.bits, layout.group_size, layout.dtype):
        raise CheckpointError(f"{where}: experts are MLX-quantized at {bits} bits, group size {group}, {dtype} "
                              f"scales; convert with --bits {bits} --group-size {group} --dtype {dtype} to "
                              "repack them without requantizing")


def quantize_resident(model, resident: dict, bits: int, group_size: int) -> dict:
    """Resident matrices to ``bits`` where the family's module can be quantized (mlx-lm's ``to_quantized``),
    as its ``quant_predicate`` says; routers at >= 8 bits (the top-k choice is sensitive to rounding).
    Returns the config's "quantization" block (per-module entries where they differ)."""
    own = getattr(model, "quant_predicate", None)
    quant = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for path, module in model.named_modules():
        w = resident.get(f"{path}.weight")
        if w is None or not hasattr(module, "to_quantized") or not mx.issubdtype(w.dtype, mx.floating):
            continue
        q = own(path, module) if own else True
        if q is False:
            continue
        q = q if isinstance(q, dict) else {}
        b, gs = q.get("bits", bits), q.get("group_size", group_size)
        if path.endswith((".gate", ".router")):
            b = max(b, 8)
        if w.shape[-1] % gs:
            continue
        out = mx.quantize(w, group_size=gs, bits=b)
        mx.eval(out)
        resident[f"{path}.weight"], resident[f"{path}.scales"], resident[f"{path}.biases"] = out
        if (b, gs) != (bits, group_size):
            quant[path] = {"group_size": gs, "bits": b}
    return quant


def relabel(weights: dict, old: int, new: int) -> dict:
    a, b = f"model.layers.{old}.", f"model.layers.{new}."
    return {(b + k[len(a):] if k.startswith(a) else k): v for k, v in weights.items()}


def sanitize_part(model, part: dict, layer: int | None, switch: str | None, where: Path) -> dict:
    """mlx-lm's ``sanitize`` on one layer's tensors (or the tensors outside the layers). A family that tells
    a checkpoint's naming by layer 0's keys alone (Mixtral) stacks nothing elsewhere: then the layer is
    sanitized again relabelled as layer 0."""
    try:
        out = model.sanitize(dict(part))
        if switch is None or f"{switch}.gate_proj.weight" in out or layer == 0:
            return out
        return relabel(model.sanitize(relabel(part, layer, 0)), 0, layer)
    except (KeyError, ValueError, IndexError, TypeError) as e:  # e.g. a sanitize that wants every layer at once
        part_name = "the tensors outside the layers" if layer is None else f"layer {layer}'s tensors"
        raise CheckpointError(f"{where}: mlx-lm's {type(model).__module__.rsplit('.', 1)[-1]} sanitize fails on {part_name} "
                              f"alone ({type(e).__name__}: {e}); this family cannot be converted layer by layer") from None


def convert_family(src: Path, dst: Path, config: dict, source: dict, *, bits: int | None = None, group_size: int | None = None,
                   dtype: str | None = None, resident_bits: int | None = None, progress: bool = True,
                   overwrite: bool = False) -> Path:
    """``flash_moe.convert`` for a family mlx-lm implements, called by it once the source's files and tensor
    headers are checked (``source``: its identity, recorded as convert records it). Same arguments; ``bits``,
    ``group_size`` and ``dtype`` default to an MLX-quantized source's own, else to 4, 64 and bfloat16. DST is
    locked, resumed or refused as for any model (``convert.destination``)."""
    from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

    from .conversion_folder import PROGRESS, RESIDENT, TOKENIZER_FILES, destination
    from .convert import verify_layer

    where = src / "config.json"
    src_quant = config.get("quantization")
    if src_quant and resident_bits:
        raise CheckpointError(f"{where}: the checkpoint is already MLX-quantized; convert without --resident-bits")
    arch = architecture(config, where)
    model = build(arch, config, where)  # for sanitize and the module tree; never evaluated
    found = switches(model)
    if not found:
        raise CheckpointError(f"{where}: mlx-lm's {config.get('model_type')} has no SwitchGLU routed experts to stream")
    weights, where_from = read_tensors(safetensors_files(src))  # lazy: a tensor is read when evaluated
    scales = next((v.dtype for k, v in weights.items() if k.endswith(".scales") and mx.issubdtype(v.dtype, mx.floating)),
                  None)
    bits = bits or (src_quant or {}).get("bits") or 4
    group_size = group_size or (src_quant or {}).get("group_size") or 64
    dtype = dtype or (str(scales).split(".")[-1] if src_quant and scales else "bfloat16")
    by_layer = {layer_of(p): p for p in found}
    num_experts, hidden, intermediate = expert_shape(next(iter(found.values())))
    layout = ExpertLayout(hidden, intermediate, bits, group_size, dtype)
    num_layers = len(model.layers)
    groups: dict[int | None, dict] = {}
    for k, v in weights.items():
        m = LAYER.match(k)
        if m and int(m.group(1)) >= num_layers:
            continue  # multi-token-prediction layers: generation does not use them
        groups.setdefault(int(m.group(1)) if m else None, {})[k] = v
    del weights

    target = getattr(mx, dtype)
    keep = getattr(model, "cast_predicate", None) or (lambda k: True)
    settings = {"bits": bits, "group_size": group_size, "dtype": dtype, "resident_bits": resident_bits,
                "num_experts": num_experts, "layers": sorted(by_layer)}
    with destination(dst, settings, source, layout, overwrite) as state:
        done = {int(k): v for k, v in state["layers"].items()}
        resident, checksums = {}, {}
        for layer in tqdm(sorted(groups, key=lambda l: -1 if l is None else l), desc="layers", unit="layer",
                          disable=not progress):
            part = sanitize_part(model, groups.pop(layer), layer, by_layer.get(layer), src)
            raw = [k for k, v in part.items() if v.dtype in (mx.uint8, mx.int8) and not k.endswith(".scales")]
            if raw:  # float8 (or other raw bytes) that this family's sanitize does not dequantize
                raise CheckpointError(f"{src}: tensor {raw[0]!r} is {part[raw[0]].dtype} after mlx-lm's sanitize (a "
                                      "float8 release it does not dequantize?); convert the bfloat16 release")
            if layer in by_layer:
                prefix = by_layer[layer] + "."
                stacked = {k[len(prefix):]: part.pop(k) for k in list(part) if k.startswith(prefix)}
                for proj in PROJECTIONS:  # expert biases (gpt-oss) stay resident, by the streamed module's name
                    if f"{proj}.bias" in stacked:
                        part[f"{prefix}experts.{proj}.bias"] = stacked.pop(f"{proj}.bias")
                dequantize_mxfp4(stacked)
                names = {f"{p}.weight" for p in PROJECTIONS}
                kinds = {f"{p}.{k}" for p in PROJECTIONS for k in ("scales", "biases")}
                if not names <= set(stacked) <= names | kinds:
                    got = sorted(stacked) or "none"
                    raise CheckpointError(f"{src}: layer {layer}: expected stacked experts {sorted(names)} under "
                                          f"{prefix[:-1]} after mlx-lm's sanitize, got {got}")
                check_source_quant(stacked, layout, f"{src}: layer {layer}")
                up = stacked["up_proj.weight"]  # (E, I, D), or (E, I, D * bits / 32) when MLX-quantized
                shape = (up.shape[0], hidden if "up_proj.scales" in stacked else up.shape[2], up.shape[1])
                if shape != (num_experts, hidden, intermediate):
                    raise CheckpointError(f"{src}: layer {layer}: experts of shape (experts, hidden, intermediate) "
                                          f"{shape}, config.json says {(num_experts, hidden, intermediate)}")
                path = dst / ModelLayout.layer_file(layer)
                if layer in done and verify_layer(path, layout, num_experts, done[layer]):
                    checksums[layer] = done[layer]  # an earlier run's layer: its experts are never evaluated
                else:
                    checksums[layer] = pack_experts(stacked, layout, path)
                    state["layers"] = {str(k): v for k, v in checksums.items()}
                    atomic_write_json(dst / PROGRESS, state)
            for k, v in part.items():
                resident[k] = v.astype(target) if mx.issubdtype(v.dtype, mx.floating) and keep(k) else v
            mx.eval(list(resident.values()))  # this layer's source tensors are released here
        if set(checksums) != set(by_layer):
            missing = sorted(set(by_layer) - set(checksums))
            files = ", ".join(sorted(set(where_from.values())))
            raise CheckpointError(f"{src}: no tensors for MoE layer {missing[0]} in {files}")

        quant = quantize_resident(model, resident, resident_bits, group_size) if resident_bits else src_quant
        partial = dst / "resident.partial.safetensors"
        with create_new(partial) as f:  # a new file: never through a link planted at that name
            mx.save_safetensors(f, resident, metadata={"format": "mlx", "producer": "flash_moe"})
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, dst / RESIDENT)
        out_config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
        if quant:
            out_config["quantization"] = quant
        out_config["flash_moe"] = {"expert_bits": bits, "expert_group_size": group_size, "dtype": dtype,
                                   "via": "mlx-lm"}
        atomic_write_json(dst / "config.json", out_config)
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                copy_file(src / name, dst / name)
        record = ModelLayout(layout, num_experts, sorted(checksums), checksums).to_json()
        record["conversion"] = {"source": source, "settings": settings}  # what a later run resumes or refuses
        atomic_write_json(dst / "layout.json", record)
        (dst / PROGRESS).unlink()
    return dst

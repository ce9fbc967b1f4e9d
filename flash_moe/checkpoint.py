"""Read a Hugging Face (or mlx-community) safetensors checkpoint into the resident model.

Every tensor is checked against the model: a missing, unexpected or misshaped tensor is a
``CheckpointError`` naming the tensor and the file it came from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .experts import ResidentExperts
from .files import CheckpointError, inside, open_regular, read_json  # CheckpointError: imported from here by older code
from .model import Model, ModelArgs, WeightError, sanitize
from .safetensors_io import read_header


def read_config(folder: str | Path) -> dict:
    """config.json as a dict (a regular file, size-bounded); errors are CheckpointErrors naming it."""
    path = Path(folder) / "config.json"
    try:
        config = read_json(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (is {folder} a model folder?)") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: a JSON {type(config).__name__}, not an object")
    return config


def model_args(config: dict, folder: str | Path) -> ModelArgs:
    """``ModelArgs`` of a folder's config.json: a bad value is a CheckpointError naming the file and the key."""
    try:
        return ModelArgs.from_config(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: {str(e).removeprefix('config.json: ')}") from None


def safetensors_files(folder: str | Path) -> list[Path]:
    """The checkpoint's shard files: those the index names (each inside ``folder``), else every
    ``*.safetensors``; each must be a regular file (a FIFO would block the reader forever)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: no \"weight_map\" of tensor name -> file name")
        files = []
        for name in sorted(set(weight_map.values())):
            try:
                files.append(inside(folder, name))
            except CheckpointError:  # say which file named it
                raise CheckpointError(f"{index}: names {name!r}, outside the model folder") from None
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: listed in {index.name} but missing")
    else:
        files = sorted(folder.glob("*.safetensors"))
        files = [f for f in files if f.name != "resident.safetensors"] or files
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors files")
    for f in files:
        os.close(open_regular(f))  # names the kind of file: "not a regular file (a FIFO)"
    return files


def read_tensors(files: list[Path]) -> tuple[dict, dict]:
    """Lazily map every tensor; returns (key -> array, key -> file name)."""
    weights, where = {}, {}
    for f in files:
        read_header(f)  # mx.load trusts the header: overlapping or shifted offsets would load as garbage
        try:
            tensors = mx.load(str(f))
        except Exception as e:  # mx.load raises a bare RuntimeError/ValueError on a bad header
            raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
        for k, v in tensors.items():
            weights[k], where[k] = v, f.name
    return weights, where


def quantization_of(config: dict) -> dict | None:
    return config.get("quantization") or None


def build_model(args: ModelArgs, quant: dict | None, names: set[str], experts_factory=None) -> Model:
    """The module tree, quantized where the checkpoint holds ``.scales`` (mlx-community style)."""
    if experts_factory is None:
        def experts_factory(layer):
            prefix = f"model.layers.{layer}.mlp.experts.gate_proj"
            q = _layer_quant(quant, prefix) if f"{prefix}.scales" in names else None
            bits, gs = (q["bits"], q["group_size"]) if q else (16, 64)
            return ResidentExperts(args.num_experts, args.hidden_size, args.moe_intermediate_size, bits, gs)

    model = Model(args, experts_factory)
    if quant:
        def predicate(path, module):
            if f"{path}.scales" not in names or not hasattr(module, "to_quantized"):
                return False
            q = _layer_quant(quant, path)
            return {"group_size": q["group_size"], "bits": q["bits"], "mode": q.get("mode", "affine")}

        nn.quantize(model, class_predicate=predicate)
    return model


def _layer_quant(quant: dict, path: str) -> dict:
    """Per-layer override (mlx-community writes e.g. ``"...mlp.gate": {"bits": 8}``) or the default."""
    for key in (path, "language_model." + path, path.replace("model.", "model.language_model.", 1)):
        if isinstance(quant.get(key), dict):
            return {**quant, **quant[key]}
    return quant


def load_weights(model: Model, weights: dict, origin: dict, where: dict, folder: Path, dtype=None) -> None:
    expected = dict(tree_flatten(model.parameters()))
    for name, w in weights.items():
        src = origin.get(name, name)
        file = where.get(src, where.get(src.replace("{e}", "0"), "?"))
        if name not in expected:
            raise CheckpointError(f"{folder / file}: unexpected tensor {src!r} (as {name!r}); not part of this model")
        if tuple(w.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{folder / file}: tensor {src!r} has shape {tuple(w.shape)}, expected {tuple(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        files = ", ".join(sorted(set(where.values())))
        raise CheckpointError(f"{folder}: tensor {missing[0]!r} is missing from {files}{more}")
    if dtype is not None:
        weights = {
            k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not k.endswith("A_log") else v)
            for k, v in weights.items()
        }
    model.update(tree_unflatten(list(weights.items())))


def model_dtype(weights: dict):
    """The checkpoint's compute dtype: that of its embedding (or first floating tensor)."""
    emb = weights.get("model.embed_tokens.scales", weights.get("model.embed_tokens.weight"))
    if emb is not None and mx.issubdtype(emb.dtype, mx.floating):
        return emb.dtype
    return next((w.dtype for w in weights.values() if mx.issubdtype(w.dtype, mx.floating)), mx.float32)


def load_checkpoint(folder: str | Path, dtype=None, experts_factory=None) -> tuple[Model, dict]:
    """A Hugging Face or mlx-community checkpoint folder -> (resident Model, config dict)."""
    folder = Path(folder)
    config = read_config(folder)
    args = model_args(config, folder)
    raw, where = read_tensors(safetensors_files(folder))
    quant = quantization_of(config)
    hf = quant is None and not any(k.startswith("language_model.") for k in raw)  # mlx-community stores 1+w
    try:
        weights, origin = sanitize(raw, args, hf_norms=hf)
    except WeightError as e:
        raise CheckpointError(f"{folder / where.get(e.key, '')}: {e}") from None
    model = build_model(args, quant, set(weights), experts_factory)
    load_weights(model, weights, origin, where, folder, dtype or model_dtype(weights))
    mx.eval(model.parameters())
    return model, config

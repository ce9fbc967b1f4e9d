"""Loader errors on damaged Hugging Face checkpoints, and the tensors a text model must ignore.

Each test copies a freshly saved tiny checkpoint, edits its safetensors files (drop, add or
reshape one tensor) and expects ``flash_moe.checkpoint.CheckpointError`` naming the tensor
and the file. Vision (``model.visual.*``) and MTP (``mtp.*``) tensors are not errors.
"""

from __future__ import annotations

import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch

import hf_models
from conftest import derive_seed, seed_note

import flash_moe
from flash_moe.checkpoint import CheckpointError

CONFIG = hf_models.QWEN3_5_CONFIGS["interval4_e8_top2"]
E = CONFIG["num_experts"]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """One saved model per (builder, layout), copied by each test before it edits the files."""
    seed = derive_seed("test_checkpoint")
    out = {}
    for builder, layout, shard in [("qwen3_5_moe", "fused", None), ("qwen3_5_moe", "per_expert", None),
                                   ("qwen3_5_moe_text", "per_expert", "100KB")]:
        folder = tmp_path_factory.mktemp(f"{builder}_{layout}")
        out[builder, layout] = hf_models.BUILDERS[builder](folder, CONFIG, seed=seed, layout=layout,
                                                           shard_size=shard)
    out["seed"] = seed
    return out


@pytest.fixture
def checkpoint(originals, tmp_path):
    def copy(builder="qwen3_5_moe", layout="fused"):
        src, torch_model = originals[builder, layout]
        dst = tmp_path / f"{builder}_{layout}"
        shutil.copytree(src, dst)
        return dst, torch_model
    return copy


def load_error(folder) -> str:
    with pytest.raises(CheckpointError) as info:
        flash_moe.load(folder, dtype="float32")
    return str(info.value)


def prefix(folder) -> str:
    names = hf_models.read_checkpoint(folder)
    return "model.language_model." if any(n.startswith("model.language_model.") for n in names) else "model."


def assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in error message: {message}"


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.parametrize("name,pattern", [
    ("layers.1.linear_attn.in_proj_z.weight", r"layers\.1\.linear_attn\.in_proj_z"),
    ("layers.3.self_attn.q_norm.weight", r"layers\.3\.self_attn\.q_norm"),
    ("layers.2.mlp.experts.down_proj", r"layers\.2\.mlp\.experts\.down_proj"),
    ("norm.weight", r"(^|[^_a-z])model\.(language_model\.)?norm\.weight"),
])
def test_missing_tensor(checkpoint, name, pattern):
    folder, _ = checkpoint("qwen3_5_moe", "fused")
    tensors = hf_models.read_checkpoint(folder)
    fname = tensors.pop(prefix(folder) + name)[0]
    hf_models.write_checkpoint(folder, tensors)
    message = load_error(folder)
    assert re.search(pattern, message), f"{name} not named: {message}"
    assert fname in message or str(folder) in message, message


def test_missing_tensor_listed_in_index(checkpoint):
    """The index still maps the tensor to a shard that no longer holds it."""
    folder, _ = checkpoint("qwen3_5_moe_text", "per_expert")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = hf_models.read_checkpoint(folder)
    key = "model.layers.2.linear_attn.A_log"
    fname = tensors.pop(key)[0]
    hf_models.write_checkpoint(folder, tensors)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    message = load_error(folder)
    assert_names(message, "layers.2.linear_attn.A_log", fname)


@pytest.mark.parametrize("expert", [3, E - 1])
def test_missing_expert(checkpoint, expert):
    folder, _ = checkpoint("qwen3_5_moe", "per_expert")
    tensors = hf_models.read_checkpoint(folder)
    tensors.pop(f"{prefix(folder)}layers.1.mlp.experts.{expert}.up_proj.weight")
    hf_models.write_checkpoint(folder, tensors)
    message = load_error(folder)
    assert_names(message, "layers.1.mlp.experts", "up_proj")
    assert re.search(rf"experts?[ .]\[?{expert}\b", message), f"expert {expert} not named: {message}"


@pytest.mark.parametrize("builder,layout,name", [
    ("qwen3_5_moe", "fused", "model.language_model.layers.0.mlp.extra_proj.weight"),
    ("qwen3_5_moe", "fused", "model.language_model.layers.9.input_layernorm.weight"),
    ("qwen3_5_moe_text", "per_expert", "model.layers.2.self_attn.q_proj.weight"),  # layer 2 is GDN
    ("qwen3_5_moe_text", "per_expert", "lm_head.bias"),
])
def test_unexpected_tensor(checkpoint, builder, layout, name):
    folder, _ = checkpoint(builder, layout)
    tensors = hf_models.read_checkpoint(folder)
    fname = hf_models.checkpoint_files(folder)[-1].name
    tensors[name] = (fname, torch.randn(CONFIG["hidden_size"], 4))
    hf_models.write_checkpoint(folder, tensors)
    assert_names(load_error(folder), name, fname)


def test_unexpected_expert(checkpoint):
    """One expert more than num_experts."""
    folder, _ = checkpoint("qwen3_5_moe", "per_expert")
    tensors = hf_models.read_checkpoint(folder)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        fname, t = tensors[f"{prefix(folder)}layers.2.mlp.experts.0.{proj}.weight"]
        tensors[f"{prefix(folder)}layers.2.mlp.experts.{E}.{proj}.weight"] = (fname, t.clone())
    hf_models.write_checkpoint(folder, tensors)
    message = load_error(folder)
    assert_names(message, "layers.2.mlp.experts", fname)


@pytest.mark.parametrize("builder,layout,name", [
    ("qwen3_5_moe", "fused", "layers.2.linear_attn.in_proj_b.weight"),
    ("qwen3_5_moe", "fused", "layers.1.mlp.experts.gate_up_proj"),
    ("qwen3_5_moe", "fused", "embed_tokens.weight"),
    ("qwen3_5_moe", "per_expert", "layers.0.mlp.experts.5.down_proj.weight"),
    ("qwen3_5_moe_text", "per_expert", "layers.3.self_attn.k_proj.weight"),
])
def test_misshaped_tensor(checkpoint, builder, layout, name):
    folder, _ = checkpoint(builder, layout)
    tensors = hf_models.read_checkpoint(folder)
    key = prefix(folder) + name
    fname, t = tensors[key]
    tensors[key] = (fname, torch.randn(t.shape[0] + 2, *t.shape[1:]))
    hf_models.write_checkpoint(folder, tensors)
    assert_names(load_error(folder), name, fname)


def test_vision_and_mtp_ignored(checkpoint, seed):
    """model.visual.* (already in the composite checkpoint) and mtp.* load as if absent."""
    folder, torch_model = checkpoint("qwen3_5_moe", "fused")
    tensors = hf_models.read_checkpoint(folder)
    assert any(n.startswith("model.visual.") for n in tensors)
    fname = hf_models.checkpoint_files(folder)[0].name
    H, I = CONFIG["hidden_size"], CONFIG["moe_intermediate_size"]
    for name, shape in [("mtp.fc.weight", (H, 2 * H)), ("mtp.norm.weight", (H,)),
                        ("mtp.pre_fc_norm_embedding.weight", (H,)),
                        ("mtp.layers.0.self_attn.q_proj.weight", (5, H)),
                        ("mtp.layers.0.mlp.experts.0.gate_proj.weight", (I, H)),
                        ("mtp.layers.0.mlp.experts.0.down_proj.weight", (H, I))]:
        tensors[name] = (fname, torch.randn(shape))
    hf_models.write_checkpoint(folder, tensors)
    tokens = hf_models.random_tokens(np.random.default_rng(seed), CONFIG["vocab_size"], (1, 10))
    out = np.array(flash_moe.load(folder, dtype="float32")(mx.array(tokens.astype(np.int32))))
    with torch.no_grad():
        ref = torch_model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    assert err <= 1e-4, f"relative error {err:.2e} " + seed_note(seed)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(CheckpointError):
        flash_moe.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe_text"}))
    with pytest.raises(CheckpointError):
        flash_moe.load(tmp_path)


def test_unsupported_model_type(checkpoint):
    folder, _ = checkpoint("qwen3_5_moe_text", "per_expert")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    assert_names(load_error(folder), "llama")

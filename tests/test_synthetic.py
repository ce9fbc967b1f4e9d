"""write_synthetic: a valid converted folder that loads and runs, sane weights, Qwen3.5-like routing skew."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import seed_note

import flash_moe
from flash_moe.layers.moe import route
from flash_moe.layout import ExpertLayout, ModelLayout
from flash_moe.load import read_packed_experts
from flash_moe.model import Model, ModelArgs
from flash_moe.layer_files import verify
from flash_moe.synthetic import (QWEN35_SKEW, qwen35_397b_config, routing_stats, synthetic_bytes,
                                 write_synthetic)

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**changes) -> dict:
    config = qwen35_397b_config(num_layers=changes.pop("num_hidden_layers", 4), vocab_size=200)
    config.update(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
                  linear_value_head_dim=32, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
                  shared_expert_intermediate_size=64, eos_token_id=0)
    config.update(changes)
    return config


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("bits,group_size,dtype", [(4, 64, "bfloat16"), (2, 32, "float32"), (8, 64, "float16"),
                                                   (16, 64, "float32")])
def test_folder_is_valid_and_runs(tmp_path, seed, bits, group_size, dtype):
    config = tiny_config()
    folder = write_synthetic(tmp_path / "a", config, bits=bits, group_size=group_size, dtype=dtype, seed=seed,
                             progress=False)
    assert verify(folder, progress=False) == [], "layout.json checksums must be the real ones"
    layout = ModelLayout.read(folder)
    assert layout.expert == ExpertLayout(128, 64, bits, group_size, dtype)
    assert layout.num_experts == 16 and layout.moe_layers == [0, 1, 2, 3]
    assert synthetic_bytes(config, bits=bits, group_size=group_size, dtype=dtype) == 4 * layout.layer_bytes()
    assert not list(folder.rglob("*.partial")) and not list(folder.rglob("*.tmp"))

    gen = np.random.default_rng(seed)
    tokens = mx.array(gen.integers(0, 200, (2, 24), dtype=np.int32))
    streamed = np.array(flash_moe.load(folder, dtype="float32", slots=5)(tokens))
    resident = np.array(flash_moe.load(folder, dtype="float32", stream=False)(tokens))
    assert np.isfinite(streamed).all(), seed_note(seed)
    assert rel_err(streamed, resident) <= 1e-5, seed_note(seed)
    assert 0.5 < streamed.std() < 20, f"logits std {streamed.std()}: weights of insane size " + seed_note(seed)

    again = write_synthetic(tmp_path / "b", config, bits=bits, group_size=group_size, dtype=dtype, seed=seed,
                            progress=False)
    assert ModelLayout.read(again).checksums == layout.checksums, "same seed, same bytes"
    assert (again / "resident.safetensors").read_bytes() == (folder / "resident.safetensors").read_bytes()
    other = write_synthetic(tmp_path / "c", config, bits=bits, group_size=group_size, dtype=dtype, seed=seed + 1,
                            progress=False)
    assert ModelLayout.read(other).checksums[0][0] != layout.checksums[0][0]


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_expert_weights_have_sane_statistics(tmp_path, seed, bits):
    """Dequantized experts: mean ~0, std ~1/sqrt(fan_in), scales of both signs, no two experts alike."""
    config = tiny_config(num_hidden_layers=1, hidden_size=256, moe_intermediate_size=128)
    folder = write_synthetic(tmp_path, config, bits=bits, seed=seed, progress=False, dtype="float32")
    layout = ModelLayout.read(folder)
    e = layout.expert
    packed = read_packed_experts(folder, layout, 0)
    for proj, fan_in in (("gate_proj", 256), ("up_proj", 256), ("down_proj", 128)):
        key = f"model.layers.0.mlp.experts.{proj}"
        w = packed[key + ".weight"]
        if e.quantized:
            scales = np.array(packed[key + ".scales"])
            assert (scales > 0).mean() > 0.4 and (scales < 0).mean() > 0.4, proj
            w = mx.dequantize(w, packed[key + ".scales"], packed[key + ".biases"], group_size=e.group_size, bits=bits)
        w = np.array(w)
        std = w.std()
        assert abs(w.mean()) < 0.1 * std, f"{proj}: mean {w.mean():.3g}, std {std:.3g} " + seed_note(seed)
        assert 0.8 < std * fan_in**0.5 < 1.25, f"{proj}: std {std:.3g}, fan-in {fan_in} " + seed_note(seed)
        assert not np.array_equal(w[0], w[1])


def route_random_states(folder: Path, gen, tokens: int) -> dict:
    """Route isotropic random hidden states (through the real post-attention norm) with the written router."""
    model = flash_moe.load(folder, dtype="float32")
    layer = model.model.layers[0]
    h = layer.post_attention_layernorm(mx.array(gen.standard_normal((tokens, model.config.hidden_size), np.float32)))
    inds, _ = route(layer.mlp.gate(h), model.config.num_experts_per_tok)
    return routing_stats(np.array(inds), model.config.num_experts)


def test_skew_gives_qwen35_popularity(tmp_path, seed):
    """E=512, K=10 as in Qwen3.5-397B: the top 20% of experts take ~42% of activations with QWEN35_SKEW
    (measured: 42.3%, 132 experts for half), ~20% without skew."""
    config = tiny_config(num_hidden_layers=1, hidden_size=256, num_experts=512, num_experts_per_tok=10)
    gen = np.random.default_rng(seed)
    plain = route_random_states(write_synthetic(tmp_path / "plain", config, seed=seed, progress=False), gen, 4000)
    skewed = route_random_states(write_synthetic(tmp_path / "skew", config, seed=seed, skew=QWEN35_SKEW,
                                                 progress=False), gen, 4000)
    note = f"plain {plain}, skewed {skewed} " + seed_note(seed)
    assert 0.19 <= plain["top20_share"] <= 0.27 and plain["experts_for_half"] >= 200, note
    assert 0.36 <= skewed["top20_share"] <= 0.50 and 100 <= skewed["experts_for_half"] <= 170, note
    # without context, consecutive tokens share experts only through popularity (real model: 8-34%)
    assert plain["consecutive_overlap"] < skewed["consecutive_overlap"] < 0.15, note


def test_resident_bits(tmp_path, seed):
    folder = write_synthetic(tmp_path, tiny_config(), resident_bits=4, seed=seed, progress=False)
    quant = json.loads((folder / "config.json").read_text())["quantization"]
    assert quant["bits"] == 4 and quant["model.layers.0.mlp.gate"]["bits"] == 8
    model = flash_moe.load(folder)
    layer = model.model.layers[3]
    assert type(layer.self_attn.q_proj).__name__ == "QuantizedLinear" and layer.mlp.gate.bits == 8
    out = model(mx.array(np.random.default_rng(seed).integers(0, 200, (1, 16), dtype=np.int32)))
    assert np.isfinite(np.array(out.astype(mx.float32))).all(), seed_note(seed)


def test_qwen35_397b_shapes():
    config = qwen35_397b_config()
    args = ModelArgs.from_config(config)
    assert [args.is_linear(i) for i in range(8)] == [True, True, True, False] * 2
    layout = ExpertLayout(args.hidden_size, args.moe_intermediate_size)
    assert layout.expert_bytes == layout.stride == 7_077_888
    assert synthetic_bytes(config) == 60 * 512 * 7_077_888
    model = Model(args, experts_factory=lambda layer: nn.Module())  # parameters stay lazy: no memory
    shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
    assert shapes["model.layers.0.linear_attn.in_proj_qkv.weight"] == (12288, 4096)
    assert shapes["model.layers.0.linear_attn.in_proj_z.weight"] == (8192, 4096)
    assert shapes["model.layers.3.self_attn.q_proj.weight"] == (16384, 4096)
    assert shapes["model.layers.3.self_attn.k_proj.weight"] == (512, 4096)
    assert shapes["model.layers.0.mlp.gate.weight"] == (512, 4096)
    assert shapes["model.layers.0.mlp.shared_expert.down_proj.weight"] == (4096, 1024)
    assert shapes["model.embed_tokens.weight"] == (248320, 4096)


def test_cli(tmp_path, monkeypatch, capsys):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks/make_synthetic.py"), "--out", str(tmp_path / "x"),
                          "--layers", "12", "--dry-run"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "experts 43.49 GB (3.62 GB a layer)" in run.stdout, run.stdout
    assert not (tmp_path / "x").exists()

    spec = importlib.util.spec_from_file_location("make_synthetic", REPO / "benchmarks/make_synthetic.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.setattr(cli, "qwen35_397b_config",
                        lambda layers, vocab: tiny_config(num_hidden_layers=layers, vocab_size=vocab))
    cli.main(["--out", str(tmp_path / "y"), "--layers", "2", "--vocab", "64", "--bits", "8", "--skew"])
    out = capsys.readouterr().out
    assert "wrote" in out and "bits 8" in out and f"skew {QWEN35_SKEW}" in out, out
    config = json.loads((tmp_path / "y/config.json").read_text())
    assert config["flash_moe"]["synthetic"] == {"seed": 0, "skew": QWEN35_SKEW}
    assert ModelLayout.read(tmp_path / "y").expert.bits == 8 and verify(tmp_path / "y", progress=False) == []

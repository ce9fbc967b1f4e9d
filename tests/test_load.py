"""load(): experts_per_token over the whole range, routing invariants, clear errors."""

import mlx.core as mx
import numpy as np
import pytest

import flash_moe
from flash_moe.checkpoint import CheckpointError
from flash_moe.layers.moe import route
from flash_moe.synthetic import qwen35_397b_config, write_synthetic


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    config = qwen35_397b_config(num_layers=4, vocab_size=150)
    config.update(hidden_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=8,
                  num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32)
    path = tmp_path_factory.mktemp("k") / "m"
    write_synthetic(path, config, bits=4, seed=7, progress=False)
    return path


@pytest.mark.parametrize("k", [1, 3, 8])
def test_any_k_streamed_equals_resident(folder, seed, k):
    streamed = flash_moe.load(folder, dtype="float32", experts_per_token=k, slots=4)
    resident = flash_moe.load(folder, dtype="float32", experts_per_token=k, stream=False)
    assert streamed.experts_per_token == k and all(l.mlp.top_k == k for l in streamed.model.layers)
    tokens = mx.array(np.random.default_rng(seed).integers(0, 150, (1, 9)))
    a, b = streamed(tokens), resident(tokens)
    err = float(mx.linalg.norm(a - b) / mx.linalg.norm(b))
    assert err < 1e-5, f"K={k}: relative error {err:.2e} (seed {seed})"
    per_token = streamed.stats.experts.sum() / 9 / 4  # experts read per token per layer (prefill: distinct ones)
    assert 0 < per_token <= k
    streamed.close()


@pytest.mark.parametrize("k", [1, 4, 16])
def test_route_is_renormalised_top_k(seed, k):
    logits = mx.random.normal((5, 16), key=mx.random.key(seed)) * 3
    inds, scores = route(logits, k)
    probs = np.array(mx.softmax(logits, axis=-1))
    top = np.sort(np.argsort(-probs, axis=-1)[:, :k], axis=-1)
    assert np.array_equal(np.sort(np.array(inds), axis=-1), top), f"seed {seed}"
    np.testing.assert_allclose(np.array(scores).sum(-1), 1.0, rtol=1e-6)
    want = np.take_along_axis(probs, np.array(inds), -1)
    np.testing.assert_allclose(np.array(scores), want / want.sum(-1, keepdims=True), rtol=1e-5)


def test_k_out_of_range(folder):
    with pytest.raises(ValueError, match="experts_per_token must be in 1..8"):
        flash_moe.load(folder, experts_per_token=9)
    with pytest.raises(ValueError, match="1..8"):
        flash_moe.load(folder, experts_per_token=0)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        flash_moe.load(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="config.json"):
        flash_moe.load(tmp_path)


@pytest.mark.parametrize("bad", ["int32", "nope"])
def test_bad_dtype(folder, bad):
    with pytest.raises(ValueError, match="unknown dtype"):
        flash_moe.load(folder, dtype=bad)

"""ExpertCache: every position it hands out holds exactly the requested expert's bytes, under eviction."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest

from flash_moe.expert_cache import ExpertCache
from flash_moe.layout import ExpertLayout, ModelLayout, expert_checksum
from flash_moe.store import ExpertStore

SEED = int(os.environ.get("FLASH_MOE_TEST_SEED", np.random.SeedSequence().entropy % 2**32))


def packed_layers(tmp_path, layout, num_experts, layers, rng):
    (tmp_path / "experts").mkdir()
    data = {}
    for layer in layers:
        data[layer] = rng.integers(1, 255, (num_experts, layout.stride), dtype=np.uint8)
        data[layer].tofile(tmp_path / ModelLayout.layer_file(layer))
    sums = {l: [expert_checksum(data[l][e, : layout.expert_bytes].tobytes()) for e in range(num_experts)] for l in layers}
    (tmp_path / "layout.json").write_text(json.dumps(ModelLayout(layout, num_experts, list(layers), sums).to_json()))
    return data


def slot_bytes(a: mx.array) -> np.ndarray:
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).view(np.uint8).ravel()


HAS_CUDA = mx.cuda.is_available()
# Model-level agreement with the resident experts. On the CPU both paths agree to float32 rounding. On MLX's
# CUDA backend float32 matmuls take different kernels per shape (measured: 1.3e-4 between two MLX-ops paths
# of the same weights, 6e-4 for the fused kernel against gather_qmm); a wrong expert moves logits by O(1).
MODEL_TOL = 1e-5 if mx.default_device() == mx.cpu else 2e-3
PINNED = pytest.param("pinned", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")])


def _buffers(kind):
    if kind == "pinned":  # MLX's CUDA backend: filled in place by the slot_scatter kernel
        from flash_moe.cuda_host import PinnedSlotBuffers

        return PinnedSlotBuffers
    return None


@pytest.mark.parametrize(
    "bits,dtype,buffers",
    [(4, "bfloat16", "host"), (2, "float32", "host"), (16, "float16", "host"), (4, "bfloat16", PINNED),
     (2, "float32", PINNED)],
)
def test_cache_holds_requested_experts(tmp_path, bits, dtype, buffers):
    rng = np.random.default_rng(SEED)
    layout = ExpertLayout(128, 64, bits, 64, dtype)
    E, layers = 16, [0, 2, 3]
    data = packed_layers(tmp_path, layout, E, layers, rng)
    with ExpertStore(tmp_path, capacity=3, buffers=_buffers(buffers)) as store:
        cache = ExpertCache(store, capacity=9)
        for step in range(120):
            layer = int(rng.choice(layers))
            ids = rng.choice(E, int(rng.integers(1, 7)), replace=False)
            arrays, pos = cache.fetch(layer, ids)
            assert len(set(pos.tolist())) == len(ids), f"positions collide (seed {SEED})"
            for i, e in enumerate(ids):
                for t in layout.tensors:
                    want = data[layer][e, t.offset : t.offset + t.nbytes]
                    got = slot_bytes(arrays[t.name][int(pos[i])])
                    assert np.array_equal(got, want), f"step {step} layer {layer} expert {e} {t.name} (seed {SEED})"
        totals = cache.totals()
        assert totals["hits"] > 0 and totals["misses"] > 0 and totals["resident"] == 9


def test_hot_experts_stay(tmp_path):
    """Frequency-weighted: an expert used every step survives a stream of one-off experts."""
    rng = np.random.default_rng(SEED)
    layout = ExpertLayout(64, 64, 4, 64)
    packed_layers(tmp_path, layout, 32, [0], rng)
    with ExpertStore(tmp_path, capacity=4) as store:
        cache = ExpertCache(store, capacity=4)
        for e in range(1, 32):
            cache.fetch(0, [0, e])
        assert cache.hits[0] == 30 and cache.misses[0] == 32, f"hot expert 0 was evicted (seed {SEED})"


def test_too_many_experts(tmp_path):
    rng = np.random.default_rng(SEED)
    layout = ExpertLayout(64, 64, 4, 64)
    packed_layers(tmp_path, layout, 8, [0], rng)
    with ExpertStore(tmp_path, capacity=2) as store:
        cache = ExpertCache(store, capacity=3)
        with pytest.raises(ValueError, match="cache holds 3"):
            cache.fetch(0, [0, 1, 2, 3])


def tiny_model(tmp_path, seed, hidden=128, intermediate=64):
    from flash_moe.synthetic import qwen35_397b_config, write_synthetic

    config = qwen35_397b_config(num_layers=4, vocab_size=200)
    config.update(hidden_size=hidden, moe_intermediate_size=intermediate, shared_expert_intermediate_size=64, num_experts=16,
                  num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32)
    write_synthetic(tmp_path / "m", config, bits=4, seed=seed, progress=False)
    return tmp_path / "m"


@pytest.mark.parametrize("cache_experts", [6, 40])
def test_cached_model_equals_resident(tmp_path, seed, cache_experts):
    """Through the model: logits with the device cache (small: evicting; large: all hits) == resident experts."""
    import flash_moe

    path = tiny_model(tmp_path, seed)
    cached = flash_moe.load(path, dtype="float32", cache_experts=cache_experts, slots=4)
    resident = flash_moe.load(path, dtype="float32", stream=False)
    tokens = mx.array(np.random.default_rng(seed).integers(0, 200, (1, 7)))
    c1, c2 = cached.make_cache(), resident.make_cache()
    for step in [tokens] + [tokens[:, i : i + 1] for i in range(5)]:  # prefill, then decode steps
        a, b = cached(step, c1), resident(step, c2)
        err = float(mx.linalg.norm(a - b) / mx.linalg.norm(b))
        assert err < MODEL_TOL, f"relative error {err:.2e} with a {cache_experts}-expert cache (seed {seed})"
    totals = cached.cache.totals()
    assert totals["misses"] > 0 and (cache_experts < 40 or totals["hits"] > 0), totals


def test_direct_io_cached_model_equals_resident(tmp_path, seed):
    """direct_io="auto" reads around the page cache when a device cache is in front and the layout is 4 KiB
    aligned (hidden 512, experts of 256 at 4 bits); the logits stay the resident model's."""
    import flash_moe
    from flash_moe.layer_files import direct_readable

    path = tiny_model(tmp_path, seed, hidden=512, intermediate=256)
    cached = flash_moe.load(path, dtype="float32", cache_experts=6, slots=4, direct_io="auto")
    direct = direct_readable(path, cached.store.layout, 2 << 20)  # else "auto" falls back to the page cache
    assert cached.store.direct == direct
    assert not flash_moe.load(path, dtype="float32", slots=4, cache_experts=0, direct_io="auto").store.direct
    resident = flash_moe.load(path, dtype="float32", stream=False)
    tokens = mx.array(np.random.default_rng(seed).integers(0, 200, (1, 7)))
    c1, c2 = cached.make_cache(), resident.make_cache()
    for step in [tokens] + [tokens[:, i : i + 1] for i in range(4)]:
        a, b = cached(step, c1), resident(step, c2)
        err = float(mx.linalg.norm(a - b) / mx.linalg.norm(b))
        assert err < MODEL_TOL, f"relative error {err:.2e} with direct reads (seed {seed})"
    totals = cached.store.stats.totals()
    assert totals["misses"] > 0 and (totals["hits"] == 0 or not direct), totals


@pytest.mark.parametrize("capacity,force", [("all", False), (12, True)])
def test_speculative_tokens_equal_resident(tmp_path, seed, capacity, force):
    """Tokens run without per-layer syncs give the resident model's logits: when every expert is cached
    (the bet holds), and when experts are missing (forced bets are voided and the token runs again)."""
    import flash_moe

    path = tiny_model(tmp_path, seed)
    cached = flash_moe.load(path, dtype="float32", cache_experts=capacity, slots=4)
    resident = flash_moe.load(path, dtype="float32", stream=False)
    rng = np.random.default_rng(seed)
    tokens = mx.array(rng.integers(0, 200, (1, 9)))
    c1, c2 = cached.make_cache(), resident.make_cache()
    if capacity == "all":  # a long prompt touches every expert: decoding then never misses
        warm = mx.array(rng.integers(0, 200, (1, 64)))
        cached(warm, cached.make_cache())
    for step in [tokens] + [mx.array(rng.integers(0, 200, (1, 1))) for _ in range(12)]:
        if force:
            cached.cache.speculation.clean = 10**6  # bet even though experts are missing
        a, b = cached(step, c1), resident(step, c2)
        err = float(mx.linalg.norm(a - b) / mx.linalg.norm(b))
        assert err < MODEL_TOL, f"relative error {err:.2e} (capacity {capacity}, seed {seed}): {cached.cache.totals()}"
    totals = cached.cache.totals()
    assert totals["speculated"] >= (12 if force else 1), totals
    if force:
        assert totals["voided"] >= 1 and totals["misses"] > 0, totals
    else:
        assert totals["voided"] <= 1 and totals["speculated"] - totals["voided"] >= 1, totals


def test_preload_fills_without_counting(tmp_path, seed):
    """preload() reads every expert when they fit (then decoding never misses) and leaves the counters alone."""
    import flash_moe

    path = tiny_model(tmp_path, seed)
    model = flash_moe.load(path, dtype="float32", cache_experts="all", slots=4)
    assert model.cache.preload() == 4 * 16 and model.cache.totals()["resident"] == 64
    assert model.cache.totals()["misses"] == 0
    rng = np.random.default_rng(seed)
    cache = model.make_cache()
    model(mx.array(rng.integers(0, 200, (1, 5))), cache)
    for _ in range(6):
        model(mx.array(rng.integers(0, 200, (1, 1))), cache)
    totals = model.cache.totals()
    assert totals["misses"] == 0 and totals["hits"] > 0 and totals["voided"] == 0 and totals["speculated"] >= 4, totals

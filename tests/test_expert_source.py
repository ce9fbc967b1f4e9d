"""The memory tiers (expert_source.py): every tier configuration gives the resident model's logits, and the
tiers' hits and misses add up (each tier's misses are the next one's requests).

Runs on the CPU here (float32, tight tolerance) and on CUDA with ``FLASH_MOE_BACKEND=cuda`` (pinned host tier,
kernel fills; the host tier then needs a device tier in front)."""

import os
import mlx.core as mx
import numpy as np
import pytest

import flash_moe
from flash_moe import kernels
from flash_moe.expert_source import Entries
from flash_moe.host_cache import HostExpertCache
from flash_moe.layout import ExpertLayout
from flash_moe.store import ExpertStore
from tests.conftest import seed_note
from tests.test_expert_cache import MODEL_TOL, slot_bytes, packed_layers, tiny_model

CUDA = kernels.BACKEND == "cuda"
# (device tier, host tier, speculate, prefetch): capacities in experts of the 4 x 16 = 64 of the tiny model
CONFIGS = {
    "none": (0, 0, False, False),
    "device": (40, 0, False, False),
    "host": (0, 40, False, False),
    "both": (24, 40, False, False),
    "both-evicting": (6, 10, False, False),
    "host-evicting": (0, 6, False, False),
    "speculative": ("all", 0, True, False),
    "speculative-host": (12, 30, True, False),
    "prefetch": (6, 20, False, True),
    "prefetch-host-only": (0, 12, False, True),
}


def _run(model, tokens, decode, rng, force=False):
    cache = model.make_cache()
    out = [model(tokens, cache)]
    for _ in range(decode):
        if force and model.cache is not None:
            model.cache.speculation.clean = 10**6  # bet even when experts are missing: voided tokens run again
        out.append(model(mx.array(rng.integers(0, 200, (1, 1))), cache))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiers_equal_resident(tmp_path, seed, name):
    device, host, speculate, prefetch = CONFIGS[name]
    if CUDA and host and not device:
        pytest.skip("on CUDA the pinned host tier serves a device tier")
    path = tiny_model(tmp_path, seed)
    tiered = flash_moe.load(path, dtype="float32", slots=4, cache_experts=device, host_cache=host / 64 if host else 0,
                            prefetch=prefetch)
    resident = flash_moe.load(path, dtype="float32", stream=False)
    assert (tiered.cache is not None) == bool(device) and (tiered.host_cache is not None) == bool(host)
    assert (tiered.prefetcher is not None) == prefetch
    tokens = mx.array(np.random.default_rng(seed).integers(0, 200, (1, 7)))
    got = _run(tiered, tokens, 10, np.random.default_rng(seed + 1), force=speculate)
    want = _run(resident, tokens, 10, np.random.default_rng(seed + 1))
    for step, (a, b) in enumerate(zip(got, want)):
        err = float(mx.linalg.norm(a - b) / mx.linalg.norm(b))
        assert err < MODEL_TOL, f"{name}: step {step}: relative error {err:.2e} {tiered.tier_totals()} {seed_note(seed)}"
    totals = tiered.tier_totals()
    store = totals["store"]
    if device and host:  # the device tier's misses are the host tier's requests (speculation books hits only)
        assert totals["device"]["misses"] == totals["host"]["hits"] + totals["host"]["misses"], totals
    if host:
        h = totals["host"]
        # every expert the store read went into the host tier (a miss or a guess), or bypassed it in a chunk
        # with more distinct experts than the first tier holds (the prompt, with tiny tiers)
        assert store["experts"] >= h["misses"] + h["prefetched"], totals
        if prefetch:
            assert h["prefetched"] > 0 and 0 <= h["prefetch_used"] <= h["prefetched"], totals
    if speculate:
        assert totals["device"]["speculated"] > 0, totals


@pytest.mark.parametrize("policy", ["frequency", "lru"])
def test_host_cache_holds_requested_experts(tmp_path, seed, policy):
    """Under eviction and with prefetches in flight, every position handed out holds the expert's bytes."""
    rng = np.random.default_rng(seed)
    layout = ExpertLayout(128, 64, 4, 64, "bfloat16")
    E, layers = 16, [0, 2, 3]
    data = packed_layers(tmp_path, layout, E, layers, rng)
    with ExpertStore(tmp_path, capacity=3) as store:
        host = HostExpertCache(store, 9, policy=policy)
        for step in range(150):
            layer = int(rng.choice(layers))
            if step % 2 == 0:
                host.prefetch(int(rng.choice(layers)), rng.choice(E, int(rng.integers(1, 6)), replace=False))
            ids = rng.choice(E, int(rng.integers(1, 6)), replace=False)
            arrays, pos = host.fetch(layer, ids)
            assert len(set(pos.tolist())) == len(ids)
            for i, e in enumerate(ids):
                for t in layout.tensors:
                    want = data[layer][e, t.offset : t.offset + t.nbytes]
                    assert np.array_equal(slot_bytes(arrays[t.name][int(pos[i])]), want), \
                        f"step {step} expert {e} {seed_note(seed)}"
            host.consumed_by(*[a[mx.array(pos)] for a in arrays.values()])
        t = host.totals()
        assert t["hits"] + t["misses"] == host.hits.sum() + host.misses.sum() and t["hits"] > 0 and t["misses"] > 0
        assert store.stats.totals()["experts"] == t["misses"] + t["prefetched"], (t, store.stats.totals())
        host.close()


def test_frequency_keeps_hot_expert_lru_does_not():
    """The policy difference in one line: a hot expert against a stream of one-off experts."""
    for policy, survives in (("frequency", True), ("lru", False)):
        entries = Entries(2, 1, 64, policy)
        entries.place(0, [0], [0])
        for _ in range(3):  # the hot expert has been used a few times
            entries.touch([0])
        hits = 0
        for e in range(1, 40):
            for want in (0, e, 40 + e % 20):  # the hot expert, then two one-offs
                pos = entries.lookup(0, [want])
                if pos[0] >= 0:
                    hits += want == 0
                else:
                    v = entries.victims(1)
                    entries.place(0, [want], v)
                    pos = v
                entries.touch(pos)
        assert (hits == 39) == survives, (policy, hits)


def test_host_capacity_specs(tmp_path, seed):
    from flash_moe.layout import ModelLayout
    from flash_moe.load import host_capacity

    layout = ModelLayout.read(tiny_model(tmp_path, seed))
    per = layout.expert.expert_bytes
    assert host_capacity(0, layout) == 0 and host_capacity("off", layout) == 0
    assert host_capacity(0.25, layout) == 16 and host_capacity("all", layout) == 64
    assert host_capacity(str(10 * per), layout) == 10 and host_capacity(10 * per + 1, layout) == 10
    assert host_capacity(f"{10 * per / 2**20}MiB", layout) == 10
    assert host_capacity("auto", layout) == (64 if CUDA else 0)  # on CUDA the tiny model fits in free RAM
    for bad in ("lots", -1, 1.5):
        with pytest.raises(ValueError, match="host_cache"):
            host_capacity(bad, layout)


def test_preload_fills_both_tiers_most_used_first(tmp_path, seed):
    """preload: the most used experts into the device tier, the next into the host tier; decoding then reads
    nothing from disk when the two hold every expert; the counters describe decoding only."""
    path = tiny_model(tmp_path, seed)
    rng = np.random.default_rng(seed)
    usage = rng.integers(0, 50, (4, 16))  # usage counts to rank by (as a run before would have left them)
    model = flash_moe.load(path, dtype="float32", slots=4, cache_experts=16, host_cache="all", prefetch=False)
    model.store.stats.usage[:] = usage
    cache = model.make_cache()
    from flash_moe.host_cache import preload_tiers

    before = model.tier_totals()
    assert preload_tiers(model.store, model.cache, model.host_cache) > 0
    after = model.tier_totals()
    assert all(after[t][k] == before[t][k] for t in ("device", "host") for k in ("hits", "misses")), (before, after)
    assert after["device"]["resident"] == 16 and after["host"]["resident"] == 64
    for l in model.store.layout.moe_layers:  # rank by rank across layers: each layer's most used 16 / 4
        held = np.array([model.cache.entries.lookup(l, [e])[0] >= 0 for e in range(16)])
        assert held.sum() == 4 and usage[l][held].min() >= usage[l][~held].max(), (l, usage[l], held)
    reads = model.store.stats.totals()["experts"]
    model(mx.array(rng.integers(0, 200, (1, 9))), cache)
    for _ in range(6):
        model(mx.array(rng.integers(0, 200, (1, 1))), cache)
    assert model.store.stats.totals()["experts"] == reads, "a preloaded pair of tiers read from disk"


def test_decode_benchmark_prints_tiered_bound(tmp_path, seed):
    """benchmarks/decode.py with both tiers and prefetch: the tiered-memory bound, with per-tier counts."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    path = tiny_model(tmp_path, seed)
    out = tmp_path / "r.json"
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "decode.py"), "--model", str(path), "-p", "8",
                          "-g", "6", "-n", "1", "--cache-experts", "8", "--host-cache", "0.5", "--prefetch", "on",
                          "--disk-gbps", "1.0", "--json", str(out)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tiered-memory bound" in run.stdout, run.stdout[-2000:]
    bound = json.loads(out.read_text())["tiered_bound"]
    p = bound["per_token"]
    assert bound["disk_gb_per_s"] == 1.0 and bound["disk_source"] == "--disk-gbps" and bound["host_to_device_gb_per_s"] > 0
    assert p["host_hits"] >= 0 and p["disk_reads"] >= 0 and p["prefetched"] > 0, bound


def test_host_slot_buffers_past_one_mlx_array_say_how_many_fit():
    """The CPU form keeps one MLX array per slot set, whose dimension is an int32: a host tier of 8 GB failed
    inside MLX with an OverflowError; it now says how many experts fit, before allocating anything."""
    from flash_moe.slots import MAX_ARRAY_BYTES, HostSlotBuffers

    layout = ExpertLayout(4096, 1024, bits=4, dtype="bfloat16")  # Qwen3.5-397B's expert, ~7 MB
    too_many = MAX_ARRAY_BYTES // layout.expert_bytes + 1
    with pytest.raises(ValueError, match=r"hold at most [\d,]+ experts") as caught:
        HostSlotBuffers(layout, too_many, 1)
    most = int(str(caught.value).split("hold at most ")[1].split(" ")[0].replace(",", ""))
    assert 0 < most < too_many and most * layout.expert_bytes <= MAX_ARRAY_BYTES

"""Speculative tokens for the families mlx-lm runs (family_cache.py rewinds mlx-lm's caches).

A rewound cache must continue exactly as one that never saw the voided token; a family model that bets
(every expert in the device tier, or forced to bet on a tier too small) must give the logits and greedy
tokens of the same model with speculation off.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("mlx_lm")

from conftest import derive_seed, seed_note
from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, RotatingKVCache

import flash_moe
from benchmarks.family_synthetic import build
from flash_moe import family_cache
from flash_moe import make_prompt_cache
from flash_moe.generation import decodes_ahead, generate_step
from flash_moe.sample import make_sampler

STEPS = 12


def kv(rng, n):
    return mx.array(rng.standard_normal((1, 2, n, 8)).astype(np.float32))


def small_kv():
    c = KVCache()
    c.step = 4  # grow every 4 tokens: voided tokens land on the growth boundary too
    return c


CACHES = {
    "kv": small_kv,
    "rotating": lambda: RotatingKVCache(max_size=5),
    "rotating-keep": lambda: RotatingKVCache(max_size=6, keep=2),
    "list": lambda: CacheList(small_kv(), RotatingKVCache(max_size=4)),
}


@pytest.mark.parametrize("make", CACHES.values(), ids=CACHES.keys())
def test_rewound_cache_equals_one_that_never_saw_the_token(make, seed):
    """Prefill, then per token: a voided token (other keys) is run, the cache restored, the real token run;
    what attention reads and the state equal a cache given only the real tokens (past a rotating window too)."""
    rng = np.random.default_rng(seed)
    rewound, plain = make(), make()
    assert family_cache.rewindable([rewound])

    def update(c, k, v):
        return [x.update_and_fetch(k, v) for x in (c.caches if isinstance(c, CacheList) else [c])]

    k, v = kv(rng, 3), kv(rng, 3)
    update(rewound, k, v), update(plain, k, v)
    for step in range(3 * STEPS):
        saved = family_cache.snapshot(rewound)
        got = update(rewound, kv(rng, 1), kv(rng, 1))  # the voided token
        mx.eval(got)
        family_cache.restore(rewound, saved)
        k, v = kv(rng, 1), kv(rng, 1)
        got, want = update(rewound, k, v), update(plain, k, v)
        for (gk, gv), (wk, wv) in zip(got, want):
            np.testing.assert_array_equal(np.array(gk), np.array(wk), err_msg=f"step {step} " + seed_note(seed))
            np.testing.assert_array_equal(np.array(gv), np.array(wv), err_msg=f"step {step} " + seed_note(seed))
    layers = [(c.caches if isinstance(c, CacheList) else [c]) for c in (rewound, plain)]
    for a, b in zip(*layers):
        assert a.offset == b.offset and getattr(a, "_idx", 0) == getattr(b, "_idx", 0)


def test_rewound_arrays_cache(seed):
    """Recurrent state is replaced per token: the restored list holds the arrays from before the token."""
    rng = np.random.default_rng(seed)
    c = ArraysCache(2)
    c[0], c[1] = kv(rng, 1), kv(rng, 1)
    before = [np.array(a) for a in c.cache]
    saved = family_cache.snapshot(c)
    c[0], c[1] = kv(rng, 1), c[1] + 1
    family_cache.restore(c, saved)
    for a, b in zip(c.cache, before):
        np.testing.assert_array_equal(np.array(a), b)
    c.lengths = mx.array([3])
    assert not family_cache.rewindable([c])  # batch bookkeeping changes in place: such a model does not bet


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def synthetic(request, tmp_path_factory):
    seed = derive_seed("speculation family " + request.param)
    tmp = tmp_path_factory.mktemp(request.param)
    build(request.param, 2, tmp / "src", tmp / "dst", vocab=256, tiny=True, dtype="float32", seed=seed)
    return request.param, tmp / "dst", seed


def logits_and_greedy(model, prompt, force=False):
    """Per-step float32 logits and greedy tokens through flash_moe's generation loop (mlx-lm's caches)."""
    out, tokens = [], []
    for token, logprobs in generate_step(prompt, model, max_tokens=STEPS):
        if force:
            model.device_cache.speculation.clean = 10**6  # bet even though experts are missing
        out.append(np.array(logprobs))
        tokens.append(token)
    return np.stack(out), tokens


@pytest.mark.parametrize("capacity,force", [("all", False), (12, True)])
def test_speculative_family_decode_equals_synchronous(synthetic, capacity, force):
    """Every expert in the device tier: decode tokens bet and stand. A tier of 12 of 32 experts, forced to bet:
    bets are voided, the caches rewound and the token re-run. Both give the synchronous model's logits and tokens."""
    family, path, seed = synthetic
    sync = flash_moe.load(path, cache_experts=capacity)
    spec = flash_moe.load(path, cache_experts=capacity)
    try:
        sync.device_cache.speculate = False
        if capacity == "all":
            assert spec.device_cache.preload() == 2 * 16
        prompt = mx.array(np.random.default_rng(seed).integers(0, 256, 9).astype(np.int32))
        want, want_tokens = logits_and_greedy(sync, prompt, force)
        got, got_tokens = logits_and_greedy(spec, prompt, force)
        note = f"{family}, capacity {capacity}: {spec.device_cache.totals()} " + seed_note(seed)
        assert got_tokens == want_tokens, note
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=note)
        t = spec.device_cache.totals()
        assert sync.device_cache.totals()["speculated"] == 0
        if force:
            assert t["speculated"] >= STEPS - 1 and t["voided"] >= 1 and t["misses"] > 0, note
        else:
            assert t["speculated"] >= STEPS - 2 and t["voided"] == 0 and t["misses"] == 0, note
    finally:
        sync.close()
        spec.close()


def decode(model, ids, max_tokens, seed, ahead: bool, monkeypatch, stop_after=None):
    """(tokens, logprobs, prompt cache) of one sampled run; ``stop_after``: the caller stops after that many."""
    monkeypatch.setenv("FLASH_MOE_ASYNC_DECODE", "1" if ahead else "0")
    cache = make_prompt_cache(model)
    got, logprobs = [], []
    for token, lp in generate_step(mx.array(ids, mx.int32), model, max_tokens=max_tokens, seed=seed,
                                   sampler=make_sampler(temperature=0.9), prompt_cache=cache):
        got.append(token)
        logprobs.append(np.array(lp))
        if len(got) == stop_after:
            break
    return got, logprobs, cache


def assert_same_run(a, b, note):
    """Same tokens, logprobs, cached tokens, and what attention reads of every mlx-lm cache (keys past the
    offset are never read: the token built ahead may have written there)."""
    assert a[0] == b[0], note
    assert all(np.array_equal(x, y) for x, y in zip(a[1], b[1])), note
    assert a[2].tokens == b[2].tokens, note
    for ca, cb in zip(a[2].layers, b[2].layers):
        assert ca.offset == cb.offset == len(a[2].tokens), note
        for x, y in zip(ca.keys_and_values(), cb.keys_and_values()):
            np.testing.assert_array_equal(np.array(x), np.array(y), err_msg=note)


def test_preloaded_family_decodes_ahead(synthetic, seed, monkeypatch):
    """Every expert in the device tier: generation builds token t+1 before reading t (mlx-lm's caches rolled back
    by family_cache.py when the caller stops early), with the tokens and caches of the read-first loop."""
    family, path, _ = synthetic
    model = flash_moe.load(path, cache_experts="all")
    try:
        assert not decodes_ahead(model, make_prompt_cache(model), None)  # a tier that may miss: read first
        model.device_cache.preload()
        assert decodes_ahead(model, make_prompt_cache(model), None)
        rng = np.random.default_rng(seed)
        ids, n, k = rng.integers(0, 256, 9).tolist(), int(rng.integers(2, 9)), int(rng.integers(1, 5))
        note = f"{family} max_tokens {n}, stop after {k} " + seed_note(seed)
        assert_same_run(decode(model, ids, n, seed, True, monkeypatch), decode(model, ids, n, seed, False, monkeypatch), note)
        stopped = decode(model, ids, 12, seed, True, monkeypatch, stop_after=k)
        exact = decode(model, ids, k, seed, False, monkeypatch)
        assert_same_run(stopped, exact, note)
        more = ids + stopped[0] + rng.integers(0, 256, 3).tolist()  # a second turn through each cache
        monkeypatch.setenv("FLASH_MOE_ASYNC_DECODE", "1")
        a = [t for t, _ in generate_step(mx.array(more, mx.int32), model, max_tokens=4, prompt_cache=stopped[2])]
        b = [t for t, _ in generate_step(mx.array(more, mx.int32), model, max_tokens=4, prompt_cache=exact[2])]
        assert a == b, note
        totals = model.device_cache.totals()
        assert totals["speculated"] > 0 and totals["misses"] == totals["voided"] == 0, totals
    finally:
        model.close()

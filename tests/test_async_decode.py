"""Decoding ahead (issue 20): ``generate_step`` builds token t+1's graph before it reads token t where a decode
forward never syncs (resident experts, or a device tier holding them all). The tokens, their logprobs and the
prompt cache afterwards must be exactly those of the loop that reads each token first
(FLASH_MOE_ASYNC_DECODE=0), for greedy and sampled
decoding, at max_tokens, and when the caller stops early (eos, a stop string): the token built ahead is then
forgotten. Streamed models and a device tier missing experts (speculating) never decode ahead: unchanged too.

Random tiny float32 hybrid models (3 GatedDeltaNet layers + 1 attention), as in test_prompt_cache.py, and the
shipped demo (its tokenizer and eos) loaded resident.
"""

from __future__ import annotations

import numpy as np
import mlx.core as mx
import pytest

import hf_models
from conftest import derive_seed, seed_note

from flash_moe import load, make_prompt_cache
from flash_moe.convert import convert
from flash_moe.generation import decodes_ahead, eos_token_ids, generate_step
from flash_moe.sample import make_sampler

CONFIG = dict(hf_models.QWEN3_5_CONFIGS["interval4_e8_top2"], hidden_size=128, num_experts=16,
              num_experts_per_tok=4, moe_intermediate_size=64, shared_expert_intermediate_size=64)
VOCAB = CONFIG["vocab_size"]
SAMPLINGS = {"greedy": {}, "sampled": {"temperature": 0.9, "top_p": 0.95}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    seed = derive_seed("test_async_decode.folders")
    hf, _ = hf_models.qwen3_5_moe_text(tmp_path_factory.mktemp("hf"), CONFIG, seed=seed)
    conv = convert(hf, tmp_path_factory.mktemp("conv"), bits=16, dtype="float32", progress=False)
    return {"resident": hf, "streamed": conv}


@pytest.fixture(scope="module", params=["resident", "streamed", "speculating", "preloaded"])
def model(request, folders):
    if request.param == "speculating":  # every one-token step a bet on a device tier of 56 of the 64 experts
        m = load(folders["streamed"], cache_experts=56)
        m.cache.should_speculate = lambda: True
    elif request.param == "preloaded":  # a device tier holding every expert: its bets cannot be lost
        m = load(folders["streamed"], cache_experts="all", preload=True)
    else:
        m = load(folders[request.param])
    m.kind = request.param
    yield m
    if request.param == "preloaded":
        totals = m.cache.totals()
        assert totals["speculated"] > 0 and totals["misses"] == totals["voided"] == 0, totals
    m.close()


def decode(model, ids, max_tokens, sampling, seed, ahead: bool, monkeypatch, stop_after=None):
    """(tokens, logprobs, prompt cache) of one run; ``stop_after``: the caller stops after that many tokens."""
    monkeypatch.setenv("FLASH_MOE_ASYNC_DECODE", "1" if ahead else "0")
    cache = make_prompt_cache(model)
    got, logprobs = [], []
    for token, lp in generate_step(mx.array(ids, mx.int32), model, max_tokens=max_tokens, seed=seed,
                                   sampler=make_sampler(**sampling), prompt_cache=cache):
        got.append(token)
        logprobs.append(np.array(lp))
        if len(got) == stop_after:
            break
    return got, logprobs, cache


def cache_state(cache):
    return list(cache.tokens), [[np.array(a.astype(mx.float32)) for a in c.state] for c in cache.layers]


def assert_same_run(a, b, note):
    assert a[0] == b[0], note
    assert all(np.array_equal(x, y) for x, y in zip(a[1], b[1])), note
    (ta, sa), (tb, sb) = cache_state(a[2]), cache_state(b[2])
    assert ta == tb, note
    assert all(c.offset == len(ta) for c in a[2].layers), note
    for la, lb in zip(sa, sb):
        assert len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb)), note


def test_who_decodes_ahead(model, monkeypatch):
    cache = make_prompt_cache(model)
    assert decodes_ahead(model, cache, None) == (model.kind in ("resident", "preloaded"))
    monkeypatch.setenv("FLASH_MOE_ASYNC_DECODE", "0")
    assert not decodes_ahead(model, cache, None)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_same_tokens_and_cache(model, seed, sampling, monkeypatch):
    rng = np.random.default_rng(seed)
    ids, n = rng.integers(0, VOCAB, 9).tolist(), int(rng.integers(1, 9))
    note = f"{model.kind} {sampling} max_tokens {n} {seed_note(seed)}"
    on = decode(model, ids, n, SAMPLINGS[sampling], seed, True, monkeypatch)
    off = decode(model, ids, n, SAMPLINGS[sampling], seed, False, monkeypatch)
    assert len(on[0]) == n, note
    assert_same_run(on, off, note)
    if model.kind == "preloaded":  # and the tier's lazy bets equal its synchronous fetches
        model.cache.speculate = False
        try:
            assert_same_run(on, decode(model, ids, n, SAMPLINGS[sampling], seed, False, monkeypatch), note)
        finally:
            model.cache.speculate = True
    assert on[2].tokens == ids + on[0][:-1], note  # the last sampled token is not processed


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_caller_stops_early(model, seed, sampling, monkeypatch):
    """Stopping after k tokens (as eos does) leaves the cache of a run of max_tokens=k, in both loops."""
    rng = np.random.default_rng(seed)
    ids, k = rng.integers(0, VOCAB, 7).tolist(), int(rng.integers(1, 6))
    note = f"{model.kind} {sampling} stop after {k} {seed_note(seed)}"
    stopped = decode(model, ids, 12, SAMPLINGS[sampling], seed, True, monkeypatch, stop_after=k)
    exact = decode(model, ids, k, SAMPLINGS[sampling], seed, False, monkeypatch)
    assert_same_run(stopped, exact, note)
    # and the cache goes on as if nothing had been built ahead: a second turn through it matches
    more = ids + stopped[0] + rng.integers(0, VOCAB, 3).tolist()
    for run in (stopped, exact):
        assert run[2].reusable(more) == len(ids) + k - 1, note
    monkeypatch.setenv("FLASH_MOE_ASYNC_DECODE", "1")
    a = [t for t, _ in generate_step(mx.array(more, mx.int32), model, max_tokens=3, prompt_cache=stopped[2])]
    b = [t for t, _ in generate_step(mx.array(more, mx.int32), model, max_tokens=3, prompt_cache=exact[2])]
    assert a == b, note


def test_eos_and_stop_in_stream_generate(demo_folder, seed, monkeypatch):
    """The demo, resident: stream_generate ends at eos with the same tokens and prompt cache ahead or not."""
    demo = load(demo_folder, stream=False)
    prompt = "def main(" + "x" * (seed % 5)
    assert decodes_ahead(demo, make_prompt_cache(demo), None)
    free = [r.token for r in demo.stream_generate(prompt, max_tokens=12)]
    j = 1 + seed % max(len(free) - 2, 1)  # before the last token: one was built ahead
    if free[j] in free[:j]:
        j = free.index(free[j])
    monkeypatch.setattr(demo.config, "eos_token_id", [demo.config.eos_token_id, free[j]])
    assert free[j] in eos_token_ids(demo, demo.tokenizer)
    runs = {}
    for ahead in (True, False):
        monkeypatch.setenv("FLASH_MOE_ASYNC_DECODE", "1" if ahead else "0")
        cache = make_prompt_cache(demo)
        stream = list(demo.stream_generate(prompt, max_tokens=12, prompt_cache=cache))
        runs[ahead] = [r.token for r in stream], [r.finish_reason for r in stream], cache_state(cache)
    note = f"eos {free[j]} at {j} of {free} {seed_note(seed)}"
    assert runs[True][0] == free[: j + 1] and runs[True][1][-1] == "stop", note
    assert runs[True][:2] == runs[False][:2], note
    (ta, sa), (tb, sb) = runs[True][2], runs[False][2]
    assert ta == tb, note
    assert all(np.array_equal(x, y) for la, lb in zip(sa, sb) for x, y in zip(la, lb)), note

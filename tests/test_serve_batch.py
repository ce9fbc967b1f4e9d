"""Continuous batching (issue 14): batched == alone, token for token, in batch_generate and in the server;
prefill interleaved with decode; the union of the batch's experts read once; a bounded load test.

Float32 demo model, so greedy choices do not depend on rounding.
"""

from __future__ import annotations

import gc
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import pytest

openai = pytest.importorskip("openai")

from conftest import seed_note
from flash_moe import load
from flash_moe.batch import Batch, batch_generate
from flash_moe.server import make_state
from serving import LiveServer, model  # noqa: F401  (model: the shared fixture)


def random_prompts(rng, n, vocab=4087):
    """Prompts of different lengths (1 to 40 tokens) below the special tokens."""
    return [[rng.randrange(vocab) for _ in range(rng.choice([1, 2, rng.randint(3, 40)]))] for _ in range(n)]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 30, "repetition_penalty": 1.3}])
def test_batch_generate_equals_alone(model, seed, sampling):
    rng = random.Random(seed)
    prompts = random_prompts(rng, 8)
    n = rng.randint(8, 20)
    kw = dict(sampling, seed=seed) if sampling else {}
    alone = [model.generate(p, max_tokens=n, **kw) for p in prompts]
    stats = model.stats
    before = stats.snapshot()
    together = batch_generate(model, prompts, max_tokens=n, **kw)
    batched_bytes = stats.snapshot().delta(before).totals()["bytes"]
    for p, a, b in zip(prompts, alone, together):
        assert b == a and b.finish_reason == a.finish_reason, f"prompt {p} {seed_note(seed)}"
    # Each MoE layer read the union of the batch's experts once per step, not each sequence's experts.
    before = stats.snapshot()
    for p in prompts:
        model.generate(p, max_tokens=n, **kw)
    assert batched_bytes < stats.snapshot().delta(before).totals()["bytes"]


@pytest.fixture(scope="module")
def speculating(demo_folder):
    """Through a device expert cache of 56 of the 64 experts, every one-token step a bet
    (``Speculation.step``): lost bets restore the layer caches, batched ones included."""
    m = load(demo_folder, dtype="float32", cache_experts=56)
    m.cache.should_speculate = lambda: True
    yield m
    m.close()


@pytest.mark.parametrize("kind", ["streamed", "speculating"])
def test_batched_logprobs_equal_alone(request, kind, seed):
    """Every step's log-probabilities in a batch equal the solo run's (float32 rounding apart), sequences
    joining and leaving at different steps."""
    model = request.getfixturevalue("model" if kind == "streamed" else "speculating")
    rng = random.Random(seed)
    prompts = random_prompts(rng, 6)
    n = 10
    solo = [[r.logprobs for r in model.stream_generate(p, max_tokens=n)] for p in prompts]
    solo_tokens = [[r.token for r in model.stream_generate(p, max_tokens=n)] for p in prompts]
    batch, got, waiting = Batch(model), {}, list(range(len(prompts)))
    while waiting or batch.busy:
        if waiting and rng.random() < 0.5:  # join at a random step
            i = waiting.pop(0)
            seq = batch.add(prompts[i])
            seq.data["i"] = i
            got[i] = []
        for s, _, logprobs in batch.step():
            got[s.data["i"]].append(logprobs)
            if len(got[s.data["i"]]) == len(solo[s.data["i"]]):
                batch.remove(s)
    for i in range(len(prompts)):
        for k, (a, b) in enumerate(zip(got[i], solo[i])):
            err = mx.abs(a - b).max().item()
            assert err < 1e-4, f"prompt {i} step {k}: logprob error {err} {seed_note(seed)}"
        assert len(got[i]) == len(solo_tokens[i])
    if kind == "speculating":
        totals = model.cache.totals()
        assert totals["speculated"] > totals["voided"] > 0, totals  # bets both held and lost


def test_union_of_experts_read_once(model, seed):
    """One batched decode step reads, per MoE layer, exactly the distinct experts its rows chose."""
    rng = random.Random(seed)
    batch = Batch(model)
    for p in random_prompts(rng, 5):
        batch.add(p)
    while batch.prefilling:
        batch.step()
    layers = model.store.layout.moe_layers
    chosen = {layer: set() for layer in layers}
    real = {layer: model.model.layers[layer].mlp.experts for layer in layers}

    def spy(layer):
        def call(x, inds, scores):
            chosen[layer].update(int(i) for i in mx.array(inds).reshape(-1).tolist())
            return real[layer](x, inds, scores)
        return call

    for layer in layers:
        model.model.layers[layer].mlp.experts = spy(layer)
    try:
        before = model.stats.snapshot()
        out = batch.step()
        read = model.stats.snapshot().delta(before)
    finally:
        for layer in layers:
            model.model.layers[layer].mlp.experts = real[layer]
    assert len(out) == 5
    for layer in layers:
        assert read.experts[layer] == len(chosen[layer]), f"layer {layer} {seed_note(seed)}"
        assert read.fetches[layer] == 1


def test_prefill_interleaved_with_decode(model, seed):
    """A long prompt joining a running batch is prefilled a chunk per step; the running sequence gets a
    token at every one of those steps, and both still equal their solo runs."""
    rng = random.Random(seed)
    short, long_ = random_prompts(rng, 1)[0][:3], [rng.randrange(4087) for _ in range(37)]
    refs = [[r.token for r in model.stream_generate(p, max_tokens=16, prefill_step_size=step)]
            for p, step in ((short, 512), (long_, 8))]
    batch = Batch(model, prefill_step_size=512)
    first = batch.add(short)
    got = {id(first): []}
    for _ in range(3):
        for s, t, _ in batch.step():
            got[id(s)].append(t)
    batch.prefill_step_size = 8
    second = batch.add(long_)
    got[id(second)] = []
    steps_while_prefilling = 0
    while batch.prefilling:
        out = batch.step()
        steps_while_prefilling += 1
        assert first in [s for s, _, _ in out]  # the running stream keeps flowing
        for s, t, _ in out:
            got[id(s)].append(t)
    assert steps_while_prefilling == 5  # 36 tokens in chunks of 8
    while len(got[id(second)]) < 16 or len(got[id(first)]) < 16:
        for s, t, _ in batch.step():
            got[id(s)].append(t)
    for seq, ref in ((first, refs[0]), (second, refs[1])):  # the solo runs stop at eos, the batch goes on
        assert got[id(seq)][: len(ref)] == ref, seed_note(seed)


def test_server_concurrent_equals_alone(model, seed):
    """8 concurrent greedy requests of different lengths, decoded together, each equal to its solo run."""
    rng = random.Random(seed)
    prompts = random_prompts(rng, 8)
    lengths = [rng.randint(4, 24) for _ in prompts]
    refs = [model.generate(p, max_tokens=n) for p, n in zip(prompts, lengths)]
    with LiveServer(make_state(model, max_batch=8)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        barrier = threading.Barrier(8)

        def ask(i):
            barrier.wait()
            return client.completions.create(model="demo", prompt=prompts[i], max_tokens=lengths[i]).choices[0].text

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, range(8)))
        m = s.state.metrics
        steps, tokens = m.get("flash_moe_decode_steps_total"), m.get("flash_moe_generated_tokens_total")
    for p, g, r in zip(prompts, got, refs):
        assert g == r, f"prompt {p} {seed_note(seed)}"
    assert tokens / steps > 2, f"mean batch size {tokens / steps}: the requests were not decoded together"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="RSS from /proc (Linux)")
def test_load(model, seed):
    """200 requests from 16 concurrent clients, a quarter of them cancelled mid-stream at random: no error,
    every completed greedy answer equal to its serial result, memory back to its baseline afterwards."""
    rng = random.Random(seed)
    pool_prompts = random_prompts(rng, 10)
    plans = [(rng.randrange(10), rng.randint(2, 6), rng.random() < 0.25) for _ in range(200)]
    refs = {(i, n): model.generate(pool_prompts[i], max_tokens=n) for i, n, _ in set((i, n, False) for i, n, _ in plans)}
    bound = 2 << 20
    with LiveServer(make_state(model, max_batch=8, max_queue=64, prompt_cache_bytes=bound)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        client.completions.create(model="demo", prompt=pool_prompts[0], max_tokens=2)  # warm up
        kept = s.state.worker.pool
        kept.entries.clear()  # the worker is idle
        gc.collect()
        base_rss, base_mx = rss(), mx.get_active_memory()
        errors, done, cancelled = [], [], []

        def run(plan):
            i, n, cancel = plan
            try:
                if cancel:
                    stream = client.completions.create(model="demo", prompt=pool_prompts[i], max_tokens=n + 50,
                                                       stream=True)
                    for _ in zip(range(rng.randint(1, 3)), stream):
                        pass
                    stream.close()
                    cancelled.append(plan)
                else:
                    text = client.completions.create(model="demo", prompt=pool_prompts[i], max_tokens=n).choices[0].text
                    done.append((i, n, text))
            except Exception as e:  # collected, asserted below
                errors.append(repr(e))

        tic = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(run, plans))
        elapsed = time.monotonic() - tic
        wait = time.monotonic() + 10
        while s.state.worker.jobs and time.monotonic() < wait:
            time.sleep(0.05)
        assert not s.state.worker.jobs
        assert s.state.metrics.get("flash_moe_requests_cancelled_total") >= min(len(cancelled), 1)
        assert 0 < kept.nbytes <= bound and s.state.metrics.get("flash_moe_prompt_cache_hits_total") > 0
    kept.entries.clear()  # the prompt caches are kept on purpose; what must come back is everything else
    assert not errors, errors[:3]
    assert len(done) + len(cancelled) == 200
    for i, n, text in done:
        assert text == refs[(i, n)], f"prompt {pool_prompts[i]}, {n} tokens {seed_note(seed)}"
    gc.collect()
    mx.clear_cache()
    assert rss() < base_rss * 1.05, f"RSS {rss()} vs baseline {base_rss}"
    assert mx.get_active_memory() <= base_mx * 1.05 + (1 << 20), f"MLX active {mx.get_active_memory()} vs {base_mx}"
    assert elapsed < 60, f"the load test took {elapsed:.0f} s"

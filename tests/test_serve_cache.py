"""Prompt caches across requests (issue 14): the second request of a conversation reuses the first's state
(cached_tokens > 0) and answers exactly as a fresh run; the LRU pool forks partial matches and stays
within its byte bound."""

from __future__ import annotations

import random

import mlx.core as mx
import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

from conftest import seed_note
from flash_moe.batch import Batch
from flash_moe.generation import eos_token_ids
from flash_moe.server import make_state
from flash_moe.server.cache_pool import PromptCachePool
from serving import LiveServer, model  # noqa: F401  (model: the shared fixture)

USERS = ["def main", "class Foo", "import os", "for i in", "return x"]


@pytest.fixture(scope="module")
def server(model):
    with LiveServer(make_state(model, max_batch=4, prompt_cache_bytes="64M")) as s:
        yield s


def solo(model, prompt, n):
    return list(model.stream_generate(prompt, max_tokens=n))


@pytest.mark.parametrize("think", [False, None])
def test_conversation_reuses_the_cache(server, model, seed, think):
    rng = random.Random(seed)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    extra = {} if think is None else {"enable_thinking": think}
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": rng.choice(USERS)}]
    n = rng.randint(6, 14)
    for turn in range(3):
        r = client.chat.completions.create(model="demo", messages=messages, max_tokens=n, logprobs=True,
                                           top_logprobs=5, extra_body=extra)
        ref = solo(model, messages, n) if think is None else list(
            model.stream_generate(messages, max_tokens=n, enable_thinking=think))
        note = f"turn {turn}, {messages} {seed_note(seed)}"
        msg = r.choices[0].message
        got = [model.tokenizer.encode(e.token, add_special_tokens=False) for e in r.choices[0].logprobs.content]
        assert len(got) == len(ref), note
        for e, s in zip(r.choices[0].logprobs.content, ref):  # the logits equal a fresh run's
            assert abs(e.logprob - s.logprobs[s.token].item()) < 1e-4, note
            top = sorted(s.logprobs.tolist(), reverse=True)[:5]
            assert [t.logprob for t in e.top_logprobs] == pytest.approx(top, abs=1e-4), note
        assert (msg.content or "") == "".join(x.content for x in ref), note
        cached = r.usage.prompt_tokens_details.cached_tokens
        if turn:  # (the first turn may reuse the system prompt of another test's conversation)
            assert 0 < cached < r.usage.prompt_tokens, note
        messages += [{"role": "assistant", "content": msg.content or ""}, {"role": "user", "content": rng.choice(USERS)}]


def test_anthropic_cache_read_tokens(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "import sys"}]
    m = client.messages.create(model="demo", max_tokens=6, system="Be brief.", messages=messages,
                               thinking={"type": "disabled"})
    text = "".join(b.text for b in m.content if b.type == "text")
    messages += [{"role": "assistant", "content": text or "ok"}, {"role": "user", "content": "def f"}]
    m = client.messages.create(model="demo", max_tokens=6, system="Be brief.", messages=messages,
                               thinking={"type": "disabled"})
    assert m.usage.cache_read_input_tokens > 0
    assert server.state.metrics.get("flash_moe_prompt_cache_hits_total") >= 1


def run(batch, ids, n, cache=None, checkpoint_at=()):
    """``n`` tokens of one sequence through the engine, ending at eos as ``solo`` (stream_generate) does: the
    engine itself does not stop there (the server's text stream does), and the retrained demo may end early."""
    eos = eos_token_ids(batch.model, batch.model.tokenizer)
    seq = batch.add(ids, prompt_cache=cache, checkpoint_at=checkpoint_at)
    tokens = []
    while len(tokens) < n and not (tokens and tokens[-1] in eos):
        tokens += [t for s, t, _ in batch.step() if s is seq]
    return tokens, seq.cached_tokens, batch.remove(seq)


def test_pool_forks_partial_matches(model, seed):
    """A prompt that shares only part of a kept cache runs on a fork: the kept cache still serves its own
    continuation, and both answers equal fresh runs."""
    rng = random.Random(seed)
    a = [rng.randrange(4087) for _ in range(30)]
    b = a[:12] + [rng.randrange(4087) for _ in range(10)]
    fresh = {k: [r.token for r in solo(model, ids, 6)] for k, ids in (("a", a), ("b", b))}
    pool, batch = PromptCachePool(model, 64 << 20), Batch(model)
    tokens, cached, cache = run(batch, a, 6, checkpoint_at=(12,))  # a checkpoint where b diverges
    assert tokens == fresh["a"] and cached == 0
    pool.put(cache)
    held = len(cache.tokens)
    tokens, cached, _ = run(batch, b, 6, pool.take(b))
    assert pool.entries == [cache]  # a fork was taken; the kept one stays
    assert cached == 12 and tokens == fresh["b"], seed_note(seed)
    assert len(cache.tokens) == held
    cont = a + fresh["a"][:5] + [rng.randrange(4087)]
    taken = pool.take(cont)
    assert taken is cache and pool.entries == []
    tokens, cached, _ = run(batch, cont, 4, taken)
    assert cached == held and tokens == [r.token for r in solo(model, cont, 4)], seed_note(seed)


def test_pool_bounded_by_bytes(model):
    batch = Batch(model)
    caches = [run(batch, [i + 1] * (5 + i), 2)[2] for i in range(4)]
    size = max(c.nbytes for c in caches)
    pool = PromptCachePool(model, 2 * size)
    for c in caches:
        pool.put(c)
    assert pool.nbytes <= 2 * size and pool.entries[-1] is caches[-1] and caches[0] not in pool.entries
    assert PromptCachePool(model, 0).take([1, 2, 3]).tokens == []
    mx.eval([])

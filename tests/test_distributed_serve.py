"""``flash-moe serve`` split over two ranks on a localhost ring (issue 17): rank 0 serves HTTP, the other rank
mirrors its batch steps (flash_moe/server/mirror.py). Driven by the real ``openai`` client; every answer must
equal the single-process server's, token for token."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import derive_seed, seed_note
from serving import LiveServer
from test_distributed import TIMEOUT, WATCHDOG, free_ports, start_ranks, write_model

from flash_moe import load
from flash_moe.server import make_state

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("serve_model"), 16, derive_seed("distributed_serve"))


def requests(rng) -> list[dict]:
    """Chat and completion requests, greedy but one: short and long prompts (one longer than a mirror message, so it
    reaches the follower in several), asked together so they share decode steps."""
    words = ["def", "main", "class", "import", "return", "self", "while", "for", "in", "print", "value"]
    long_text = " ".join(rng.choice(words, 1500).tolist())  # ~1,500 tokens: more than mirror.CAPACITY ids
    return [
        {"kind": "chat", "messages": [{"role": "user", "content": "def main"}], "max_tokens": 8},
        {"kind": "completion", "prompt": "class Foo:", "max_tokens": 10, "logprobs": 1},
        {"kind": "chat", "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": " ".join(rng.choice(words, 12).tolist())}],
         "max_tokens": 6},
        {"kind": "completion", "prompt": long_text, "max_tokens": 4, "logprobs": 1},
        # sampled: the follower samples greedily, so only rank 0's tokens sent to it keep the ranks together
        {"kind": "completion", "prompt": "import os", "max_tokens": 12, "logprobs": 1, "temperature": 1.5, "seed": 7},
    ]


def ask(url: str, request: dict) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    if request["kind"] == "chat":
        r = client.chat.completions.create(model="m", messages=request["messages"], max_tokens=request["max_tokens"],
                                           temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        return {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
                "usage": (r.usage.prompt_tokens, r.usage.completion_tokens)}
    r = client.completions.create(model="m", prompt=request["prompt"], max_tokens=request["max_tokens"],
                                  temperature=request.get("temperature", 0), seed=request.get("seed"),
                                  logprobs=request["logprobs"])
    return {"text": r.choices[0].text, "finish": r.choices[0].finish_reason,
            "usage": (r.usage.prompt_tokens, r.usage.completion_tokens),
            "logprobs": r.choices[0].logprobs.token_logprobs}


def conversation(url: str, first: dict) -> list[dict]:
    """All requests at once, then a second turn of the first chat (the prompt-cache pool reuses the first)."""
    with ThreadPoolExecutor(len(first)) as pool:
        answers = list(pool.map(lambda r: ask(url, r), first))
    turn = dict(first[0], messages=first[0]["messages"] + [{"role": "assistant", "content": answers[0]["text"]},
                                                           {"role": "user", "content": "and then?"}])
    return answers + [ask(url, turn)]


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.mark.parametrize("cache_bytes", ["8G", "0"])  # with a prompt-cache pool (mirrored too), without
def test_served_split_equals_single_process(folder, tmp_path, seed, cache_bytes):
    rng = np.random.default_rng(seed)
    asked = requests(rng)
    model = load(folder, group=None)
    with LiveServer(make_state(model, max_batch=4, prompt_cache_bytes=cache_bytes)) as alone:
        want = conversation(alone.url, asked)
        want_cached = metric(alone.url, "flash_moe_prompt_cache_tokens_total")
    model.close()
    assert (want_cached > 0) == (cache_bytes != "0")  # the second turn reused the first

    port = free_ports(1)[0]
    procs = start_ranks(2, ["-m", "flash_moe", "serve", "--model", str(folder), "--port", str(port), "--max-batch",
                            "4", "--prompt-cache-bytes", cache_bytes], tmp_path, to_files=True,
                        watchdog=60)  # a busy CI box: no false alarm here
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:  # rank 0 alone binds the port
            assert all(p.poll() is None for p in procs), [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
            assert time.monotonic() < deadline, "the split server did not start"
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        got = conversation(url, asked)
        assert metric(url, "flash_moe_prompt_cache_tokens_total") == want_cached
        procs[0].send_signal(signal.SIGINT)  # rank 0 stops serving and tells the follower to quit
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    errs = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    assert codes == [0, 0], errs
    assert "expert-parallel rank 1 of 2" in errs[1] and not (tmp_path / "rank1.out").read_text()
    for i, (a, b) in enumerate(zip(got, want)):
        assert a["text"] == b["text"] and a["usage"] == b["usage"] and a["finish"] == b["finish"], (i, seed_note(seed))
        if "logprobs" in b:
            np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-4, err_msg=seed_note(seed))


def test_killed_follower_ends_the_server(folder, tmp_path):
    """The follower killed while a request is being generated: the request fails (never hangs), and rank 0
    ends within the watchdog's timeout with a line naming itself, never with success."""
    port = free_ports(1)[0]
    procs = start_ranks(2, ["-m", "flash_moe", "serve", "--model", str(folder), "--port", str(port)], tmp_path,
                        to_files=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert procs[0].poll() is None and time.monotonic() < deadline, (tmp_path / "rank0.err").read_text()
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(client.completions.create, model="m", prompt="def main", max_tokens=100000,
                                temperature=0)
            while metric(url, "flash_moe_generated_tokens_total") < 3:  # generation is under way
                assert time.monotonic() < deadline and not reply.done()
                time.sleep(0.05)
            procs[1].send_signal(signal.SIGKILL)
            start = time.monotonic()
            with pytest.raises(openai.APIError):  # a 500 naming the broken run, or the connection dropped
                reply.result(timeout=WATCHDOG + 30)
        procs[0].wait(timeout=WATCHDOG + 30)
        assert time.monotonic() - start < WATCHDOG + 30
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    err = (tmp_path / "rank0.err").read_text()
    assert procs[0].returncode not in (0, None), err
    assert ("error: rank 0 of 2: " in err or "flash-moe: rank 0 of 2: no progress" in err), err
    assert "another rank stopped" in err, err


def test_failed_step_resets_every_rank(folder, tmp_path):
    """A step that fails on every rank alike (a damaged embedding row: non-finite logits) fails its request
    with a 500; rank 0 resets its batch and tells the follower to, and the next request's answer equals the
    single-process server's after the same failure."""
    from safetensors.numpy import load_file, save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    weights = load_file(damaged / "resident.safetensors")
    weights["model.embed_tokens.weight"][7] = np.nan  # token 7's embedding
    save_file(weights, damaged / "resident.safetensors", metadata={"format": "mlx"})

    def session(url: str) -> str:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        with pytest.raises(openai.InternalServerError, match="not finite"):
            client.completions.create(model="m", prompt=[1, 7, 3], max_tokens=4, temperature=0)
        return client.completions.create(model="m", prompt="def main", max_tokens=6, temperature=0).choices[0].text

    model = load(damaged, group=None)
    with LiveServer(make_state(model)) as alone:
        want = session(alone.url)
    model.close()
    port = free_ports(1)[0]
    procs = start_ranks(2, ["-m", "flash_moe", "serve", "--model", str(damaged), "--port", str(port)], tmp_path,
                        to_files=True, watchdog=60)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
                [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        assert session(url) == want
        procs[0].send_signal(signal.SIGINT)
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert codes == [0, 0], [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]

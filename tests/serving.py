"""A live flash-moe server for tests: uvicorn in a thread, on 127.0.0.1 at a free port."""

from __future__ import annotations

import contextlib
import itertools
import math
import socket
import threading
import time

import pytest
import uvicorn

from flash_moe import load
from flash_moe.server.app import create_app


class LiveServer:
    def __init__(self, state):
        self.state = state
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Script:
    """Stands in for the worker's engine (its generation seam): each added sequence writes the next scripted
    reply, token by token, ending it with <|im_end|>; ``endless(text)`` replies repeat until max_tokens or a
    cancellation. ``gate`` (a threading.Event) holds every step until set; ``delay`` seconds pass per step. Everything after the engine runs
    as served: the worker's detokenizer and stop strings, the parser, the formats."""

    def __init__(self, tokenizer, replies, *, gate=None, delay: float = 0.0):
        self.tokenizer, self.gate, self.delay = tokenizer, gate, delay
        self.replies = list(replies)
        self.prompts, self.yielded, self.running = [], [], {}
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.fail = self.encode(FAIL)[0]  # a reply with this token makes the step raise

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        assert self.tokenizer.decode(ids, skip_special_tokens=False) == text
        return ids

    @property
    def busy(self) -> bool:
        return bool(self.running)

    def add(self, ids, **sampling):
        self.prompts.append(list(ids))
        reply = self.replies.pop(0)
        tokens = itertools.cycle(self.encode(reply[0])) if isinstance(reply, tuple) else iter(self.encode(reply) + [self.end])
        handle = object()
        self.running[handle] = [tokens, 0]
        return handle

    def step(self):
        import mlx.core as mx

        if self.gate is not None:
            self.gate.wait(30)
        time.sleep(self.delay)  # a model's pace, where a test needs one
        vocab = len(self.tokenizer)
        out = []
        for handle, state in self.running.items():
            state[1] += 1
            token = next(state[0])
            if token == self.fail:
                raise RuntimeError("scripted failure")
            out.append((handle, token, mx.full((vocab,), -math.log(vocab))))
        return out

    def remove(self, handle) -> None:
        self.yielded.append(self.running.pop(handle)[1])

    def prompt_text(self, i: int = -1) -> str:
        return self.tokenizer.decode(self.prompts[i], skip_special_tokens=False)


FAIL = "\u2603"  # a scripted reply containing it fails the engine step that reaches it


def endless(text: str) -> tuple:
    """A scripted reply that repeats ``text`` until max_tokens or a cancellation."""
    return (text,)


@contextlib.contextmanager
def scripted(model, *replies, gate=None, delay: float = 0.0, **options):
    """A live server whose engine is a Script of ``replies``: yields (server, script)."""
    from flash_moe.server import make_state

    script = Script(model.tokenizer, replies, gate=gate, delay=delay)
    with LiveServer(make_state(model, engine=script, **options)) as server:
        yield server, script


@pytest.fixture(scope="module")
def model(demo_folder):
    """The demo model in float32, its tokenizer loaded: what every server test serves (import it by name)."""
    m = load(demo_folder, dtype="float32")
    m.tokenizer
    yield m
    m.close()

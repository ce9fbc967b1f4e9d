"""A live flash-moe server for tests: uvicorn in a thread, on 127.0.0.1 at a free port."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

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
    """Stands in for ``flash_moe.generate.generate_step`` (the worker's generation seam): each run writes the
    next scripted reply, token by token, ending it with <|im_end|>. ``endless`` replies repeat forever;
    ``gate`` (a threading.Event) holds every run before its first token until set."""

    def __init__(self, tokenizer, replies, *, gate=None):
        import math

        self.tokenizer, self.gate, self.math = tokenizer, gate, math
        self.replies = list(replies)
        self.prompts, self.closed, self.yielded = [], [], []

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        assert self.tokenizer.decode(ids, skip_special_tokens=False) == text
        return ids

    def __call__(self, prompt, model, *, max_tokens=256, **kwargs):
        import itertools

        import mlx.core as mx

        self.prompts.append(prompt.tolist())
        reply = self.replies.pop(0)
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        ids = itertools.cycle(self.encode(reply[0])) if isinstance(reply, tuple) else iter(self.encode(reply) + [end])
        vocab = model.config.vocab_size
        count = 0
        if self.gate is not None:
            self.gate.wait(30)
        try:
            for token in itertools.islice(ids, max_tokens):
                count += 1
                yield token, mx.full((vocab,), -self.math.log(vocab))
        finally:
            self.yielded.append(count)
            self.closed.append(True)

    def prompt_text(self, i: int = -1) -> str:
        return self.tokenizer.decode(self.prompts[i], skip_special_tokens=False)


def endless(text: str) -> tuple:
    """A scripted reply that repeats ``text`` until max_tokens or a cancellation."""
    return (text,)

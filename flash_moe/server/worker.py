"""The model worker: one thread owns MLX and runs every sequence; the HTTP side only queues jobs.

A job goes in through ``Worker.submit`` (a bounded queue: full means 429) and its tokens come back through
its ``Channel``, which hands plain Python values (never MLX arrays) to the asyncio loop of the HTTP side.
Jobs join the engine (continuous batching, batch.py) at the next step, up to ``max_batch`` of them: their
prompts are prefilled a chunk per step while the others decode together. A job whose client went away is
marked cancelled and leaves at its next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .. import generation as gen


class QueueFull(RuntimeError):
    """Every running slot is taken and the waiting queue is full."""


class GenerationError(RuntimeError):
    """The model failed while running a job (500)."""


class Channel:
    """Worker -> HTTP: items put from the worker thread come out of ``get`` on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue, self.cancelled = loop, asyncio.Queue(), False

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    async def get(self):
        return await self.queue.get()

    def cancel(self) -> None:
        """Called from the HTTP side when the client is gone; the worker drops the job at its next step."""
        self.cancelled = True


@dataclass
class Job:
    ids: list[int]
    channel: Channel
    max_tokens: int = 256
    sampling: dict = field(default_factory=dict)  # temperature, top_p, top_k, min_p, repetition_penalty, seed
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; 0: the chosen token's only
    checkpoint_at: tuple = ()  # prompt positions where its prompt cache takes a checkpoint (history end)
    cached_tokens: int = 0  # prompt tokens found in the prompt cache (set by the worker)


@dataclass
class Step:
    """One generated token, as the HTTP side sees it."""

    text: str  # new text (stop strings already cut)
    token: int
    finish_reason: str | None
    prompt_tokens: int
    generation_tokens: int
    cached_tokens: int = 0
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Done:
    """Sent after the last Step of a job (or instead of any, when the job failed: ``error``)."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


class Metrics:
    """Counters the worker and the HTTP side update and /metrics renders (plain Python, under a lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counters: dict[str, float] = {}
        self.gauges: dict[str, float] = {}
        self.recent: deque = deque()  # (time, tokens) of the last WINDOW seconds, for tok/s

    WINDOW = 10.0

    def add(self, name: str, value: float = 1, **labels) -> None:
        key = _key(name, labels)
        with self.lock:
            self.counters[key] = self.counters.get(key, 0) + value

    def set(self, name: str, value: float) -> None:
        with self.lock:
            self.gauges[name] = value

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.recent.append((now, n))
            while self.recent and self.recent[0][0] < now - self.WINDOW:
                self.recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            while self.recent and self.recent[0][0] < now - self.WINDOW:
                self.recent.popleft()
            if not self.recent:
                return 0.0
            span = max(now - self.recent[0][0], 1.0)
            return sum(n for _, n in self.recent) / span

    def get(self, name: str, **labels) -> float:
        with self.lock:
            return self.counters.get(_key(name, labels), self.gauges.get(name, 0))


def _key(name: str, labels: dict) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _logprobs(logprobs, token: int, k: int):
    import mlx.core as mx

    chosen = logprobs[token].item()
    if not k:
        return chosen, []
    top = mx.argpartition(-logprobs, kth=k - 1)[:k]
    values = logprobs[top].tolist()
    return chosen, sorted(zip(top.tolist(), values), key=lambda p: -p[1])


class Worker(threading.Thread):
    """Runs up to ``max_batch`` sequences, one token each per step; ``max_queue`` more may wait.

    ``engine`` (default: a ``Batch`` over the model) is the generation seam: ``add(ids, **sampling)`` -> a
    handle, ``step()`` -> [(handle, token, logprobs)], ``remove(handle)``, ``busy``; tests script it.
    """

    def __init__(self, model, *, max_batch: int = 8, max_queue: int = 64, metrics: Metrics | None = None,
                 prompt_cache_bytes: int = 0, engine=None):
        super().__init__(name="flash-moe-worker", daemon=True)
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        from ..batch import Batch

        self.model, self.max_batch = model, max_batch
        self.new_engine = (lambda: Batch(model)) if engine is None else (lambda: engine)
        self.lead = None  # an expert-parallel run: the other ranks mirror this engine (mirror.py)
        if engine is None and getattr(model, "parallel", None) is not None:
            from .mirror import Lead

            self.lead = Lead(model)
            self.new_engine = self.lead.new_batch
        self.engine = self.new_engine()
        self.pending: queue.Queue = queue.Queue(max(1, max_queue))
        self.metrics = metrics or Metrics()
        self.jobs: dict = {}  # engine handle -> (Job, TextStream)
        self.pool = None
        if prompt_cache_bytes > 0 and engine is None:
            from .cache_pool import PromptCachePool

            self.pool = PromptCachePool(model, prompt_cache_bytes)
            if self.lead is not None:
                self.pool = self.lead.mirror(self.pool)
        self.eos = gen.eos_token_ids(model, model.tokenizer)
        self._halt = threading.Event()
        self.on_fatal = lambda: None  # called from this thread when serving cannot go on (serve: stop uvicorn)

    def submit(self, job: Job) -> None:
        try:
            self.pending.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.max_batch} sequences running and {self.pending.maxsize} waiting") from None
        self.metrics.set("flash_moe_queue_depth", self.pending.qsize())

    def stop(self, timeout: float = 10.0) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout)
        if self.lead is not None and not self.is_alive():  # not while a step may still wait in a collective
            self.lead.close()

    def run(self) -> None:
        store = getattr(self.model, "store", None)
        while not self._halt.is_set():
            self._admit()
            for handle, (job, _) in list(self.jobs.items()):
                if job.channel.cancelled:  # the client went away: stop at this step
                    self._finish(handle)
                    self.metrics.add("flash_moe_requests_cancelled_total")
            if not self.jobs:
                continue
            before = store.stats.snapshot() if store is not None else None
            try:
                results = self.engine.step()
            except Exception as e:  # the model failed mid-step: its state is suspect, so every running job
                for handle, (job, _) in self.jobs.items():  # fails, nothing is kept, a fresh engine goes on
                    job.channel.put(Done(GenerationError(f"{type(e).__name__}: {e}")))
                    try:
                        self.engine.remove(handle)
                    except Exception:  # the engine is being replaced; what it still holds does not matter
                        pass
                self.jobs.clear()
                self.engine = self.new_engine()
                self.metrics.add("flash_moe_engine_failures_total")
                self.metrics.set("flash_moe_active_sequences", 0)
                if self.lead is not None and self.lead.error is not None:  # a rank died: the server ends
                    self.on_fatal()
                    break
                continue
            if before is not None:
                self._count_io(store.stats.snapshot().delta(before).totals())
            if results:
                self.metrics.add("flash_moe_decode_steps_total")
                self.metrics.set("flash_moe_decode_batch_size", len(results))
            for handle, token, logprobs in results:
                self._emit(handle, token, logprobs)
        for handle in list(self.jobs):
            self._finish(handle, Done(GenerationError("the server is shutting down")))

    def _admit(self) -> None:
        while len(self.jobs) < self.max_batch:
            try:
                job = self.pending.get(timeout=0.05) if not self.jobs else self.pending.get_nowait()
            except queue.Empty:
                break
            self.metrics.set("flash_moe_queue_depth", self.pending.qsize())
            if job.channel.cancelled:
                self.metrics.add("flash_moe_requests_cancelled_total")
                continue
            try:
                if self.pool is not None:
                    cache = self.pool.take(job.ids)
                    handle = self.engine.add(job.ids, prompt_cache=cache, checkpoint_at=job.checkpoint_at,
                                             **job.sampling)
                else:
                    handle = self.engine.add(job.ids, **job.sampling)
            except Exception as e:  # a bad job fails alone
                job.channel.put(Done(GenerationError(f"{type(e).__name__}: {e}")))
                continue
            job.cached_tokens = getattr(handle, "cached_tokens", 0)
            if job.cached_tokens:
                self.metrics.add("flash_moe_prompt_cache_hits_total")
                self.metrics.add("flash_moe_prompt_cache_tokens_total", job.cached_tokens)
            self.jobs[handle] = (job, gen.TextStream(self.model.tokenizer, self.eos, job.stop, job.max_tokens))
            self.metrics.add("flash_moe_prompt_tokens_total", len(job.ids))
        self.metrics.set("flash_moe_active_sequences", len(self.jobs))

    def _emit(self, handle, token: int, logprobs) -> None:
        job, text = self.jobs[handle]
        delta, finish = text.add(token)
        step = Step(text=delta, token=token, finish_reason=finish, prompt_tokens=len(job.ids),
                    generation_tokens=text.n, cached_tokens=job.cached_tokens)
        if job.top_logprobs is not None:
            step.logprob, step.top_logprobs = _logprobs(logprobs, token, job.top_logprobs)
        self.metrics.add("flash_moe_generated_tokens_total")
        self.metrics.tokens(1)
        job.channel.put(step)
        if finish:
            self._finish(handle, Done())

    def _finish(self, handle, done: Done | None = None) -> None:
        job, _ = self.jobs.pop(handle)
        cache = self.engine.remove(handle)
        if self.pool is not None and cache is not None:  # kept for the conversation's next request
            self.pool.put(cache)
            self.metrics.set("flash_moe_prompt_cache_bytes", self.pool.nbytes)
        if done is not None:
            job.channel.put(done)
        self.metrics.set("flash_moe_active_sequences", len(self.jobs))

    def _count_io(self, io: dict) -> None:
        for name in ("bytes", "experts", "hits", "misses"):
            if io.get(name):
                key = "flash_moe_expert_bytes_read_total" if name == "bytes" else f"flash_moe_expert_{name}_total"
                self.metrics.add(key, io[name])

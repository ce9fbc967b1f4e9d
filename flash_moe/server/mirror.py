"""``flash-moe serve`` in an expert-parallel run: rank 0's continuous batching, mirrored on every rank.

Rank 0 serves HTTP, tokenizes and samples; its worker runs a ``Batch`` as in one process. Every other rank
runs the same ``Batch`` calls in the same order (``follow_batches``), so each forward pass has the same
rows and every rank reaches the same ``all_sum`` of each MoE layer. Before each step rank 0 sends what
changed since the last one, in one ``all_sum`` of a fixed-size int32 buffer (the followers add zeros):

- the prompt-cache pool's ``take`` (the prompt's ids), each ``add`` (its ids, unless they are the take's
  just before, its checkpoint positions and the tokens its prompt cache let it skip, which the follower
  checks against its own), each ``remove`` and ``put``, and a reset after a failed step: the follower's pool
  sees the same calls and decides alike;
- the token each running sequence feeds next (rank 0 sampled it; the followers' own samples are ignored,
  so sampling parameters never travel, and logits that differ in the last bit cannot split the streams).

A long new prompt that does not fit in one buffer takes more buffers before the step (``_MORE``), about
one per ``CAPACITY`` ids. At the end rank 0 sends quit in the same buffer.
"""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np

from ..batch import Batch
from ..distributed import ParallelError, failure, share
from .cache_pool import PromptCachePool

SIZE = 1024  # int32 values per message: [word, payload length, payload...]
CAPACITY = SIZE - 2
_MORE, _STEP, _QUIT = 21, 22, 23  # message words (non-zero: a dead rank 0's ring may hand back zeros)
_TAKE, _ADD, _REMOVE, _PUT, _RESET, _TOKENS = 1, 2, 3, 4, 5, 6  # calls in the payload stream


class Lead:
    """Rank 0: the calls of its worker's engine and prompt-cache pool, queued for the next step's message."""

    def __init__(self, model):
        self.model, self.parallel = model, model.parallel
        self.calls: list[int] = []
        self.handles = itertools.count(1)
        self.batches = 0
        self.error: ParallelError | None = None  # the run broke (a rank died): the server must end
        self.taken = (None, None)  # the pool's last take: (cache, ids); an add of the same ids does not resend them

    def new_batch(self) -> "LeadBatch":
        """The worker's engine; a second one replaces a batch whose step failed: the followers reset too."""
        if self.batches:
            self.calls.append(_RESET)
        self.batches += 1
        return LeadBatch(self)

    def mirror(self, pool: PromptCachePool) -> "LeadPool":
        return LeadPool(pool, self)

    def send(self, running) -> None:
        """The queued calls and the running sequences' next tokens, then the step: every rank's forward follows."""
        stream = self.calls + [_TOKENS, len(running)] + [s.last_id for s in running]
        self.calls = []
        for start in range(0, max(len(stream), 1), CAPACITY):
            part = stream[start : start + CAPACITY]
            last = start + CAPACITY >= len(stream)
            _message(self.parallel, _STEP if last else _MORE, part)

    def close(self) -> None:
        """The server stopped: the followers return (every rank's model then closes without more collectives)."""
        p = self.parallel
        if p.closed:
            return
        p.busy(True)
        try:
            _message(p, _QUIT, [])
        finally:
            p.busy(False)
            p.ended()


class LeadBatch:
    """Rank 0's engine: a ``Batch`` whose calls reach the followers before each step."""

    def __init__(self, lead: Lead):
        self.lead, self.batch = lead, Batch(lead.model)
        self.numbers: dict = {}  # BatchSequence -> the number the followers know it by

    @property
    def busy(self) -> bool:
        return self.batch.busy

    def add(self, ids, *, prompt_cache=None, checkpoint_at=(), **sampling):
        seq = self.batch.add(ids, prompt_cache=prompt_cache, checkpoint_at=checkpoint_at, **sampling)
        n = self.numbers[seq] = next(self.lead.handles)
        marks = sorted({int(m) for m in checkpoint_at})
        cache, taken = self.lead.taken
        self.lead.taken = (None, None)
        sent = [-1] if prompt_cache is not None and prompt_cache is cache and taken == seq.ids else [len(seq.ids), *seq.ids]
        self.lead.calls += [_ADD, n, int(prompt_cache is not None), seq.cached_tokens, *sent, len(marks), *marks]
        return seq

    def remove(self, seq):
        self.lead.calls += [_REMOVE, self.numbers.pop(seq)]
        return self.batch.remove(seq)

    def step(self):
        p = self.lead.parallel
        if p.closed:
            raise ParallelError(f"rank {p.rank} of {p.size}: the expert-parallel run was closed")
        p.busy(True)
        try:
            self.lead.send(self.batch.running)
            return self.batch.step()
        except RuntimeError as e:
            err = failure(e, p)
            if isinstance(err, ParallelError):  # no step can pair up any more: nothing more is sent
                self.lead.error = err
                p.ended()
            raise err from None
        finally:
            p.busy(False)


class LeadPool:
    """Rank 0's prompt-cache pool: ``take`` and ``put`` also reach the followers' pools."""

    def __init__(self, pool: PromptCachePool, lead: Lead):
        self.pool, self.lead = pool, lead

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes

    def take(self, ids):
        ids = list(ids)
        self.lead.calls += [_TAKE, len(ids), *ids]
        cache = self.pool.take(ids)
        self.lead.taken = (cache, ids)
        return cache

    def put(self, cache) -> None:
        self.lead.calls.append(_PUT)  # the cache the last remove returned
        self.pool.put(cache)


def _message(p, word: int, payload) -> np.ndarray:
    buf = np.zeros(SIZE, np.int32)
    if word:
        buf[0], buf[1] = word, len(payload)
        buf[2 : 2 + len(payload)] = payload
    try:
        return share(buf, p, (_MORE, _STEP, _QUIT))
    except RuntimeError as e:
        raise failure(e, p) from None


class _Replay:
    """A follower's Batch and pool, driven by rank 0's calls."""

    def __init__(self, model, prompt_cache_bytes: int):
        self.model = model
        self.pool = PromptCachePool(model, prompt_cache_bytes) if prompt_cache_bytes > 0 else None
        self.batch = Batch(model)
        self.seqs: dict = {}
        self.taken = self.removed = self.taken_ids = None
        self.failed = False  # the last step raised here: rank 0's must have too, and a reset must follow

    def apply(self, stream: list[int]) -> None:
        p, it = self.model.parallel, iter(stream)
        take = lambda n: [next(it) for _ in range(n)]
        for call in it:
            if call == _TAKE:
                self.taken_ids = take(next(it))
                self.taken = self.pool.take(self.taken_ids)
            elif call == _ADD:
                n, uses_taken, cached = take(3)
                length = next(it)
                ids = self.taken_ids if length == -1 else take(length)  # -1: the ids of the take before it
                marks = take(next(it))
                cache, self.taken = (self.taken if uses_taken else None), None
                seq = self.seqs[n] = self.batch.add(ids, prompt_cache=cache, checkpoint_at=marks)
                if seq.cached_tokens != cached:
                    raise ParallelError(f"rank {p.rank} of {p.size}: its prompt-cache pool reuses {seq.cached_tokens} "
                                        f"tokens where rank 0's reuses {cached}")
            elif call == _REMOVE:
                seq = self.seqs.pop(next(it))
                try:
                    self.removed = self.batch.remove(seq)
                except Exception:
                    if not self.failed:  # after a failed step, rank 0 removes what it can, then resets
                        raise
            elif call == _PUT:
                self.pool.put(self.removed)
            elif call == _RESET:
                self.batch, self.seqs, self.failed = Batch(self.model), {}, False
            elif call == _TOKENS:
                tokens = take(next(it))
                if self.failed:
                    raise ParallelError(f"rank {p.rank} of {p.size}: a step failed here and not on rank 0")
                if len(tokens) != len(self.batch.running):
                    raise ParallelError(f"rank {p.rank} of {p.size}: {len(self.batch.running)} sequences running, "
                                        f"rank 0 runs {len(tokens)}")
                for s, t in zip(self.batch.running, tokens):
                    s.last, s.last_id = mx.array([t], mx.int32), t
            else:
                raise ParallelError(f"rank {p.rank} of {p.size}: unknown call {call} from rank 0")


def follow_batches(model, prompt_cache_bytes: int = 0) -> int:
    """A follower of ``flash-moe serve``: run rank 0's batch steps until it quits; returns the steps taken.
    ``prompt_cache_bytes`` must be rank 0's (the same flags on every rank)."""
    p = model.parallel
    replay, stream, steps = _Replay(model, prompt_cache_bytes), [], 0
    while True:
        message = _message(p, 0, [])
        if message[0] == _QUIT:
            p.ended()
            return steps
        stream += message[2 : 2 + int(message[1])].tolist()
        if message[0] == _MORE:
            continue
        replay.apply(stream)
        stream = []
        p.busy(True)
        try:
            replay.batch.step()
        except RuntimeError as e:
            err = failure(e, p)
            if err is not e or isinstance(e, ParallelError):
                raise err from None
            replay.failed = True  # e.g. non-finite logits: rank 0 raised the same and resets its batch
        except Exception:
            replay.failed = True
        finally:
            p.busy(False)
        steps += 1

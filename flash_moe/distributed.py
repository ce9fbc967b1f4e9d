"""Expert-parallel streaming over ``mx.distributed`` (processes started by ``mlx.launch``).

Every rank holds the resident weights and runs attention, GatedDeltaNet and routing itself, identically.
Each MoE layer's routed experts are split between the ranks (``assign_experts``): a rank reads and
computes only the (token, k) pairs whose expert it owns, and ``ExpertParallel`` adds the ranks' partial
sums with one ``all_sum`` per MoE layer. The shared expert is resident everywhere; every rank computes
it and adds it after the ``all_sum`` (the model's MoE block does that unchanged), so the hidden state is
the same on every rank and the model never learns it runs split.

Generation (``lockstep``): rank 0 owns the text. It sends the prompt's token ids to the others, samples,
and shares each token (an ``all_sum`` in which the others add zeros, evaluated with the token), then says
whether another forward pass follows. The other ranks run the same ``generate_step`` on what they receive
(``follow`` serves the command line), so every rank runs the same collectives in the same order.

Prompt caches: a prompt cache decides how many prompt tokens are processed, so every rank must decide alike.
Each follower runs a mirror of the prompt cache rank 0 uses (the cache its own caller passed, else one it
keeps per cache of rank 0's): ``PromptCache.prepare`` is deterministic, and the mirror sees the same ids,
checkpoint positions and forward passes. The ranks check before the prefill that they reuse the same number
of tokens: a mismatch is a ``ParallelError`` on every rank, never a hang.

Expert popularity (``record_usage``) lives in the converted folder as ``usage.json`` (docs/format.md);
with it, ``assign_experts`` balances the expected reads per token between the ranks.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .files import CheckpointError, atomic_write_json, read_json

USAGE_FILE = "usage.json"
USAGE_FORMAT = "flash_moe-usage"
USAGE_VERSION = 1

# Token ids and protocol words travel as int32 all_sums; followers add zeros.
# Every word is non-zero: MLX's ring may hand back zeros instead of failing when rank 0 is gone.
_GENERATE, _QUIT = 1, 2  # request kinds
_GO, _STOP = 1, 2  # after a token: another forward pass, or the end of the generation
# kind, prompt length, prefill step size, max tokens, prompt cache (0: none, else rank 0's tag for it), its
# max_checkpoints, the prompt tokens it supplies, how many checkpoint_at positions follow the prompt
_HEADER = 8
_MIRRORS = 4  # prompt caches a follower keeps in step with rank 0's (the most recently used)
_BACKEND_ERROR = re.compile(r"\[(ring|jaccl|mpi|nccl)\]")
# MLX's ring backend does not always fail a collective whose peer died: an evaluation waiting on it can hang
# (seen on 0.32.4), holding the GIL. A watchdog process ends a rank that made no progress inside a generation
# for this long.
TIMEOUT_ENV, DEFAULT_TIMEOUT = "FLASH_MOE_PARALLEL_TIMEOUT", 120.0
_WATCHDOG = """
import os, select, signal, sys, time
fd, pid, timeout, message = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
busy = False
while True:
    ready = select.select([fd], [], [], timeout if busy else None)[0]
    if not ready:
        os.write(2, message.encode())
        os.kill(pid, signal.SIGKILL)  # not SIGTERM: a server catches it to shut down gracefully, waiting on us
        sys.exit(0)
    data = os.read(fd, 4096)
    if not data:
        sys.exit(0)
    busy = data[-1:] == b"b"
"""

class ParallelError(RuntimeError):
    """A collective failed: another rank died, was killed or lost its connection (or the ranks diverged)."""


# ---- expert assignment ----------------------------------------------------------------------------


def assign_experts(moe_layers, num_experts: int, size: int, usage: dict | None = None) -> dict[int, np.ndarray]:
    """The rank that owns each expert, per MoE layer: ``{layer: int array [num_experts]}``.

    Without ``usage``: round robin, rotated by one rank per layer (uneven counts do not always land on the
    same ranks). With ``usage`` (``{layer: counts [num_experts]}``, see ``read_usage``): greedy, most
    popular expert first, each to the rank with the least expected traffic so far (ties: fewest experts).
    Per token a rank waits for its slowest peer, so equal traffic, not equal counts, is what pays.
    """
    if size < 1:
        raise ValueError(f"need at least one rank, got {size}")
    owners = {}
    for i, layer in enumerate(moe_layers):
        if usage is None:
            owners[layer] = (np.arange(num_experts) + i) % size
            continue
        counts = np.asarray(usage[layer], np.float64)
        owner = np.empty(num_experts, np.int64)
        load, held = np.zeros(size), np.zeros(size, np.int64)
        for e in np.argsort(-counts, kind="stable"):
            r = min(range(size), key=lambda r: (load[r], held[r], r))
            owner[e], load[r], held[r] = r, load[r] + counts[e], held[r] + 1
        owners[layer] = owner
    return owners


def read_usage(folder: str | Path, moe_layers, num_experts: int) -> dict | None:
    """``folder/usage.json`` as ``{layer: int64 counts [num_experts]}``, or None when there is none.
    A file that does not describe this model's layers and experts is an error naming it."""
    path = Path(folder) / USAGE_FILE
    try:
        data = read_json(path)
    except FileNotFoundError:
        return None
    bad = lambda why: CheckpointError(f"{path}: {why}; rerun flash_moe.distributed.record_usage or delete the file")
    if not isinstance(data, dict) or data.get("format") != USAGE_FORMAT:
        raise bad(f"not a usage file (format is not {USAGE_FORMAT!r})")
    if data.get("version") != USAGE_VERSION:
        raise bad(f"version {data.get('version')!r}, this flash_moe reads version {USAGE_VERSION}")
    layers = data.get("layers")
    if not isinstance(layers, dict):
        raise bad("no 'layers' object")
    out = {}
    for layer in moe_layers:
        counts = layers.get(str(layer))
        if not (isinstance(counts, list) and len(counts) == num_experts
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)):
            raise bad(f"layer {layer} needs {num_experts} non-negative integer counts")
        out[layer] = np.array(counts, np.int64)
    extra = sorted(set(layers) - {str(layer) for layer in moe_layers})
    if extra:
        raise bad(f"layers {', '.join(extra)} are not MoE layers of this model")
    return out


class _Counter:
    """Stands in for a layer's experts provider during ``record_usage``: counts the routed ids, then calls it."""

    def __init__(self, inner, counts: np.ndarray):
        self.inner, self.counts = inner, counts

    def __call__(self, x, inds, scores):
        self.counts += np.bincount(np.array(inds).ravel(), minlength=len(self.counts))
        return self.inner(x, inds, scores)


def record_usage(model, text, *, path: str | Path | None = None, prefill_step_size: int = 512) -> Path:
    """Run ``text`` (a string, encoded without special tokens, or token ids) through ``model`` and write how
    often each expert was routed to into ``usage.json`` (the model's converted folder unless ``path``).

    Counts are routing choices, one per (token, k) pair, at the model's current experts per token. In an
    expert-parallel run every rank routes the same way; rank 0 writes. Returns the file's path.
    """
    ids = model.tokenizer.encode(text, add_special_tokens=False) if isinstance(text, str) else list(text)
    if not ids:
        raise ValueError("record_usage: the calibration text is empty")
    args = model.config
    moe = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    counts = {i: np.zeros(args.num_experts, np.int64) for i in moe}
    for i in moe:  # a plain attribute shadows the module's child entry; deleting it restores the module
        mlp = model.model.layers[i].mlp
        object.__setattr__(mlp, "experts", _Counter(mlp.experts, counts[i]))
    try:
        cache = model.make_cache()
        tokens = mx.array(ids, mx.int32)
        for start in range(0, len(ids), prefill_step_size):
            logits = model(tokens[start : start + prefill_step_size][None], cache)
            mx.eval(logits, [c.state for c in cache])  # the logits too: every rank evaluates the same collectives
    finally:
        for i in moe:
            object.__delattr__(model.model.layers[i].mlp, "experts")
    out = Path(path) if path is not None else Path(model.path) / USAGE_FILE
    parallel = getattr(model, "parallel", None)
    if parallel is None or parallel.rank == 0:
        atomic_write_json(out, {
            "format": USAGE_FORMAT, "version": USAGE_VERSION, "tokens": len(ids),
            "experts_per_token": args.num_experts_per_tok,
            "layers": {str(i): c.tolist() for i, c in counts.items()},
        })
    return out


# ---- the split model ------------------------------------------------------------------------------


def resolve_group(group="auto"):
    """The group to split experts over, or None for one process: "auto" takes ``mx.distributed.init()``
    (a group of size > 1 only when ``mlx.launch`` or an MPI/NCCL launcher started this process)."""
    if group is None or group is False:
        return None
    if isinstance(group, str):
        if group != "auto":
            raise ValueError(f"group must be 'auto', None or an mx.distributed.Group, got {group!r}")
        group = mx.distributed.init()
    return group if group.size() > 1 else None


def launched_rank() -> int:
    """This process's rank in the group ``mlx.launch`` started (0 when it runs alone): every rank runs the
    same command, and the others stay quiet."""
    group = resolve_group("auto")
    return group.rank() if group is not None else 0


@dataclass
class Parallel:
    """One rank's view of an expert-parallel run: its group and who owns which expert of each MoE layer."""

    group: object
    owners: dict  # layer -> int array [num_experts]: the owning rank
    balanced_by: str | None = None  # the usage file the assignment was balanced by, None: round robin
    usage: dict | None = None
    timeout: float = DEFAULT_TIMEOUT  # seconds without progress inside a generation before the watchdog ends us
    _request: np.ndarray | None = None  # a generation request already received by ``follow``
    _closed: bool = False
    _busy: bool = False  # inside a generation that has not ended cleanly: the collectives may be mid-way
    _watchdog: int | None = None  # the pipe to the watchdog process
    # rank 0: its prompt caches' tags; followers: {tag: mirror PromptCache}, most recently used last
    _tags: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    _mirrors: dict = field(default_factory=dict)
    _last_tag: int = 0
    _seed: object = None  # a follower's prompt cache for the first new tag (``follow(prompt_cache=)``)

    def __post_init__(self):
        if self.timeout > 0:
            self._start_watchdog()

    def _start_watchdog(self) -> None:
        """A small process that ends this one when it stays busy without progress for ``timeout`` seconds: the
        stuck thread waits inside MLX, holding the GIL, where no thread or signal handler of ours would run."""
        import subprocess

        message = (f"flash-moe: rank {self.rank} of {self.size}: no progress in an expert-parallel generation for "
                   f"{self.timeout:g} s ({TIMEOUT_ENV}): another rank stopped (it crashed, was killed or lost its "
                   "connection); ending this rank\n")
        read, write = os.pipe()
        try:
            subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, str(read), str(os.getpid()),
                              str(self.timeout), message], pass_fds=(read,), stdin=subprocess.DEVNULL)
        finally:
            os.close(read)
        os.set_blocking(write, False)
        self._watchdog = write

    def _tell(self, word: bytes) -> None:
        if self._watchdog is not None:
            try:
                os.write(self._watchdog, word)
            except BlockingIOError:  # the pipe is full of beats the watchdog has yet to read: it knows
                pass

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:  # the watchdog process sees the pipe close and ends
            os.close(self._watchdog)
            self._watchdog = None

    def busy(self, flag: bool) -> None:
        """Entering (True) or cleanly leaving (False) collectives that all ranks must reach."""
        self._busy = flag
        self._tell(b"b" if flag else b"i")

    def beat(self) -> None:
        """Progress: a MoE layer or a token went by."""
        if self._busy:
            self._tell(b"b")

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def size(self) -> int:
        return self.group.size()

    def owned(self, layer: int) -> np.ndarray:
        """Bool mask [num_experts] of the experts of ``layer`` this rank reads and computes."""
        return self.owners[layer] == self.rank

    def summary(self) -> str:
        per_layer = [int(self.owned(layer).sum()) for layer in self.owners] or [0]
        num_experts = len(next(iter(self.owners.values()))) if self.owners else 0
        low, high = min(per_layer), max(per_layer)
        held = f"{low}" if low == high else f"{low}-{high}"
        how = "round robin"
        if self.usage is not None:
            mine = sum(int(self.usage[l][self.owned(l)].sum()) for l in self.owners)
            total = sum(int(self.usage[l].sum()) for l in self.owners)
            how = f"balanced by {self.balanced_by}: {100 * mine / max(total, 1):.1f}% of its recorded activations"
        return (f"expert-parallel rank {self.rank} of {self.size}: owns {held} of {num_experts} experts in each "
                f"of {len(self.owners)} MoE layers ({how})")

    def ended(self) -> None:
        """The run was ended by a protocol of its own (a follower heard quit, or rank 0 sent it): nothing more
        to send at ``close``, nothing more to watch."""
        self._closed = True
        self._stop_watchdog()

    def close(self) -> None:
        """End the run on every rank together: rank 0 says so, the others hear it (``follow`` hears it
        itself). Every rank closes its model, as every rank takes part in each generation."""
        if self._closed:
            return
        self._closed = True
        # After a failure mid-generation the other ranks may wait in another collective: send nothing, and
        # let this process's exit end their run (a ParallelError on each).
        if self._busy:
            return
        self.busy(True)
        try:
            word = share(np.array([_QUIT] + [0] * (_HEADER - 1), np.int32), self, (_GENERATE, _QUIT))
        except RuntimeError as e:
            raise failure(e, self) from None
        self.busy(False)
        self._stop_watchdog()
        if word[0] != _QUIT:
            raise ParallelError(f"rank {self.rank} of {self.size}: closed while rank 0 started a generation")

    def lockstep(self, steps, prompt, model, **kwargs):
        """``steps`` (``generate_step``'s loop) run by every rank together: see ``lockstep``."""
        return lockstep(steps, prompt, model, **kwargs)

    def tag(self, cache) -> int:
        """Rank 0: the number that names ``cache`` (a PromptCache) to the followers; 0 for None."""
        if cache is None:
            return 0
        if cache not in self._tags:
            self._last_tag += 1
            self._tags[cache] = self._last_tag
        return self._tags[cache]

    def mirror(self, tag: int, max_checkpoints: int, model, own=None):
        """A follower: its copy of rank 0's prompt cache ``tag`` (None for 0). ``own``: the prompt cache this
        rank's caller passed (a script every rank runs keeps its own caches), else the one kept for the tag,
        else a new empty one."""
        from .prompt_cache import make_prompt_cache

        if tag == 0:
            return None
        cache = self._mirrors.pop(tag, None) if own is None else own
        if cache is None:
            cache, self._seed = self._seed, None
            if cache is None:
                cache = make_prompt_cache(model, max_checkpoints=max_checkpoints)
        self._mirrors[tag] = cache
        while len(self._mirrors) > _MIRRORS:
            del self._mirrors[next(iter(self._mirrors))]
        return cache


def plan(group, folder: Path, layout, *, out=sys.stderr) -> Parallel | None:
    """The expert assignment for this run (balanced by ``folder/usage.json`` when present), printed to ``out``."""
    group = resolve_group(group)
    if group is None:
        return None
    usage = read_usage(folder, layout.moe_layers, layout.num_experts)
    owners = assign_experts(layout.moe_layers, layout.num_experts, group.size(), usage)
    timeout = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        timeout = float(timeout) if timeout else DEFAULT_TIMEOUT
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={timeout!r}: not a number of seconds (0 turns the watchdog off)") from None
    parallel = Parallel(group, owners, str(Path(folder) / USAGE_FILE) if usage else None, usage, timeout)
    if out is not None:
        print(f"flash_moe: {parallel.summary()}", file=out, flush=True)
    return parallel


class ExpertParallel(nn.Module):
    """The experts provider of an expert-parallel MoE layer: this rank's partial sum (``local`` computes only
    the pairs whose expert this rank owns, zeros for the rest), added over all ranks by one ``all_sum``."""

    def __init__(self, local: nn.Module, parallel: Parallel):
        super().__init__()
        self.local = local
        self._parallel = parallel

    def __call__(self, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
        y = self.local(x, inds, scores)  # syncs on the routing, which waited for the previous layer's all_sum
        self._parallel.beat()
        return mx.distributed.all_sum(y, group=self._parallel.group)


def _lost(parallel: Parallel, what: str) -> ParallelError:
    return ParallelError(f"rank {parallel.rank} of {parallel.size}: {what} (another rank stopped: it crashed, "
                         "was killed or lost its connection)")


def share(values: np.ndarray, parallel: Parallel, valid=None) -> np.ndarray:
    """Rank 0's int32 ``values`` on every rank (the others pass zeros of the same shape). Rank 0 checks it got
    back what it sent, the others that ``values[0]`` is one of ``valid``: a collective whose peer died may
    return garbage instead of failing."""
    mine = values if parallel.rank == 0 else np.zeros_like(values)
    out = np.array(mx.distributed.all_sum(mx.array(mine, mx.int32), group=parallel.group))
    if parallel.rank == 0 and not np.array_equal(out, values):
        raise _lost(parallel, "a collective came back altered")
    if valid is not None and out[0] not in valid:
        raise _lost(parallel, f"rank 0 sent {out[0]} where a protocol word was due")
    return out


def failure(e: BaseException, parallel: Parallel) -> BaseException:
    """A backend's error (``[ring] connection to a peer was lost``, ...) as a ``ParallelError`` naming this rank."""
    if isinstance(e, RuntimeError) and not isinstance(e, ParallelError) and _BACKEND_ERROR.search(str(e)):
        return _lost(parallel, str(e))
    return e


class _HeldInterrupt:
    """Rank 0, main thread: a Ctrl-C (SIGINT) inside the block is held until it ends (``held``), so a forward
    pass is never cut between two collectives the followers wait in."""

    def __init__(self, active: bool):
        self.active = (active and threading.current_thread() is threading.main_thread()
                       and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        self.held = False

    def _hold(self, *_):
        self.held = True

    def __enter__(self):
        if self.active:
            signal.signal(signal.SIGINT, self._hold)

    def __exit__(self, *_):
        if self.active:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def lockstep(steps, prompt, model, *, max_tokens: int, sampler, prefill_step_size: int, prompt_cache=None,
             checkpoint_at=(), **kwargs):
    """``steps(prompt, model, ...)`` (the generation loop) run by every rank together; a generator.

    Rank 0 shares its prompt ids, prefill step, token budget and prompt-cache use first (the other ranks' own
    are ignored; each follower runs its mirror of rank 0's prompt cache, and all ranks check they reuse the
    same prefix), then each token it samples (an ``all_sum`` where the others add zeros, evaluated with the
    token). The loop runs a forward pass when asked for its next token, so before asking, rank 0 tells the
    others whether it asks (``go``): a stop there is where the consumer of rank 0's tokens stopped. A Ctrl-C
    on rank 0 (main thread) is held until the step under way has yielded its token (every rank's consumer
    then saw the same tokens); the others hear stop, and rank 0 raises ``KeyboardInterrupt``. Backend
    failures leave as ``ParallelError``s naming this rank.
    """
    p = model.parallel
    lead = p.rank == 0
    if p._closed:
        raise ParallelError(f"rank {p.rank} of {p.size}: the expert-parallel run was closed")
    p.busy(True)
    interrupt = _HeldInterrupt(lead)
    try:
        with interrupt:
            if lead:
                ids = np.array(prompt, np.int32).reshape(-1)
                marks = np.array(sorted({int(m) for m in checkpoint_at}), np.int32)
                reused = prompt_cache.reusable(ids) if prompt_cache is not None else 0
                share(np.array([_GENERATE, ids.size, prefill_step_size, min(max_tokens, 2**31 - 1),
                                 p.tag(prompt_cache), prompt_cache.max_checkpoints if prompt_cache else 0,
                                 reused, marks.size], np.int32), p, (_GENERATE,))
                share(np.concatenate([ids, marks]), p)
                mismatch = 0
            else:
                header, p._request = p._request, None
                if header is None:
                    header = share(np.zeros(_HEADER, np.int32), p, (_GENERATE, _QUIT))
                if header[0] != _GENERATE:
                    raise ParallelError(f"rank {p.rank} of {p.size}: asked to generate, but rank 0 has finished")
                n = int(header[1])
                values = share(np.zeros(n + int(header[7]), np.int32), p)
                prompt, checkpoint_at = mx.array(values[:n]), tuple(int(m) for m in values[n:])
                prefill_step_size, max_tokens = int(header[2]), int(header[3])
                prompt_cache = p.mirror(int(header[4]), int(header[5]), model, own=prompt_cache)
                reused = prompt_cache.reusable(values[:n]) if prompt_cache is not None else 0
                mismatch = int(reused != int(header[6]))
            # Every rank must process the same prompt tokens, or their collectives stop pairing.
            if int(mx.distributed.all_sum(mx.array([mismatch], mx.int32), group=p.group).item()):
                p.busy(False)
                raise ParallelError(
                    f"rank {p.rank} of {p.size}: a follower's prompt cache holds other tokens than rank 0's: in an "
                    "expert-parallel run, use prompt caches only through generation (every rank keeps a mirror), "
                    "not filled or loaded on rank 0 alone")
    except RuntimeError as e:
        raise failure(e, p) from None

    def shared(logprobs, key):
        token = sampler(logprobs, key).astype(mx.int32)
        return mx.distributed.all_sum(token if lead else mx.zeros_like(token), group=p.group)

    inner = steps(prompt, model, max_tokens=max_tokens, sampler=shared, prefill_step_size=prefill_step_size,
                  prompt_cache=prompt_cache, checkpoint_at=checkpoint_at, **kwargs)
    pending = False  # a token went out and the go word after it has not
    try:
        while True:
            with interrupt:
                if pending:
                    pending = False
                    if share(np.array([_GO], np.int32), p, (_GO, _STOP))[0] == _STOP:
                        break
                try:
                    item = next(inner)
                    p.beat()
                except StopIteration:  # the token budget: every rank's loop ends at the same count
                    break
                pending = True
            try:
                yield item
            except GeneratorExit:  # the consumer stopped at this token
                break
            if interrupt.held:  # Ctrl-C on rank 0 during this step: its token went out as on the others
                break
        with interrupt:
            if pending:  # rank 0 says stop, a follower must hear stop
                if share(np.array([_STOP], np.int32), p, (_GO, _STOP))[0] == _GO:
                    raise ParallelError(f"rank {p.rank} of {p.size} stopped generating while rank 0 went on: "
                                        "every rank must take the whole generation")
        p.busy(False)
    except RuntimeError as e:
        raise failure(e, p) from None
    finally:
        inner.close()
    if interrupt.held:
        raise KeyboardInterrupt


def finish(model) -> None:
    """Rank 0 of a split run (the command line): tell the followers that no more generations come."""
    parallel = getattr(model, "parallel", None)
    if parallel is not None:
        parallel.close()


def following(model) -> bool:
    """Whether ``model`` is an expert-parallel rank other than 0 (it computes; rank 0 has the text)."""
    parallel = getattr(model, "parallel", None)
    return parallel is not None and parallel.rank != 0


def follow(model, timer=None, prompt_cache=None) -> int:
    """A follower's command line: generate whatever rank 0 asks, silently, until rank 0 closes.
    ``prompt_cache``: the follower's copy of the first prompt cache rank 0 uses (``generate --prompt-cache``:
    every rank loads the same file). Returns how many generations it took part in."""
    from .generation import generate_step

    p = model.parallel
    p._seed = prompt_cache
    done = 0
    while True:
        try:
            header = share(np.zeros(_HEADER, np.int32), p, (_GENERATE, _QUIT))
        except RuntimeError as e:
            raise failure(e, p) from None
        if header[0] == _QUIT:
            p.ended()
            return done
        p._request = header
        for _ in generate_step(mx.array([0], mx.int32), model, timer=timer):
            pass
        done += 1

"""ExpertStore: reads the routed experts a layer needs from the packed layer files into slot buffers.

The store reads bytes; it does not dequantize or compute, and it does not cache: it trusts the OS page
cache (flash-moe measured every user-space cache as a loss on unified memory), or, with ``direct=True``,
reads around it for a machine whose cache tier is elsewhere (a discrete GPU's ExpertCache). One
``fetch(layer, ids)`` reads each expert with positioned scatter reads (``os.preadv``) straight into
preallocated slot arrays, the experts in parallel on a persistent thread pool (preadv releases the GIL).

Slot buffers are a swappable piece (``slots.SlotBuffers``): ``num_sets`` sets used round robin, so the caller
can compute on one set while the next fills. A set is overwritten ``num_sets`` fetches later; mark the
arrays computed from it with ``SlotSet.consumed_by`` and the store evaluates them before reusing it.
"""

from __future__ import annotations

import errno
import hashlib
import operator
import os
import threading
import time
import weakref
from dataclasses import dataclass, fields
from pathlib import Path
from queue import SimpleQueue

import mlx.core as mx
import numpy as np

from .files import CheckpointError
from .layer_files import (VERIFY_MODES, ExpertReadError, LayerFiles, direct_aligned, direct_supported, experts_to_check, ranges,
                          verify_files)
from .layout import DIRECT_ALIGN, ModelLayout
from .slots import HostSlotBuffers, SlotSet

# Without RWF_NOWAIT (macOS, or a filesystem that refuses it) a read counts as a page-cache hit when one
# expert arrived faster than this. flash-moe's M3 Max: ~7.3 GB/s per read warm, ~2.5 GB/s cold (4 threads).
HIT_BYTES_PER_S = 4e9

_COUNTERS = ("fetches", "experts", "bytes", "seconds", "hits", "misses", "missed_bytes")


@dataclass
class IOStats:
    """Cumulative per-layer read counters (index = decoder-layer number) and an expert usage matrix."""

    fetches: np.ndarray  # [layers] int64
    experts: np.ndarray  # [layers] int64
    bytes: np.ndarray  # [layers] int64
    seconds: np.ndarray  # [layers] float64, wall time of the fetches
    hits: np.ndarray  # [layers] int64, experts found in the page cache (probe or timing estimate)
    misses: np.ndarray  # [layers] int64
    missed_bytes: np.ndarray  # [layers] int64, bytes of the chunks not found cached (a partly cached expert's rest)
    usage: np.ndarray  # [layers, experts] int64, how often each expert was fetched

    @classmethod
    def zeros(cls, num_layers: int, num_experts: int) -> "IOStats":
        per_layer = {n: np.zeros(num_layers, np.float64 if n == "seconds" else np.int64) for n in _COUNTERS}
        return cls(**per_layer, usage=np.zeros((num_layers, num_experts), np.int64))

    def snapshot(self) -> "IOStats":
        return IOStats(**{f.name: getattr(self, f.name).copy() for f in fields(self)})

    def reset(self) -> None:
        for f in fields(self):
            getattr(self, f.name)[...] = 0

    def delta(self, since: "IOStats") -> "IOStats":
        """What happened after ``since`` (an earlier snapshot), e.g. during one token."""
        return IOStats(**{f.name: getattr(self, f.name) - getattr(since, f.name) for f in fields(self)})

    def totals(self) -> dict:
        out = {n: getattr(self, n).sum().item() for n in _COUNTERS}
        probed = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / probed if probed else float("nan")
        out["gb_per_s"] = out["bytes"] / out["seconds"] / 1e9 if out["seconds"] else float("nan")
        return out


class _ReadPool:
    """Persistent reader threads; each task posts exactly one result (value or exception) to its queue."""

    def __init__(self, threads: int):
        self._tasks: SimpleQueue = SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"flash-moe-read-{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            fn, args, done = task
            try:
                done.put(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the fetching thread
                done.put(e)

    def submit(self, fn, args, done: SimpleQueue) -> None:
        self._tasks.put((fn, args, done))

    def shutdown(self) -> None:
        for _ in self._threads:
            self._tasks.put(None)
        for t in self._threads:
            t.join()


def _shutdown(pool: _ReadPool, files: list[LayerFiles], buffers, pending: list[list]) -> None:
    pool.shutdown()
    for f in files:
        f.close()
    # A buffer kind may free memory that pending computation still reads (pinned CUDA memory does).
    for arrays in pending:
        if arrays:
            mx.eval(*arrays)
            arrays.clear()
    buffers.close()


def _chunks(iov: list[memoryview], size: int) -> list[tuple[int, list[memoryview], int]]:
    """Cut one expert's buffer list into reads of about ``size`` bytes: (offset in expert, buffers, bytes)."""
    chunks, cur, cur_bytes, start = [], [], 0, 0
    for buf in iov:
        while len(buf):
            take = min(len(buf), size - cur_bytes)
            cur.append(buf[:take])
            buf, cur_bytes = buf[take:], cur_bytes + take
            if cur_bytes == size:
                chunks.append((start, cur, cur_bytes))
                start, cur, cur_bytes = start + cur_bytes, [], 0
    if cur:
        chunks.append((start, cur, cur_bytes))
    return chunks


def _probe_mode(probe_cache: bool) -> str | None:
    if not probe_cache:
        return None
    return "nowait" if hasattr(os, "RWF_NOWAIT") else "timing"


class ExpertStore:
    """Reads routed experts from a converted model folder into reusable slot buffers.

    Args:
        folder: the converted model folder (``layout.json``, ``experts/layer_NNN.bin``).
        layout: the ``ModelLayout``; read from ``folder/layout.json`` when None.
        capacity: the most experts one fetch may read (slots per set).
        num_sets: slot sets, used round robin by successive fetches.
        threads: reader threads (the fetching thread reads one expert itself).
        buffers: a ``SlotBuffers`` class or factory, called as ``buffers(expert_layout, capacity, num_sets)``;
            ``HostSlotBuffers`` when None.
        probe_cache: count page-cache hits and misses (``RWF_NOWAIT`` probe on Linux, read time elsewhere).
        direct: read around the page cache (``O_DIRECT`` on Linux, ``F_NOCACHE`` on macOS), straight into the
            slot buffers. For a machine whose own cache tier sits in front (a discrete GPU's ExpertCache):
            no page-cache copy, no reclaim under a memory cap, and no page-cache hits either (every read
            counts as a miss). Needs 4 KiB-aligned tensors and buffers (real checkpoints' sizes; pinned CUDA
            slots); says which tensor is not.
        verify: check experts against layout.json's checksums the first time they are read: "off" (default),
            "sample" (a fixed 1 in ``SAMPLE_EVERY`` of each layer's experts) or "full" (every expert). A
            mismatch raises ``CheckpointError`` naming the file, layer and expert. The hash runs over the slot
            buffers the read filled (no second read), on the reader threads, once per expert per store.
        readahead: let the kernel read ahead of buffered reads (Linux). Off by default (``POSIX_FADV_RANDOM``):
            experts are read at random, and a chunk that follows a cached one looks sequential to the kernel,
            which then reads up to ``read_ahead_kb`` past the expert: disk time and page cache (reclaim under
            a memory cap) spent on bytes nobody asked for. Measured in ``benchmarks/page_cache_cap.py``.
    """

    def __init__(
        self,
        folder: str | Path,
        layout: ModelLayout | None = None,
        *,
        capacity: int,
        num_sets: int = 2,
        threads: int = 8,
        read_chunk: int = 2 << 20,
        buffers=None,
        probe_cache: bool = True,
        direct: bool = False,
        verify: str = "off",
        readahead: bool = False,
    ):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        if capacity < 1 or num_sets < 1 or threads < 1:
            raise ValueError(f"capacity, num_sets and threads must be >= 1, got {capacity}, {num_sets}, {threads}")
        if not hasattr(os, "preadv"):
            raise RuntimeError("os.preadv is unavailable here (needs Linux, or macOS 11+ with Python 3.10+)")
        self.folder = Path(folder)
        self.layout = ModelLayout.read(self.folder) if layout is None else layout
        self.capacity, self.num_sets = capacity, num_sets
        expert = self.layout.expert
        self._stride, self._expert_bytes = expert.stride, expert.expert_bytes
        if read_chunk < 4096:
            raise ValueError(f"read_chunk must be >= 4096 bytes, got {read_chunk}")
        if direct and not direct_supported():
            raise ValueError("direct reads need O_DIRECT (Linux) or F_NOCACHE (macOS); this platform has neither")
        if direct and read_chunk % DIRECT_ALIGN:
            raise ValueError(f"direct reads: read_chunk {read_chunk:,} is not a multiple of {DIRECT_ALIGN} bytes")
        self._read_chunk, self.direct = read_chunk, direct
        self._probe = ("direct" if probe_cache else None) if direct else _probe_mode(probe_cache)
        self._files = LayerFiles(self.folder, self.layout)
        # One scratch area takes the alignment padding between tensors; its content is never used.
        self._scratch = memoryview(bytearray(64))
        try:
            self.buffers = (buffers or HostSlotBuffers)(expert, capacity, num_sets)
            self._iovecs = [self._plan(self.buffers.host_views(s)) for s in range(num_sets)]
            # verify() and checksums keep the plain descriptors; fetches read through these.
            no_readahead = not (direct or readahead) and hasattr(os, "POSIX_FADV_RANDOM")
            self._read_files = (LayerFiles(self.folder, self.layout, direct=direct, readahead=readahead)
                                if direct or no_readahead else self._files)
        except BaseException:
            self._files.close()
            raise
        self._pending: list[list] = [[] for _ in range(num_sets)]
        self._next_set = 0
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()  # fetches and a prefetcher's read_into both record
        self._pool = _ReadPool(threads)
        self.stats = IOStats.zeros(max(self.layout.moe_layers, default=-1) + 1, self.layout.num_experts)
        self.verify_mode = verify
        self._unchecked = experts_to_check(self.layout, verify)  # [layers, experts]: still to hash on first read
        self._gaps = []  # (zero bytes before the tensor, tensor name) in file order: what the checksum covers
        pos = 0
        for t in expert.tensors:
            self._gaps.append((bytes(t.offset - pos), t.name))
            pos = t.offset + t.nbytes
        files = [self._files] + ([self._read_files] if self._read_files is not self._files else [])
        self._finalizer = weakref.finalize(self, _shutdown, self._pool, files, self.buffers, self._pending)

    def _plan(self, views: dict[str, np.ndarray]) -> list[list]:
        """Per slot, the expert's bytes in file order as read chunks [(offset in expert, buffers, bytes)]."""
        return [self._slot_plan(views, slot, self.capacity) for slot in range(self.capacity)]

    def _slot_plan(self, views: dict[str, np.ndarray], slot: int, capacity: int) -> list:
        """Read chunks of one slot of ``views`` (per tensor, shape (capacity, *shape))."""
        iov, pos = [], 0
        for t in self.layout.expert.tensors:
            if t.offset > pos:
                iov.append(self._scratch[: t.offset - pos])
            view = views[t.name]
            if view.shape != (capacity, *t.shape) or view.nbytes != capacity * t.nbytes:
                raise ValueError(f"slot buffer {t.name}: host view {view.shape} {view.dtype} does not match {t}")
            if self.direct and not (direct_aligned(t) and view.ctypes.data % DIRECT_ALIGN == 0):
                raise ValueError(
                    f"direct reads need {DIRECT_ALIGN}-byte alignment: tensor {t.name} sits at byte "
                    f"{t.offset:,} of each expert with {t.nbytes:,} bytes, its slot buffer at address "
                    f"{view.ctypes.data:#x}; read through the page cache (direct_io=False) instead"
                )
            iov.append(memoryview(view[slot]).cast("B"))
            pos = t.offset + t.nbytes
        return _chunks(iov, self._read_chunk)

    @property
    def probe(self) -> str | None:
        """How hits are estimated: "nowait" (RWF_NOWAIT probe), "timing" (read speed), "direct" (none: the
        page cache is bypassed), or None (off)."""
        return self._probe

    def resident_bytes(self) -> int:
        """Bytes of all slot buffers: the store's RAM footprint."""
        return self.buffers.nbytes

    def fetch(self, layer: int, expert_ids) -> SlotSet:
        """Read ``expert_ids`` (distinct, at most ``capacity``) of ``layer``; expert ``expert_ids[i]`` lands in slot i.

        The returned set is overwritten ``num_sets`` fetches later. Fetches are serialized; each one reads
        its experts in parallel. Raises ``ExpertReadError`` (naming file, layer, expert, offset) on a failed
        or short read, after every read of the fetch has finished.
        """
        if not self._finalizer.alive:
            raise ValueError(f"ExpertStore of {self.folder} is closed")
        ids = self._check(layer, expert_ids)
        n = len(ids)
        with self._lock:
            index = self._next_set
            self._next_set = (index + 1) % self.num_sets
            pending = self._pending[index]
            if pending:
                mx.eval(*pending)  # the computation that used this set must finish before we overwrite it
                pending.clear()
            self._read(layer, ids, self._iovecs[index][:n], self._pool)
            if self._unchecked is not None:
                self._check_sums(layer, ids, self.buffers.host_views(index), range(n))
            arrays = self.buffers.compute_arrays(index, n)
        return SlotSet(arrays, n, ids, index, pending)

    def read_into(self, layer: int, expert_ids, views: dict[str, np.ndarray], slots, parallel: bool = True) -> None:
        """Read ``expert_ids`` of ``layer`` into ``views[name][slots[i]]`` (per tensor, numpy arrays of shape
        (n, *shape), e.g. a host tier's buffers), counted in ``stats`` as fetches are. ``parallel``: over the
        reader threads (False: in the calling thread, e.g. a prefetcher's, so demand reads never queue behind it).
        The caller keeps ``views`` unread by pending computation at those slots until this returns."""
        if not self._finalizer.alive:
            raise ValueError(f"ExpertStore of {self.folder} is closed")
        ids = [int(e) for e in expert_ids]
        for e in ids:
            if not 0 <= e < self.layout.num_experts:
                raise ValueError(f"layer {layer}: expert {e} out of range (0..{self.layout.num_experts - 1})")
        if layer not in self._files.fds:
            raise ValueError(f"layer {layer} has no expert file in {self.folder}")
        n = len(next(iter(views.values())))
        slots = [int(slot) for slot in slots]
        plans = [self._slot_plan(views, slot, n) for slot in slots]
        self._read(layer, ids, plans, self._pool if parallel else None)
        if self._unchecked is not None:
            self._check_sums(layer, ids, views, slots)

    def _read(self, layer: int, ids: list[int], plans: list, pool) -> None:
        """Read expert ``ids[i]`` by the chunks ``plans[i]``, over ``pool`` (None: this thread), and record it."""
        fd = self._read_files.fds[layer]
        done: SimpleQueue = SimpleQueue()  # per read, so an interrupted read cannot leak results into the next
        # Every chunk of every expert goes to the pool at once: K whole-expert reads would keep only
        # K threads copying (page-cache hits are memcpy-bound per thread).
        jobs = [(fd, iov, layer, ids[i], delta, size) for i in range(len(ids)) for delta, iov, size in plans[i]]
        start = time.perf_counter()
        if pool is not None:
            for job in jobs[1:]:
                pool.submit(self._read_chunk_of, job, done)
        results = []
        for job in jobs[:1] if pool is not None else jobs:
            try:
                results.append(self._read_chunk_of(*job))
            except Exception as e:  # noqa: BLE001 - raised below, once the other reads are done
                results.append(e)
        if pool is not None:
            results += [done.get() for _ in range(len(jobs) - 1)]
        seconds = time.perf_counter() - start
        for r in results:
            if isinstance(r, BaseException):
                raise r
        per = len(plans[0]) if plans else 1  # chunks per expert, in job order
        hits = [None if results[i] is None else all(results[i : i + per]) for i in range(0, len(results), per)]
        missed = sum(job[-1] for job, hit in zip(jobs, results) if hit is False)
        with self._stats_lock:
            self._record(layer, ids, hits, seconds, missed)

    def _check(self, layer: int, expert_ids) -> list[int]:
        if layer not in self._files.fds:
            raise ValueError(
                f"layer {layer} has no expert file in {self.folder}: MoE layers are "
                f"{ranges(self.layout.moe_layers)}"
            )
        try:
            if isinstance(expert_ids, np.ndarray):
                expert_ids = expert_ids.tolist()
            ids = [operator.index(e) for e in expert_ids]
        except TypeError:
            raise TypeError(f"layer {layer}: expert ids must be integers, got {expert_ids!r}") from None
        if len(ids) > self.capacity:
            raise ValueError(f"layer {layer}: {len(ids)} experts requested, capacity is {self.capacity}")
        for e in ids:
            if not 0 <= e < self.layout.num_experts:
                raise ValueError(f"layer {layer}: expert {e} out of range (0..{self.layout.num_experts - 1})")
        if len(set(ids)) != len(ids):
            dup = sorted({e for e in ids if ids.count(e) > 1})
            raise ValueError(f"layer {layer}: expert ids must be distinct, got {dup} more than once")
        return ids

    def _check_sums(self, layer: int, ids: list[int], views: dict, slots) -> None:
        """Hash the experts just read into ``views[name][slots[i]]`` not checked yet (in parallel on the pool)."""
        todo = [(i, slot) for i, slot in enumerate(slots) if self._unchecked[layer, ids[i]]]
        if not todo:
            return
        done = SimpleQueue()
        for _, slot in todo:
            self._pool.submit(self._slot_checksum, (views, slot), done)
        got = [done.get() for _ in todo]
        for r in got:
            if isinstance(r, BaseException):
                raise r
        results = dict(got)
        for i, slot in todo:
            e, want, got = ids[i], self.layout.checksums[layer][ids[i]], results[slot]
            if got != want:
                raise CheckpointError(
                    f"{self._files.paths[layer]}: layer {layer} expert {e}: checksum {got} does not match "
                    f"{want} in layout.json (damaged, or from another conversion); run `flash-moe verify "
                    f"{self.folder}` to list every damaged expert"
                )
            self._unchecked[layer, e] = False

    def _slot_checksum(self, views: dict, slot: int) -> tuple[int, str]:
        h = hashlib.blake2b(digest_size=16)
        for gap, name in self._gaps:
            h.update(gap)  # alignment gaps are zeros in a well-formed file; the reader skips them
            h.update(views[name][slot])
        return slot, h.hexdigest()

    def _read_chunk_of(self, fd: int, iov: list, layer: int, expert: int, delta: int, nbytes: int) -> bool | None:
        """One chunk of one expert, one preadv. Returns whether it was a page-cache hit (None when not probed)."""
        offset = expert * self._stride + delta
        try:
            if self._probe == "nowait":
                try:
                    if os.preadv(fd, iov, offset, os.RWF_NOWAIT) == nbytes:
                        return True
                except BlockingIOError:
                    pass
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self._probe = "timing"  # this filesystem refuses RWF_NOWAIT
            start = time.perf_counter()
            got = os.preadv(fd, iov, offset)
            seconds = time.perf_counter() - start
        except OSError as e:
            raise ExpertReadError(
                e.errno,
                f"{self._files.paths[layer]}: layer {layer} expert {expert}: read of {nbytes:,} bytes "
                f"at byte offset {offset:,} failed: {e.strerror or e}",
            ) from e
        if got != nbytes:
            raise ExpertReadError(
                errno.EIO,
                f"{self._files.paths[layer]}: layer {layer} expert {expert}: short read at byte offset "
                f"{offset:,}: got {got:,} of {nbytes:,} bytes (file changed since it was opened?)",
            )
        if self._probe == "timing":
            return seconds * HIT_BYTES_PER_S < nbytes
        return False if self._probe else None

    def _record(self, layer: int, ids: list[int], hits: list, seconds: float, missed_bytes: int) -> None:
        s, n = self.stats, len(ids)
        s.fetches[layer] += 1
        s.experts[layer] += n
        s.bytes[layer] += n * self._expert_bytes
        s.seconds[layer] += seconds
        if self._probe:
            got = sum(1 for h in hits if h)
            s.hits[layer] += got
            s.misses[layer] += n - got
            s.missed_bytes[layer] += missed_bytes
        s.usage[layer, ids] += 1  # ids are distinct, so fancy-index += counts each once

    def verify(self, layers=None, progress: bool = False) -> list[tuple[int, int, str, str]]:
        """Re-check the checksums of layout.json with the store's open files; see ``verify``."""
        with self._lock:
            return verify_files(self._files, self.layout, layers, progress)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "ExpertStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""HostExpertCache: a RAM tier of experts between the device tier and the ExpertStore, for discrete GPUs.

With direct reads (O_DIRECT) behind a GPU's device cache, host RAM holds no experts at all, and every
device miss goes to disk. This tier keeps ``capacity`` experts in host memory: page-locked on CUDA, where a
device miss is served by a copy from pinned memory at PCIe speed (``PinnedSlotBuffers.scatter_rows``); plain
MLX-visible host buffers elsewhere (the CPU form, which the tests run; on Apple the page cache already is
this tier, so it stays off by default there). Its misses are read by the store straight into its buffers
(``ExpertStore.read_into``, direct reads included).

Prefetching: ``prefetch(layer, ids)`` reads guessed experts into this tier on background threads while
the current layer computes; a guess never touches the device tier and never overwrites an entry that
pending computation may still read. A lookup that finds a guess still being read waits for that read.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from .expert_source import Entries, popularity_order, slice_fill
from .slots import HostSlotBuffers


class HostExpertCache:
    """An ``ExpertSource`` (expert_source.py) over ``capacity`` experts of any layer in host memory.

    ``buffers``: a ``SlotBuffers`` kind for the storage (one set of ``capacity`` slots): ``HostSlotBuffers``
    (default; the computation reads it in place) or ``cuda_host.PinnedSlotBuffers`` (then only a device tier
    in front reads it, by ``fill_into``)."""

    def __init__(self, store, capacity: int, *, policy: str = "frequency", buffers=None):
        if capacity < 1:
            raise ValueError(f"host cache capacity must be >= 1 expert, got {capacity}")
        self.store, self.capacity, self.policy = store, capacity, policy
        self.buffers = (buffers or HostSlotBuffers)(store.layout.expert, capacity, 1)
        self.views = self.buffers.host_views(0)
        self._scatter_rows = getattr(self.buffers, "scatter_rows", None)
        self.arrays = None if self._scatter_rows else self.buffers.compute_arrays(0, capacity)
        n_layers = max(store.layout.moe_layers, default=-1) + 1
        self.entries = Entries(capacity, n_layers, store.layout.num_experts, policy)
        self.hits = np.zeros(n_layers, np.int64)
        self.misses = np.zeros(n_layers, np.int64)
        self.prefetched = self.prefetch_used = 0  # experts read on a guess, and how many of them were then used
        # wall time of demand reads (misses), of copies out to a device tier, and of the (overlapped) guesses
        self.read_seconds = self.copy_seconds = self.prefetch_seconds = 0.0
        self._fresh = np.zeros(capacity, bool)  # brought by a prefetch, not used yet
        self._handed = np.zeros(capacity, bool)  # handed out to computation not known to have run
        self._readers: list[mx.array] = []
        self._inflight: dict[int, object] = {}  # position -> Future of the guess being read into it
        self._threads = None
        self.prefetch_threads = 4  # one expert per thread: one thread alone reads far slower than a layer computes

    @property
    def nbytes(self) -> int:
        return self.buffers.nbytes

    def consumed_by(self, *arrays: mx.array) -> None:
        self._readers.extend(arrays)
        if len(self._readers) > 64:
            self._settle()

    def _settle(self) -> None:
        """Run what reads the handed-out entries: then any entry may be overwritten."""
        if self._readers:
            mx.eval(*self._readers)
            self._readers.clear()
        self._handed[:] = False

    def _wait(self, positions=None) -> None:
        """Wait for the guesses being read into ``positions`` (None: all)."""
        at = list(self._inflight) if positions is None else [p for p in np.asarray(positions).tolist() if p in self._inflight]
        for p in at:
            self._inflight.pop(p).result()  # a failed read raises here, in the fetching thread

    def _ensure(self, layer: int, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids`` (distinct, at most ``capacity``), reading the missing ones in."""
        if len(ids) > self.capacity:
            raise ValueError(f"layer {layer}: {len(ids)} experts requested, the host cache holds {self.capacity}")
        pos = self.entries.lookup(layer, ids)
        miss = np.nonzero(pos < 0)[0]
        self.hits[layer] += len(ids) - len(miss)
        self.misses[layer] += len(miss)
        found = pos[pos >= 0]
        self._wait(found)  # a guess still being read in: wait for it (the others read on)
        self.prefetch_used += int(self._fresh[found].sum())
        self._fresh[found] = False
        if len(miss):
            keep = np.union1d(found, np.fromiter(self._inflight, np.int64, len(self._inflight)))
            if self.capacity - len(keep) < len(miss):  # too few entries free of reads in flight: let them land
                self._wait()
                keep = found
            victims = self.entries.victims(len(miss), keep=keep)
            self._settle()
            self.entries.place(layer, ids[miss], victims)
            self._fresh[victims] = False
            start = time.perf_counter()
            self.store.read_into(layer, ids[miss], self.views, victims)
            self.read_seconds += time.perf_counter() - start
            pos[miss] = victims
        self.entries.touch(pos)
        return pos

    def fetch(self, layer: int, expert_ids) -> tuple[dict[str, mx.array], np.ndarray]:
        if self.arrays is None:
            raise NotImplementedError("a pinned host cache is read by a device cache in front of it (fill_into)")
        pos = self._ensure(layer, np.asarray(expert_ids, np.int64))
        self._handed[pos] = True
        return self.arrays, pos

    def fill_into(self, layer: int, ids, targets: dict[str, mx.array], where) -> None:
        pos = self._ensure(layer, np.asarray(ids, np.int64))
        start = time.perf_counter()
        if self._scatter_rows is not None:  # pinned memory: a kernel copies the rows over PCIe, in place
            mx.eval(self._scatter_rows(pos, list(targets.values()), where))
        else:
            slice_fill(self.arrays, pos, targets, where)  # evaluated: nothing reads these entries later
        self.copy_seconds += time.perf_counter() - start

    def prefetch(self, layer: int, expert_ids, skip=None) -> int:
        """Start reading ``expert_ids`` of ``layer`` that neither this tier nor ``skip`` (the device tier's
        ``Entries``) holds; returns how many. Runs on a background thread until the next lookup."""
        ids = np.unique(np.asarray(expert_ids, np.int64))
        ids = ids[self.entries.lookup(layer, ids) < 0]
        if skip is not None:
            ids = ids[skip.lookup(layer, ids) < 0]
        keep = np.flatnonzero(self._handed | self._fresh)  # never overwrite what may be read, or an unused guess
        ids = ids[: max(0, self.capacity - len(keep))]
        if not len(ids):
            return 0
        victims = self.entries.victims(len(ids), keep=keep)
        self.entries.place(layer, ids, victims)
        self.entries.last[victims] = self.entries.tick  # a guess ranks as recent, with no uses
        self._fresh[victims] = True
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.prefetch_threads, thread_name_prefix="flash-moe-prefetch")
        # On threads of its own, not the store's readers: demand reads never queue behind a guess.
        for e, v in zip(ids.tolist(), victims.tolist()):
            self._inflight[v] = self._threads.submit(self._guess_read, layer, [e], [v])
        self.prefetched += len(ids)
        return len(ids)

    def _guess_read(self, layer: int, ids, victims) -> None:
        start = time.perf_counter()
        self.store.read_into(layer, ids, self.views, victims, False)
        self.prefetch_seconds += time.perf_counter() - start

    def preload(self, order: list[tuple[int, int]]) -> int:
        """Read the (layer, expert) pairs of ``order`` not held yet, up to capacity; returns how many."""
        todo = {}
        for l, e in order[: self.capacity]:
            if self.entries.lookup(l, [e])[0] < 0:
                todo.setdefault(l, []).append(e)
        counters = self.hits.copy(), self.misses.copy()
        for l, ids in todo.items():
            self._ensure(l, np.asarray(ids, np.int64))
        self.hits[:], self.misses[:] = counters
        return sum(map(len, todo.values()))

    def totals(self) -> dict:
        h, m = int(self.hits.sum()), int(self.misses.sum())
        return {"hits": h, "misses": m, "hit_rate": h / max(h + m, 1), "resident": self.entries.resident,
                "capacity": self.capacity, "bytes": self.nbytes, "policy": self.policy,
                "prefetched": self.prefetched, "prefetch_used": self.prefetch_used, "read_seconds": self.read_seconds,
                "copy_seconds": self.copy_seconds, "prefetch_seconds": self.prefetch_seconds}

    def close(self) -> None:
        self._wait()
        if self._threads is not None:
            self._threads.shutdown()
        self._settle()
        self.buffers.close()


def preload_tiers(store, device=None, host=None, owned=None, progress: bool = False) -> int:
    """Fill the tiers before decoding in popularity order (the store's usage counts): the most used experts
    into the device tier, the next ones into the host tier. Returns how many experts were read."""
    order = popularity_order(store.stats.usage, store.layout.moe_layers, owned)
    count = 0
    if device is not None:
        counters = (host.hits.copy(), host.misses.copy()) if host is not None else None
        count += device.preload(progress=progress)  # its misses pass through the host tier: not decoding's
        if host is not None:
            host.hits[:], host.misses[:] = counters
        order = [(l, e) for l, e in order if device.entries.lookup(l, [e])[0] < 0]
    if host is not None:
        count += host.preload(order)
    return count

"""Where a layer's routed experts come from: one interface, implemented by each memory tier.

A source hands out experts with ``fetch(layer, ids) -> (arrays, positions)``: per tensor name an array
``(n, *shape)`` and, for each requested expert, its row in those arrays. Three sources chain, each
asking the next one for its misses:

    DeviceExpertCache (GPU memory, expert_cache.py) -> HostExpertCache (RAM, host_cache.py) -> StoreSource (SSD)

A tier in front fills its own arrays from the next source with ``fill_into`` (the next source knows the
fastest copy: a kernel from pinned memory on CUDA, ``slice_update`` elsewhere). ``consumed_by`` marks
computation that reads the handed-out arrays, so a tier evaluates it before overwriting an entry.
``Entries`` is the placement and eviction policy both caching tiers share.
"""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx
import numpy as np

POLICIES = ("frequency", "lru")


class ExpertSource(Protocol):
    capacity: int  # the most distinct experts one fetch may ask for

    def fetch(self, layer: int, ids) -> tuple[dict[str, mx.array], np.ndarray]: ...

    def fill_into(self, layer: int, ids, targets: dict[str, mx.array], where) -> None:
        """Write expert ``ids[i]`` into row ``where[i]`` of each ``targets[name]`` (replacing its arrays)."""

    def consumed_by(self, *arrays: mx.array) -> None: ...

    def totals(self) -> dict: ...


def slice_fill(arrays: dict, rows, targets: dict, where) -> None:
    """``targets[name][where[i]] = arrays[name][rows[i]]`` by ``slice_update``, which donates the target
    buffer (in place: a gather-scatter would copy the whole array, 25 ms vs 0.7 ms per expert into 1 GiB,
    measured on CPU) as long as no other reference to it survives; evaluated at once for the same reason."""
    for row, at in zip(np.asarray(rows).tolist(), np.asarray(where).tolist()):
        at = mx.array([at])
        for name in targets:
            targets[name] = mx.slice_update(targets[name], arrays[name][row : row + 1], at, axes=(0,))
    mx.eval(list(targets.values()))


class StoreSource:
    """The ExpertStore as a source: every fetch reads (page cache or disk), into the store's slot sets."""

    def __init__(self, store):
        self.store, self.capacity = store, store.capacity
        self._last = None  # the last slot set handed out: what ``consumed_by`` protects
        # The in-place kernel fill where the slot buffers offer it (pinned CUDA memory), else slice_update.
        self._scatter = getattr(store.buffers, "scatter", None)

    def fetch(self, layer: int, ids) -> tuple[dict[str, mx.array], np.ndarray]:
        self._last = self.store.fetch(layer, ids)
        return self._last.arrays, np.arange(len(ids))

    def consumed_by(self, *arrays: mx.array) -> None:
        self._last.consumed_by(*arrays)

    def fill_into(self, layer: int, ids, targets: dict[str, mx.array], where) -> None:
        ids, where = np.asarray(ids), np.asarray(where)
        for first in range(0, len(ids), self.capacity):
            slots = self.store.fetch(layer, ids[first : first + self.capacity])
            rows = where[first : first + self.capacity]
            if self._scatter is not None:
                # Run the fill now. MLX does not know the kernel writes the target arrays (they are its inputs),
                # so nothing would order a later reader after it: its CUDA graphs link kernels by the buffers
                # they read, and a lazy fill whose zero output no one evaluates never runs at all.
                mx.eval(self._scatter(slots.index, slots.count, list(targets.values()), rows))
            else:
                slice_fill(slots.arrays, range(len(rows)), targets, rows)

    def totals(self) -> dict:
        return self.store.stats.totals()


class Entries:
    """Which (layer, expert) each of ``capacity`` positions holds, and which entries to evict.

    ``policy="frequency"``: evict the lowest ``weight * uses + last use`` (the frequency-weighted LRU of the
    flash-moe CUDA port: an expert used often survives a burst of one-off ones); ``"lru"``: the oldest use.
    """

    def __init__(self, capacity: int, num_layers: int, num_experts: int, policy: str = "frequency",
                 weight: float = 10.0):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.capacity, self.num_experts, self.policy, self.weight = capacity, num_experts, policy, weight
        self.position = np.full(num_layers * num_experts, -1, np.int64)  # key -> position, -1: absent
        self.keys = np.full(capacity, -1, np.int64)  # layer * num_experts + expert held at each position
        self.uses = np.zeros(capacity, np.int64)
        self.last = np.zeros(capacity, np.int64)
        self.tick = 0

    def lookup(self, layer: int, ids) -> np.ndarray:
        return self.position[layer * self.num_experts + np.asarray(ids, np.int64)]

    def victims(self, n: int, keep=()) -> np.ndarray:
        """``n`` positions to overwrite, never one in ``keep``."""
        score = (self.weight * self.uses + self.last) if self.policy == "frequency" else self.last.astype(np.float64)
        score = score.astype(np.float64)
        score[self.keys < 0] = -1  # empty positions first
        score[np.asarray(keep, np.int64)] = np.inf
        return np.argpartition(score, n - 1)[:n] if n else np.zeros(0, np.int64)

    def place(self, layer: int, ids, where) -> None:
        """Positions ``where`` now hold experts ``ids`` of ``layer`` (their old entries are forgotten)."""
        old = self.keys[where]
        self.position[old[old >= 0]] = -1
        keys = layer * self.num_experts + np.asarray(ids, np.int64)
        self.keys[where], self.uses[where] = keys, 0
        self.position[keys] = where

    def touch(self, positions) -> None:
        """One use of the entries at ``positions`` (one fetch: a tick)."""
        self.tick += 1
        np.add.at(self.uses, positions, 1)
        self.last[positions] = self.tick

    @property
    def resident(self) -> int:
        return int((self.keys >= 0).sum())


def popularity_order(usage: np.ndarray, layers, owned: dict | None = None) -> list[tuple[int, int]]:
    """(layer, expert) pairs, most used first, rank by rank across layers (``usage`` [layers, experts])."""
    ranked = {l: np.argsort(-usage[l], kind="stable") for l in layers}
    if owned is not None:
        ranked = {l: r[owned[l][r]] for l, r in ranked.items()}
    depth = max((len(r) for r in ranked.values()), default=0)
    return [(l, int(ranked[l][r])) for r in range(depth) for l in layers if r < len(ranked[l])]

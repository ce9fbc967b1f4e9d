"""DeviceExpertCache: a device-memory tier in front of the ExpertStore, for discrete GPUs.

On unified memory (Apple) the page cache already is the fastest tier and every user-space cache
lost (the seed engine measured it). A discrete GPU is another machine: an expert in GPU memory
skips the SSD, the page cache copy and the PCIe transfer. The cache holds ``capacity`` experts of
any layer as per-tensor arrays (capacity, ...) on the default device; the expert computation
indexes them directly, so a hit costs no copy at all. Misses are read by the store and written
into the positions of the least valuable entries (score = weight * uses + last use, the
frequency-weighted LRU of the flash-moe CUDA port).

Speculation (tokens with no per-layer sync, betting every expert is here) lives in speculation.py.

Filling in place: with pinned slot buffers (MLX's CUDA backend) a kernel copies the read slots
straight into the cache arrays (``PinnedSlotBuffers.scatter``); MLX's own ``slice_update`` copies the
whole array there. Elsewhere ``slice_update`` runs in place as long as nothing else holds the array,
which is why readers are registered (``consumed_by``) and evaluated before a fill.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .expert_source import Entries, StoreSource, popularity_order
from .layout import ExpertLayout, mlx_dtype
from .speculation import Speculation


class DeviceExpertCache:
    """The GPU tier (an ``ExpertSource``, see expert_source.py): ``capacity`` experts of any layer in device
    memory; misses come from ``next`` (a ``HostExpertCache`` or the store; default: the store).

    ``owned`` (expert-parallel runs): ``{layer: bool [num_experts]}``, the experts this rank reads; preload
    takes only those. Such runs do not speculate: each rank's cache would decide alone whether a token runs
    again, and the ranks' collectives would no longer pair up."""

    def __init__(self, store, capacity: int, *, weight: float = 10.0, owned: dict | None = None, next=None,
                 policy: str = "frequency"):
        layout: ExpertLayout = store.layout.expert
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 expert, got {capacity}")
        self.store, self.capacity, self.weight = store, capacity, weight
        self.next = next if next is not None else StoreSource(store)
        self.num_experts = store.layout.num_experts
        self.owned = owned
        self.speculation = Speculation(self, enabled=owned is None)
        self.arrays = {t.name: mx.zeros((capacity, *t.shape), mlx_dtype(t.dtype)) for t in layout.tensors}
        mx.eval(list(self.arrays.values()))
        n_layers = max(store.layout.moe_layers, default=-1) + 1
        self.entries = Entries(capacity, n_layers, self.num_experts, policy, weight)
        self.hits = np.zeros(n_layers, np.int64)
        self.misses = np.zeros(n_layers, np.int64)
        self._readers: list[mx.array] = []

    @property
    def position(self) -> np.ndarray:
        return self.entries.position

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def consumed_by(self, *arrays: mx.array) -> None:
        """Declare arrays computed from the cache: they are evaluated before any entry is overwritten."""
        self._readers.extend(arrays)
        if len(self._readers) > 64:  # all hits for a while: these have long run; do not hold them forever
            mx.eval(*self._readers)
            self._readers.clear()

    def fetch(self, layer: int, expert_ids) -> tuple[dict[str, mx.array], np.ndarray]:
        """Make ``expert_ids`` (distinct, at most ``capacity``) resident; return the arrays and their positions."""
        ids = np.asarray(expert_ids, np.int64)
        if len(ids) > self.capacity:
            raise ValueError(f"layer {layer}: {len(ids)} experts requested, the cache holds {self.capacity}")
        pos = self.entries.lookup(layer, ids)
        miss = np.nonzero(pos < 0)[0]
        self.hits[layer] += len(ids) - len(miss)
        self.misses[layer] += len(miss)
        self.speculation.fetched(bool(len(miss)))
        if len(miss):
            victims = self.entries.victims(len(miss), keep=pos[pos >= 0])  # never evict what this fetch uses
            if self._readers:  # what reads the entries about to be overwritten must have run
                mx.eval(*self._readers)
                self._readers.clear()
            self.entries.place(layer, ids[miss], victims)
            step = self.next.capacity
            for first in range(0, len(miss), step):
                self.next.fill_into(layer, ids[miss][first : first + step], self.arrays, victims[first : first + step])
            pos[miss] = victims
        self.entries.touch(pos)
        return self.arrays, pos

    def preload(self, progress: bool = False) -> int:
        """Fill the cache before decoding: every expert when they all fit, else the most used so far
        (the store's usage counts; rank by rank across layers). Returns how many were read. The hit and
        miss counters are left as they were: they describe decoding."""
        order = popularity_order(self.store.stats.usage, self.store.layout.moe_layers, self.owned)[: self.capacity]
        todo = {}
        for l, e in order:
            if self.position[l * self.num_experts + e] < 0:
                todo.setdefault(l, []).append(e)
        count = sum(map(len, todo.values()))
        counters = self.hits.copy(), self.misses.copy()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=count, desc="preload experts", unit="expert")
        step = min(self.store.capacity, self.capacity)
        for l, ids in todo.items():
            for first in range(0, len(ids), step):
                self.fetch(l, ids[first : first + step])
                if bar is not None:
                    bar.update(len(ids[first : first + step]))
        if bar is not None:
            bar.close()
        self.hits[:], self.misses[:] = counters
        self.speculation.clean = 0
        return count

    # Speculation (speculation.py) bets on this tier; these two are its switch and its test.
    @property
    def speculate(self) -> bool:
        return self.speculation.enabled

    @speculate.setter
    def speculate(self, on: bool) -> None:
        self.speculation.enabled = on

    def should_speculate(self) -> bool:
        """True when a whole token's worth of synchronous fetches in a row found every expert here."""
        return self.speculation.should()

    def totals(self) -> dict:
        h, m = int(self.hits.sum()), int(self.misses.sum())
        return {"hits": h, "misses": m, "hit_rate": h / max(h + m, 1), "resident": self.entries.resident,
                "capacity": self.capacity, "bytes": self.nbytes, "speculated": self.speculation.speculated, "voided": self.speculation.voided}


ExpertCache = DeviceExpertCache  # the name before the tiers had distinct words

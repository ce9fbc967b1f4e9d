"""Speculative decode tokens: one token with no host sync per layer, betting that the device tier holds
every expert it needs.

The per-layer host sync (to learn which experts to read) costs a round trip and stalls the GPU at every
layer. When a whole token's worth of synchronous fetches in a row found every expert in the device tier,
the next token runs without it: each layer looks its experts' positions up on the device (``positions``),
and the lookups are read back once, with the token's logits (``commit``). A lookup that found an expert
missing voids the token: ``step`` restores the layer caches (prompt cache) and runs the token again the
synchronous way, which reads the missing experts in. A tier holding every expert (``certain``) cannot lose a bet:
its tokens skip the snapshot and the readback, so a decode forward never syncs and generation builds the next
token before reading this one (generation.decodes_ahead).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


class Speculation:
    """The bets on one ``DeviceExpertCache``. ``enabled`` False: never bet (expert-parallel runs, where each
    rank's tier would decide alone whether a token runs again and the collectives would no longer pair up)."""

    def __init__(self, device, enabled: bool = True):
        self.device, self.enabled = device, enabled
        self.clean = 0  # synchronous fetches in a row without a miss
        self.speculated = self.voided = 0  # tokens tried this way, and how many of them had to run again
        self._rows: list[mx.array] | None = None  # per layer, expert -> position (-1: absent), on the device
        self._lookups: list[mx.array] | None = None  # a speculative token's lookups, and their layers
        self._layers: list[int] = []
        self._pairs = 0  # (token, expert) pairs a layer looks up in a speculative token
        self._sure = False  # this token's tier holds every expert (begin(sure=True))
        self._holds_all: bool | None = None  # the tier holds every expert of every MoE layer (None: unknown)

    def fetched(self, missed: bool) -> None:
        """A synchronous fetch of the device tier happened; ``missed``: it had to fill entries."""
        self.clean = 0 if missed else self.clean + 1
        if missed:
            self._rows = None  # the device copy of the positions is stale
            self._holds_all = None

    def certain(self) -> bool:
        """Whether no bet can be lost: the tier holds every expert of every MoE layer (a preloaded tier of
        them all). Such a token needs no snapshot and no readback, so a decode forward never syncs."""
        if self._holds_all is None:
            d = self.device
            held = d.position.reshape(-1, d.num_experts) >= 0
            self._holds_all = bool(held[list(d.store.layout.moe_layers)].all())
        return self._holds_all

    def should(self) -> bool:
        return self.enabled and self.clean >= len(self.device.store.layout.moe_layers)

    @property
    def active(self) -> bool:
        """Inside a speculative token (between ``begin`` and ``end``)."""
        return self._lookups is not None

    def begin(self, sure: bool = False) -> None:
        """Start a speculative token; ``sure``: the tier holds every expert (``certain``), so the lookups need
        no clamp and no readback (one launch less per MoE layer)."""
        if self._rows is None:  # upload the positions table (after fills only)
            d = self.device
            table = mx.array(d.position.reshape(-1, d.num_experts).astype(np.int32))
            self._rows = [table[layer] for layer in range(table.shape[0])]
            mx.eval(self._rows)
        self._lookups, self._layers, self._sure = [], [], sure

    def positions(self, layer: int, inds: mx.array) -> mx.array:
        """Device-tier positions of ``inds`` (device ids, no sync); absent experts read position 0 and void the token."""
        found = mx.take(self._rows[layer], inds)
        self._layers.append(layer)
        self._pairs = inds.size
        if self._sure:
            return found
        self._lookups.append(found)
        return mx.maximum(found, 0)

    def end(self) -> mx.array | None:
        """The token's lookups as one array, to evaluate with its logits and hand to ``commit``."""
        lookups, self._lookups = self._lookups, None
        return mx.stack([a.reshape(-1) for a in lookups]) if lookups else None

    def commit(self, lookups: mx.array | None) -> bool:
        """Whether the speculative token stands (every expert was held); books its hits and uses."""
        self.speculated += 1
        if lookups is None:
            return True
        found = np.array(lookups)  # [layers, pairs], evaluated with the logits
        if (found < 0).any():
            self.voided += 1
            self.clean = 0
            return False
        np.add.at(self.device.hits, self._layers, found.shape[1])
        self.device.entries.touch(found.ravel())
        return True

    def step(self, model, tokens: mx.array, cache: list, snapshot=None, restore=None) -> mx.array:
        """Logits of one token run as a bet; a lost bet restores ``cache`` and runs it again with syncs.
        ``snapshot(c)``/``restore(c, saved)``: how to rewind a layer cache (default: its own methods)."""
        if self.certain():  # nothing can be missing: lazy logits, the hits booked now (nothing to evict: no touch)
            self.begin(sure=True)
            try:
                logits = model(tokens, cache)
            finally:
                self.end()
            self.speculated += 1
            np.add.at(self.device.hits, self._layers, self._pairs)
            return logits
        snapshot = snapshot or (lambda c: c.snapshot())
        restore = restore or (lambda c, s: c.restore(s))
        saved = [snapshot(c) for c in cache]
        self.begin()
        try:
            logits = model(tokens, cache)
        finally:
            lookups = self.end()
        mx.eval(logits, lookups)
        if self.commit(lookups):
            return logits
        for c, s in zip(cache, saved):
            restore(c, s)
        return model(tokens, cache)

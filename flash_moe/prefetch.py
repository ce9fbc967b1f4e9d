"""Reads that overlap compute: while layer L computes, read layer L+1's likely experts into the host tier.

The guess is layer L+1's router applied to layer L's MoE input (the hidden state one attention block
earlier than the one L+1 will route): a lazy top-k, evaluated in the same sync as layer L's own routing,
so it costs no extra round trip. The reads run on the host tier's background thread during layer L's
expert computation and layer L+1's attention; the host tier waits for them at its next lookup. Guesses
skip experts the device tier holds and only ever replace host-tier entries (see host_cache.py).

The other predictor measured (benchmarks/predictors.py), the previous token's experts of layer L+1, needs
no prefetch here: those experts were just used, so they are still in the tiers.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


class Prefetcher:
    """``blocks``: {MoE layer: (next MoE layer, its SparseMoeBlock)}; ``host``: the HostExpertCache read into;
    ``device``: the DeviceExpertCache in front (its experts are not read again), or None.
    ``max_tokens``: guess only for calls of at most this many tokens (decode); a long chunk would guess a
    large part of the next layer."""

    def __init__(self, blocks: dict, host, device=None, max_tokens: int = 8):
        self.blocks, self.host, self.device, self.max_tokens = blocks, host, device, max_tokens
        self.guesses = 0

    def guess(self, layer: int, x: mx.array) -> mx.array | None:
        """Layer L+1's top-k for the tokens ``x`` (layer ``layer``'s MoE input), lazy; None when not guessing."""
        nxt = self.blocks.get(layer)
        if nxt is None or x.shape[0] > self.max_tokens:
            return None
        k = nxt[1].top_k
        logits = nxt[1].gate(x)
        return mx.argpartition(-logits, k - 1, axis=-1)[..., :k]

    def submit(self, layer: int, guess: np.ndarray) -> None:
        nxt = self.blocks[layer][0]
        self.guesses += 1
        self.host.prefetch(nxt, guess.ravel(), skip=self.device.entries if self.device is not None else None)

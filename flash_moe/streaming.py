"""StreamingExperts: the routed experts of one MoE layer, read from an ExpertStore on every call.

Same call as ResidentExperts. The chosen expert ids are the one host sync per layer: they say
which bytes to read. Router and shared expert stay resident in the model.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import kernels
from .expert_source import StoreSource
from .experts import stacked_ffn
from .layout import ExpertLayout


def expert_compute(x, arrays: dict, inds, scores, layout: ExpertLayout):
    """The fused Metal/CUDA kernels where the backend has them, else ``stacked_ffn`` (MLX ops)."""
    if kernels.BACKEND == "ops" or not layout.quantized:
        return stacked_ffn(x, arrays, inds, scores, layout.bits, layout.group_size)
    from .kernels.expert_ffn import expert_ffn

    return expert_ffn(x, arrays, inds, scores, bits=layout.bits, group_size=layout.group_size)


def _bucket(n: int) -> int:
    return n if n <= 16 else 1 << (n - 1).bit_length()


class StreamingExperts(nn.Module):
    """The experts of one MoE layer, from ``source`` (the first memory tier: a ``DeviceExpertCache`` or
    ``HostExpertCache``, see expert_source.py) or, without one, read from ``store`` on every call.

    ``owned`` (bool [num_experts], expert-parallel runs): only those experts are read and computed; the
    (token, k) pairs routed to the others contribute zero, so the result is this rank's partial sum.
    ``prefetch`` (set by load): a ``prefetch.Prefetcher`` that guesses the next layer's experts from this
    layer's hidden state, read into the host tier while this layer computes.
    """

    def __init__(self, store, layer: int, source=None, owned: np.ndarray | None = None):
        super().__init__()
        # Plain attributes (not parameters): the store owns the bytes, the model never saves them.
        self._store, self._layer, self._layout = store, layer, store.layout.expert
        self._direct = StoreSource(store)
        self._tiered = source is not None
        self._source = source if source is not None else self._direct
        self._owned = None if owned is None or owned.all() else np.asarray(owned, bool)
        self.prefetch = None

    def __call__(self, x: mx.array, inds: mx.array, scores: mx.array, compute=expert_compute) -> mx.array:
        """``compute(x, arrays, slots, scores, layout)``: the experts over the tier's or store's slot arrays
        (default the score-weighted sum, [N, D]); another (families.switch_outputs) is for one token's K
        experts, which always fit the slots (the per-chunk path below always sums)."""
        bet = getattr(self._source, "speculation", None)
        if bet is not None and bet.active:  # a speculative token (speculation.py): no sync
            return compute(x, self._source.arrays, bet.positions(self._layer, inds), scores, self._layout)
        guess = self.prefetch.guess(self._layer, x) if self.prefetch is not None else None
        if guess is not None:
            mx.eval(inds, guess)  # one sync for both
            self.prefetch.submit(self._layer, np.array(guess))
        ids = np.array(inds)  # host sync: we must know what to read
        keep = None
        if self._owned is not None:
            keep = self._owned[ids]  # [N, K]: the pairs this rank computes
            if not keep.any():
                return mx.zeros(x.shape, x.dtype)
            if keep.all():
                keep = None
            elif len(ids) == 1:  # one token (decode): its owned pairs are a shorter top-k
                own = np.nonzero(keep[0])[0]
                ids, scores, keep = ids[:, own], scores[:, mx.array(own)], None
            elif self._tiered:
                # A tier computes on [N, K] indices: the unowned pairs run on an owned expert with score zero
                # (exact: the sum adds +0.0).
                ids = np.where(keep, ids, ids[keep][0])
                scores = scores * mx.array(keep).astype(scores.dtype)
                keep = None
        uniq, local = np.unique(ids if keep is None else ids[keep], return_inverse=True)
        if keep is None:
            local = local.reshape(ids.shape).astype(np.int32)
            for source in (self._source, self._direct):  # the first tier; past its capacity, the store itself
                if len(uniq) <= source.capacity:
                    arrays, pos = source.fetch(self._layer, uniq)  # a tier's hits cost no read
                    y = compute(x, arrays, mx.array(pos[local].astype(np.int32)), scores, self._layout)
                    source.consumed_by(y)
                    return y
        else:
            full = np.full(ids.shape, -1, np.int32)
            full[keep] = local
            local = full
        return self._pairs(x, uniq, local, scores)

    def _pairs(self, x, uniq, local, scores):
        """Only the (token, k) pairs with ``local >= 0``, their experts ``uniq[local]`` read a slot set at a time.

        For more distinct experts than slots (a long prompt chunk), and for a rank's share of a chunk: every
        expert is read once per chunk, and only its own pairs are computed. The sum runs in float32, as the
        one-group sum over k does: in bfloat16 it is then bit-identical."""
        cap = self._store.capacity
        y = mx.zeros(x.shape, mx.float32)
        scores_flat = scores.reshape(-1)
        for first in range(0, len(uniq), cap):
            sel = np.nonzero((local >= first) & (local < first + cap))
            rows, flat, slot = sel[0], np.ravel_multi_index(sel, local.shape), local[sel] - first
            # Pad the pair count to a power of two with zero-score pairs: on backends that compile kernels per
            # shape (MLX's CUDA JIT), every new count would otherwise compile anew (15 vs 136 tok/s prefill).
            pad = _bucket(len(rows)) - len(rows)
            rows, slot = np.pad(rows, (0, pad)), np.pad(slot, (0, pad))
            pair_scores = mx.concatenate([scores_flat[mx.array(flat)], mx.zeros((pad,), scores.dtype)])
            slots = self._store.fetch(self._layer, uniq[first : first + cap])
            part = expert_compute(
                x[mx.array(rows)], slots.arrays, mx.array(slot.astype(np.int32))[:, None], pair_scores[:, None],
                self._layout,
            )
            y = y.at[mx.array(rows)].add(part.astype(mx.float32))
            slots.consumed_by(y)
        return y.astype(x.dtype)

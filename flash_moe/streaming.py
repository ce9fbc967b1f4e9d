"""StreamingExperts: the routed experts of one MoE layer, read from an ExpertStore on every call.

Same call as ResidentExperts. The chosen expert ids are the one host sync per layer: they say
which bytes to read. Router and shared expert stay resident in the model.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import kernels
from .experts import gather_mm, switch_glu
from .layout import ExpertLayout


def slot_ffn(x, arrays: dict, inds, scores, layout: ExpertLayout):
    """Score-weighted SwiGLU of the experts in slot arrays (S, ...): x [N, D], inds/scores [N, K] -> [N, D]."""

    def proj(name, h, idx, sorted_indices):
        # Stored floats take the compute dtype, as the resident model's do at load: float32 scales
        # must not promote a bfloat16 model's activations to float32.
        cast = lambda a: a if a.dtype == h.dtype else a.astype(h.dtype)
        w = arrays[f"{name}.weight"]
        if not layout.quantized:
            return gather_mm(h, cast(w), idx, sorted_indices)
        return mx.gather_qmm(
            h, w, cast(arrays[f"{name}.scales"]), cast(arrays[f"{name}.biases"]), rhs_indices=idx, transpose=True,
            group_size=layout.group_size, bits=layout.bits, sorted_indices=sorted_indices,
        )

    return switch_glu(x, inds, proj, scores, sort=inds.size >= 64)


def expert_compute(x, arrays: dict, inds, scores, layout: ExpertLayout):
    """The fused Metal/CUDA kernels where the backend has them, else ``slot_ffn`` (MLX ops)."""
    if kernels.BACKEND == "ops" or not layout.quantized:
        return slot_ffn(x, arrays, inds, scores, layout)
    from .kernels.expert_ffn import expert_ffn

    return expert_ffn(x, arrays, inds, scores, bits=layout.bits, group_size=layout.group_size)


def _bucket(n: int) -> int:
    return n if n <= 16 else 1 << (n - 1).bit_length()


class StreamingExperts(nn.Module):
    def __init__(self, store, layer: int, cache=None):
        super().__init__()
        # Plain attributes (not parameters): the store owns the bytes, the model never saves them.
        self._store, self._layer, self._layout, self._cache = store, layer, store.layout.expert, cache

    def __call__(self, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
        if self._cache is not None and self._cache.speculating:  # a speculative token: no sync
            return expert_compute(x, self._cache.arrays, self._cache.positions(self._layer, inds), scores, self._layout)
        ids = np.array(inds)  # host sync: we must know what to read
        uniq, local = np.unique(ids, return_inverse=True)
        local = local.reshape(ids.shape).astype(np.int32)
        if self._cache is not None and len(uniq) <= self._cache.capacity:
            arrays, pos = self._cache.fetch(self._layer, uniq)  # device tier: hits cost no read, no copy
            y = expert_compute(x, arrays, mx.array(pos[local]), scores, self._layout)
            self._cache.consumed_by(y)
            return y
        cap = self._store.capacity
        if len(uniq) <= cap:
            slots = self._store.fetch(self._layer, uniq)
            y = expert_compute(x, slots.arrays, mx.array(local), scores, self._layout)
            slots.consumed_by(y)
            return y
        # More distinct experts than slots (a long prompt chunk): read them a slot set at a time and
        # compute only the (token, k) pairs routed to each group, so every expert is read once per chunk.
        # The sum runs in float32, as the one-group sum over k does: in bfloat16 it is then bit-identical.
        y = mx.zeros(x.shape, mx.float32)
        scores_flat = scores.reshape(-1)
        for first in range(0, len(uniq), cap):
            sel = np.nonzero((local >= first) & (local < first + cap))
            rows, flat, slot = sel[0], np.ravel_multi_index(sel, ids.shape), local[sel] - first
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

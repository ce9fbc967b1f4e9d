"""Routed experts of a form the fused kernels do not cover, on MLX ops over the same slot buffers.

gpt-oss's experts add a bias to each projection and use their own activation (a clamped SwiGLU). The
weights are packed as every expert is (docs/format.md); the biases are small (one vector per
projection and expert) and stay resident, gathered per call by expert id. The activation is the
family's own module, taken from mlx-lm's ``SwitchGLU``, so its math is mlx-lm's.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .experts import project
from .layout import PROJECTIONS, ExpertLayout


class Bias(nn.Module):
    """One projection's bias vector per expert: (experts, out)."""

    def __init__(self, num_experts: int, out_dim: int):
        super().__init__()
        self.bias = mx.zeros((num_experts, out_dim))


class OwnFormExperts(nn.Module):
    """``StreamingExperts``' call, ``(x [N, D], inds [N, K], scores [N, K]) -> [N, D]``, for biased experts
    with the family's activation: weights read per call from the ExpertStore (or, given ``arrays``, all
    in memory), biases resident."""

    def __init__(self, activation, layout: ExpertLayout, num_experts: int, store=None, layer: int = 0,
                 arrays: dict | None = None):
        super().__init__()
        for proj in PROJECTIONS:
            setattr(self, proj, Bias(num_experts, layout.hidden if proj == "down_proj" else layout.intermediate))
        # Plain attributes, not parameters: the store owns the weights' bytes.
        self._activation, self._layout, self._store, self._layer, self._arrays = (
            activation, layout, store, layer, arrays)

    def ffn(self, x, arrays: dict, slots, inds, scores):
        """Score-weighted experts: ``slots`` index ``arrays``, ``inds`` (the experts' ids) the biases."""
        h = x[:, None, None, :]

        def proj(name, h):
            e = self._layout
            return project(h, arrays, name, slots, e.bits, e.group_size) + getattr(self, name).bias[inds][..., None, :]

        y = proj("down_proj", self._activation(proj("up_proj", h), proj("gate_proj", h))).squeeze(-2)
        return (y * scores[..., None]).sum(axis=-2)

    def __call__(self, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
        if self._arrays is not None:
            return self.ffn(x, self._arrays, inds, inds, scores)
        ids = np.array(inds)  # host sync: we must know what to read
        uniq, local = np.unique(ids, return_inverse=True)
        local = local.reshape(ids.shape).astype(np.int32)
        cap = self._store.capacity
        y = None
        # More distinct experts than slots: a slot set at a time, each (token, k) pair with its group.
        for first in range(0, len(uniq), cap):
            slots = self._store.fetch(self._layer, uniq[first : first + cap])
            if len(uniq) <= cap:
                y = self.ffn(x, slots.arrays, mx.array(local), inds, scores)
            else:
                sel = np.nonzero((local >= first) & (local < first + cap))
                rows, flat = mx.array(sel[0]), mx.array(np.ravel_multi_index(sel, ids.shape))
                part = self.ffn(x[rows], slots.arrays, mx.array(local[sel] - first)[:, None],
                                inds.reshape(-1)[flat][:, None], scores.reshape(-1)[flat][:, None])
                y = (mx.zeros(x.shape, mx.float32) if y is None else y).at[rows].add(part.astype(mx.float32))
            slots.consumed_by(y)
        return y.astype(x.dtype)

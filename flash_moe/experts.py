"""Routed experts held in memory: stacked (E, out, in) weights, float or affine-quantized.

This is the provider for small models and the reference the streamed experts are tested
against; ``StreamingExperts`` (streaming.py) has the same call but reads its weights from SSD.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


# MLX 0.32.4's CUDA backend computes gather_mm with sorted_indices=True wrongly for rows grouped by expert
# (relative error 1.2-1.3 against the CPU on a 24-token, K=4, 16-expert prefill, H200, 2026-12-02; the same
# rows unsorted agree to 2e-7). Rows are still grouped there, but the kernel is not told they are sorted.
SORTED_GATHER = not (hasattr(mx, "cuda") and mx.cuda.is_available())


def switch_glu(x, inds, proj, scores, sort: bool = False):
    """Sum_k scores[n, k] * down(silu(gate x_n) * up x_n) with expert ``inds[n, k]``.

    ``proj(name, h, inds, sorted_indices)`` applies one stacked projection to rows h gathered by inds.
    """
    N, K = inds.shape
    h = x[:, None, None, :]  # [N, 1, 1, D]
    idx = inds
    if sort:  # group rows by expert so each expert's weights are read once (prefill)
        flat = inds.flatten()
        order = mx.argsort(flat)
        inv = mx.argsort(order)
        h = x[order // K][:, None, :]  # [N*K, 1, D]
        idx = flat[order]
    told = sort and SORTED_GATHER
    g = proj("gate_proj", h, idx, told)
    u = proj("up_proj", h, idx, told)
    y = proj("down_proj", nn.silu(g) * u, idx, told)  # [N, K, 1, D] or [N*K, 1, D]
    if sort:
        y = y[inv].reshape(N, K, -1)
    else:
        y = y.squeeze(-2)
    return (y * scores[..., None]).sum(axis=-2)


def gather_mm(h, w, inds, sorted_indices=False):
    """h @ w[inds].T for unquantized stacked weights (the CPU kernel takes float32 only)."""
    if h.dtype == mx.float32 or mx.default_device() != mx.cpu:
        return mx.gather_mm(h, w.swapaxes(-1, -2), rhs_indices=inds, sorted_indices=sorted_indices)
    out = mx.gather_mm(h.astype(mx.float32), w.swapaxes(-1, -2).astype(mx.float32), rhs_indices=inds,
                       sorted_indices=sorted_indices)
    return out.astype(h.dtype)


class StackedLinear(nn.Module):
    """One projection of all experts: weight (E, out, in), or packed uint32 + scales + biases."""

    def __init__(self, num_experts, in_dim, out_dim, bits=16, group_size=64):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        if bits == 16:
            self.weight = mx.zeros((num_experts, out_dim, in_dim))
        else:
            self.weight = mx.zeros((num_experts, out_dim, in_dim * bits // 32), mx.uint32)
            self.scales = mx.zeros((num_experts, out_dim, in_dim // group_size))
            self.biases = mx.zeros((num_experts, out_dim, in_dim // group_size))

    def __call__(self, h, inds, sorted_indices=False):
        if self.bits == 16:
            return gather_mm(h, self.weight, inds, sorted_indices)
        return mx.gather_qmm(
            h, self.weight, self.scales, self.biases, rhs_indices=inds, transpose=True,
            group_size=self.group_size, bits=self.bits, sorted_indices=sorted_indices,
        )


class ResidentExperts(nn.Module):
    def __init__(self, num_experts, hidden, intermediate, bits=16, group_size=64):
        super().__init__()
        self.gate_proj = StackedLinear(num_experts, hidden, intermediate, bits, group_size)
        self.up_proj = StackedLinear(num_experts, hidden, intermediate, bits, group_size)
        self.down_proj = StackedLinear(num_experts, intermediate, hidden, bits, group_size)

    def __call__(self, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
        proj = lambda name, h, idx, s: getattr(self, name)(h, idx, s)
        return switch_glu(x, inds, proj, scores, sort=inds.size >= 64)


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


def project(h, arrays: dict, name: str, idx, bits: int, group_size: int, sorted_indices: bool = False):
    """h @ w[idx].T for one projection ``name`` of stacked expert arrays (``{name}.weight`` and, quantized,
    ``.scales``/``.biases``): resident parameters or slot arrays alike. Stored floats take the compute dtype,
    as the resident model's do at load: float32 scales must not promote a bfloat16 model's activations."""
    cast = lambda a: a if a.dtype == h.dtype else a.astype(h.dtype)
    w = arrays[f"{name}.weight"]
    if bits == 16:
        return gather_mm(h, cast(w), idx, sorted_indices)
    return mx.gather_qmm(h, w, cast(arrays[f"{name}.scales"]), cast(arrays[f"{name}.biases"]), rhs_indices=idx,
                         transpose=True, group_size=group_size, bits=bits, sorted_indices=sorted_indices)


def stacked_ffn(x, arrays: dict, inds, scores, bits: int, group_size: int):
    """The one plain-MLX expert FFN: score-weighted SwiGLU of experts ``inds`` [N, K] of stacked ``arrays``
    (per tensor (E or slots, ...)): x [N, D], scores [N, K] -> [N, D]. Rows are grouped by expert from 64 pairs."""
    proj = lambda name, h, idx, s: project(h, arrays, name, idx, bits, group_size, s)
    return switch_glu(x, inds, proj, scores, sort=inds.size >= 64)


class StackedProjection(nn.Module):
    """One projection's parameters for all experts: weight (E, out, in), or packed uint32 + scales + biases."""

    def __init__(self, num_experts, in_dim, out_dim, bits=16, group_size=64):
        super().__init__()
        if bits == 16:
            self.weight = mx.zeros((num_experts, out_dim, in_dim))
        else:
            self.weight = mx.zeros((num_experts, out_dim, in_dim * bits // 32), mx.uint32)
            self.scales = mx.zeros((num_experts, out_dim, in_dim // group_size))
            self.biases = mx.zeros((num_experts, out_dim, in_dim // group_size))


class ResidentExperts(nn.Module):
    def __init__(self, num_experts, hidden, intermediate, bits=16, group_size=64):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.gate_proj = StackedProjection(num_experts, hidden, intermediate, bits, group_size)
        self.up_proj = StackedProjection(num_experts, hidden, intermediate, bits, group_size)
        self.down_proj = StackedProjection(num_experts, intermediate, hidden, bits, group_size)

    def __call__(self, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
        arrays = {f"{p}.{k}": a for p in ("gate_proj", "up_proj", "down_proj") for k, a in getattr(self, p).items()}
        return stacked_ffn(x, arrays, inds, scores, self.bits, self.group_size)

"""GatedDeltaNet linear attention (Qwen3.5's 3-of-4 layers).

Per token and value head: S <- g*S; delta = beta*(v - S k); S <- S + delta k^T; y = S q,
with a causal depthwise conv (+SiLU) over q, k, v, l2-normalised q/k and a gated RMSNorm on y.
The recurrent state is fp32, laid out (B, Hv, Dv, Dk) as ``mx.fast.gated_delta_update`` keeps it.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..kernels.gated_delta_decode import gated_delta_decode
from .stacked import stacked

# mx.fast.gated_delta_update runs the whole sequence in one primitive (no Python loop over tokens);
# FLASH_MOE_GDN=ops selects the reference recurrence, used by tests to cross-check it.
USE_FAST = os.environ.get("FLASH_MOE_GDN", "fast") != "ops"
# A decode token on a GPU runs conv, norms, gates, recurrence and gated norm as one kernel
# (kernels/gated_delta_decode.body); FLASH_MOE_FUSED_GDN=0 keeps the composed path (to measure both).
FUSED_DECODE = os.environ.get("FLASH_MOE_FUSED_GDN", "1") != "0"


def gated_delta_ops(q, k, v, g, beta, state=None):
    """Reference recurrence. q, k (B, T, Hk, Dk); v (B, T, Hv, Dv); g, beta (B, T, Hv)."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2:]
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), mx.float32)
    if Hv != Hk:  # value head h reads key head h // (Hv // Hk)
        q = mx.repeat(q, Hv // Hk, axis=2)
        k = mx.repeat(k, Hv // Hk, axis=2)
    ys = []
    for t in range(T):
        qt, kt, vt = (a[:, t].astype(mx.float32) for a in (q, k, v))  # [B, Hv, D*]
        state = state * g[:, t, :, None, None]
        kv = (state * kt[:, :, None, :]).sum(-1)  # [B, Hv, Dv]
        delta = (vt - kv) * beta[:, t, :, None]
        state = state + delta[..., None] * kt[:, :, None, :]
        ys.append((state * qt[:, :, None, :]).sum(-1))
    return mx.stack(ys, axis=1).astype(q.dtype), state


# Decoding is bound by per-op overhead (MLX's CUDA backend: ~10-20 us an op, a few us of GPU work each), so
# the elementwise chains are compiled into single kernels and the one-token conv is a multiply-sum.
@mx.compile
def decay_and_beta(a, b, A_log, dt_bias):
    """Per-head state decay g = exp(-exp(A_log) * softplus(a + dt_bias)) in fp32, and beta = sigmoid(b)."""
    g = mx.exp(-mx.exp(A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + dt_bias))
    return g, mx.sigmoid(b)


@mx.compile
def conv_step(window, weight):
    """The causal depthwise conv + SiLU for one new token: window (B, kernel, C), weight (C, kernel, 1)."""
    y = (window.astype(mx.float32) * weight[..., 0].T.astype(mx.float32)).sum(axis=1, keepdims=True)
    return nn.silu(y.astype(window.dtype))


@mx.compile
def gated_rms_norm(y, z, weight, eps: float):
    """RMSNorm(y) * SiLU(z), the gate in fp32, the result in z's dtype."""
    normed = mx.fast.rms_norm(y, weight, eps)
    return (normed.astype(mx.float32) * nn.silu(z.astype(mx.float32))).astype(z.dtype)


def gated_delta(q, k, v, g, beta, state=None):
    if USE_FAST:
        y, state = mx.fast.gated_delta_update(q, k, v, g, beta, initial_state=state)
        return y, state
    return gated_delta_ops(q, k, v, g, beta, state)


class GatedDeltaNet(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.Hk, self.Hv = args.linear_num_key_heads, args.linear_num_value_heads
        self.Dk, self.Dv = args.linear_key_head_dim, args.linear_value_head_dim
        self.key_dim, self.value_dim = self.Hk * self.Dk, self.Hv * self.Dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = args.linear_conv_kernel_dim
        D = args.hidden_size

        self.in_proj_qkv = nn.Linear(D, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(D, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(D, self.Hv, bias=False)
        self.in_proj_a = nn.Linear(D, self.Hv, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = mx.ones((self.Hv,))
        self.A_log = mx.zeros((self.Hv,))
        self.norm = nn.RMSNorm(self.Dv, eps=args.rms_norm_eps)  # gated RMSNorm, one weight for all heads
        self.out_proj = nn.Linear(self.value_dim, D, bias=False)
        self._qk_scales = None  # not a parameter (leading underscore): built at the first call, in q's dtype

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, L, _ = x.shape
        if L == 1 and cache is not None and FUSED_DECODE and kernels.BACKEND != "ops":
            return self.decode(x, cache)
        # the four input projections as one matmul (their rows stacked)
        qkv, z, a, b = stacked(self, "_in_proj", [self.in_proj_qkv, self.in_proj_z, self.in_proj_a, self.in_proj_b])(x)
        z = z.reshape(B, L, self.Hv, self.Dv)

        conv_state = cache[0] if cache is not None else None
        if conv_state is None:
            conv_state = mx.zeros((B, self.kernel - 1, self.conv_dim), x.dtype)
        padded = mx.concatenate([conv_state, qkv], axis=1)
        if cache is not None:
            cache[0] = padded[:, -(self.kernel - 1) :]
        qkv = conv_step(padded, self.conv1d.weight) if L == 1 else nn.silu(self.conv1d(padded))  # [B, L, conv_dim]

        q, k, v = mx.split(qkv, [self.key_dim, 2 * self.key_dim], axis=-1)
        # l2norm(x) = rms_norm(x, eps/D) / sqrt(D); q also takes the 1/sqrt(Dk) readout scale: both scales
        # ride in as the norm's weight (one kernel each).
        eps = 1e-6 / self.Dk
        if self._qk_scales is None or self._qk_scales[0].dtype != q.dtype:
            self._qk_scales = (mx.full((self.Dk,), self.Dk**-1.0, q.dtype), mx.full((self.Dk,), self.Dk**-0.5, q.dtype))
        q = mx.fast.rms_norm(q.reshape(B, L, self.Hk, self.Dk), self._qk_scales[0], eps)
        k = mx.fast.rms_norm(k.reshape(B, L, self.Hk, self.Dk), self._qk_scales[1], eps)
        v = v.reshape(B, L, self.Hv, self.Dv)

        g, beta = decay_and_beta(a, b, self.A_log, self.dt_bias)
        state = cache[1] if cache is not None else None
        y, state = gated_delta(q, k, v, g, beta, state)
        if cache is not None:
            cache[1] = state
            cache.offset += L

        y = gated_rms_norm(y, z, self.norm.weight, self.norm.eps)
        return self.out_proj(y.reshape(B, L, -1))

    def decode(self, x: mx.array, cache, backend: str | None = None) -> mx.array:
        """One token (x [B, 1, D]) through ``kernels.gated_delta_decode``: the same math as ``__call__``."""
        B = x.shape[0]
        conv_state, state = cache[0], cache[1]
        if conv_state is None:
            conv_state = mx.zeros((B, self.kernel - 1, self.conv_dim), x.dtype)
        if state is None:
            state = mx.zeros((B, self.Hv, self.Dv, self.Dk), mx.float32)
        proj = stacked(self, "_in_proj", [self.in_proj_qkv, self.in_proj_z, self.in_proj_a, self.in_proj_b])
        mixed, z, a, b = (p.reshape(B, -1) for p in proj(x))
        y, cache[1], cache[0] = gated_delta_decode(
            mixed, z, a, b, conv_state, state, self.conv1d.weight.reshape(self.conv_dim, -1),
            self.A_log, self.dt_bias, self.norm.weight, heads=(self.Hk, self.Hv, self.Dk, self.Dv),
            eps=self.norm.eps, backend=backend)
        cache.offset += 1
        return self.out_proj(y[:, None])

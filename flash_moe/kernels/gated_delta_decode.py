"""GatedDeltaNet's decode step (one token) in one kernel launch: gated_delta_decode.body, and its MLX reference.

The composed decode path (flash_moe/layers/gated_delta.py) costs ~9 launches between the in_proj matmuls and
out_proj: the conv window's concatenation, the conv and its sum, two q/k norms, the gates, the recurrence and
the gated RMSNorm. Decoding is bound by launches, not bytes (the state is 4 MB a layer at the 397B shapes).
"""

from __future__ import annotations

import mlx.core as mx

from . import launch, resolve_backend

WARPS = 4
_EPS: dict[float, mx.array] = {}  # the norm's eps as a kernel input, made once (each new array is an upload)


def gated_delta_decode_ref(mixed, z, a, b, conv_state, state, conv_w, A_log, dt_bias, norm_w, *, heads, eps):
    """The kernel's math in MLX ops, float32 inside; arguments as ``gated_delta_decode``."""
    Hk, Hv, Dk, Dv = heads
    B, C = mixed.shape
    f32 = lambda t: t.astype(mx.float32)
    window = mx.concatenate([conv_state, mixed[:, None]], axis=1)  # (B, KW, C)
    conv = (f32(window) * f32(conv_w).T).sum(axis=1)
    act = conv * mx.sigmoid(conv)
    q, k, v = mx.split(act, [Hk * Dk, 2 * Hk * Dk], axis=-1)
    q, k, v = q.reshape(B, Hk, Dk), k.reshape(B, Hk, Dk), v.reshape(B, Hv, Dv)
    q = q * mx.rsqrt((q * q).sum(-1, keepdims=True) + 1e-6) * Dk**-0.5
    k = k * mx.rsqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    q, k = mx.repeat(q, Hv // Hk, axis=1), mx.repeat(k, Hv // Hk, axis=1)  # value head h reads key head h // r
    a_dt = f32(a) + f32(dt_bias)
    g = mx.exp(-mx.exp(f32(A_log)) * (mx.maximum(a_dt, 0) + mx.log(1 + mx.exp(-mx.abs(a_dt)))))
    beta = mx.sigmoid(f32(b))
    s = state * g[..., None, None]
    kv = (s * k[:, :, None, :]).sum(-1)
    delta = (v - kv) * beta[..., None]
    s = s + delta[..., None] * k[:, :, None, :]
    y = (s * q[:, :, None, :]).sum(-1)  # (B, Hv, Dv)
    y = y * mx.rsqrt((y * y).mean(-1, keepdims=True) + eps) * f32(norm_w)
    zz = f32(z).reshape(B, Hv, Dv)
    return (y * zz * mx.sigmoid(zz)).reshape(B, -1).astype(z.dtype), s, window[:, 1:]


def gated_delta_decode(mixed, z, a, b, conv_state, state, conv_w, A_log, dt_bias, norm_w, *, heads, eps: float,
                       backend: str | None = None, init_value: float | None = None):
    """One GatedDeltaNet decode token after the input projections.

    Args:
        mixed: (B, C) in_proj_qkv of the token, C = 2 Hk Dk + Hv Dv; z: (B, Hv Dv); a, b: (B, Hv).
        conv_state: (B, KW - 1, C) the conv window before the token; conv_w: (C, KW).
        state: (B, Hv, Dv, Dk) float32 recurrent state. A_log, dt_bias: (Hv,); norm_w: (Dv,).
        heads: (Hk, Hv, Dk, Dv); eps: the gated RMSNorm's.
        backend: "metal", "cuda" or "ops" (``gated_delta_decode_ref``); default ``kernels.BACKEND``.
    Returns:
        y (B, Hv Dv) in z's dtype (gated-normed, ready for out_proj), the new state, the new conv window.
    """
    Hk, Hv, Dk, Dv = heads
    B, C = mixed.shape
    kw = conv_w.shape[1]
    if C != 2 * Hk * Dk + Hv * Dv or conv_state.shape != (B, kw - 1, C) or state.shape != (B, Hv, Dv, Dk):
        raise ValueError(f"gated_delta_decode: mixed {mixed.shape}, conv_state {conv_state.shape}, state "
                         f"{state.shape} do not fit heads {heads} and a conv of {kw}")
    backend = resolve_backend(backend)
    if backend == "ops" or Dk % 32 or Hv % Hk or kw < 2:
        return gated_delta_decode_ref(mixed, z, a, b, conv_state, state, conv_w, A_log, dt_bias, norm_w,
                                      heads=heads, eps=eps)
    if conv_state.dtype != mixed.dtype:  # the kernel copies window values as they are
        conv_state = conv_state.astype(mixed.dtype)
    if state.dtype != mx.float32:
        state = state.astype(mx.float32)
    if eps not in _EPS:
        _EPS[eps] = mx.array([eps], mx.float32)
    template = {"HK": Hk, "HV": Hv, "DK": Dk, "DV": Dv, "KW": kw, "WARPS": WARPS}
    return launch(
        "gated_delta_decode",
        backend,
        {"mixed": mixed, "conv_state": conv_state, "conv_w": conv_w, "z": z, "a": a, "b": b, "A_log": A_log,
         "dt_bias": dt_bias, "norm_w": norm_w, "state": state, "eps": _EPS[eps]},
        {"y": ((B, Hv * Dv), z.dtype), "state_out": ((B, Hv, Dv, Dk), mx.float32),
         "conv_out": ((B, kw - 1, C), conv_state.dtype)},
        template,
        grid=(32 * WARPS * Hv, B, 1),
        init_value=init_value,
    )

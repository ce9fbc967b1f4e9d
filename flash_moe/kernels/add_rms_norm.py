"""The residual add and the RMSNorm that follows it as one launch: add_rms_norm.body, and its MLX reference.

A decoder layer adds a residual twice and normalises right after each add; at decode each of those is a
launch of its own (issue 20).
"""

from __future__ import annotations

import mlx.core as mx

from . import launch, resolve_backend

WARPS = 8
_EPS: dict[float, mx.array] = {}  # eps as a kernel input, made once


def add_rms_norm(x: mx.array, y: mx.array | None, w: mx.array, eps: float, *, backend: str | None = None,
                 init_value: float | None = None) -> tuple[mx.array, mx.array]:
    """(h, RMSNorm(h) * w) with h = x + y (x when y is None), in x's dtype. x, y (..., D); w (D,)."""
    if y is None:
        return x, mx.fast.rms_norm(x, w, eps)
    backend = resolve_backend(backend)
    d = x.shape[-1]
    n = x.size // d
    if backend == "ops" or n > 65535 or y.dtype != x.dtype or y.shape != x.shape:
        h = x + y
        return h, mx.fast.rms_norm(h, w, eps)
    if eps not in _EPS:
        _EPS[eps] = mx.array([eps], mx.float32)
    h, normed = launch(
        "add_rms_norm",
        backend,
        {"x": x, "y": y, "w": w, "eps": _EPS[eps]},
        {"h": (x.shape, x.dtype), "normed": (x.shape, x.dtype)},
        {"D": d, "WARPS": WARPS},
        grid=(32 * WARPS, n, 1),
        init_value=init_value,
    )
    return h, normed

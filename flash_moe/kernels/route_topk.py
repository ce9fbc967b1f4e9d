"""The MoE router's tail (softmax, top-k, renormalisation) in one launch: route_topk.body, and its MLX reference.

In MLX ops it is 7 launches a layer (cast, softmax, argpartition, gather, sum, divide, cast): at decode, where
launches are the cost (issue 20), more than the router's matmul.
"""

from __future__ import annotations

import mlx.core as mx

from . import launch, resolve_backend

WARPS = 4
MAX_K, MAX_E = 64, 4096  # K rounds of a threadgroup argmax; a token's logits in shared memory (Metal: 32 KB)


def route_topk_ref(logits: mx.array, k: int, normalize: bool = True) -> tuple[mx.array, mx.array]:
    """Softmax over the last axis in fp32, the k largest (unordered), optionally renormalised over the k;
    inds int32, scores in the logits' dtype."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    e = probs.shape[-1]
    inds = mx.argpartition(probs, kth=e - k, axis=-1)[..., e - k :]
    scores = mx.take_along_axis(probs, inds, axis=-1)
    if normalize:
        scores = scores / scores.sum(axis=-1, keepdims=True)
    return inds.astype(mx.int32), scores.astype(logits.dtype)


def route_topk(logits: mx.array, k: int, normalize: bool = True, *, backend: str | None = None,
               init_value: float | None = None) -> tuple[mx.array, mx.array]:
    """``route_topk_ref`` in one kernel where the backend has one: inds in descending order of score (the lower
    index first on ties), int32; scores in the logits' dtype. logits (..., E) -> (..., k) each."""
    e = logits.shape[-1]
    if not 1 <= k <= e:
        raise ValueError(f"route_topk: k = {k} for {e} experts")
    backend = resolve_backend(backend)
    n = logits.size // e
    if backend == "ops" or k > MAX_K or e > MAX_E or n > 65535:
        return route_topk_ref(logits, k, normalize)
    inds, scores = launch(
        "route_topk",
        backend,
        {"logits": logits if logits.ndim == 2 else logits.reshape(n, e)},
        {"inds": ((n, k), mx.int32), "scores": ((n, k), logits.dtype)},
        {"E": e, "K": k, "NORMALIZE": int(normalize), "WARPS": WARPS},
        grid=(32 * WARPS, n, 1),
        init_value=init_value,
    )
    if logits.ndim != 2:
        inds, scores = inds.reshape(*logits.shape[:-1], k), scores.reshape(*logits.shape[:-1], k)
    return inds, scores

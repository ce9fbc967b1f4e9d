"""The router tail in one kernel (kernels/route_topk) against its MLX reference and the model's route().

The reference runs everywhere; the kernel where MLX has a GPU backend
(FLASH_MOE_BACKEND=cuda python -m pytest tests/test_route_topk.py), its outputs pre-filled with NaN.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import seed_note

from flash_moe.kernels import route_topk, route_topk_ref
from flash_moe.layers.moe import route

GPU_BACKENDS = [
    pytest.param("metal", marks=[pytest.mark.metal, pytest.mark.skipif(not mx.metal.is_available(), reason="no Metal GPU")]),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not mx.cuda.is_available(), reason="no CUDA GPU")]),
]


def by_index(inds, scores):
    order = np.argsort(np.array(inds), axis=-1)
    return np.take_along_axis(np.array(inds), order, -1), np.take_along_axis(np.array(scores.astype(mx.float32)), order, -1)


@pytest.mark.parametrize("k,normalize", [(1, True), (4, True), (10, False), (16, True)])
def test_reference_is_route_in_the_logits_dtype(seed, k, normalize):
    logits = (mx.random.normal((3, 16), key=mx.random.key(seed)) * 3).astype(mx.bfloat16)
    i1, s1 = route_topk_ref(logits, k, normalize)
    i2, s2 = route(logits, k, normalize)
    assert i1.dtype == mx.int32 and s1.dtype == mx.bfloat16 and s2.dtype == mx.float32
    a, b = by_index(i1, s1), by_index(i2, s2.astype(mx.bfloat16))
    assert np.array_equal(a[0], b[0]), seed_note(seed)
    assert np.array_equal(a[1], b[1]), seed_note(seed)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("e,k", [(16, 4), (512, 4), (512, 10), (64, 64), (100, 7)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_kernel_equals_reference(seed, backend, e, k, dtype, normalize):
    rng = np.random.default_rng(seed)
    # distinct multiples of 1/32 in [-8, 8), exact in bfloat16 too: the top k is one set
    base = (rng.permutation(e).astype(np.float32) - e // 2) / 32
    logits = mx.array(np.stack([rng.permutation(base) for _ in range(3)])).astype(dtype)
    got = route_topk(logits, k, normalize, backend=backend, init_value=float("nan"))
    want = route_topk_ref(logits, k, normalize)
    assert got[0].dtype == mx.int32 and got[1].dtype == dtype
    gi, gs = by_index(*got)
    wi, ws = by_index(*want)
    assert np.array_equal(gi, wi), seed_note(seed)
    np.testing.assert_allclose(gs, ws, rtol=1e-5 if dtype == mx.float32 else 1e-2, err_msg=seed_note(seed))
    s = np.array(got[1].astype(mx.float32))
    assert (np.diff(s, axis=-1) <= 0).all(), "descending order"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kernel_leading_dims_and_ties(seed, backend):
    logits = mx.zeros((2, 3, 32), mx.bfloat16)  # all equal: the lowest indices, equal scores
    inds, scores = route_topk(logits, 4, backend=backend)
    assert inds.shape == (2, 3, 4)
    assert np.array_equal(np.array(inds), np.broadcast_to(np.arange(4), (2, 3, 4)))
    np.testing.assert_allclose(np.array(scores.astype(mx.float32)), 0.25)


def test_bad_k():
    with pytest.raises(ValueError, match="k = 5"):
        route_topk(mx.zeros((1, 4)), 5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("k,dtype", [(4, mx.bfloat16), (2, mx.float32), (1, mx.bfloat16)])
@pytest.mark.parametrize("pad", [True, False])
def test_batch1_outputs_small_enough_for_the_managed_pool(seed, backend, k, dtype, pad, monkeypatch):
    """One token's outputs of <= 8 bytes (K = 4's bfloat16 scores): padded on CUDA (kernels.output_buffer) or not,
    the same values as the reference."""
    from flash_moe import kernels

    monkeypatch.setattr(kernels, "PAD_SMALL_OUTPUTS", pad)
    rng = np.random.default_rng(seed)
    logits = mx.array(((rng.permutation(512).astype(np.float32) - 256) / 32)[None]).astype(dtype)
    inds, scores = route_topk(logits, k, backend=backend, init_value=float("nan"))
    assert inds.shape == scores.shape == (1, k) and scores.dtype == dtype
    wi, ws = by_index(*route_topk_ref(logits, k))
    gi, gs = by_index(inds, scores)
    assert np.array_equal(gi, wi), seed_note(seed)
    np.testing.assert_allclose(gs, ws, rtol=1e-5 if dtype == mx.float32 else 1e-2, err_msg=seed_note(seed))


@pytest.mark.parametrize("pad", [True, False])
def test_small_outputs_get_a_buffer_past_the_managed_pool(monkeypatch, pad):
    """kernels.launch on CUDA asks for a 16-byte flat buffer for an output of <= 8 bytes and returns its leading
    values in the shape asked for; larger outputs, other backends and FLASH_MOE_PAD_SMALL_OUTPUTS=0 keep the shape.
    The kernel is faked (no GPU here): it returns 0, 1, 2, ... in each buffer it is asked for."""
    from flash_moe import kernels

    asked = []

    def fake_build(name, input_names, output_names, backend=None):
        def run(*, output_shapes, output_dtypes, **kw):
            asked.append(list(output_shapes))
            return [mx.arange(int(np.prod(s))).astype(d).reshape(s) for s, d in zip(output_shapes, output_dtypes)]

        return run

    monkeypatch.setattr(kernels, "build", fake_build)
    monkeypatch.setattr(kernels, "PAD_SMALL_OUTPUTS", pad)
    logits = mx.zeros((1, 512), mx.bfloat16)
    inds, scores = route_topk(logits, 4, backend="cuda")  # inds 16 bytes, scores 8 bytes
    assert asked[-1] == ([(1, 4), (8,)] if pad else [(1, 4), (1, 4)])
    assert inds.shape == scores.shape == (1, 4) and scores.dtype == mx.bfloat16 and inds.dtype == mx.int32
    assert np.array_equal(np.array(scores.astype(mx.float32)), [[0, 1, 2, 3]])
    route_topk(logits, 10, backend="cuda")  # 20 bytes of scores
    assert asked[-1] == [(1, 10), (1, 10)]
    route_topk(logits.astype(mx.float32), 1, backend="cuda")  # 4 bytes each
    assert asked[-1] == ([(4,), (4,)] if pad else [(1, 1), (1, 1)])
    route_topk(logits, 4, backend="metal")  # Metal's allocator has no such pool
    assert asked[-1] == [(1, 4), (1, 4)]

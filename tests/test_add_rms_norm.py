"""The residual add fused into the RMSNorm after it (kernels/add_rms_norm), and the decoder loop that uses it.

On the CPU the loop of ``DecoderLayer.residual_step`` (the adds deferred into the norms) is checked against
the plain layer loop; on a GPU (FLASH_MOE_BACKEND=cuda python -m pytest tests/test_add_rms_norm.py) the
kernel against the separate add and ``mx.fast.rms_norm``, its outputs pre-filled with NaN.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_qwen35, seed_note

from flash_moe.kernels import add_rms_norm

GPU_BACKENDS = [
    pytest.param("metal", marks=[pytest.mark.metal, pytest.mark.skipif(not mx.metal.is_available(), reason="no Metal GPU")]),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not mx.cuda.is_available(), reason="no CUDA GPU")]),
]


def test_residual_steps_equal_the_layer_loop(seed):
    model = random_qwen35(seed)
    tokens = mx.array(np.random.default_rng(seed).integers(0, 97, (1, 6)))
    h = model.model.embed_tokens(tokens)
    want = h
    for layer in model.layers:
        want = layer(want, None)
    want = model.model.norm(want)
    delta = None
    for layer in model.layers:
        h, delta = layer.residual_step(h, delta, None)
    got = add_rms_norm(h, delta, model.model.norm.weight, model.model.norm.eps, backend="ops")[1]
    if mx.default_device() == mx.cpu:  # the same ops in the same order: bit for bit
        assert mx.array_equal(got, want).item(), seed_note(seed)
    else:  # on a GPU residual_step runs the fused add+norm kernel, which rounds its sum in another order
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item(), seed_note(seed)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n,d", [(1, 64), (3, 4096), (2, 200)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_kernel_equals_add_then_norm(seed, backend, n, d, dtype):
    rng = np.random.default_rng(seed)
    x, y = (mx.array(rng.normal(0, 1, (n, d)).astype(np.float32)).astype(dtype) for _ in range(2))
    w = mx.array(rng.normal(1, 0.1, (d,)).astype(np.float32)).astype(dtype)
    h, normed = add_rms_norm(x, y, w, 1e-6, backend=backend, init_value=float("nan"))
    assert mx.array_equal(h, x + y).item(), "the sum is stored as the separate add stores it"
    want = mx.fast.rms_norm(x + y, w, 1e-6).astype(mx.float32)
    err = float(mx.abs(normed.astype(mx.float32) - want).max() / mx.abs(want).max())
    assert err < (1e-5 if dtype == mx.float32 else 1e-2), seed_note(seed)

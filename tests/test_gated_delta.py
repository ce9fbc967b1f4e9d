"""mx.fast.gated_delta_update (the fast path) against the reference recurrence, and through the model."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import random_qwen35

from flash_moe.layers import gated_delta


@pytest.mark.parametrize("B,T,Hk,Hv,Dk,Dv", [(1, 1, 2, 4, 32, 16), (2, 9, 1, 4, 16, 32), (1, 33, 2, 2, 64, 64)])
def test_fast_equals_ops(seed, B, T, Hk, Hv, Dk, Dv):
    mx.random.seed(seed)
    q = mx.random.normal((B, T, Hk, Dk)) / Dk
    k = mx.fast.rms_norm(mx.random.normal((B, T, Hk, Dk)), None, 1e-6) * Dk**-0.5
    v = mx.random.normal((B, T, Hv, Dv))
    g = mx.random.uniform(0.05, 0.99, (B, T, Hv))
    beta = mx.random.uniform(0.0, 1.0, (B, T, Hv))
    s0 = mx.random.normal((B, Hv, Dv, Dk)) * 0.1
    y1, s1 = mx.fast.gated_delta_update(q, k, v, g, beta, initial_state=s0)
    y2, s2 = gated_delta.gated_delta_ops(q, k, v, g, beta, s0)
    for a, b, what in ((y1, y2, "y"), (s1, s2, "state")):
        err = float(mx.linalg.norm(a - b) / mx.linalg.norm(b))
        assert err < 1e-5, f"{what}: relative error {err:.2e} (seed {seed})"


def test_model_with_ops_recurrence(seed, monkeypatch):
    """The whole model gives the same logits with the reference recurrence."""
    model = random_qwen35(seed)
    tokens = mx.array(np.random.default_rng(seed).integers(0, 97, (2, 11)))
    fast = model(tokens)
    monkeypatch.setattr(gated_delta, "USE_FAST", False)
    ops = model(tokens)
    err = float(mx.linalg.norm(fast - ops) / mx.linalg.norm(ops))
    assert err < 1e-5, f"relative error {err:.2e} (seed {seed})"

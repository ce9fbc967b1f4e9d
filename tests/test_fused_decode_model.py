"""Issue 20's decode kernels through the whole model on a GPU: logits with the fused GatedDeltaNet step, router
and add+norm kernels against the same model with all three off (FLASH_MOE_BACKEND=cuda python -m pytest
tests/test_fused_decode_model.py). Skipped without a GPU: there the kernels do not run (their MLX references
are checked in test_gdn_decode.py, test_route_topk.py and test_add_rms_norm.py)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_qwen35, seed_note

from flash_moe import kernels
from flash_moe import model as model_module
from flash_moe.layers import gated_delta, moe

pytestmark = pytest.mark.skipif(kernels.BACKEND == "ops", reason="no GPU kernels on this backend")
TOL = {mx.float32: 1e-4, mx.bfloat16: 5e-2}


def set_fused(monkeypatch, on: bool):
    monkeypatch.setattr(gated_delta, "FUSED_DECODE", on)
    monkeypatch.setattr(moe, "FUSED_ROUTE", on)
    monkeypatch.setattr(model_module, "FUSED_ADD_NORM", on)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_logits_with_and_without_the_kernels(seed, dtype, monkeypatch):
    model = random_qwen35(seed, hidden=128, head_dim=32, experts=16, k=4, intermediate=64)
    model.set_dtype(dtype)
    tokens = mx.array(np.random.default_rng(seed).integers(0, 97, (1, 12)))
    runs = {}
    for on in (False, True):
        set_fused(monkeypatch, on)
        cache = model.make_cache()
        out = [model(tokens[:, :6], cache)[:, -1]]
        for i in range(6, 12):  # decode tokens: the fused GDN step applies to these
            out.append(model(tokens[:, i : i + 1], cache)[:, -1])
        runs[on] = mx.concatenate(out).astype(mx.float32)
    err = float(mx.linalg.norm(runs[True] - runs[False]) / mx.linalg.norm(runs[False]))
    assert err < TOL[dtype], f"relative error {err:.2e} ({seed_note(seed)})"

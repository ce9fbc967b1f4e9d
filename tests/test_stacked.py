"""StackedLinear: several projections of one input as one matmul, against the separate modules."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import seed_note

from flash_moe.layers.stacked import StackedLinear, stacked


def linears(seed, dims=(48, 16, 1), quantize=None):
    mx.random.seed(seed)
    mods = [nn.Linear(64, d, bias=False) for d in dims]
    if quantize:
        mods = [nn.QuantizedLinear.from_linear(m, group_size=32, bits=quantize) for m in mods]
    return mods


@pytest.mark.parametrize("quantize", [None, 4, 8])
def test_equals_separate_projections(seed, quantize):
    mods = linears(seed, quantize=quantize)
    x = mx.random.normal((2, 3, 64), key=mx.random.key(seed))
    want = [m(x) for m in mods]
    s = StackedLinear(mods)
    assert s.ok
    got = s(x)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert mx.allclose(g, w, atol=1e-5, rtol=1e-5).item(), seed_note(seed)
    # the modules now hold views of the stacked arrays, and still compute the same
    for m, w in zip(mods, want):
        assert mx.allclose(m(x), w, atol=1e-5, rtol=1e-5).item()


def test_replaced_weights_are_restacked(seed):
    mods = linears(seed)
    s = StackedLinear(mods)
    x = mx.random.normal((1, 64), key=mx.random.key(seed))
    s(x)
    mods[1].weight = mods[1].weight * 2  # e.g. model.update / load_weights after the first call
    for g, m in zip(s(x), mods):
        assert mx.allclose(g, m(x), atol=1e-5).item()


def test_unlike_modules_run_one_by_one(seed):
    mods = linears(seed, dims=(16, 8)) + linears(seed, dims=(8,), quantize=4)
    biased = [nn.Linear(64, 8, bias=True), nn.Linear(64, 8, bias=True)]
    x = mx.random.normal((1, 64), key=mx.random.key(seed))
    for group in (mods, biased):
        s = StackedLinear(group)
        assert not s.ok
        for g, m in zip(s(x), group):
            assert mx.array_equal(g, m(x)).item()


def test_kept_per_owner_and_remade_for_new_modules(seed):
    owner = nn.Module()
    a, b = linears(seed, dims=(8, 8))
    s = stacked(owner, "_p", [a, b])
    assert stacked(owner, "_p", [a, b]) is s
    c = linears(seed + 1, dims=(8,))[0]
    assert stacked(owner, "_p", [a, c]) is not s
    assert "_p" not in owner.parameters()

"""The fused GatedDeltaNet decode step (kernels/gated_delta_decode) against the composed layer path.

On the CPU the kernel's MLX reference (``backend="ops"``) is checked against the layer's composed decode
(conv_step, rms_norm, decay_and_beta, gated_delta_update, gated_rms_norm): that proves the kernel's
algebra. On a GPU (FLASH_MOE_BACKEND=cuda python -m pytest tests/test_gdn_decode.py) the kernel itself is
checked against that reference, with its outputs pre-filled with NaN, and through the layer.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import seed_note

from flash_moe.cache import ArraysCache
from flash_moe.kernels import gated_delta_decode
from flash_moe.layers.gated_delta import GatedDeltaNet
from flash_moe.model import ModelArgs

HAS_METAL = mx.metal.is_available()
HAS_CUDA = mx.cuda.is_available()
GPU_BACKENDS = [
    pytest.param("metal", marks=[pytest.mark.metal, pytest.mark.skipif(not HAS_METAL, reason="no Metal GPU")]),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")]),
]
TOL = {mx.float32: 1e-5, mx.bfloat16: 4e-2}  # bf16: the composed path rounds ~5 times
# (Hk, Hv, Dk, Dv): a small GQA-like case, equal heads, and Qwen3.5-397B's
HEADS = [(2, 4, 32, 16), (2, 2, 64, 64), (16, 64, 128, 128)]


def rel(a, b) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return float(mx.linalg.norm(a - b) / mx.linalg.norm(b))


def layer(heads, dtype, seed) -> GatedDeltaNet:
    Hk, Hv, Dk, Dv = heads
    args = ModelArgs(model_type="qwen3_5_moe_text", hidden_size=64, num_hidden_layers=4, vocab_size=97,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=32, shared_expert_intermediate_size=32, linear_num_key_heads=Hk,
                     linear_num_value_heads=Hv, linear_key_head_dim=Dk, linear_value_head_dim=Dv)
    mx.random.seed(seed)
    gdn = GatedDeltaNet(args)
    gdn.update({"A_log": mx.random.normal((Hv,)), "dt_bias": mx.random.normal((Hv,)),
                "norm": {"weight": 1 + 0.1 * mx.random.normal((Dv,))}})
    gdn.set_dtype(dtype)
    return gdn


def prefilled(gdn, dtype, seed, prompt=5) -> tuple[ArraysCache, mx.array]:
    """A cache after a composed-path prompt, and the next token's input."""
    rng = np.random.default_rng(seed)
    xs = mx.array(rng.normal(0, 1, (1, prompt + 1, 64)).astype(np.float32)).astype(dtype)
    cache = ArraysCache(2)
    gdn(xs[:, :prompt], cache)
    mx.eval(cache.state)
    return cache, xs[:, prompt:]


def composed(gdn, x, cache):
    c = ArraysCache(2)
    c.restore(cache.snapshot())
    return gdn(x, c), c  # on the CPU (kernels.BACKEND "ops") a decode token takes the composed path


def fused(gdn, x, cache, backend):
    c = ArraysCache(2)
    c.restore(cache.snapshot())
    return gdn.decode(x, c, backend=backend), c


@pytest.mark.parametrize("heads", HEADS[:2])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_reference_equals_composed_layer(seed, heads, dtype, monkeypatch):
    """The kernel's math (its MLX reference) == the layer's composed decode: output, state and conv window."""
    from flash_moe.layers import gated_delta

    monkeypatch.setattr(gated_delta, "FUSED_DECODE", False)
    gdn = layer(heads, dtype, seed)
    cache, x = prefilled(gdn, dtype, seed)
    (want, wc), (got, gc) = composed(gdn, x, cache), fused(gdn, x, cache, "ops")
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel(got, want) < TOL[dtype], seed_note(seed)
    assert rel(gc[1], wc[1]) < TOL[dtype], seed_note(seed)
    assert mx.array_equal(gc[0], wc[0]), "the conv window moves on by the token, exactly"
    assert gc.offset == wc.offset


def test_reference_without_a_prompt(seed, monkeypatch):
    """A first token with an empty cache: zero conv window and state, as the composed path assumes."""
    from flash_moe.layers import gated_delta

    gdn = layer(HEADS[0], mx.float32, seed)
    x = mx.array(np.random.default_rng(seed).normal(0, 1, (1, 1, 64)).astype(np.float32))
    monkeypatch.setattr(gated_delta, "FUSED_DECODE", False)
    want = gdn(x, ArraysCache(2))
    got = gdn.decode(x, ArraysCache(2), backend="ops")
    assert rel(got, want) < 1e-5, seed_note(seed)


def random_inputs(rng, B, heads, kw, dtype):
    Hk, Hv, Dk, Dv = heads
    C = 2 * Hk * Dk + Hv * Dv
    a = lambda *shape, s=1.0: mx.array(rng.normal(0, s, shape).astype(np.float32)).astype(dtype)
    return dict(mixed=a(B, C), z=a(B, Hv * Dv), a=a(B, Hv), b=a(B, Hv), conv_state=a(B, kw - 1, C),
                state=mx.array(rng.normal(0, 0.1, (B, Hv, Dv, Dk)).astype(np.float32)), conv_w=a(C, kw, s=0.5),
                A_log=a(Hv), dt_bias=a(Hv), norm_w=a(Dv, s=0.1) + 1)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_kernel_equals_reference(seed, backend, heads, dtype, batch):
    rng = np.random.default_rng(seed)
    inputs = random_inputs(rng, batch, heads, 4, dtype)
    want = gated_delta_decode(**inputs, heads=heads, eps=1e-6, backend="ops")
    got = gated_delta_decode(**inputs, heads=heads, eps=1e-6, backend=backend, init_value=float("nan"))
    for name, g, w in zip(("y", "state", "conv window"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert not mx.isnan(g).any().item(), f"{name}: elements no thread wrote"
        assert rel(g, w) < TOL[dtype], f"{name}: relative error {rel(g, w):.2e} ({seed_note(seed)})"
    assert mx.array_equal(got[2], want[2])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_kernel_through_the_layer(seed, backend, dtype, monkeypatch):
    """Several decode tokens in a row: fused kernel vs the composed path, output and carried state."""
    from flash_moe.layers import gated_delta

    gdn = layer(HEADS[0], dtype, seed)
    cache, x = prefilled(gdn, dtype, seed)
    c1, c2 = ArraysCache(2), ArraysCache(2)
    c1.restore(cache.snapshot())
    c2.restore(cache.snapshot())
    rng = np.random.default_rng(seed + 1)
    for _ in range(4):
        monkeypatch.setattr(gated_delta, "FUSED_DECODE", False)
        want = gdn(x, c1)
        got = gdn.decode(x, c2, backend=backend)
        assert rel(got, want) < TOL[dtype], seed_note(seed)
        assert rel(c2[1], c1[1]) < TOL[dtype], seed_note(seed)
        x = mx.array(rng.normal(0, 1, (1, 1, 64)).astype(np.float32)).astype(dtype)

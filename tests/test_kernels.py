"""flash_moe.kernels against a float64 NumPy reference that unpacks the words itself.

The same tests run the "ops" fallback everywhere and the GPU kernels where MLX has that
backend (FLASH_MOE_BACKEND=cuda python -m pytest tests/test_kernels.py on the GPU machine).
Kernel outputs are pre-filled with NaN, so an element no thread writes fails the test.
Without a GPU, the kernel sources are still compiled: Metal through clang with
tests/metal_stub.h, CUDA through nvcc, when those compilers are installed.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import seed_note

from flash_moe import kernels
from flash_moe.kernels import dequant_matvec, expert_ffn, kernel_source

NAN = float("nan")
TOL = {mx.float32: 1e-5, mx.bfloat16: 1e-2, mx.float16: 1e-2}
HAS_METAL = mx.metal.is_available()
HAS_CUDA = mx.cuda.is_available()
BACKEND_PARAMS = [
    "ops",
    pytest.param("metal", marks=[pytest.mark.metal, pytest.mark.skipif(not HAS_METAL, reason="no Metal GPU")]),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")]),
]


# ---------------------------------------------------------------- float64 reference


def unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """q values of packed rows: (..., n * bits / 32) uint32 -> (..., n), LSB-first bit stream."""
    stream = np.unpackbits(words.astype("<u4").view(np.uint8), axis=-1, bitorder="little")
    stream = stream.reshape(*words.shape[:-1], -1, bits).astype(np.int64)
    return (stream << np.arange(bits)).sum(-1)


def dequantize64(words, scales, biases, bits, group_size) -> np.ndarray:
    q = unpack(words, bits).astype(np.float64)
    q = q.reshape(*q.shape[:-1], -1, group_size)
    return (q * scales[..., None] + biases[..., None]).reshape(*words.shape[:-1], -1)


def to64(a: mx.array) -> np.ndarray:
    """Exact float64 copy of an MLX array (bfloat16 read bit for bit)."""
    if a.dtype == mx.bfloat16:
        return (np.array(a.view(mx.uint16)).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.array(a).astype(np.float64)


def random_matrix(rng, lead, out_dim, in_dim, bits, group_size, dtype):
    """Random packed words and signed scales: (mx arrays, float64 dequantized matrix)."""
    if bits == 16:
        w = mx.array(rng.normal(0, in_dim**-0.5, (*lead, out_dim, in_dim)).astype(np.float32)).astype(dtype)
        return {"weight": w}, to64(w)
    words = rng.integers(0, 2**32, (*lead, out_dim, in_dim * bits // 32), dtype=np.uint32)
    groups = (*lead, out_dim, in_dim // group_size)
    scales = rng.normal(0, 2.0 / 2**bits, groups) * in_dim**-0.5  # both signs
    biases = -scales * (2**bits - 1) / 2 + rng.normal(0, 0.1 * in_dim**-0.5, groups)
    arrays = {
        "weight": mx.array(words),
        "scales": mx.array(scales.astype(np.float32)).astype(dtype),
        "biases": mx.array(biases.astype(np.float32)).astype(dtype),
    }
    return arrays, dequantize64(words, to64(arrays["scales"]), to64(arrays["biases"]), bits, group_size)


def random_slots(rng, s, d, i, bits, group_size, dtype):
    slots, dense = {}, {}
    for proj, (out_dim, in_dim) in {"gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}.items():
        arrays, dense[proj] = random_matrix(rng, (s,), out_dim, in_dim, bits, group_size, dtype)
        slots.update({f"{proj}.{kind}": a for kind, a in arrays.items()})
    return slots, dense


def expert_ffn64(x, dense, inds, scores):
    gate = np.einsum("nkoi,ni->nko", dense["gate_proj"][inds], x)
    up = np.einsum("nkoi,ni->nko", dense["up_proj"][inds], x)
    h = gate / (1 + np.exp(-gate)) * up
    y = np.einsum("nkdi,nki->nkd", dense["down_proj"][inds], h)
    return (y * scores[..., None]).sum(1)


def rel_err(out: mx.array, ref: np.ndarray) -> float:
    out = to64(out)
    if not np.isfinite(out).all():
        return math.inf  # NaN poison left somewhere, or an overflow
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# ---------------------------------------------------------------- the reference reads MLX's format


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_numpy_unpacking_matches_mx_dequantize(bits, seed):
    rng = np.random.default_rng(seed)
    w = mx.array(rng.normal(0, 1, (16, 256)).astype(np.float32))
    q, s, b = mx.quantize(w, group_size=64, bits=bits)
    ours = dequantize64(np.array(q), to64(s), to64(b), bits, 64)
    theirs = to64(mx.dequantize(q, s, b, group_size=64, bits=bits))
    assert np.abs(ours - theirs).max() <= 1e-6 * np.abs(theirs).max(), seed_note(seed)


# ---------------------------------------------------------------- expert_ffn

# (bits, group_size, K, N, dtype, D, I, max_tile, shared_bytes): small tile / shared budget
# force partial tiles and experts staged a few at a time (KB < K) on the GPU.
FFN_CASES = [
    *[(bits, 64, 4, 3, mx.float32, 256, 128, None, None) for bits in (2, 3, 4, 5, 6, 8)],
    (4, 64, 1, 1, mx.float32, 256, 128, None, None),
    (4, 64, 10, 5, mx.float32, 256, 128, None, None),
    (4, 32, 4, 2, mx.float32, 256, 128, None, None),
    (4, 128, 4, 2, mx.float32, 256, 128, None, None),
    (4, 64, 10, 1, mx.bfloat16, 256, 128, None, None),
    (2, 64, 4, 2, mx.bfloat16, 256, 128, None, None),
    (4, 64, 4, 2, mx.float16, 256, 128, None, None),
    (3, 64, 10, 2, mx.float32, 256, 192, 128, 3 * 528),
]


def _case_id(case):
    bits, gs, k, n, dtype, d, i, tile, shared = case
    name = f"b{bits}-g{gs}-K{k}-N{n}-{str(dtype).split('.')[-1]}-D{d}-I{i}"
    return name + (f"-tile{tile}-shared{shared}" if tile else "")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("case", FFN_CASES, ids=_case_id)
def test_expert_ffn(case, backend, seed, monkeypatch):
    bits, gs, k, n, dtype, d, i, tile, shared = case
    if tile:
        monkeypatch.setattr(kernels, "MAX_TILE", tile)
        monkeypatch.setitem(kernels.SHARED_BYTES, "metal", shared)
        monkeypatch.setitem(kernels.SHARED_BYTES, "cuda", shared)
    rng = np.random.default_rng(seed)
    s = 12
    slots, dense = random_slots(rng, s, d, i, bits, gs, dtype)
    x = mx.array(rng.normal(0, 1, (n, d)).astype(np.float32)).astype(dtype)
    inds = np.stack([rng.choice(s, k, replace=False) for _ in range(n)]).astype(np.int32)
    scores = rng.random((n, k)) + 0.05
    scores /= scores.sum(1, keepdims=True)
    scores_mx = mx.array(scores.astype(np.float32)).astype(dtype)

    out = expert_ffn(x, slots, mx.array(inds), scores_mx, bits=bits, group_size=gs, backend=backend, init_value=NAN)
    ref = expert_ffn64(to64(x), dense, inds, to64(scores_mx))
    assert out.shape == (n, d) and out.dtype == dtype
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{backend} {_case_id(case)}: relative error {err:.3g} " + seed_note(seed)


# (split, groups, K, D, tile): gate/up input split and down expert groups (issue 20), batch 1; a split with
# partial tiles, and more groups than pairs of experts.
SHAPE_CASES = [(1, 1, 4, 256, None), (2, 1, 4, 256, None), (4, 2, 4, 256, None), (2, 4, 10, 256, None),
               (4, 3, 10, 512, 96), (8, 8, 3, 256, None)]


@pytest.mark.parametrize("backend", BACKEND_PARAMS[1:])
@pytest.mark.parametrize("shape", SHAPE_CASES, ids=lambda c: "split{}-groups{}-K{}-D{}-tile{}".format(*c))
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_expert_ffn_launch_shapes(shape, dtype, backend, seed, monkeypatch):
    split, groups, k, d, tile = shape
    monkeypatch.setattr(kernels, "GATE_UP_SPLIT", split)
    monkeypatch.setattr(kernels, "DOWN_GROUPS", groups)
    if tile:
        monkeypatch.setattr(kernels, "MAX_TILE", tile)
    from flash_moe.kernels.expert_ffn import launch_shape

    assert launch_shape(1, k, d)[0] == split and launch_shape(2, k, d) == (1, 1)
    rng = np.random.default_rng(seed)
    slots, dense = random_slots(rng, 12, d, 128, 4, 64, dtype)
    x = mx.array(rng.normal(0, 1, (1, d)).astype(np.float32)).astype(dtype)
    inds = rng.choice(12, k, replace=False).astype(np.int32)[None]
    scores = mx.array((rng.random((1, k)) + 0.05).astype(np.float32)).astype(dtype)
    out = expert_ffn(x, slots, mx.array(inds), scores, bits=4, group_size=64, backend=backend, init_value=NAN)
    err = rel_err(out, expert_ffn64(to64(x), dense, inds, to64(scores)))
    assert err <= TOL[dtype], f"{backend} split {split} groups {groups}: relative error {err:.3g} " + seed_note(seed)


def test_launch_shape_choice(monkeypatch):
    """The new shapes apply at batch 1 only, and only where they divide the work."""
    from flash_moe.kernels.expert_ffn import launch_shape

    monkeypatch.setattr(kernels, "GATE_UP_SPLIT", 4)
    monkeypatch.setattr(kernels, "DOWN_GROUPS", 8)
    assert launch_shape(1, 10, 4096) == (4, 5)  # 10 experts: 5 pairs, so at most 5 groups
    assert launch_shape(1, 4, 4096) == (4, 2)
    assert launch_shape(1, 4, 96) == (1, 2)  # 96 is not a multiple of 4 * 32
    assert launch_shape(3, 10, 4096) == (1, 1)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_expert_ffn_unquantized_and_leading_dims(dtype, seed):
    """bits 16 (the ops path on every backend) and x of shape (B, L, D)."""
    rng = np.random.default_rng(seed)
    slots, dense = random_slots(rng, 6, 64, 32, 16, 64, dtype)
    x = mx.array(rng.normal(0, 1, (2, 3, 64)).astype(np.float32)).astype(dtype)
    inds = rng.integers(0, 6, (2, 3, 2)).astype(np.int32)
    scores = rng.random((2, 3, 2)).astype(np.float32)
    out = expert_ffn(x, slots, mx.array(inds), mx.array(scores), bits=16, group_size=64)
    ref = expert_ffn64(to64(x).reshape(6, 64), dense, inds.reshape(6, 2), scores.reshape(6, 2))
    assert out.shape == (2, 3, 64)
    assert rel_err(out.reshape(6, 64), ref) <= TOL[dtype], seed_note(seed)


def test_expert_ffn_rejects_bad_slots(seed):
    rng = np.random.default_rng(seed)
    slots, _ = random_slots(rng, 4, 128, 64, 4, 64, mx.float32)
    x, inds, scores = mx.ones((1, 128)), mx.zeros((1, 2), mx.int32), mx.ones((1, 2))
    with pytest.raises(KeyError, match="down_proj.biases"):
        expert_ffn(x, {k: v for k, v in slots.items() if k != "down_proj.biases"}, inds, scores, bits=4, group_size=64)
    with pytest.raises(ValueError, match="gate_proj.weight"):
        expert_ffn(x, slots, inds, scores, bits=2, group_size=64)
    with pytest.raises(ValueError, match="disagree"):
        expert_ffn(x, slots, mx.zeros((1, 3), mx.int32), scores, bits=4, group_size=64)


# ---------------------------------------------------------------- dequant_matvec

# (bits, group_size, N, dtype, in_dim, out_dim, max_tile); out 50 leaves a partial row block.
MATVEC_CASES = [
    *[(bits, 64, 2, mx.float32, 256, 50, None) for bits in (2, 3, 4, 5, 6, 8)],
    (4, 64, 1, mx.bfloat16, 512, 96, None),
    (4, 32, 3, mx.float16, 256, 64, None),
    (3, 64, 2, mx.float32, 256, 40, 96),
]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("case", MATVEC_CASES, ids=lambda c: f"b{c[0]}-g{c[1]}-N{c[2]}-{c[3]}-{c[4]}x{c[5]}-t{c[6]}")
def test_dequant_matvec(case, backend, seed, monkeypatch):
    bits, gs, n, dtype, in_dim, out_dim, tile = case
    if tile:
        monkeypatch.setattr(kernels, "MAX_TILE", tile)
    rng = np.random.default_rng(seed)
    arrays, dense = random_matrix(rng, (), out_dim, in_dim, bits, gs, dtype)
    x = mx.array(rng.normal(0, 1, (n, in_dim)).astype(np.float32)).astype(dtype)
    out = dequant_matvec(
        x, arrays["weight"], arrays["scales"], arrays["biases"], bits=bits, group_size=gs, backend=backend, init_value=NAN
    )
    assert out.shape == (n, out_dim) and out.dtype == dtype
    err = rel_err(out, to64(x) @ dense.T)
    assert err <= TOL[dtype], f"{backend} {case}: relative error {err:.3g} " + seed_note(seed)


@pytest.mark.parametrize("backend", BACKEND_PARAMS[1:])
def test_poison_shows_unwritten_outputs(backend, seed):
    """A launch over half the rows leaves NaN in the rest: the poison in these tests works."""
    rng = np.random.default_rng(seed)
    arrays, _ = random_matrix(rng, (), 64, 128, 4, 64, mx.float32)
    x = mx.array(rng.normal(0, 1, (1, 128)).astype(np.float32))
    template = kernels.matvec_template("poison", 128, 64, 4, 64)
    rows_per_block = template["WARPS"] * template["ROWS"]
    (out,) = kernels.launch(
        "dequant_matvec",
        backend,
        {"x": x, "w": arrays["weight"], "scales": arrays["scales"], "biases": arrays["biases"]},
        {"out": ((1, 64), mx.float32)},
        template,
        grid=(32 * template["WARPS"] * (32 // rows_per_block), 1, 1),
        init_value=NAN,
    )
    out = np.array(out)
    assert np.isfinite(out[0, :32]).all() and np.isnan(out[0, 32:]).all(), seed_note(seed)


# ---------------------------------------------------------------- the sources compile

T = {mx.float32: ("float", "float"), mx.bfloat16: ("bfloat16_t", "__nv_bfloat16"), mx.int32: ("int32_t", "int32_t")}
T[mx.uint32] = ("uint32_t", "uint32_t")
T[mx.float16] = ("float16_t", "__half")
T[mx.int64] = ("int64_t", "int64_t")
GATE_UP = dict(BITS=3, GROUP_SIZE=64, IN_DIM=4096, OUT_DIM=1024, ROWS=4, WARPS=4, TILE=4096, K=10, SPLIT=1)
DOWN = GATE_UP | dict(BITS=4, IN_DIM=1024, OUT_DIM=4096, TILE=1024, KB=7, WARPS=8, ROWS=8, GU_SPLIT=1, ES=1)
# kernel -> (inputs, outputs, template): the Qwen3.5-397B shapes, bf16 activations.
SOURCE_CASES = {
    "expert_gate_up": (
        {"x": mx.bfloat16, "inds": mx.int32}
        | {f"{p}_{t}": mx.uint32 if t == "w" else mx.bfloat16 for p in ("gate", "up") for t in "wsb"},
        {"h": mx.float32},
        GATE_UP,
    ),
    "expert_down": (
        {"h": mx.float32, "inds": mx.int32, "scores": mx.float32, "down_w": mx.uint32}
        | {"down_s": mx.bfloat16, "down_b": mx.bfloat16},
        {"y": mx.bfloat16},
        DOWN,
    ),
    "dequant_matvec": (
        {"x": mx.float16, "w": mx.uint32, "scales": mx.float16, "biases": mx.float16},
        {"out": mx.float16},
        dict(BITS=2, GROUP_SIZE=32, IN_DIM=8192, OUT_DIM=100, ROWS=4, WARPS=4, TILE=4096),
    ),
    "gated_delta_decode": (
        {n: mx.bfloat16 for n in ("mixed", "conv_state", "conv_w", "z", "a", "b")}
        | {"A_log": mx.float32, "dt_bias": mx.bfloat16, "norm_w": mx.bfloat16, "state": mx.float32, "eps": mx.float32},
        {"y": mx.bfloat16, "state_out": mx.float32, "conv_out": mx.bfloat16},
        dict(HK=16, HV=64, DK=128, DV=128, KW=4, WARPS=4),
    ),
}
SOURCE_CASES["add_rms_norm"] = ({"x": mx.bfloat16, "y": mx.bfloat16, "w": mx.bfloat16, "eps": mx.float32},
                                {"h": mx.bfloat16, "normed": mx.bfloat16}, dict(D=4096, WARPS=8))
SOURCE_CASES["route_topk"] = ({"logits": mx.bfloat16}, {"inds": mx.int32, "scores": mx.bfloat16},
                              dict(E=512, K=10, NORMALIZE=1, WARPS=4))
SOURCE_CASES["expert_gate_up@split"] = (SOURCE_CASES["expert_gate_up"][0], {"h": mx.float32},
                                        GATE_UP | dict(BITS=4, SPLIT=4, TILE=1024))
SOURCE_CASES["expert_down@groups"] = (SOURCE_CASES["expert_down"][0], {"y": mx.bfloat16},
                                      DOWN | dict(WARPS=16, ROWS=4, GU_SPLIT=4, ES=4, KB=10))
# CUDA only (pinned host memory): the slot set of flash_moe/cuda_host.py at the 397B layout.
SLOT_PULL = (
    {"meta": mx.int64},
    {f"t{i}": mx.uint32 if i % 3 == 0 else mx.bfloat16 for i in range(9)},
    dict(COUNT=10, WARPS=8, NTHREADS=65536),
)
SLOT_SCATTER = (
    {"meta": mx.int64, "pos": mx.int32} | {f"c{i}": mx.uint32 if i % 3 == 0 else mx.bfloat16 for i in range(9)},
    {"done": mx.int32},
    dict(COUNT=32, WARPS=8, NTHREADS=65536),
)
# Metal's thread attributes, added to the signature when the body names them (as MLX does).
METAL_ATTRIBUTES = {
    "threadgroup_position_in_grid": "uint3",
    "thread_index_in_threadgroup": "uint",
    "thread_index_in_simdgroup": "uint",
    "simdgroup_index_in_threadgroup": "uint",
}


def metal_translation_unit() -> str:
    """Every kernel as MLX's metal_kernel would emit it (kernel signature, template, instantiation)."""
    parts = [kernel_source("expert_down", "metal")[0]]
    for key, (inputs, outputs, template) in SOURCE_CASES.items():
        name = key.split("@")[0]
        body = kernel_source(name, "metal")[1]
        fn = f"custom_kernel_{key.replace('@', '_')}"
        params = [f"const device {T[d][0]}* {n} [[buffer({i})]]" for i, (n, d) in enumerate(inputs.items())]
        params += [f"device {T[d][0]}* {n} [[buffer({len(inputs) + i})]]" for i, (n, d) in enumerate(outputs.items())]
        params += [f"{t} {a} [[{a}]]" for a, t in METAL_ATTRIBUTES.items() if a in body]
        args = ", ".join(str(v) for v in template.values())
        # MLX's instantiation also carries [[host_name(...)]] [[kernel]], which clang rejects there.
        parts += [
            f'#line 1 "{fn} signature"',
            "template <" + ", ".join(f"int {k}" for k in template) + ">",
            f"[[kernel]] void {fn}(\n  " + ",\n  ".join(params) + ") {\n" + body + "}",
            f'#line 1 "{fn} instantiation"',
            f"template decltype({fn}<{args}>) {fn}<{args}>;",
        ]
    return "\n".join(parts) + "\n"


def cuda_translation_unit() -> str:
    """Every kernel as MLX's cuda_kernel would emit it, with NVRTC's implicit headers spelled out."""
    parts = ["#include <cstdint>", "#include <cuda_bf16.h>", "#include <cuda_fp16.h>"]
    parts += [kernel_source("expert_down", "cuda")[0], "namespace mlx::core::cu {"]
    for key, (inputs, outputs, template) in (SOURCE_CASES | {"slot_pull": SLOT_PULL, "slot_scatter": SLOT_SCATTER}).items():
        name = key.split("@")[0]
        params = [f"const {T[d][1]}* {n}" for n, d in inputs.items()] + [f"{T[d][1]}* {n}" for n, d in outputs.items()]
        consts = "".join(f"  constexpr int {k} = {v};\n" for k, v in template.items())
        parts.append(f"__global__ void {key.replace('@', '_')}(" + ", ".join(params) + ") {\n" + consts
                     + kernel_source(name, "cuda")[1] + "}")
    return "\n".join(parts + ["}  // namespace mlx::core::cu"]) + "\n"


def test_metal_source_parses(tmp_path):
    clang = shutil.which("clang++") or shutil.which("clang")
    if clang is None:
        pytest.skip("clang is not installed (apt-get install clang): Metal syntax not checked")
    src = tmp_path / "kernels.metal.cpp"
    src.write_text(metal_translation_unit())
    stub = Path(__file__).with_name("metal_stub.h")
    cmd = [clang, "-fsyntax-only", "-x", "c++", "-std=c++17", "-Wall", "-Wno-unknown-attributes"]
    cmd += ["-Wno-unused-variable", "-Wno-sign-compare", "-Werror", "-include", str(stub), str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"


def test_cuda_source_compiles(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed: CUDA source not compiled here")
    src = tmp_path / "kernels.cu"
    src.write_text(cuda_translation_unit())
    cmd = [nvcc, "-std=c++17", "-arch=sm_90", "-c", "-Xptxas", "-v", str(src), "-o", str(tmp_path / "kernels.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    # Register arrays indexed at run time would land in local memory: a slow kernel.
    spills = [line for line in result.stderr.splitlines() if "spill" in line and "0 bytes spill stores" not in line]
    assert not spills, result.stderr


# ---------------------------------------------------------------- pinned slot buffers (CUDA)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("upload", ["mapped", "copy"])
def test_pinned_slot_buffers(upload, seed):
    """Bytes written into the pinned host views come out of compute_arrays, and expert_ffn runs on them."""
    from flash_moe.cuda_host import PinnedSlotBuffers
    from flash_moe.layout import ExpertLayout

    layout = ExpertLayout(hidden=256, intermediate=128, bits=4, group_size=64, dtype="bfloat16")
    rng = np.random.default_rng(seed)
    buffers = PinnedSlotBuffers(layout, capacity=6, num_sets=2, upload=upload)
    try:
        for index in range(2):
            slots, dense = random_slots(rng, 6, 256, 128, 4, 64, mx.bfloat16)
            assert buffers.host_views(index)["gate_proj.weight"].ctypes.data % 4096 == 0  # O_DIRECT destinations
            for name, view in buffers.host_views(index).items():
                source = slots[name].view(mx.uint16) if slots[name].dtype == mx.bfloat16 else slots[name]
                view[...] = np.array(source)
            count = 4
            arrays = buffers.compute_arrays(index, count)
            for name, a in arrays.items():
                got = np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)[:count]
                want = buffers.host_views(index)[name][:count]
                assert np.array_equal(got, want), f"{upload} set {index} {name} " + seed_note(seed)
            x = mx.array(rng.normal(0, 1, (2, 256)).astype(np.float32))
            inds = np.stack([rng.choice(count, 3, replace=False) for _ in range(2)]).astype(np.int32)
            scores = rng.random((2, 3)).astype(np.float32)
            out = expert_ffn(x, arrays, mx.array(inds), mx.array(scores), bits=4, group_size=64, init_value=NAN)
            err = rel_err(out, expert_ffn64(to64(x), dense, inds, scores))
            assert err <= 1e-5, f"{upload} set {index}: relative error {err:.3g} " + seed_note(seed)
    finally:
        mx.synchronize()
        buffers.close()

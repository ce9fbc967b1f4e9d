"""One quantized matrix times a few vectors: dequant_matvec.body, and its MLX reference."""

from __future__ import annotations

import mlx.core as mx

from . import launch, matvec_template, resolve_backend


def dequant_matvec_ref(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *, bits: int, group_size: int
) -> mx.array:
    """dequantize(w) @ x in MLX ops (float32 inside)."""
    y = mx.quantized_matmul(
        x.astype(mx.float32), w, scales, biases, transpose=True, group_size=group_size, bits=bits
    )
    return y.astype(x.dtype)


def dequant_matvec(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    bits: int,
    group_size: int,
    backend: str | None = None,
    init_value: float | None = None,
) -> mx.array:
    """x (..., in) -> (..., out) through an affine-quantized (out, in) matrix.

    Args:
        x: activations, float32 / bfloat16 / float16.
        w, scales, biases: as ``mx.quantize`` returns them: (out, in * bits / 32) uint32 and
            (out, in / group_size).
        backend: "metal", "cuda" or "ops"; default ``kernels.BACKEND``.
        init_value: pre-fill the kernel's output with this (tests pass NaN).
    """
    in_dim = x.shape[-1]
    out_dim = w.shape[0]
    if w.shape != (out_dim, in_dim * bits // 32) or scales.shape != (out_dim, in_dim // group_size):
        raise ValueError(
            f"dequant_matvec: w {w.shape} / scales {scales.shape} do not fit x {x.shape} "
            f"at {bits} bits, group size {group_size}"
        )
    if scales.shape != biases.shape:
        raise ValueError(f"dequant_matvec: scales {scales.shape} and biases {biases.shape} differ")
    backend = resolve_backend(backend)
    if backend == "ops":
        return dequant_matvec_ref(x, w, scales, biases, bits=bits, group_size=group_size)

    shape = x.shape
    x = x.reshape(-1, in_dim)
    template = matvec_template("dequant_matvec", in_dim, out_dim, bits, group_size)
    block = template["WARPS"] * template["ROWS"]
    step = 65535  # CUDA's limit on blocks along y
    parts = []
    for a in range(0, x.shape[0], step):
        xa = x[a : a + step]
        (y,) = launch(
            "dequant_matvec",
            backend,
            {"x": xa, "w": w, "scales": scales, "biases": biases},
            {"out": ((xa.shape[0], out_dim), xa.dtype)},
            template,
            grid=(32 * template["WARPS"] * -(-out_dim // block), xa.shape[0], 1),
            init_value=init_value,
        )
        parts.append(y)
    y = parts[0] if len(parts) == 1 else mx.concatenate(parts)
    return y.reshape(*shape[:-1], out_dim)

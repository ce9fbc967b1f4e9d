"""GPU kernels for the routed experts, and the one place that picks a backend.

``BACKEND`` is ``$FLASH_MOE_BACKEND`` when set ("metal", "cuda" or "ops"), else the GPU
that MLX has, else "ops" (pure MLX ops: the reference and the CPU path).

Kernel sources are files beside this module: one body per op (``<op>.body``), written
once against a small dialect (``metal.h`` / ``cuda.h``: types, address spaces, barriers,
SIMD sums) plus shared helpers (``quant.h``). ``build`` glues dialect, helpers and body
and hands them to ``mx.fast.metal_kernel`` or ``mx.fast.cuda_kernel``, so a CUDA run
exercises the same code the Metal build compiles.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import mlx.core as mx

from ..layout import QUANT_BITS

BACKENDS = ("metal", "cuda", "ops")
SOURCE_DIR = Path(__file__).parent


def _default_backend() -> str:
    forced = os.environ.get("FLASH_MOE_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FLASH_MOE_BACKEND={forced!r}: expected one of {BACKENDS}")
        return forced
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "ops"


BACKEND = _default_backend()


def resolve_backend(backend: str | None) -> str:
    backend = backend or BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {BACKENDS}")
    return backend


QUANTIZED = {"expert_gate_up", "expert_down", "dequant_matvec"}  # the kernels that use quant.h


def _read(name: str) -> str:
    # #line makes compiler errors name the file and line they come from.
    return f'#line 1 "{name}"\n' + (SOURCE_DIR / name).read_text() + "\n"


def kernel_source(name: str, backend: str) -> tuple[str, str]:
    """(header, body) of kernel ``name`` in ``backend``'s dialect, as ``build`` compiles them."""
    if backend not in ("metal", "cuda"):
        raise ValueError(f"kernel {name!r}: no kernel source for backend {backend!r}")
    # MLX hashes a custom kernel's source at each evaluation: kernels that dequantize nothing skip quant.h.
    header = _read(f"{backend}.h") + (_read("quant.h") if name in QUANTIZED else "")
    # The prologue names the thread indices; MLX adds Metal's index attributes to the
    # signature only when their names appear in the body, so it must be part of it.
    body = _read(f"{backend}_prologue.h") + _read(f"{name}.body")
    return header, body


@functools.lru_cache(maxsize=None)
def build(name: str, input_names: tuple[str, ...], output_names: tuple[str, ...], backend: str | None = None):
    """The compiled-on-first-use kernel ``name`` (``<name>.body``) for ``backend``."""
    backend = resolve_backend(backend)
    header, body = kernel_source(name, backend)
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    return make(
        name=f"flash_moe_{name}",
        input_names=list(input_names),
        output_names=list(output_names),
        source=body,
        header=header,
    )


KERNEL_BITS = QUANT_BITS  # the kernels decode every stored width (one table: layout.py)
WARPS = 4  # warps of 32 threads per threadgroup
ROWS = 4  # output rows per warp (halved until it divides the output dimension)
MAX_TILE = 4096  # values of x staged in shared memory at once (16.5 KB)
SHARED_BYTES = {"metal": 32 * 1024, "cuda": 48 * 1024}  # static shared-memory limits
# Expert launch shapes at batch 1 (issue 20, docs/kernels.md): gate/up's input dimension cut over this many
# threadgroups, and the down kernel's warps in this many expert groups; 1 and 1 is the shape measured before.
GATE_UP_SPLIT = int(os.environ.get("FLASH_MOE_GATE_UP_SPLIT", "1"))
DOWN_GROUPS = int(os.environ.get("FLASH_MOE_DOWN_GROUPS", "1"))
# MLX's CUDA allocator serves every buffer of <= 8 bytes from one small pool of *managed* memory that the host
# shares (mlx/backend/cuda/allocator.cpp, small_block_size): the sampled token and its normaliser, which the host
# reads with .item() each token, live there. A kernel output that small (at batch 1, K = 4's bfloat16 router scores)
# is then written and read by the GPU in pages the host keeps touching: over PCIe, or faulted back while the host
# reads a neighbour (docs/benchmarks.md, "Why K=4 decodes slower than K=10"). ``launch`` gives such outputs a 16-byte
# buffer on CUDA when FLASH_MOE_PAD_SMALL_OUTPUTS=1. Off by default until a CUDA run has checked its logits and
# measured it against the exact sizes (benchmarks/gpu_suite.sh pool_* steps): a hypothesis, not yet a measurement.
CUDA_MANAGED_POOL_BYTES = 8
PAD_SMALL_OUTPUTS = os.environ.get("FLASH_MOE_PAD_SMALL_OUTPUTS", "0") == "1"


def output_buffer(shape: tuple[int, ...], dtype: mx.Dtype, backend: str) -> tuple[int, ...]:
    """The shape a kernel output is allocated with: ``shape``, or on CUDA a flat 16-byte buffer when ``shape`` would
    fall in the managed pool (the kernels index their outputs flat, so its leading values are the output)."""
    if backend != "cuda" or not PAD_SMALL_OUTPUTS or math.prod(shape) * dtype.size > CUDA_MANAGED_POOL_BYTES:
        return tuple(shape)
    return (2 * CUDA_MANAGED_POOL_BYTES // dtype.size,)


def matvec_template(what: str, in_dim: int, out_dim: int, bits: int, group_size: int) -> dict[str, int]:
    """Compile-time constants shared by the matvec-shaped kernels (see quant.h)."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"{what}: the kernels take bits in {KERNEL_BITS}, got {bits}")
    if group_size % 32 or in_dim % group_size:
        raise ValueError(
            f"{what}: group size {group_size} must be a multiple of 32 that divides the input dimension {in_dim}"
        )
    rows = ROWS
    while out_dim % rows:
        rows //= 2
    return {
        "BITS": bits,
        "GROUP_SIZE": group_size,
        "IN_DIM": in_dim,
        "OUT_DIM": out_dim,
        "ROWS": rows,
        "WARPS": WARPS,
        "TILE": min(in_dim, MAX_TILE),
    }


def launch(
    name: str,
    backend: str,
    inputs: dict[str, mx.array],
    outputs: dict[str, tuple[tuple[int, ...], mx.Dtype]],
    template: dict[str, int],
    grid: tuple[int, int, int],
    init_value: float | None = None,
) -> list[mx.array]:
    """Run kernel ``name``; ``init_value`` pre-fills the outputs (tests poison them with NaN)."""
    kernel = build(name, tuple(inputs), tuple(outputs), backend)
    buffers = [output_buffer(shape, dtype, backend) for shape, dtype in outputs.values()]
    results = kernel(
        inputs=list(inputs.values()),
        template=list(template.items()),
        grid=grid,
        threadgroup=(32 * template["WARPS"], 1, 1),
        output_shapes=buffers,
        output_dtypes=[dtype for _, dtype in outputs.values()],
        init_value=init_value,
    )
    # a padded output: its leading values as the shape asked for (a slice and a reshape: views, no launch)
    return [
        out if buffer == tuple(shape) else out[: math.prod(shape)].reshape(shape)
        for out, buffer, (shape, _) in zip(results, buffers, outputs.values())
    ]


from .add_rms_norm import add_rms_norm  # noqa: E402
from .dequant_matvec import dequant_matvec, dequant_matvec_ref  # noqa: E402
from .expert_ffn import expert_ffn, expert_ffn_ref  # noqa: E402
from .gated_delta_decode import gated_delta_decode, gated_delta_decode_ref  # noqa: E402
from .route_topk import route_topk, route_topk_ref  # noqa: E402

__all__ = [
    "BACKEND",
    "add_rms_norm",
    "build",
    "dequant_matvec",
    "dequant_matvec_ref",
    "expert_ffn",
    "expert_ffn_ref",
    "gated_delta_decode",
    "gated_delta_decode_ref",
    "kernel_source",
    "launch",
    "matvec_template",
    "resolve_backend",
    "route_topk",
    "route_topk_ref",
]

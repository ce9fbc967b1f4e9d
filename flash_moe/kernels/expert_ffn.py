"""The routed experts of one MoE layer: y = sum_k scores_k * down_k(silu(gate_k x) * up_k x).

Weights come as slot sets (see flash_moe/store.py): per tensor of the expert layout one
array (S, *shape), and ``inds`` picks slots. Two kernel launches: expert_gate_up.body
(gate and up matvecs and SwiGLU for every (token, k)), then expert_down.body (down
matvec and the weighted sum over k). ``expert_ffn_ref`` is the same function in MLX ops.
"""

from __future__ import annotations

import mlx.core as mx

from . import SHARED_BYTES, launch, matvec_template, resolve_backend

MAX_GRID_Y = 65535  # CUDA's limit on blocks along y: (token, k) pairs per launch


def expert_ffn_ref(
    x: mx.array, slots: dict[str, mx.array], inds: mx.array, scores: mx.array, *, bits: int, group_size: int
) -> mx.array:
    """Pure-MLX expert_ffn (``gather_qmm``, float32 inside). Also the CPU path."""
    shape, k = x.shape, inds.shape[-1]
    inds = inds.reshape(-1, k)
    xf = x.reshape(-1, 1, 1, shape[-1]).astype(mx.float32)

    def project(a, proj):
        w = slots[f"{proj}.weight"]
        if bits == 16:
            return mx.gather_mm(a, w.swapaxes(-1, -2).astype(mx.float32), rhs_indices=inds)
        scales, biases = slots[f"{proj}.scales"], slots[f"{proj}.biases"]
        return mx.gather_qmm(
            a, w, scales, biases, rhs_indices=inds, transpose=True, group_size=group_size, bits=bits
        )

    gate, up = project(xf, "gate_proj"), project(xf, "up_proj")  # (N, K, 1, I)
    h = gate * mx.sigmoid(gate) * up
    y = project(h, "down_proj").squeeze(-2)  # (N, K, D)
    y = (y * scores.reshape(-1, k, 1).astype(mx.float32)).sum(axis=1)
    return y.astype(x.dtype).reshape(shape)


def _check(x, slots, inds, scores, bits):
    if x.shape[:-1] != inds.shape[:-1] or inds.shape != scores.shape:
        raise ValueError(
            f"expert_ffn: x {x.shape}, inds {inds.shape} and scores {scores.shape} disagree "
            "(want x (..., D), inds and scores (..., K))"
        )
    names = ("weight",) if bits == 16 else ("weight", "scales", "biases")
    missing = [f"{p}.{n}" for p in ("gate_proj", "up_proj", "down_proj") for n in names if f"{p}.{n}" not in slots]
    if missing:
        raise KeyError(f"expert_ffn: slot set lacks {missing} (has {sorted(slots)})")
    d = x.shape[-1]
    s, i = slots["gate_proj.weight"].shape[:2]
    packed = (lambda n: n) if bits == 16 else (lambda n: n * bits // 32)
    want = {
        "gate_proj.weight": (s, i, packed(d)),
        "up_proj.weight": (s, i, packed(d)),
        "down_proj.weight": (s, d, packed(i)),
    }
    for name, shape in want.items():
        if slots[name].shape != shape:
            raise ValueError(
                f"expert_ffn: slots[{name!r}] has shape {slots[name].shape}, expected {shape} "
                f"for hidden {d}, intermediate {i}, {bits} bits"
            )
        if bits != 16 and slots[name].dtype != mx.uint32:
            raise ValueError(f"expert_ffn: slots[{name!r}] is {slots[name].dtype}, expected uint32")


def expert_ffn(
    x: mx.array,
    slots: dict[str, mx.array],
    inds: mx.array,
    scores: mx.array,
    *,
    bits: int,
    group_size: int,
    backend: str | None = None,
    init_value: float | None = None,
) -> mx.array:
    """Routed-expert FFN over slot sets.

    Args:
        x: (..., D) activations, float32 / bfloat16 / float16.
        slots: tensor name (``gate_proj.weight``, ...) -> (S, *shape) array.
        inds: (..., K) int slot indices in [0, S) (not checked on the GPU).
        scores: (..., K) routing weights.
        bits, group_size: the affine quantization; bits 16 = unquantized (ops path only).
        backend: "metal", "cuda" or "ops"; default ``kernels.BACKEND``.
        init_value: pre-fill the kernels' outputs with this (tests pass NaN).

    Returns:
        (..., D) in x's dtype; sums in float32.
    """
    _check(x, slots, inds, scores, bits)
    backend = resolve_backend(backend)
    if backend == "ops" or bits == 16:
        return expert_ffn_ref(x, slots, inds, scores, bits=bits, group_size=group_size)

    # Every op here costs host time at each call: reshape and cast only when needed.
    shape, d, k = x.shape, x.shape[-1], inds.shape[-1]
    if x.ndim != 2:
        x, inds, scores = x.reshape(-1, d), inds.reshape(-1, k), scores.reshape(-1, k)
    if inds.dtype != mx.int32:
        inds = inds.astype(mx.int32)
    n, step = x.shape[0], max(1, MAX_GRID_Y // k)
    if n <= step:
        y = _launches(x, slots, inds, scores, bits, group_size, backend, init_value)
    else:
        y = mx.concatenate(
            [
                _launches(x[a : a + step], slots, inds[a : a + step], scores[a : a + step], bits, group_size, backend, init_value)
                for a in range(0, n, step)
            ]
        )
    return y if len(shape) == 2 else y.reshape(shape)


def launch_shape(n: int, k: int, d: int) -> tuple[int, int]:
    """(gate/up input split, down expert groups) for n tokens: ``GATE_UP_SPLIT`` and ``DOWN_GROUPS`` at batch 1
    where they fit (the split staging re-reads h once per part: not for batches), else (1, 1)."""
    from . import DOWN_GROUPS, GATE_UP_SPLIT, WARPS  # read at each call: benchmarks set them

    if n != 1:
        return 1, 1
    split = GATE_UP_SPLIT if GATE_UP_SPLIT >= 1 and d % (32 * GATE_UP_SPLIT) == 0 else 1
    groups = max(1, min(DOWN_GROUPS, -(-k // 2), 1024 // (32 * WARPS)))  # each group takes pairs of experts
    return split, groups


def _launches(x, slots, inds, scores, bits, group_size, backend, init_value):
    n, d = x.shape
    k = inds.shape[1]
    i = slots["gate_proj.weight"].shape[1]
    split, groups = launch_shape(n, k, d)
    up = matvec_template("expert_ffn gate/up", d, i, bits, group_size)
    up["K"] = k
    up["SPLIT"] = split
    up["TILE"] = min(up["TILE"], d // split)  # a threadgroup stages only its part of x
    block = up["WARPS"] * up["ROWS"]
    h_shape = (n, k, i) if split == 1 else (n, k, split, 2, i)
    (h,) = launch(
        "expert_gate_up",
        backend,
        {
            "x": x,
            "inds": inds,
            "gate_w": slots["gate_proj.weight"],
            "gate_s": slots["gate_proj.scales"],
            "gate_b": slots["gate_proj.biases"],
            "up_w": slots["up_proj.weight"],
            "up_s": slots["up_proj.scales"],
            "up_b": slots["up_proj.biases"],
        },
        {"h": (h_shape, mx.float32)},
        up,
        grid=(32 * up["WARPS"] * -(-i // block) * split, n * k, 1),
        init_value=init_value,
    )

    down = matvec_template("expert_ffn down", i, d, bits, group_size)
    expert_bytes = down["TILE"] // 32 * 33 * 4  # one expert's staged h (quant.h layout)
    down["K"] = k
    block = down["WARPS"] * down["ROWS"]  # rows per threadgroup; its warps: WARPS per expert group
    down["KB"] = max(1, min(k, (SHARED_BYTES[backend] - 4 * groups * block) // expert_bytes))  # less the group sums
    down["GU_SPLIT"] = split
    down["ES"] = groups
    down["WARPS"] *= groups
    (y,) = launch(
        "expert_down",
        backend,
        {
            "h": h,
            "inds": inds,
            "scores": scores,
            "down_w": slots["down_proj.weight"],
            "down_s": slots["down_proj.scales"],
            "down_b": slots["down_proj.biases"],
        },
        {"y": ((n, d), x.dtype)},
        down,
        grid=(32 * down["WARPS"] * -(-d // block), n, 1),
        init_value=init_value,
    )
    return y

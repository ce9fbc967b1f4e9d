"""Routed-expert FFN of one layer at Qwen3.5-397B shapes, on the GPU: fused kernels vs gather_qmm vs the floor.

    python benchmarks/kernels.py            # on a machine with MLX's CUDA or Metal backend

Experts: hidden 4096, intermediate 1024, 512 experts, 4-bit, group 64, bf16 scales, all resident.
Each timing evaluates ``--layers`` calls together (like one token's layers), every call with other
experts and inputs (rotated, so the 50 MB L2 cannot hold them), and reports the median over
``--repeats`` of the time per call. The floor is the experts' bytes over the device-to-device
copy bandwidth measured in the same run. With CUDA, the pinned-host path of flash_moe/cuda_host.py
is timed too: host to GPU pull, and pull + FFN.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

from flash_moe import kernels
from flash_moe.kernels import expert_ffn
from flash_moe.layout import ExpertLayout

D, I, E, BITS, GS = 4096, 1024, 512, 4, 64
LAYOUT = ExpertLayout(hidden=D, intermediate=I, bits=BITS, group_size=GS, dtype="bfloat16")
EXPERT_BYTES = LAYOUT.expert_bytes  # 7,077,888


def make_experts(num: int) -> dict[str, mx.array]:
    slots = {}
    for t in LAYOUT.tensors:
        shape = (num, *t.shape)
        if t.dtype == "uint32":  # 31 random bits per word: every 4-bit value but the top one's high bit
            slots[t.name] = mx.random.randint(0, 2**31 - 1, shape, dtype=mx.int32).view(mx.uint32)
        else:
            slots[t.name] = (mx.random.normal(shape) * 0.01).astype(mx.bfloat16)
    mx.eval(slots)
    return slots


def timed(make_outputs, layers: int, repeats: int, rotations: int) -> tuple[float, float]:
    """Median seconds per call: (eval only, graph building + eval). make_outputs(j) builds call j lazily."""
    for _ in range(2):
        mx.eval([make_outputs(j) for j in range(layers)])
    evals, totals = [], []
    for r in range(repeats):
        mx.synchronize()
        start = time.perf_counter()
        outs = [make_outputs((r * layers + j) % rotations) for j in range(layers)]
        built = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        end = time.perf_counter()
        evals.append((end - built) / layers)
        totals.append((end - start) / layers)
    return statistics.median(evals), statistics.median(totals)


def copy_bandwidth() -> tuple[float, str]:
    """Device-to-device copy rate (bytes read + written per second) of a 1 GiB buffer."""
    try:
        import torch

        if torch.cuda.is_available():
            a = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
            b = torch.empty_like(a)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(3):
                b.copy_(a)
            samples = []
            for _ in range(20):
                start.record()
                b.copy_(a)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            del a, b
            torch.cuda.empty_cache()
            return 2 * 2**30 / statistics.median(samples), "torch copy_"
    except ImportError:
        pass
    a = mx.random.randint(0, 2**31 - 1, (2**28,), dtype=mx.int32)
    mx.eval(a)
    t, _ = timed(lambda j: a + j, 1, 20, 1000)
    return 2 * a.nbytes / t, "MLX a + j"


def switch_glu(x, slots, inds, scores):
    """mlx-lm's SwitchGLU path (gather_qmm in the activation dtype), plus the weighted sum."""

    def proj(a, p):
        return mx.gather_qmm(
            a, slots[f"{p}.weight"], slots[f"{p}.scales"], slots[f"{p}.biases"],
            rhs_indices=inds, transpose=True, group_size=GS, bits=BITS,
        )

    xe = x[:, None, None, :]
    gate, up = proj(xe, "gate_proj"), proj(xe, "up_proj")
    y = proj(gate * mx.sigmoid(gate) * up, "down_proj").squeeze(-2)
    return (y * scores[..., None]).sum(axis=-2)


def routing(rng, rotations, n, k):
    """Per rotation: inds (n, k), x (n, D) bf16, scores (n, k); and the mean count of distinct experts."""
    chosen = [np.stack([rng.choice(E, k, replace=False) for _ in range(n)]).astype(np.int32) for _ in range(rotations)]
    distinct = float(np.mean([len(np.unique(c)) for c in chosen]))
    inds = [mx.array(c) for c in chosen]
    xs = [mx.array(rng.normal(0, 1, (n, D)).astype(np.float32)).astype(mx.bfloat16) for _ in range(rotations)]
    scores = [mx.array(rng.dirichlet(np.ones(k), n).astype(np.float32)) for _ in range(rotations)]
    mx.eval(inds, xs, scores)
    return inds, xs, scores, distinct


def bench_resident(args, slots, bandwidth, rng):
    print(f"\n== experts resident on the GPU (floor = K x {EXPERT_BYTES:,} B / {bandwidth / 1e9:.0f} GB/s) ==")
    print(f"{'N':>3} {'K':>3} {'fused us':>9} {'GB/s':>6} {'gather_qmm us':>14} {'floor us':>9} {'fused/floor':>11} {'gqmm/fused':>10} {'fused, with build':>17} {'gqmm, with build':>16}")
    print("(us per call: median over repeats of one eval of --layers calls / layers; 'with build' adds the Python graph building;")
    print(" floor: the distinct experts' bytes over the copy bandwidth)")
    for n, k in [(1, 4), (1, 10), (4, 10), (16, 10), (64, 10)]:
        inds, xs, scores, distinct = routing(rng, args.rotations, n, k)
        fused, fused_all = timed(lambda j: expert_ffn(xs[j], slots, inds[j], scores[j], bits=BITS, group_size=GS), args.layers, args.repeats, args.rotations)
        gqmm, gqmm_all = timed(lambda j: switch_glu(xs[j], slots, inds[j], scores[j]), args.layers, args.repeats, args.rotations)
        floor = distinct * EXPERT_BYTES / bandwidth  # each distinct expert read once
        gbs = distinct * EXPERT_BYTES / fused / 1e9
        print(
            f"{n:>3} {k:>3} {fused * 1e6:9.1f} {gbs:6.0f} {gqmm * 1e6:14.1f} {floor * 1e6:9.1f} {fused / floor:11.2f} "
            f"{gqmm / fused:10.2f} {fused_all * 1e6:17.1f} {gqmm_all * 1e6:16.1f}"
        )


def bench_launch_shapes(args, slots, rng):
    print("\n== fused kernels, warps per threadgroup x rows per warp (N = 1; eval time per call) ==")
    print(f"{'warps':>5} {'rows':>4} {'K=4 us':>8} {'K=10 us':>8}")
    saved = kernels.WARPS, kernels.ROWS
    routes = {k: routing(rng, args.rotations, 1, k) for k in (4, 10)}
    try:
        for warps, rows in [(4, 4), (4, 8), (8, 4), (8, 8), (2, 8), (4, 2), (2, 4)]:
            kernels.WARPS, kernels.ROWS = warps, rows
            t = {}
            for k, (inds, xs, scores, _) in routes.items():
                t[k], _ = timed(lambda j: expert_ffn(xs[j], slots, inds[j], scores[j], bits=BITS, group_size=GS), args.layers, args.repeats, args.rotations)
            print(f"{warps:>5} {rows:>4} {t[4] * 1e6:8.1f} {t[10] * 1e6:8.1f}")
    finally:
        kernels.WARPS, kernels.ROWS = saved


def bench_split_shapes(args, slots, bandwidth, rng):
    """Issue 20's launch shapes at N = 1: gate/up input split x down expert groups; (1, 1) is the old shape."""
    print("\n== fused kernels at N = 1: gate/up input split x down expert groups (1 x 1 = the old shape) ==")
    print(f"{'split':>5} {'groups':>6} {'K=4 us':>8} {'/floor':>7} {'K=10 us':>8} {'/floor':>7}")
    saved = kernels.GATE_UP_SPLIT, kernels.DOWN_GROUPS
    routes = {k: routing(rng, args.rotations, 1, k) for k in (4, 10)}
    try:
        for split, groups in [(1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (1, 5), (2, 2), (4, 2), (4, 5), (8, 5)]:
            kernels.GATE_UP_SPLIT, kernels.DOWN_GROUPS = split, groups
            t, floor = {}, {}
            for k, (inds, xs, scores, distinct) in routes.items():
                t[k], _ = timed(lambda j: expert_ffn(xs[j], slots, inds[j], scores[j], bits=BITS, group_size=GS),
                                args.layers, args.repeats, args.rotations)
                floor[k] = distinct * EXPERT_BYTES / bandwidth
            print(f"{split:>5} {groups:>6} {t[4] * 1e6:8.1f} {t[4] / floor[4]:7.2f} {t[10] * 1e6:8.1f} {t[10] / floor[10]:7.2f}",
                  flush=True)
    finally:
        kernels.GATE_UP_SPLIT, kernels.DOWN_GROUPS = saved


def bench_pinned(args, rng):
    from flash_moe.cuda_host import PinnedSlotBuffers

    print("\n== pinned host memory -> GPU (flash_moe/cuda_host.py), 2 slot sets of 10 experts ==")
    print(f"{'upload':>7} {'K':>3} {'pull us':>8} {'GB/s':>6} {'pull+ffn us':>11} {'GB/s':>6}")
    for upload in ("mapped", "copy"):
        buffers = PinnedSlotBuffers(LAYOUT, capacity=10, num_sets=2, upload=upload)
        for index in range(2):
            for name, view in buffers.host_views(index).items():
                if view.dtype == np.uint32:
                    view[...] = rng.integers(0, 2**32, view.shape, dtype=np.uint32)
                else:  # bf16 bits of small normal values
                    view[...] = (rng.normal(0, 0.01, view.shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        x = mx.array(rng.normal(0, 1, (1, D)).astype(np.float32)).astype(mx.bfloat16)
        for k in (1, 4, 10):
            inds, scores = mx.arange(k, dtype=mx.int32)[None], mx.full((1, k), 1.0 / k)
            # compute_arrays runs the copy (upload="copy") when called: time the calls, not only the graph.
            samples_pull, samples_ffn = [], []
            for r in range(args.repeats + 2):
                mx.synchronize()
                start = time.perf_counter()
                mx.eval(list(buffers.compute_arrays(r % 2, k).values()))
                mx.synchronize()
                mid = time.perf_counter()
                y = expert_ffn(x, buffers.compute_arrays(r % 2, k), inds, scores, bits=BITS, group_size=GS)
                mx.eval(y)
                mx.synchronize()
                end = time.perf_counter()
                if r >= 2:
                    samples_pull.append(mid - start)
                    samples_ffn.append(end - mid)
            pull, both = statistics.median(samples_pull), statistics.median(samples_ffn)
            nbytes = k * EXPERT_BYTES
            print(f"{upload:>7} {k:>3} {pull * 1e6:8.0f} {nbytes / pull / 1e9:6.1f} {both * 1e6:11.0f} {nbytes / both / 1e9:6.1f}")
        mx.synchronize()
        buffers.close()


PHASES = [(1, 4), (1, 10), (4, 10)]


def profile(args):
    """Run under Nsight Compute: each method on 5 rotations per phase, a marker kernel before each phase."""
    slots = make_experts(args.experts)
    rng = np.random.default_rng(1)
    marker = mx.fast.cuda_kernel(name="phase_marker", input_names=["a"], output_names=["o"], source="o[0] = a[0];")
    one = mx.ones((1,))
    methods = {
        "fused": lambda x, i, s: expert_ffn(x, slots, i, s, bits=BITS, group_size=GS),
        "gather_qmm": lambda x, i, s: switch_glu(x, slots, i, s),
    }
    phases = [(name, n, k, routing(rng, 5, n, k)) for n, k in PHASES for name in methods]
    for name, _, _, (inds, xs, scores, _) in phases:  # compile and warm everything first
        mx.eval(methods[name](xs[0], inds[0], scores[0]))
    for name, n, k, (inds, xs, scores, _) in phases:
        mx.eval(marker(inputs=[one], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)], output_dtypes=[mx.float32]))
        for j in range(5):
            mx.eval(methods[name](xs[j], inds[j], scores[j]))


def summarize(path):
    """Per phase of ``profile``: GPU time and DRAM bytes per call, from ncu's CSV log."""
    import csv

    unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0}
    unit |= {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    lines = open(path).read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        print(f"{path}: no CSV from ncu\n" + "\n".join(lines[-20:]))
        return
    kernels_by_id = {}
    for row in csv.DictReader(lines[start:]):
        k = kernels_by_id.setdefault(int(row["ID"]), {"name": row["Kernel Name"]})
        k[row["Metric Name"]] = float(row["Metric Value"].replace(",", "")) * unit.get(row["Metric Unit"], 1)
    segments, current = [], None
    for kid in sorted(kernels_by_id):
        k = kernels_by_id[kid]
        if "phase_marker" in k["name"]:
            current = []
            segments.append(current)
        elif current is not None:
            current.append(k)
    labels = [(name, n, k) for n, k in PHASES for name in ("fused", "gather_qmm")]
    print("\n== Nsight Compute, caches flushed before each kernel (cold), per call ==")
    print(f"{'method':>10} {'N':>3} {'K':>3} {'kernels':>7} {'GPU us':>8} {'DRAM MB':>8} {'GB/s':>6} {'floor us':>9}")
    for (name, n, k), seg in zip(labels, segments):
        t = sum(x.get("gpu__time_duration.sum", 0) for x in seg) / 5
        b = sum(x.get("dram__bytes_read.sum", 0) for x in seg) / 5
        floor = n * k * EXPERT_BYTES / 2.966e12
        print(f"{name:>10} {n:>3} {k:>3} {len(seg) / 5:7.1f} {t * 1e6:8.1f} {b / 1e6:8.1f} {b / t / 1e9:6.0f} {floor * 1e6:9.1f}")
        for x in seg[: max(1, len(seg) // 5)]:
            print(f"{'':>14} {x.get('gpu__time_duration.sum', 0) * 1e6:7.1f} us  {x['name'][:90]}")


def main():
    global E
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=60, help="calls evaluated together per timing")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rotations", type=int, default=64, help="distinct routing/input sets cycled through")
    parser.add_argument("--experts", type=int, default=E, help="experts resident (512 in the model)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-shape sweep")
    parser.add_argument("--shapes", action="store_true",
                        help="only the resident table and issue 20's split/groups launch shapes (old vs new)")
    parser.add_argument("--profile", action="store_true", help="the run for ncu (see docs/kernels.md)")
    parser.add_argument("--summarize", metavar="NCU_CSV", help="print the table from ncu's --csv log")
    args = parser.parse_args()
    E = args.experts
    if args.summarize:
        return summarize(args.summarize)
    if args.profile:
        return profile(args)
    print(f"MLX {mx.__version__}, {mx.default_device()}, kernels backend {kernels.BACKEND}")
    rng = np.random.default_rng(0)
    bandwidth, how = copy_bandwidth()
    print(f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s ({how}, read + write)")
    slots = make_experts(E)
    bench_resident(args, slots, bandwidth, rng)
    if args.shapes:
        return bench_split_shapes(args, slots, bandwidth, rng)
    if not args.no_sweep:
        bench_launch_shapes(args, slots, rng)
    if kernels.BACKEND == "cuda":
        del slots
        bench_pinned(args, rng)


if __name__ == "__main__":
    main()

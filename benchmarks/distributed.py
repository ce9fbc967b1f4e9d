"""Expert-parallel decode on one machine: N ranks over MLX's ring backend (localhost), same model, N = 1, 2, ...

    python benchmarks/distributed.py --make /data/syn --layers 4 --experts 128 --vocab 32768   # once
    python benchmarks/distributed.py --model /data/syn --ranks 1 2 4 --k 10 --tokens 16 [--cold] [--cap-fraction 0.16]

For each N the ranks are started as ``mlx.launch --backend ring`` starts them (``MLX_RANK`` and a ring
hostfile on free localhost ports; N = 1 is one plain process). Each rank decodes a prompt once clean
(tok/s, expert bytes read per token by this rank, page-cache hits; cold with ``--cold``, which drops the
page cache first), then another prompt under ``PhaseTimer`` (ms per token by phase, ``comm`` being the
all_sum of each MoE layer plus the wait for the slowest rank). Then it times a bare ``all_sum`` of one
hidden-size vector in the model's dtype, the collective each MoE layer adds per token.

A rank per machine is emulated with a memory cap per rank (cgroup v2, Linux, root; it counts the page
cache): ``--cap-fraction F`` caps what each rank adds after loading at F of all the experts' bytes (+1 GiB),
as ``benchmarks/decode.py --cap-fraction`` does for one process, so N ranks hold N times the experts in
their page caches, as N machines would. ``--warm-prompt P`` first runs a P-token prompt (every rank), so
the caps are reached before measuring. ``--cpu`` runs every rank on MLX's CPU with the ops kernels (a GPU
machine's CPUs and disk, ring backend); ``--backend nccl`` starts the ranks through ``mlx.launch``, a GPU each.

The arithmetic (docs/distributed.md) is printed beside each N > 1: the N = 1 timed run's ms per token with
its expert phases (reads and compute) scaled by the slowest rank's share of the expert bytes, plus
(MoE layers + 2) bare all_sums. A measured time under it is the page caches' gain (N of them).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def make(folder: Path, layers: int, experts: int, vocab: int, dtype: str, seed: int) -> None:
    from flash_moe.synthetic import QWEN35_SKEW, qwen35_397b_config, synthetic_bytes, write_synthetic

    config = dict(qwen35_397b_config(layers, vocab), num_experts=experts)
    size = synthetic_bytes(config, dtype=dtype)
    print(f"writing {layers} layers of {experts} experts (397B shapes, {dtype}): {size / 1e9:.2f} GB", flush=True)
    write_synthetic(folder, config, skew=QWEN35_SKEW, seed=seed, dtype=dtype)


def worker(args) -> None:
    """One rank: both decodes and the all_sum timing; writes its JSON to args.out."""
    import mlx.core as mx
    import numpy as np

    from flash_moe import load
    from flash_moe.generation import generate_step
    from flash_moe.timing import PhaseTimer

    from benchmarks.decode import enter_memory_cap

    if args.cpu:
        mx.set_default_device(mx.cpu)
    cgroup = f"flash_moe_rank{os.environ.get('MLX_RANK', 0)}"
    if args.cap:
        enter_memory_cap(args.cap, cgroup)
    model = load(args.model, experts_per_token=args.k, **({"cache_experts": 0} if args.cpu else {}))
    p = model.parallel
    rank, size = (p.rank, p.size) if p else (0, 1)
    layout = model.store.layout
    moe_layers = len(layout.moe_layers)
    out = {"rank": rank, "ranks": size, "k": args.k, "moe_layers": moe_layers,
           "owned": int(p.owned(layout.moe_layers[0]).sum()) if p else model.config.num_experts}
    if args.cap_fraction is not None:  # after loading: the cap bounds what decoding adds, page cache included
        out["cap"] = enter_memory_cap(str(int(args.cap_fraction * moe_layers * layout.layer_bytes() + (1 << 30))),
                                      cgroup)
    rng = np.random.default_rng(args.seed)
    prompts = [mx.array(rng.integers(0, model.config.vocab_size, n), mx.int32) for n in (args.warm_prompt, args.prompt,
                                                                                         args.prompt)]
    if args.warm_prompt:
        before, start = model.stats.snapshot(), time.perf_counter()
        for _ in generate_step(prompts[0], model, max_tokens=1):
            pass
        io = model.stats.snapshot().delta(before).totals()
        out["warm"] = {"seconds": time.perf_counter() - start, "gb": io["bytes"] / 1e9, "hit_rate": io["hit_rate"]}

    def decode(prompt, timer=None):
        steps = generate_step(prompt, model, max_tokens=args.tokens + 1, timer=timer)
        next(steps)  # prefill and the first token
        before, start = model.stats.snapshot(), time.perf_counter()
        n = sum(1 for _ in steps)
        seconds = time.perf_counter() - start
        io = model.stats.snapshot().delta(before).totals()
        return {"tok_s": n / seconds, "mb_per_token": io["bytes"] / n / 1e6, "hit_rate": io["hit_rate"],
                "read_gb_s": io["gb_per_s"]}

    out["clean"] = decode(prompts[1])
    timer = PhaseTimer(model).install()
    out["timed"] = decode(prompts[2], timer)
    timer.uninstall()
    s = timer.summary()
    out["phases_ms"] = {k: round(v, 3) for k, v in s["total"].items()}
    out["comm_ms_per_layer"] = s["total"].get("comm", 0.0) / moe_layers
    if p:
        x = mx.ones((model.config.hidden_size,), model.model.layers[0].input_layernorm.weight.dtype)  # activations
        for _ in range(5):
            mx.eval(mx.distributed.all_sum(x, group=p.group))
        start = time.perf_counter()
        for _ in range(args.reps):
            mx.eval(mx.distributed.all_sum(x, group=p.group))
        out["all_sum_ms"] = 1e3 * (time.perf_counter() - start) / args.reps
    Path(args.out.replace("{rank}", str(rank))).write_text(json.dumps(out))
    model.close()


def launcher() -> list[str]:
    """The ``mlx.launch`` command (beside this Python, on PATH, or through its module)."""
    import shutil

    found = Path(sys.executable).with_name("mlx.launch")
    if found.exists() or shutil.which("mlx.launch"):
        return [str(found) if found.exists() else shutil.which("mlx.launch")]
    return [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


def run(args, n: int, tmp: Path) -> list[dict]:
    from benchmarks.decode import drop_page_cache
    from flash_moe.layout import ModelLayout

    layout = ModelLayout.read(args.model)
    if args.cold:
        print(f"  page cache: {drop_page_cache([args.model / layout.layer_file(l) for l in layout.moe_layers])}")
    hostfile = tmp / f"hosts{n}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(n)]))
    out = str(tmp / f"n{n}_rank{{rank}}.json")
    argv = [sys.executable, __file__, "--worker", "--model", str(args.model), "--k", str(args.k), "--tokens",
            str(args.tokens), "--prompt", str(args.prompt), "--warm-prompt", str(args.warm_prompt), "--seed",
            str(args.seed), "--reps", str(args.reps), "--out", out] + (["--cap", args.cap] if args.cap else []) \
        + (["--cap-fraction", str(args.cap_fraction)] if args.cap_fraction is not None else []) \
        + (["--cpu"] if args.cpu else [])
    procs = []
    # the checkout first, then the caller's path (the GPU machine's MLX lives there: replacing it lost MLX)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p))
    if args.cpu:
        env["FLASH_MOE_BACKEND"] = "ops"
    if n > 1 and args.backend != "ring":  # mlx.launch starts the ranks (nccl: one GPU each)
        procs.append(subprocess.Popen(launcher() + ["-n", str(n), "--backend", args.backend, *argv], env=env))
    for rank in range(n if not procs else 0):
        if n > 1:
            env = dict(env, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
        procs.append(subprocess.Popen(argv, env=env))
    try:
        codes = [p.wait(timeout=args.timeout) for p in procs]
    finally:  # a timeout, or the suite's own (SIGTERM): no rank outlives the run
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        sys.exit(f"{n} ranks: exit codes {codes}")
    return [json.loads(Path(out.format(rank=r)).read_text()) for r in range(n)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="converted folder (e.g. written by --make)")
    p.add_argument("--make", type=Path, help="write a synthetic 397B-shaped model here first (then benchmark it)")
    p.add_argument("--layers", type=int, default=4, help="--make: decoder layers")
    p.add_argument("--experts", type=int, default=128, help="--make: experts per layer (512 in the real model)")
    p.add_argument("--vocab", type=int, default=32768, help="--make: vocabulary size")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="--make: weights and scales (MLX's CPU quantized matmul is ~14x slower in bfloat16)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts to run (default 1 2)")
    p.add_argument("--k", type=int, default=10, help="experts per token (default 10)")
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens per run (default 16)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--reps", type=int, default=50, help="bare all_sum repetitions (default 50)")
    p.add_argument("--cold", action="store_true", help="evict the layer files from the page cache before each N")
    p.add_argument("--cap", default=None, help="memory limit per rank, page cache included (cgroup v2, root)")
    p.add_argument("--cap-fraction", type=float, default=None,
                   help="after loading, cap what each rank adds (page cache included) at this fraction of all the "
                        "experts' bytes + 1 GiB (cgroup v2, root): one machine's RAM per rank")
    p.add_argument("--warm-prompt", type=int, default=0, help="tokens of a first prompt that fills the page caches")
    p.add_argument("--cpu", action="store_true", help="run every rank on MLX's CPU with the ops kernels")
    p.add_argument("--backend", default="ring", choices=("ring", "nccl", "mpi", "jaccl"),
                   help="ring (default): ranks on localhost started here; others through mlx.launch (nccl: a GPU "
                        "per rank; set NCCL_NVLS_ENABLE=0)")
    p.add_argument("--json", default=None, help="write every rank's numbers to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds per N before giving up")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.make:
        make(args.make, args.layers, args.experts, args.vocab, args.dtype, args.seed)
        args.model = args.model or args.make
    if not args.model:
        p.error("--model (or --make) is required")
    import signal
    import tempfile

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("benchmarks/distributed.py: terminated"))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ranks:
            print(f"{n} rank(s) ...", flush=True)
            rows += run(args, n, Path(tmp))
    report(args, rows)


def predicted_ms(base: dict, row: dict, slowest_share: float) -> float:
    """The arithmetic: N = 1's ms per token with its expert phases scaled by the slowest rank's share of the
    expert bytes, plus (MoE layers + 2) all_sums of this N."""
    ph = base["phases_ms"]
    experts = ph.get("expert_io", 0.0) + ph.get("expert_compute", 0.0)
    return sum(ph.values()) - experts + experts * slowest_share + (row["moe_layers"] + 2) * row.get("all_sum_ms", 0.0)


def report(args, rows: list[dict]) -> None:
    print(f"\nK={args.k}, {args.tokens} decoded tokens after a {args.prompt}-token prompt"
          f"{', cold page cache' if args.cold else ''}{f', cap {args.cap} per rank' if args.cap else ''}"
          f"{f', cap {args.cap_fraction} of the experts per rank' if args.cap_fraction is not None else ''}"
          f"{f', after a {args.warm_prompt}-token prompt' if args.warm_prompt else ''}{', CPU' if args.cpu else ''}")
    head = f"{'ranks':>5} {'rank':>4} {'owned':>5} {'tok/s':>7} {'MB/token':>9} {'hit':>5} {'read GB/s':>9} " \
           f"{'ms/token':>9} {'comm ms':>8} {'comm/layer':>10} {'all_sum ms':>10} {'predicted':>9}"
    print(head)
    base = next((r for r in rows if r["ranks"] == 1), None)
    for r in rows:
        c, ph = r["clean"], r["phases_ms"]
        group = [g for g in rows if g["ranks"] == r["ranks"]]
        pred = ""
        if base is not None and r["ranks"] > 1 and r["rank"] == 0:
            share = max(g["timed"]["mb_per_token"] for g in group) / max(base["timed"]["mb_per_token"], 1e-9)
            r["predicted_ms"] = predicted_ms(base, r, share)
            pred = f"{r['predicted_ms']:.1f}"
        print(f"{r['ranks']:>5} {r['rank']:>4} {r['owned']:>5} {c['tok_s']:>7.2f} {c['mb_per_token']:>9.1f} "
              f"{c['hit_rate']:>5.2f} {c['read_gb_s']:>9.2f} {sum(ph.values()):>9.1f} {ph.get('comm', 0):>8.2f} "
              f"{r['comm_ms_per_layer']:>10.3f} {r.get('all_sum_ms', float('nan')):>10.3f} {pred:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                              indent=1))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

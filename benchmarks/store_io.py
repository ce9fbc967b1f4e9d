"""Expert read throughput: plain parallel pread vs ExpertStore.fetch, alone and beside MLX work.

Creates (or reuses, with --dir) packed layer files of random bytes, then times three passes over
the same random expert ids (K per layer step, layers in turn, like decoding):
  (1) plain: a thread pool doing one os.preadv per expert into fixed buffers,
  (2) store: ExpertStore.fetch,
  (3) store while the main thread runs MLX matmuls (standing in for the model), fetching on a thread.
Warm page cache by default; --cold drops the files from the page cache before each pass (Linux).

    python benchmarks/store_io.py                      # 4 layers x 64 experts of 7,077,888 bytes
    python benchmarks/store_io.py --hidden 1024 --intermediate 256 --experts 32 --steps 200
"""

import argparse
import json
import mmap
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flash_moe.layout import ExpertLayout, ModelLayout  # noqa: E402
from flash_moe.store import ExpertStore  # noqa: E402


def make_files(folder: Path, layout: ModelLayout, rng) -> None:
    """Random layer files; an expert is a random window of a 64 MiB random pool (cheap, all distinct)."""
    stride = layout.expert.stride
    pool = rng.integers(0, 256, (64 << 20) + stride, dtype=np.uint8)
    (folder / "experts").mkdir(parents=True, exist_ok=True)
    for layer in layout.moe_layers:
        with open(folder / layout.layer_file(layer), "wb") as f:
            for start in rng.integers(0, 64 << 20, layout.num_experts):
                f.write(pool[start : start + stride].data)
    (folder / "layout.json").write_text(json.dumps(layout.to_json(), indent=1))


def reuse_or_make(folder: Path, layout: ModelLayout, rng) -> str:
    try:
        old = ModelLayout.read(folder)
        same = (old.expert, old.num_experts, old.moe_layers) == (layout.expert, layout.num_experts, layout.moe_layers)
        sizes_ok = all(
            (folder / layout.layer_file(i)).stat().st_size == layout.layer_bytes() for i in layout.moe_layers
        )
        if same and sizes_ok:
            return "reused"
    except (FileNotFoundError, ValueError):
        pass
    make_files(folder, layout, rng)
    return "created"


def drop_cache(folder: Path, layout: ModelLayout) -> None:
    for layer in layout.moe_layers:
        fd = os.open(folder / layout.layer_file(layer), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_pread(folder: Path, layout: ModelLayout, steps, threads: int) -> float:
    """Seconds for the steps with a plain thread pool, one preadv per expert into a fixed buffer."""
    nbytes, stride = layout.expert.expert_bytes, layout.expert.stride
    fds = {i: os.open(folder / layout.layer_file(i), os.O_RDONLY) for i in layout.moe_layers}
    k = max(len(ids) for _, ids in steps)
    # Page-aligned (mmap) destinations: the best case for the kernel's copy, so a fair baseline.
    bufs = [np.frombuffer(mmap.mmap(-1, nbytes), np.uint8) for _ in range(k)]

    def read(args):
        fd, slot, e = args
        if os.preadv(fd, [bufs[slot]], e * stride) != nbytes:
            raise OSError(f"short read of expert {e}")

    try:
        with ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            for layer, ids in steps:
                list(pool.map(read, [(fds[layer], s, e) for s, e in enumerate(ids)]))
            return time.perf_counter() - start
    finally:
        for fd in fds.values():
            os.close(fd)


def store_fetch(store: ExpertStore, steps) -> float:
    start = time.perf_counter()
    for layer, ids in steps:
        store.fetch(layer, ids)
    return time.perf_counter() - start


def store_fetch_beside_mlx(store: ExpertStore, steps, size: int) -> tuple[float, int, float]:
    """Fetch on a thread while the main thread evaluates matmuls; returns (fetch s, matmuls, matmul s)."""
    a = mx.random.normal((size, size))
    mx.eval(a)
    result = {}
    reader = threading.Thread(target=lambda: result.setdefault("s", store_fetch(store, steps)))
    matmuls, start = 0, time.perf_counter()
    reader.start()
    while reader.is_alive():
        mx.eval(a @ a)
        matmuls += 1
    reader.join()
    return result["s"], matmuls, time.perf_counter() - start


def matmul_rate(size: int, seconds: float = 1.0) -> float:
    a = mx.random.normal((size, size))
    mx.eval(a)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        mx.eval(a @ a)
        n += 1
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, help="folder for the layer files (kept; reused when it matches)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--k", type=int, default=10, help="experts per layer step")
    p.add_argument("--steps", type=int, default=40, help="layer steps per pass")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the three passes (median reported)")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--matmul", type=int, default=512, help="size of the MLX matmul run beside the reads")
    p.add_argument("--cold", action="store_true", help="drop the files from the page cache before each pass")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    expert = ExpertLayout(args.hidden, args.intermediate, bits=args.bits)
    layout = ModelLayout(expert, args.experts, list(range(args.layers)))
    folder = args.dir or Path(tempfile.mkdtemp(prefix="flash_moe_store_io_"))
    try:
        t0 = time.perf_counter()
        how = reuse_or_make(folder, layout, rng)
        nbytes = layout.expert.expert_bytes
        print(
            f"{how} {args.layers} layer files x {args.experts} experts x {nbytes:,} bytes "
            f"({args.layers * layout.layer_bytes() / 1e9:.2f} GB) in {folder} ({time.perf_counter() - t0:.1f} s)"
        )
        steps = [(i % args.layers, rng.choice(args.experts, args.k, replace=False).tolist()) for i in range(args.steps)]
        total = args.steps * args.k * nbytes
        print(
            f"{args.steps} steps x K={args.k} = {total / 1e9:.2f} GB per pass, {args.threads} threads, "
            f"{'cold (fadvise DONTNEED before each pass)' if args.cold else 'warm page cache'}"
        )

        def prepare():
            if args.cold:
                drop_cache(folder, layout)

        # Rounds alternate the three passes, so a machine whose load drifts biases none of them.
        times = {"plain": [], "store": [], "beside": []}
        hit_rates, mm_rates = [], []
        plain_pread(folder, layout, steps[: min(4, len(steps))], args.threads)  # start threads, touch buffers
        with ExpertStore(folder, layout, capacity=args.k, threads=args.threads) as store:
            rate_alone = matmul_rate(args.matmul)
            for _ in range(args.rounds):
                prepare()
                times["plain"].append(plain_pread(folder, layout, steps, args.threads))
                prepare()
                store.stats.reset()
                times["store"].append(store_fetch(store, steps))
                hit_rates.append(store.stats.totals()["hit_rate"])
                prepare()
                seconds, matmuls, mm_seconds = store_fetch_beside_mlx(store, steps, args.matmul)
                times["beside"].append(seconds)
                mm_rates.append(matmuls / mm_seconds)
            probe, resident = store.probe, store.resident_bytes()

        def line(name, key, extra=""):
            t = sorted(times[key])
            med = t[len(t) // 2]
            print(
                f"  {name:<34} {total / med / 1e9:7.2f} GB/s  {med / args.steps * 1e3:7.2f} ms/step  "
                f"(rounds {total / t[-1] / 1e9:.2f}..{total / t[0] / 1e9:.2f})  {extra}"
            )
            return med

        print(f"median of {args.rounds} rounds:")
        base = line("(1) plain parallel pread", "plain")
        alone = line("(2) ExpertStore.fetch", "store", f"page-cache hits {np.mean(hit_rates):.0%} ({probe})")
        beside = line(
            "(3) ExpertStore.fetch beside MLX",
            "beside",
            f"matmul {args.matmul}^2: {np.median(mm_rates):.1f}/s vs {rate_alone:.1f}/s alone",
        )
        print(f"  ratios: (2)/(1) = {base / alone:.2f}, (3)/(1) = {base / beside:.2f}  (throughput, 1.0 = plain pread)")
        print(f"  slot buffers: {resident / 1e6:.1f} MB")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

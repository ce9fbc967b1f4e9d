"""The page-cache read path under a memory cap: ExpertStore.fetch against the disk ceiling, per read setting.

    python benchmarks/page_cache_cap.py --dir /tmp/pcc --layers 2 [--cap-fraction 0.16] [--variants base direct ...]
    python benchmarks/page_cache_cap.py --model /root/syn397      # a converted model's own expert files

Makes (or reuses) packed layer files of random bytes at Qwen3.5-397B's expert shape (or reads a converted
model's, ``--model``), measures the disk
ceiling (``disk_ceiling.py``), enters a cgroup memory limit of ``cap_fraction`` of the expert bytes (page
cache included; the slot buffers are allocated before, outside it), then per variant: evicts the files,
fetches ``warmup`` layer steps (the page cache fills up to the cap), and times ``steps`` more. A layer step
is K experts drawn with Qwen3.5's measured popularity skew (top 20% of experts ~42% of picks), layers in
turn, as decoding asks. Per variant: store GB/s and its ratio to the ceiling, page-cache hits, bytes the
process read from the device (``/proc/self/io``: readahead shows up here), and the cgroup's reclaim counts.
The ceiling is measured again at the end, inside the cap; ratios use the better of the two. CPU seconds
per GB fetched (user + system of the whole process: the kernel's copy out of the page cache and the
cgroup's reclaim run on the reading threads) say what a CPU-starved machine pays.

Variants (each a change to one thing, against ``base`` = the store's defaults: buffered, 2 MiB chunks,
16 threads, no readahead): readahead (the kernel's readahead left on, the store's default before issue 19),
willneed (POSIX_FADV_WILLNEED on the K experts before the fetch), dontneed (POSIX_FADV_DONTNEED on them
after: nothing left to reclaim, no hits either), whole (one read per expert), small (512 KiB chunks),
threads4, threads32, direct (O_DIRECT: no page cache at all).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode import enter_memory_cap  # noqa: E402
from benchmarks.disk_ceiling import describe, disk_ceiling  # noqa: E402
from benchmarks.store_io import make_files  # noqa: E402
from flash_moe.layout import ExpertLayout, ModelLayout  # noqa: E402
from flash_moe.store import ExpertStore  # noqa: E402

VARIANTS = ("base", "readahead", "direct", "whole", "threads4", "threads32", "dontneed", "willneed", "small")
SKEW = 0.65  # exp(SKEW * z) popularity over normal quantiles z: top 20% of 512 experts get ~42% of picks


def popularity(num_experts: int, rng) -> np.ndarray:
    z = np.array([NormalDist().inv_cdf((i + 0.5) / num_experts) for i in range(num_experts)])
    w = np.exp(SKEW * rng.permutation(z))
    return w / w.sum()


def proc_read_bytes() -> int:
    """Bytes this process made the block layer read (readahead included, page-cache hits not)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def reclaim_counts() -> dict:
    """The cgroup's reclaim counters (v2 memory.stat pgscan/pgsteal; v1 has only pgpgout), 0 when unreadable."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for base in ([Path("/sys/fs/cgroup/memory")] if controllers == "memory" else
                     [Path("/sys/fs/cgroup")] if controllers == "" else []):
            stat = base / path.strip("/") / "memory.stat"
            if stat.exists():
                rows = dict(r.split() for r in stat.read_text().splitlines())
                return {k: int(rows[k]) for k in ("pgscan", "pgsteal", "pgpgout", "pgmajfault") if k in rows}
    return {}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def evict(fds: list[int]) -> None:
    for fd in fds:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def run_variant(name: str, folder: Path, layout: ModelLayout, steps: list, warmup: int, threads: int, fds: list[int]) -> dict:
    e = layout.expert
    opts = {"threads": threads, "read_chunk": 2 << 20, "readahead": name == "readahead"}
    if name == "whole":
        opts["read_chunk"] = -(-e.expert_bytes // 4096) * 4096
    elif name == "small":
        opts["read_chunk"] = 512 << 10
    elif name.startswith("threads"):
        opts["threads"] = int(name[len("threads"):])
    k = max(len(ids) for _, ids in steps)
    with ExpertStore(folder, layout, capacity=k, direct=name == "direct", **opts) as store:
        by_layer = {l: fds[i] for i, l in enumerate(layout.moe_layers)}

        def fetch(layer, ids):
            if name == "willneed":
                for x in ids:
                    os.posix_fadvise(by_layer[layer], x * e.stride, e.expert_bytes, os.POSIX_FADV_WILLNEED)
            store.fetch(layer, ids)
            if name == "dontneed":
                for x in ids:
                    os.posix_fadvise(by_layer[layer], x * e.stride, e.expert_bytes, os.POSIX_FADV_DONTNEED)

        evict(fds)
        for layer, ids in steps[:warmup]:
            fetch(layer, ids)
        store.stats.reset()
        read0, reclaim0, cpu0, start = proc_read_bytes(), reclaim_counts(), cpu_seconds(), time.perf_counter()
        for layer, ids in steps[warmup:]:
            fetch(layer, ids)
        secs, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
        t = store.stats.totals()
        reclaim = {key: v - reclaim0.get(key, 0) for key, v in reclaim_counts().items()}
    device = proc_read_bytes() - read0
    return {"variant": name, "gbps": t["bytes"] / secs / 1e9, "seconds": secs, "bytes": t["bytes"],
            "hit_rate": t["hit_rate"], "device_bytes": device, "device_per_byte": device / t["bytes"], "reclaim": reclaim,
            "cpu_s_per_gb": cpu / (t["bytes"] / 1e9)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=None, help="folder of the layer files (kept and reused)")
    p.add_argument("--model", type=Path, default=None, help="read this converted model's expert files instead")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=512)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--cap-fraction", type=float, default=0.16, help="memory cap as a fraction of the expert bytes")
    p.add_argument("--no-cap", action="store_true", help="run without a memory cap (for comparison)")
    p.add_argument("--warmup", type=int, default=60, help="layer steps before timing (fill the cache)")
    p.add_argument("--steps", type=int, default=150, help="timed layer steps per variant")
    p.add_argument("--rounds", type=int, default=1, help="rounds over the variants (they alternate)")
    p.add_argument("--threads", type=int, default=16, help="the store's reader threads (base)")
    p.add_argument("--ceiling-seconds", type=float, default=2.0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    if args.model:
        folder, layout = args.model, ModelLayout.read(args.model)
    else:
        layout = ModelLayout(ExpertLayout(args.hidden, args.intermediate, bits=4), args.experts, list(range(args.layers)))
        folder = args.dir or Path(tempfile.mkdtemp(prefix="flash_moe_pcc_"))
    start = time.perf_counter()
    paths = [folder / layout.layer_file(l) for l in layout.moe_layers]
    how = "reused"
    if not all(f.exists() and f.stat().st_size == layout.layer_bytes() for f in paths):
        if args.model:
            sys.exit(f"{args.model}: layer files missing or of the wrong size")
        make_files(folder, layout, rng)
        how = "created"
    total = len(paths) * layout.layer_bytes()
    print(f"{how} {len(paths)} layer files of {layout.num_experts} x {layout.expert.expert_bytes:,} B ({total / 1e9:.2f} GB) "
          f"in {folder} ({time.perf_counter() - start:.0f} s); read_ahead_kb of the devices: "
          + ", ".join(f"{d.parent.parent.name}={d.read_text().strip()}" for d in Path("/sys/block").glob("*/queue/read_ahead_kb")
                      if not d.parent.parent.name.startswith(("loop", "ram"))))
    pop = popularity(layout.num_experts, rng)
    n, layers = args.warmup + args.steps, layout.moe_layers
    steps = [(layers[i % len(layers)], rng.choice(layout.num_experts, args.k, replace=False, p=pop).tolist()) for i in range(n)]
    before = disk_ceiling(folder, seconds=args.ceiling_seconds, layout=layout)
    print("disk ceiling before:", describe(before))
    fds = [os.open(f, os.O_RDONLY) for f in paths]
    if not args.no_cap:
        print("cap:", enter_memory_cap(str(int(args.cap_fraction * total))), f"= {args.cap_fraction} of the expert bytes")
    rows = []
    for _ in range(args.rounds):
        for v in args.variants:
            r = run_variant(v, folder, layout, steps, args.warmup, args.threads, fds)
            rows.append(r)
            print(f"  {v:<10} {r['gbps']:6.2f} GB/s  hits {r['hit_rate']:4.0%}  device reads {r['device_per_byte']:5.2f} x "
                  f"the bytes fetched  CPU {r['cpu_s_per_gb']:.2f} s/GB  reclaim {r['reclaim']}", flush=True)
    after = disk_ceiling(folder, seconds=args.ceiling_seconds, layout=layout)
    print(f"disk ceiling after{'' if args.no_cap else ' (inside the cap)'}:", describe(after))
    ceiling = max(before["gbps"], after["gbps"])
    print(f"per variant, median over rounds, against the ceiling {ceiling:.2f} GB/s:")
    for v in args.variants:
        mine = [r for r in rows if r["variant"] == v]
        g = float(np.median([r["gbps"] for r in mine]))
        dev, cpu = (float(np.median([r[key] for r in mine])) for key in ("device_per_byte", "cpu_s_per_gb"))
        print(f"  {v:<10} {g:6.2f} GB/s = {g / ceiling:.2f} x ceiling; device reads {dev:.2f} x fetched; CPU {cpu:.2f} s/GB "
              f"(rounds: " + ", ".join(f"{r['gbps']:.2f}" for r in mine) + ")")
    for fd in fds:
        os.close(fd)


if __name__ == "__main__":
    main()

"""Decode benchmark: flash_moe streaming vs the disk's bound and vs mlx-lm, in one run.

    python benchmarks/decode.py --model DIR [--k 4] [--cold] [--cap 48G] [--peer]

Prints, in order: the disk's ceiling for random expert reads (``disk_ceiling.py``: O_DIRECT, many reads in
flight; measured again after the trials, the bound takes the better), a plain parallel-pread test over the
same expert files in decoding's pattern (cold when the page cache can be dropped, warm otherwise),
flash_moe decode with mlx_lm.benchmark's keys (prompt_tps, generation_tps, peak_memory), a per-phase
breakdown, bytes read and page-cache hit rate per token, the I/O bound (bytes missed per generated token /
the disk ceiling + the time not spent reading) and our ratio to it, and with ``--peer`` mlx-lm decoding a
resident model of the same shapes. ``--cap`` runs everything inside a cgroup memory limit (Linux, root; v2,
or v1 as on the CPU box), which counts the page cache: 48G emulates a 48 GB laptop.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flash_moe import load  # noqa: E402
from flash_moe.generation import generate_step  # noqa: E402
from flash_moe.layout import ModelLayout  # noqa: E402
from flash_moe.timing import PhaseTimer  # noqa: E402

from benchmarks.disk_ceiling import DEPTHS, describe, disk_ceiling  # noqa: E402


def drop_page_cache(files) -> str:
    """Drop the whole page cache if we may (root), else evict our files; say which happened."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "dropped (drop_caches)"
    except OSError:
        pass
    if hasattr(os, "posix_fadvise"):
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        return "evicted per file (posix_fadvise DONTNEED; may be partial)"
    return "NOT dropped (no permission): results are warm"


def enter_memory_cap(limit, name: str = "flash_moe_bench") -> str:
    """Move this process into a child cgroup whose memory limit (page cache included) is ``limit``.
    Charges made before the move stay where they were (v1's default, v2's rule)."""
    v1 = Path("/sys/fs/cgroup/memory")
    if v1.is_dir():  # cgroup v1 (the CPU box): a child of our own memory cgroup
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.split(":")[1] == "memory")
        cg = v1 / own.strip("/") / name
        try:
            cg.mkdir(exist_ok=True)
            (cg / "memory.limit_in_bytes").write_text(str(limit))
            (cg / "cgroup.procs").write_text(str(os.getpid()))
            return f"memory.limit_in_bytes={limit} (cgroup v1, counts the page cache)"
        except OSError as e:
            sys.exit(f"--cap needs root and the cgroup v1 memory controller: {e}")
    cg = Path("/sys/fs/cgroup") / name
    try:
        cg.mkdir(exist_ok=True)
        (cg / "memory.max").write_text(limit)
        (cg / "cgroup.procs").write_text(str(os.getpid()))
        return f"memory.max={limit} (cgroup v2, counts the page cache)"
    except OSError as e:
        sys.exit(f"--cap needs root and cgroup v2 with the memory controller: {e}")


def pread_test(folder: Path, layout: ModelLayout, k: int, tokens: int, threads: int, seed: int,
               per_layer: bool = False, chunk: int = 2 << 20, direct: bool = False) -> dict:
    """K random experts per MoE layer per token, read with plain os.preadv on `threads` threads.

    per_layer=False: every read of every token submitted at once (deep queue: what the disk can do).
    per_layer=True: one layer's K experts at a time, each cut into `chunk`-byte reads, waiting for the layer
    (decoding's own pattern: the next layer's experts are unknown until this one is computed).
    direct=True: O_DIRECT into a page-aligned buffer (the page cache bypassed: always cold)."""
    e = layout.expert
    rng = np.random.default_rng(seed)
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = {l: os.open(folder / layout.layer_file(l), flags) for l in layout.moe_layers}
    buf = mmap.mmap(-1, e.expert_bytes * k)  # page-aligned, as O_DIRECT wants
    pieces = [(j * e.expert_bytes + a, min(chunk, e.expert_bytes - a)) for j in range(k) for a in range(0, e.expert_bytes, chunk)]
    steps = [[(fds[l], int(x)) for x in rng.choice(layout.num_experts, k, replace=False)]
             for _ in range(tokens) for l in layout.moe_layers]
    view = memoryview(buf)

    def read(job):
        fd, expert, (at, n) = job
        return os.preadv(fd, [view[at : at + n]], expert * e.stride + at % e.expert_bytes)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        if per_layer:
            for step in steps:
                list(pool.map(read, [(fd, x, p) for j, (fd, x) in enumerate(step) for p in pieces if p[0] // e.expert_bytes == j]))
        else:
            list(pool.map(read, [(fd, x, p) for step in steps for j, (fd, x) in enumerate(step) for p in pieces
                                 if p[0] // e.expert_bytes == j]))
    secs = time.perf_counter() - start
    for fd in fds.values():
        os.close(fd)
    return {"gb_per_s": len(steps) * k * e.expert_bytes / secs / 1e9, "seconds": secs, "reads": len(steps) * k}


def io_bound(missed_bytes: float, read_seconds: float, token_seconds: float, ceiling_gbps: float) -> dict:
    """Per generated token: what decoding would cost if every missed byte came at the disk's ceiling and
    nothing else changed: missed bytes / ceiling + the time not spent reading. ratio = bound / measured.

    The ratio stays <= 1 while the store reads no faster than the ceiling (it reads the same disk) and
    its reads sit on the critical path; it can pass 1 when the disk ran faster during the run than during
    either ceiling pass, or when reads overlap compute (prefetching)."""
    compute = max(token_seconds - read_seconds, 0.0)
    bound = missed_bytes / (ceiling_gbps * 1e9) + compute
    return {"missed_mb_per_token": missed_bytes / 1e6, "read_ms": 1e3 * read_seconds, "compute_ms": 1e3 * compute,
            "bound_ms": 1e3 * bound, "actual_ms": 1e3 * token_seconds, "ceiling_gb_per_s": ceiling_gbps,
            "ratio": bound / token_seconds if token_seconds else float("nan")}


def decode_trial(model, prompt_tokens: int, generation_tokens: int, seed: int, timer=None) -> dict:
    mx.random.seed(seed)
    prompt = mx.random.randint(0, model.config.vocab_size, (prompt_tokens,)).astype(mx.int32)
    before = gen_before = model.stats.snapshot() if model.stats is not None else None
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = None
    for i, _ in enumerate(generate_step(prompt, model, max_tokens=generation_tokens, timer=timer)):
        if i == 0:
            first = time.perf_counter()
            gen_before = model.stats.snapshot() if before is not None else None
            tiers_before = tier_counts(model)
    end = time.perf_counter()
    tiers_gen = {t: {k: v - tiers_before[t][k] for k, v in c.items()} for t, c in tier_counts(model).items()}
    io = model.stats.snapshot().delta(before).totals() if before is not None else {}
    # reads of the generated tokens after the first: what generation_tps times (prefill reads grouped)
    io_gen = model.stats.snapshot().delta(gen_before).totals() if before is not None else {}
    return {
        "prompt_tps": prompt_tokens / (first - start),
        "generation_tps": (generation_tokens - 1) / (end - first) if generation_tokens > 1 else 0.0,
        "peak_memory": mx.get_peak_memory() / 1e9,
        "total_time": end - start,
        "io": io,
        "io_generation": io_gen,
        "tiers_generation": tiers_gen,
    }


def tier_counts(model) -> dict:
    """The numeric counters of each memory tier (``LoadedModel.tier_totals``), for deltas."""
    totals = model.tier_totals() if hasattr(model, "tier_totals") else {}
    return {t: {k: v for k, v in c.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for t, c in totals.items()}


def host_to_device_gbps(model, n: int = 16) -> float | None:
    """The host tier's copy bandwidth into device arrays (pinned memory -> GPU on CUDA), on ``n`` experts of
    the first layer: a first fill reads them in, the second is the copy alone."""
    host = model.host_cache
    if host is None:
        return None
    from flash_moe.layout import mlx_dtype

    layout = model.store.layout
    ids = np.arange(min(n, layout.num_experts, host.capacity))
    targets = {t.name: mx.zeros((len(ids), *t.shape), mlx_dtype(t.dtype)) for t in layout.expert.tensors}
    mx.eval(list(targets.values()))
    host.fill_into(layout.moe_layers[0], ids, targets, np.arange(len(ids)))
    start = time.perf_counter()
    host.fill_into(layout.moe_layers[0], ids, targets, np.arange(len(ids)))
    return len(ids) * layout.expert.expert_bytes / (time.perf_counter() - start) / 1e9


def tiered_bound(args, result: dict, layout, trials: list, tokens: int, gen_ms: float, h2d, ceiling_gbps: float):
    """Per generated token: device-tier misses served by the host tier cost a copy at the host->device
    bandwidth measured in this run, the rest a disk read at the disk's (--disk-gbps, else the disk ceiling);
    plus the time not spent reading or copying. Counts over the trials' generated tokens after the first."""
    eb = layout.expert.expert_bytes
    delta = {}
    for r in trials:
        for tier, counts in r["tiers_generation"].items():
            for k, v in counts.items():
                delta.setdefault(tier, {}).setdefault(k, 0)
                delta[tier][k] += v
    tokens = max(tokens, 1)
    host, store = delta.get("host"), delta["store"]
    guessed = host["prefetched"] if host else 0
    disk_reads = (store["experts"] - guessed) / tokens  # demand reads; the guesses ran beside the compute
    host_hits = host["hits"] / tokens if host else 0.0
    read_s = (host["read_seconds"] if host else store["seconds"]) / tokens
    copy_s = host["copy_seconds"] / tokens if host else 0.0
    gbps, source = (args.disk_gbps, "--disk-gbps") if args.disk_gbps else (ceiling_gbps, "disk ceiling")
    not_reading = max(gen_ms - 1e3 * (read_s + copy_s), 0.0)
    bound = 1e3 * (host_hits * eb / (h2d * 1e9) if h2d else 0.0) + 1e3 * disk_reads * eb / (gbps * 1e9) + not_reading
    out = {"per_token": {"device_hits": delta["device"]["hits"] / tokens if "device" in delta else 0.0,
                         "host_hits": host_hits, "disk_reads": disk_reads, "prefetched": guessed / tokens,
                         "prefetch_used": (host["prefetch_used"] / tokens) if host else 0.0},
           "host_to_device_gb_per_s": h2d, "disk_gb_per_s": gbps, "disk_source": source, "read_ms": 1e3 * read_s,
           "copy_ms": 1e3 * copy_s, "not_reading_ms": not_reading, "bound_ms": bound, "actual_ms": gen_ms,
           "ratio": bound / gen_ms if gen_ms else float("nan"), "tiers": delta}
    # Projected: every per-layer cost scales with the MoE layers (reads, copies and compute alike), and the
    # disk reads go to a disk of --project-disk-gbps; the hit rates are this run's (synthetic routing: a floor).
    scale = args.project_layers / max(len(layout.moe_layers), 1)
    projected = scale * (1e3 * (host_hits * eb / (h2d * 1e9) if h2d else 0.0)
                         + 1e3 * disk_reads * eb / (args.project_disk_gbps * 1e9) + not_reading)
    out["projected"] = {"layers": args.project_layers, "disk_gb_per_s": args.project_disk_gbps, "ms": projected,
                        "tok_per_s": 1e3 / projected if projected else float("nan")}
    result["tiered_bound"] = out
    p = out["per_token"]
    print(f"tiers per token: {p['device_hits']:.1f} device hits, {host_hits:.1f} host hits, {disk_reads:.1f} disk reads waited for"
          f" (+{p['prefetched']:.1f} guessed on the side, {p['prefetch_used']:.1f} of them used); host->device "
          f"{h2d or float('nan'):.1f} GB/s, disk {gbps:.2f} GB/s ({source})")
    print(f"tiered-memory bound {bound:.1f} ms (= host hits x {eb / 1e6:.2f} MB / host->device + disk reads / disk + "
          f"{not_reading:.1f} ms not reading) vs {gen_ms:.1f} ms measured: ratio {out['ratio']:.2f}")
    print(f"projected to {args.project_layers} MoE layers with a {args.project_disk_gbps:g} GB/s disk (this run's "
          f"per-tier miss rates): {projected:.1f} ms/token = {out['projected']['tok_per_s']:.2f} tok/s")


def peer_mlx_lm(folder: Path, k: int, prompt_tokens: int, generation_tokens: int, trials: int) -> dict:
    """mlx-lm decoding the same weights, all resident: our resident.safetensors + every packed expert,
    renamed to mlx-lm's qwen3_5_moe names."""
    import mlx.nn as nn
    from mlx_lm.models import qwen3_5_moe

    from flash_moe.load import read_packed_experts

    config = json.loads((folder / "config.json").read_text())
    layout = ModelLayout.read(folder)
    cfg = {k2: v for k2, v in config.items() if k2 not in ("quantization", "flash_moe")}
    cfg.update(num_experts_per_tok=k, model_type="qwen3_5_moe_text")
    model = qwen3_5_moe.Model(qwen3_5_moe.ModelArgs.from_dict({"model_type": "qwen3_5_moe", "text_config": cfg}))
    weights = dict(mx.load(str(folder / "resident.safetensors")))
    for layer in layout.moe_layers:
        weights.update(read_packed_experts(folder, layout, layer))
    weights = {"language_model." + n.replace(".mlp.experts.", ".mlp.switch_mlp."): w for n, w in weights.items()}
    e = layout.expert

    def quantized(path, module):
        scales = weights.get(f"{path}.scales")
        if scales is None or not hasattr(module, "to_quantized"):
            return False
        bits = weights[f"{path}.weight"].shape[-1] * 32 // (scales.shape[-1] * e.group_size)
        return {"group_size": e.group_size, "bits": bits}

    nn.quantize(model, class_predicate=quantized)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    weights = None
    return lm_trials(model, cfg["vocab_size"], prompt_tokens, generation_tokens, trials)


def lm_trials(model, vocab_size: int, prompt_tokens: int, generation_tokens: int, trials: int) -> dict:
    """mlx-lm's own generate_step on an mlx-lm model: one warm-up, then the trials' averages (same keys as ours)."""
    from mlx_lm.generate import generate_step as lm_step

    out = []
    for t in range(trials + 1):  # the first is a warm-up
        prompt = mx.random.randint(0, vocab_size, (prompt_tokens,))
        start = time.perf_counter()
        for i, _ in enumerate(lm_step(prompt, model, max_tokens=generation_tokens)):
            if i == 0:
                first = time.perf_counter()
        end = time.perf_counter()
        if t:
            out.append({"prompt_tps": prompt_tokens / (first - start),
                        "generation_tps": (generation_tokens - 1) / (end - first)})
    model = None  # free the resident copy before returning
    mx.clear_cache()
    return {key: float(np.mean([o[key] for o in out])) for key in out[0]}


def profile_trial(model, args, path: str) -> None:
    """cProfile of one decode trial: where the host time goes (the GPU is mostly waiting on it)."""
    import cProfile
    import io as _io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    decode_trial(model, args.prompt_tokens, args.generation_tokens, seed=7)
    prof.disable()
    out = _io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(30)
    Path(path).write_text(out.getvalue())
    print(f"profile written to {path}")


def resident_run(folder: Path, args, result: dict) -> None:
    """Our model with every expert resident (gather_qmm, like mlx-lm): tells model code from streaming."""
    model = load(folder, experts_per_token=args.k, stream=False)
    decode_trial(model, args.prompt_tokens, 4, seed=0)
    trials = [decode_trial(model, args.prompt_tokens, args.generation_tokens, seed=100 + t) for t in range(args.num_trials)]
    avg = {key: float(np.mean([r[key] for r in trials])) for key in ("prompt_tps", "generation_tps", "peak_memory")}
    print("flash_moe, all experts resident: " + ", ".join(f"{k2}={v:.3f}" for k2, v in avg.items()))
    if args.profile:
        profile_trial(model, args, args.profile)
    result.update(resident=avg)
    model = None
    mx.clear_cache()
    finish(folder, args, result, avg, "flash_moe resident")


def finish(folder: Path, args, result: dict, avg: dict, ours: str) -> None:
    """The mlx-lm peer (``--peer``) beside our averages, then the JSON (``--json``)."""
    if args.peer:
        peer = peer_mlx_lm(folder, args.k, args.prompt_tokens, args.generation_tokens, args.num_trials)
        result["peer"] = peer
        print(f"mlx-lm (resident, same shapes): prompt_tps={peer['prompt_tps']:.3f}, generation_tps="
              f"{peer['generation_tps']:.3f}; {ours} / mlx-lm generation: {avg['generation_tps'] / peer['generation_tps']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="converted flash_moe folder (e.g. from make_synthetic.py)")
    p.add_argument("--k", type=int, default=4, help="experts per token")
    p.add_argument("-p", "--prompt-tokens", type=int, default=64)
    p.add_argument("-g", "--generation-tokens", type=int, default=32)
    p.add_argument("-n", "--num-trials", type=int, default=2)
    p.add_argument("--threads", type=int, default=8, help="reader threads (pread test and ExpertStore)")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each measurement")
    p.add_argument("--cap", default=None, help="cgroup-v2 memory.max for this process, e.g. 48G")
    p.add_argument("--cap-fraction", type=float, default=None,
                   help="after loading, cap new memory (page cache included) at this fraction of the expert bytes "
                        "+ 1 GiB: 0.16 is a 48 GB laptop's share of the 397B model's experts")
    p.add_argument("--cache-experts", default="0",
                   help="experts kept in device memory (ExpertCache): a count, a fraction of all experts, or 'all'")
    p.add_argument("--host-cache", default="0",
                   help="experts kept in host RAM behind the device cache (HostExpertCache, pinned on CUDA): a fraction "
                        "of all experts, bytes like 24GB, 'all' or 'auto'; prints the tiered-memory bound")
    p.add_argument("--prefetch", default="auto", choices=("auto", "on", "off"),
                   help="read the next layer's guessed experts into the host cache while a layer computes")
    p.add_argument("--disk-gbps", type=float, default=None,
                   help="disk bandwidth for the tiered bound (default: the disk ceiling measured in this run)")
    p.add_argument("--project-layers", type=int, default=60,
                   help="the tiered bound projected to this many MoE layers (the 397B model has 60) ...")
    p.add_argument("--project-disk-gbps", type=float, default=7.0, help="... and a disk of this bandwidth (NVMe: 7)")
    p.add_argument("--no-speculate", action="store_true",
                   help="with --cache-experts: always sync per layer (no speculative all-cached tokens)")
    p.add_argument("--preload", action="store_true", help="with --cache-experts: fill the device cache before decoding")
    p.add_argument("--direct", action=argparse.BooleanOptionalAction, default=None,
                   help="the ExpertStore reads with O_DIRECT (around the page cache), or not; default: the library's "
                        "'auto' (direct when a device cache is in front). Direct runs also measure a direct pread pass")
    p.add_argument("--read-chunk-kib", type=int, default=2048, help="bytes per read of the ExpertStore, in KiB")
    p.add_argument("--resident", action="store_true",
                   help="flash_moe with every expert in memory (no store): our model code against mlx-lm's")
    p.add_argument("--profile", default=None, help="write a cProfile summary of one decode trial to this file")
    p.add_argument("--warm-prompt", type=int, default=0,
                   help="before the trials, prefill this many random tokens (touches every expert: warms the caches)")
    p.add_argument("--peer", action="store_true", help="also run mlx-lm on a resident model of the same shapes")
    p.add_argument("--json", default=None, help="write all numbers to this file")
    p.add_argument("--ceiling-seconds", type=float, default=2.0,
                   help="seconds of reading per queue depth of the disk ceiling (before and after the trials)")
    args = p.parse_args()

    folder = Path(args.model)
    layout = ModelLayout.read(folder)
    files = [folder / layout.layer_file(l) for l in layout.moe_layers]
    result = {"args": vars(args), "device": str(mx.default_device())}
    if args.cap:
        result["cap"] = enter_memory_cap(args.cap)
        print("memory cap:", result["cap"])

    ceiling = {"before": disk_ceiling(folder, seconds=args.ceiling_seconds)}
    print("disk ceiling before the run:", describe(ceiling["before"]))
    result["ceiling"] = ceiling
    cache_state = drop_page_cache(files) if args.cold else "warm (not dropped)"
    disk = pread_test(folder, layout, args.k, 8, args.threads, seed=1)
    warm = pread_test(folder, layout, args.k, 8, args.threads, seed=1)  # the same reads again: page cache
    layered = pread_test(folder, layout, args.k, 8, args.threads, seed=1, per_layer=True)
    result["pread"] = {"first": disk, "repeat": warm, "repeat_per_layer": layered, "cache": cache_state}
    print(f"plain parallel pread in decoding's pattern ({args.threads} threads, {layout.expert.expert_bytes / 1e6:.2f} MB experts, "
          f"K={args.k}): first pass {disk['gb_per_s']:.2f} GB/s [{cache_state}], repeat {warm['gb_per_s']:.2f} GB/s, "
          f"repeat one layer at a time {layered['gb_per_s']:.2f} GB/s")
    direct_io = "auto" if args.direct is None else args.direct

    if args.resident:
        return resident_run(folder, args, result)
    model = load(folder, experts_per_token=args.k, threads=args.threads, cache_experts=args.cache_experts,
                 read_chunk=args.read_chunk_kib << 10, direct_io=direct_io, host_cache=args.host_cache,
                 prefetch={"auto": "auto", "on": True, "off": False}[args.prefetch])
    if model.device_cache is not None and args.no_speculate:
        model.device_cache.speculate = False
    if (model.device_cache is not None or model.host_cache is not None) and args.preload:
        from flash_moe.host_cache import preload_tiers

        start = time.perf_counter()
        n = preload_tiers(model.store, model.device_cache, model.host_cache)
        print(f"preloaded {n} experts into the device/host tiers in {time.perf_counter() - start:.1f} s")
    h2d = host_to_device_gbps(model)
    if args.cap_fraction is not None:
        expert_bytes = len(layout.moe_layers) * layout.layer_bytes()
        # Charges made before the move stay outside the group: the cap then bounds what decoding adds,
        # page cache included, as a laptop's free RAM bounds its page cache.
        result["cap"] = enter_memory_cap(str(int(args.cap_fraction * expert_bytes + (1 << 30))))
        print(f"memory cap after load: {result['cap']} ({args.cap_fraction:.2f} of {expert_bytes / 1e9:.1f} GB of experts)")
    decode_trial(model, args.prompt_tokens, 4, seed=0)  # warm-up at the trials' shapes (kernels compile per shape)
    if args.warm_prompt:
        pre = decode_trial(model, args.warm_prompt, 2, seed=1)
        print(f"warm-up prefill of {args.warm_prompt} tokens: {pre['prompt_tps']:.1f} tok/s, read {pre['io']['experts']} experts"
              + (f"; device cache {model.device_cache.totals()}" if model.device_cache is not None else ""))
    trials = []
    for t in range(args.num_trials):
        if args.cold:
            drop_page_cache(files)
        r = decode_trial(model, args.prompt_tokens, args.generation_tokens, seed=100 + t)
        trials.append(r)
        print(f"Trial {t + 1}: prompt_tps={r['prompt_tps']:.3f}, generation_tps={r['generation_tps']:.3f}, "
              f"peak_memory={r['peak_memory']:.3f}, total_time={r['total_time']:.3f}")
    avg = {key: float(np.mean([r[key] for r in trials])) for key in ("prompt_tps", "generation_tps", "peak_memory", "total_time")}
    print("Averages: " + ", ".join(f"{k2}={v:.3f}" for k2, v in avg.items()))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1e6 if sys.platform == "darwin" else 1e3)
    result["direct_io"] = model.store.direct
    print(f"resident: peak RSS {rss:.0f} MB, slot buffers {model.store.resident_bytes() / 1e6:.0f} MB; "
          f"expert reads {'with O_DIRECT' if model.store.direct else 'through the page cache'}")
    if model.device_cache is not None:
        result["device_cache"] = model.device_cache.totals()
        print(f"device expert cache: {result['device_cache']}")

    if args.profile:
        profile_trial(model, args, args.profile)
    if args.cold:
        drop_page_cache(files)
    timer = PhaseTimer(model).install()
    decode_trial(model, args.prompt_tokens, args.generation_tokens, seed=999, timer=timer)
    timer.uninstall()
    summary = timer.summary()
    print(timer.table())

    # The bound, per generated token (the reads after each trial's first token, which is what generation_tps
    # times), against the disk ceiling measured again now, in the same process: the better of the two passes.
    # Under a memory cap the read buffers count against it: a DeepSeek-V3 expert is 24.8 MB, and 64 in flight
    # (1.6 GB) beside the slot buffers went past a 3.1 GB cap (the kernel killed the run). Keep them <= 256 MiB.
    depths = [d for d in DEPTHS if not result.get("cap") or d * layout.expert.expert_bytes <= 256 << 20] or [1]
    ceiling["after"] = disk_ceiling(folder, seconds=args.ceiling_seconds, inflight=depths)
    print("disk ceiling after the run:", describe(ceiling["after"]))
    ceiling_gbps = max(ceiling["before"]["gbps"], ceiling["after"]["gbps"])
    eb = layout.expert.expert_bytes
    tokens = sum(args.generation_tokens - 1 for _ in trials)
    io = {key: sum(r["io_generation"][key] for r in trials) / max(tokens, 1)
          for key in ("hits", "misses", "seconds", "missed_bytes")}
    gen_s = 1 / avg["generation_tps"] if avg["generation_tps"] else float("nan")
    # missed bytes by chunk: an expert with one cached chunk counts as a miss but reads less from the disk
    missed = io["missed_bytes"]
    hit = (io["hits"] + io["misses"]) * eb - missed
    bound = io_bound(missed, io["seconds"], gen_s, ceiling_gbps)
    result.update(trials=trials, average=avg, phases=summary, rss_mb=rss, bound={**bound, "hit_mb_per_token": hit / 1e6})
    store_gbps = (io["hits"] + io["misses"]) * eb / max(io["seconds"], 1e-9) / 1e9
    result["store_vs_plain"] = {"store_gb_per_s": store_gbps, "plain_per_layer_gb_per_s": layered["gb_per_s"],
                                "plain_deep_queue_gb_per_s": warm["gb_per_s"], "ceiling_gb_per_s": ceiling_gbps}
    # cold runs compare with the disk ceiling, warm ones with plain pread in decoding's warm pattern
    plain, what = ((ceiling_gbps, "the disk ceiling (cold; the store's rate includes its page-cache hits)") if args.cold else
                   (layered["gb_per_s"], "plain parallel pread of the same files (warm, one layer at a time)"))
    result["store_vs_plain"]["ratio"] = store_gbps / plain
    print(f"ExpertStore while the model runs: {store_gbps:.2f} GB/s = {store_gbps / plain:.2f} x {what}")
    print(f"per generated token (trials): {missed / 1e6:.1f} MB missed + {hit / 1e6:.1f} MB hit "
          f"({100 * io['hits'] / max(io['hits'] + io['misses'], 1e-9):.0f}% page-cache hits), reads took {bound['read_ms']:.1f} ms; "
          f"I/O bound {bound['bound_ms']:.1f} ms (= missed / {ceiling_gbps:.2f} GB/s disk ceiling + {bound['compute_ms']:.1f} ms "
          f"not reading) vs {bound['actual_ms']:.1f} ms measured: ratio to the I/O bound {bound['ratio']:.2f}")
    if model.device_cache is not None or model.host_cache is not None:
        tiered_bound(args, result, layout, trials, tokens, bound["actual_ms"], h2d, ceiling_gbps)

    finish(folder, args, result, avg, "flash_moe")


if __name__ == "__main__":
    main()

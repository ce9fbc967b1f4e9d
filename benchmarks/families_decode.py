"""Decode benchmark for the families run through mlx-lm (issue 16): DeepSeek-V3 and Qwen3-235B-A22B shapes.

    python benchmarks/families_decode.py --family deepseek_v3 --layers 3 --work /root/fam --json out.json
    python benchmarks/families_decode.py --family qwen3_moe --layers 4 --work /root/fam --cleanup

One run, in order:
1. build (``family_synthetic.py``): an mlx-lm-quantized checkpoint with the family's real per-layer shapes and
   random weights in WORK/FAMILY-src, converted by ``flash_moe.convert`` into WORK/FAMILY (kept for later runs);
2. warm: flash_moe streaming with every expert in the device cache, preloaded (``cache_experts="all"``), then
   mlx-lm's own model of the source, all resident, on the same weights and the same prompt sizes: the ratio;
3. capped: ``benchmarks/decode.py`` on the converted folder in its own process (a cgroup cap cannot be left):
   page cache dropped, memory capped at ``--cap-fraction`` of the expert bytes after loading, its I/O bound
   (missed bytes / the cold raw pread rate + the time not reading) and the ratio to it.
``--cap-fraction 0`` runs step 3 without drop or cap (the warm page cache), as on a machine without root.
Goals (issue 16): warm >= 1.0x mlx-lm; capped >= 0.9 of the bound.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flash_moe  # noqa: E402
from benchmarks.decode import decode_trial, lm_trials  # noqa: E402
from benchmarks.family_synthetic import FAMILIES, build  # noqa: E402

KEYS = ("prompt_tps", "generation_tps", "peak_memory")


def phase(result: dict, name: str, fn, *args):
    """One step of the run; a failure is printed and recorded and the run goes on (a GPU lease is one try)."""
    try:
        result[name] = fn(*args)
        return result[name]
    except Exception as e:  # noqa: BLE001 - reported, and the exit status says so
        traceback.print_exc()
        print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
        result.setdefault("failed", []).append(name)
        return None


def host_split(forward, cache: list, prompt_tokens: int, vocab: int, reps: int = 20) -> dict:
    """One decode token after a prompt, in two halves: ``graph_ms``, the host building its graph (not evaluated:
    the share that decoding ahead hides behind the device's work), and ``eval_ms``, evaluating the built graph
    (launching it and the device running it) with nothing else in flight. Read-first, a token costs about
    their sum; decoding ahead, about the larger of graph + launching and the device time."""
    from benchmarks.family_op_count import build_time

    from flash_moe import family_cache

    forward(mx.random.randint(0, vocab, (1, prompt_tokens)).astype(mx.int32), cache)
    mx.eval([c.state for c in cache])
    tok = mx.array([[1]], dtype=mx.int32)
    built = build_time(forward, cache, tok, reps)
    evals = []
    for _ in range(reps):
        saved = [family_cache.snapshot(c) for c in cache]
        out = forward(tok, cache)
        start = time.perf_counter()
        mx.eval(out, [c.state for c in cache])
        evals.append(time.perf_counter() - start)
        for c, s in zip(cache, saved):
            family_cache.restore(c, s)
    return {"graph_ms": 1e3 * built, "eval_ms": 1e3 * float(np.median(evals))}


def warm_flash_moe(folder: Path, k: int, args) -> dict:
    """flash_moe with every expert on the device, preloaded: one warm-up at the trials' shapes, then the trials."""
    # Buffered reads: the preload then copies the just-written folder out of the page cache (O_DIRECT, the
    # default behind a device cache, would read all of it from the disk again at ~1.5 GB/s).
    model = flash_moe.load(folder, experts_per_token=k, threads=args.threads, cache_experts="all", direct_io=False)
    try:
        start = time.perf_counter()
        n = model.cache.preload() if model.cache is not None else 0
        if model.cache is not None and args.no_speculate:
            model.cache.speculate = False
        preload_s = time.perf_counter() - start
        decode_trial(model, args.prompt_tokens, 4, seed=0)  # kernels compile per shape (MLX's CUDA JIT)
        trials = [decode_trial(model, args.prompt_tokens, args.generation_tokens, seed=100 + t)
                  for t in range(args.num_trials)]
        out = {key: float(np.mean([r[key] for r in trials])) for key in KEYS}
        out.update(preloaded=n, preload_s=preload_s, trials=trials,
                   device_cache=model.cache.totals() if model.cache is not None else None)
        # after the totals: these builds book hits too
        out.update(host_split(model.forward, model.make_cache(), args.prompt_tokens, model.config.vocab_size))
        return out
    finally:
        model.close()
        del model
        gc.collect()  # the device cache's arrays go with the model
        mx.clear_cache()


def mlx_lm_peer(src: Path, k: int, args) -> dict:
    """mlx-lm's own model of the source checkpoint (its loader, its SwitchGLU, all experts resident), routed to k."""
    from mlx_lm.utils import load_model

    from flash_moe.families import routing_attrs, switches

    from mlx_lm.models.cache import make_prompt_cache

    model, config = load_model(src)
    for module, name in routing_attrs(model, list(switches(model))):
        setattr(module, name, k)
    split = host_split(model, make_prompt_cache(model), args.prompt_tokens, config["vocab_size"])
    return {**lm_trials(model, config["vocab_size"], args.prompt_tokens, args.generation_tokens, args.num_trials), **split}


def capped(folder: Path, k: int, args) -> dict:
    """benchmarks/decode.py on the converted folder, in its own process; its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "decode.json"
        cmd = [sys.executable, str(Path(__file__).with_name("decode.py")), "--model", str(folder), "--k", str(k),
               "--threads", str(args.threads), "-p", str(args.cap_prompt_tokens), "-g", str(args.cap_generation_tokens),
               "-n", str(args.num_trials), "--cache-experts", args.cap_cache_experts, "--json", str(out)]
        if args.cap_fraction:
            cmd += ["--cold", "--cap-fraction", str(args.cap_fraction)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", required=True, choices=sorted(FAMILIES))
    p.add_argument("--layers", type=int, default=3, help="decoder layers, all MoE")
    p.add_argument("--work", type=Path, required=True, help="folder for WORK/FAMILY-src and WORK/FAMILY")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tiny", action="store_true", help="test-sized dims (tests/test_families_decode.py)")
    p.add_argument("--dtype", default="bfloat16", help="scales, biases and resident floats")
    p.add_argument("--k", type=int, default=None, help="experts per token (default: the family's, 8 for both)")
    p.add_argument("-p", "--prompt-tokens", type=int, default=64)
    p.add_argument("-g", "--generation-tokens", type=int, default=32)
    p.add_argument("-n", "--num-trials", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--no-warm", action="store_true", help="skip step 2 (flash_moe warm and mlx-lm)")
    p.add_argument("--no-peer", action="store_true", help="skip mlx-lm in step 2")
    p.add_argument("--no-speculate", action="store_true",
                   help="step 2 without speculative tokens (a per-layer host sync every decode token), to measure them")
    p.add_argument("--cap-fraction", type=float, default=0.16, help="step 3's cap; 0: no drop, no cap; -1: skip step 3")
    p.add_argument("--cap-cache-experts", default="0.33",
                   help="step 3's device cache (decode.py --cache-experts; direct reads follow, as by default): 0.33 = "
                        "the share a whole DeepSeek-V3 / Qwen3-235B gets on one GPU, as the 397B runs' cap_cache_k4; "
                        "0 = the page cache alone")
    p.add_argument("--cap-prompt-tokens", type=int, default=8, help="step 3's prompt (a long cold prefill reads most experts)")
    p.add_argument("--cap-generation-tokens", type=int, default=16)
    p.add_argument("--cleanup", action="store_true", help="remove both folders at the end (disk for the next family)")
    p.add_argument("--json", default=None, help="write all numbers to this file")
    args = p.parse_args(argv)

    src, folder = args.work / f"{args.family}-src", args.work / args.family
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "device": str(mx.default_device())}
    try:
        result["build"] = build(args.family, args.layers, src, folder, vocab=args.vocab, tiny=args.tiny, dtype=args.dtype)
        print("build:", json.dumps(result["build"]), flush=True)
        k = args.k or json.loads((folder / "config.json").read_text())["num_experts_per_tok"]
        ours = None if args.no_warm else phase(result, "warm", warm_flash_moe, folder, k, args)
        if ours:
            print(f"flash_moe warm, K={k}, every expert in the device cache ({ours['preloaded']} preloaded in "
                  f"{ours['preload_s']:.1f} s): " + ", ".join(f"{key}={ours[key]:.3f}" for key in KEYS)
                  + ", speculative tokens {speculated} ({voided} voided)".format(**(ours["device_cache"] or
                                                                                  {"speculated": 0, "voided": 0})),
                  flush=True)
        peer = None if args.no_warm or args.no_peer else phase(result, "peer", mlx_lm_peer, src, k, args)
        if peer:
            print(f"mlx-lm resident, same weights: prompt_tps={peer['prompt_tps']:.3f}, generation_tps="
                  f"{peer['generation_tps']:.3f}", flush=True)
        for name, r in (("flash_moe", ours), ("mlx-lm", peer)):
            if r:
                print(f"{name}: {1e3 / r['generation_tps']:.3f} ms a decode token; alone, building its graph on the "
                      f"host {r['graph_ms']:.3f} ms, then evaluating it {r['eval_ms']:.3f} ms", flush=True)
        if ours and peer:
            result["warm_vs_mlx_lm"] = ours["generation_tps"] / peer["generation_tps"]
            print(f"flash_moe / mlx-lm generation: {result['warm_vs_mlx_lm']:.2f}x (goal >= 1.0), prompt: "
                  f"{ours['prompt_tps'] / peer['prompt_tps']:.2f}x", flush=True)
        cap = phase(result, "capped", capped, folder, k, args) if args.cap_fraction >= 0 else None
        if cap:
            print(f"capped ({args.cap_fraction:.2f} of the experts, device cache {args.cap_cache_experts}): generation_tps="
                  f"{cap['average']['generation_tps']:.3f}, ratio to the I/O bound {cap['bound']['ratio']:.2f} "
                  f"(goal >= 0.9)", flush=True)
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        if args.cleanup:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)
    if result.get("failed"):
        sys.exit(f"failed: {', '.join(result['failed'])}")
    return result


if __name__ == "__main__":
    main()

"""Launches per decode layer and per token for a family model (issue 16): flash_moe's streamed one against
mlx-lm's own resident one on the same weights.

    python benchmarks/family_op_count.py [--family qwen3_moe|deepseek_v3] [--layers 2] [--json OUT]

Writes the family at test size (``family_synthetic.build(tiny=True)``: every structure of the real model,
small dims), loads it twice, flash_moe streamed with every expert in a preloaded device tier (decode tokens
run as certain speculative tokens, as in ``families_decode.py``'s warm run) and mlx-lm's ``load_model`` of
the source, then counts one decode token's graph per piece as ``op_count.py`` does (its GPU stand-ins on
the CPU). A ``Reshape`` of a ``Broadcast`` copies on a GPU (``mx.repeat``): counted as a launch here.
Also times the host's graph building of one decode token (no evaluation): the part of a token that
decoding ahead (``mx.async_eval``, generation.decodes_ahead) hides behind the device's work.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flash_moe  # noqa: E402
from benchmarks.family_synthetic import build  # noqa: E402
from benchmarks.op_count import VIEWS, install_stand_ins, summary  # noqa: E402
from flash_moe import family_cache  # noqa: E402


# A dtype view of the same width ("View uint32" in the graph; families.switch_outputs' slot indices) shares the buffer.
VIEWS.add("View")


def count(outputs, path: Path) -> Counter:
    """Primitive labels of the graph, with each Reshape fed by a Broadcast relabelled a copy (a GPU launch)."""
    mx.export_to_dot(str(path), *[o for o in outputs if isinstance(o, mx.array)])
    text = path.read_text()
    labels = {n: ("View" if l.startswith("View ") else l) for n, l in re.findall(r'(\d+) \[label ="([^"]+)"', text)}
    producer = dict((a, p) for p, a in re.findall(r'(\d+) -> "([^"]+)"', text))  # array -> its primitive
    c = Counter(labels.values())
    for a, p in re.findall(r'"([^"]+)" -> (\d+)', text):  # array -> the primitive it feeds
        if labels.get(p) == "Reshape" and labels.get(producer.get(a)) == "Broadcast":
            c["Reshape"] -= 1
            c["Copy (reshape of a broadcast)"] += 1
    return +c


def pieces(model, cache, speculation, tmp: Path, x, tok) -> dict:
    """Per piece of layer 0 and the whole token: the summary of its graph."""
    layer = model.model.layers[0]
    rows = {}

    def measure(name, fn):
        saved = [family_cache.snapshot(c) for c in cache]
        if speculation is not None:  # as Speculation.step runs a token on a tier holding every expert
            speculation.begin(sure=speculation.certain())
        try:
            out = fn()
        finally:
            lookups = speculation.end() if speculation is not None else None
        outs = (list(out) if isinstance(out, (tuple, list)) else [out]) + [lookups]
        rows[name] = summary(count(outs, tmp / "g.dot"))
        for c, s in zip(cache, saved):
            family_cache.restore(c, s)
        mx.eval([c.state for c in cache])

    k = next(getattr(layer.mlp, n) for n in ("top_k", "num_experts_per_tok") if hasattr(layer.mlp, n))
    inds = mx.arange(k, dtype=mx.uint32).reshape(1, 1, k)  # as argpartition gives them
    mx.eval(inds)  # a leaf: not counted
    measure("attention mixer", lambda: layer.self_attn(layer.input_layernorm(x), None, cache[0]))
    measure("switch_mlp (experts only)", lambda: layer.mlp.switch_mlp(x, inds))
    measure("MoE block (router, experts, shared)", lambda: layer.mlp(x))
    measure("decoder layer", lambda: layer(x, None, cache[0]))
    measure("token (embed, layers, norm, lm_head)", lambda: model(tok, cache))
    return rows


def build_time(forward, cache, tok, reps: int) -> float:
    """Median seconds to build one decode token's graph (not evaluated); the cache rewound after each."""
    times = []
    for _ in range(reps):
        saved = [family_cache.snapshot(c) for c in cache]
        start = time.perf_counter()
        out = forward(tok, cache)
        times.append(time.perf_counter() - start)
        del out
        for c, s in zip(cache, saved):
            family_cache.restore(c, s)
        mx.eval([c.state for c in cache])  # mlx-lm's KV writes are in place: run them, or the graphs chain
    return float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="qwen3_moe", choices=["qwen3_moe", "deepseek_v3"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--reps", type=int, default=30, help="graph builds timed per model")
    p.add_argument("--json")
    args = p.parse_args(argv)
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build(args.family, args.layers, tmp / "src", tmp / "dst", vocab=256, tiny=True, dtype="bfloat16", seed=0)
        ours = flash_moe.load(tmp / "dst", cache_experts="all")
        ours.device_cache.preload()
        peer, _ = load_model(tmp / "src")
        prompt = mx.array(np.arange(8, dtype=np.int32))[None]
        caches = {}
        for name, m in (("flash_moe", ours), ("mlx-lm", peer)):
            c = ours.make_cache() if name == "flash_moe" else make_prompt_cache(peer)
            (ours.forward if name == "flash_moe" else peer)(prompt, c)
            mx.eval([x.state for x in c])
            caches[name] = c
        tok = mx.array([[3]], dtype=mx.int32)
        spec = ours.device_cache.speculation
        assert spec.certain(), "every expert must be in the device tier"
        result["build_ms"] = {
            "flash_moe": 1e3 * build_time(ours.forward, caches["flash_moe"], tok, args.reps),
            "mlx-lm": 1e3 * build_time(peer, caches["mlx-lm"], tok, args.reps),
        }
        launched = install_stand_ins()
        D = ours.config.hidden_size
        x = (mx.random.normal((1, 1, D)) * 0.1).astype(mx.bfloat16)
        mx.eval(x)
        result["flash_moe"] = pieces(ours.model, caches["flash_moe"], spec, tmp, x, tok)
        result["mlx-lm"] = pieces(peer, caches["mlx-lm"], None, tmp, x, tok)
        ours.close()
    print(f"MLX {mx.__version__}, {args.family} at test size, {args.layers} layers; CPU graph with GPU stand-ins")
    print(f"{'piece':40s} {'flash_moe':>9s} {'mlx-lm':>7s}  launches by kind (flash_moe | mlx-lm)")
    for name in result["flash_moe"]:
        a, b = result["flash_moe"][name], result["mlx-lm"][name]
        kinds = lambda r: ", ".join(f"{k} {v}" for k, v in r["by_kind"].items())
        print(f"{name:40s} {a['launches']:9d} {b['launches']:7d}  {kinds(a)} | {kinds(b)}")
    print(f"host graph building of one decode token (median of {args.reps}, not evaluated): "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in result["build_ms"].items()))
    print(f"custom kernels launched: {sorted(set(launched))}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

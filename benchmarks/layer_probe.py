"""Where a decode step's time goes, piece by piece, on the model's real shapes.

    python benchmarks/layer_probe.py --model DIR [--k 4]

Each piece is called alone and evaluated (median of repeated calls, µs), with MLX's compiler on and
off, beside two yardsticks measured in the same run: an eval round trip of one tiny op and the cost
of one op inside a chain. Decoding is bound by per-op overhead, so op counts are what these show.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flash_moe import load  # noqa: E402


def timed(fn, reps: int = 60, warm: int = 5) -> float:
    for _ in range(warm):
        mx.eval(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--preload", action="store_true",
                   help="every expert in the device cache, and a whole speculative decode token timed per layer")
    args = p.parse_args()
    model = load(args.model, experts_per_token=args.k, cache_experts="all" if args.preload else 1024,
                 preload=args.preload)
    layers = model.model.layers
    gdn = next(i for i, l in enumerate(layers) if l.is_linear)
    full = next(i for i, l in enumerate(layers) if not l.is_linear)
    D = model.config.hidden_size
    x = mx.random.normal((1, 1, D)).astype(mx.bfloat16) * 0.1
    tiny = mx.zeros((4,))
    mx.eval(x, tiny)
    cache = model.make_cache()

    def chain(n):
        def run():
            y = tiny
            for _ in range(n):
                y = y + 1
            return y
        return run

    rows = []

    def row(name, fn, note=""):
        on = timed(fn)
        mx.disable_compile()
        off = timed(fn)
        mx.enable_compile()
        rows.append((name, on, off, note))
        print(f"{name:28s} {on:9.1f} {off:9.1f}  {note}", flush=True)

    print(f"{'piece (us per call)':28s} {'compiled':>9s} {'plain':>9s}")
    row("eval round trip (1 op)", chain(1))
    row("chain of 64 ops / 64", lambda: chain(64)(), "per-op cost: divide by 64")
    L = layers[gdn]
    xn = L.input_layernorm(x)
    from flash_moe.layers import gated_delta

    fused = gated_delta.FUSED_DECODE
    for on in (False, True):  # the composed decode path, then kernels/gated_delta_decode (issue 20)
        gated_delta.FUSED_DECODE = on
        what = "fused kernel" if on else "composed"
        row(f"GDN mixer, {what}", lambda: L.linear_attn(xn, cache[gdn]))
        row(f"GDN decoder layer, {what}", lambda: L(x, cache[gdn]))
    gated_delta.FUSED_DECODE = fused
    row("GDN in_proj_qkv (qmm)", lambda: L.linear_attn.in_proj_qkv(xn))
    h = L.post_attention_layernorm(x)
    row("router (gate + route)", lambda: L.mlp.gate(h.reshape(1, D)))
    from flash_moe.layers.moe import route

    logits = L.mlp.gate(h.reshape(1, D))
    mx.eval(logits)
    row("route() alone", lambda: route(logits, args.k, True))

    def sync():
        inds, _ = route(L.mlp.gate(h.reshape(1, D)), args.k, True)
        return mx.array(np.array(inds))
    row("router + host sync + upload", sync)
    row("shared expert MLP", lambda: L.mlp.shared_expert(h.reshape(1, D)))
    row("MoE block (cache hits)", lambda: L.mlp(h))
    F = layers[full]
    row("attention mixer", lambda: F.self_attn(F.input_layernorm(x), cache[full]))
    small = np.arange(args.k, dtype=np.int32)
    table = mx.arange(512, dtype=mx.int32)
    mx.eval(table)
    row("upload 4 ints + take", lambda: mx.take(table, mx.array(small)))
    inds_dev = mx.array(small)
    mx.eval(inds_dev)
    row("take on device ids", lambda: mx.take(table, inds_dev))
    tok = mx.array([[1]], dtype=mx.int32)

    def token():
        c = model.make_cache()
        return model(tok, c)
    row("whole model, 1 token (fresh cache)", token)
    if args.preload:  # one graph per token, no per-layer sync: what decode pays per layer
        c = model.make_cache()
        model.forward(mx.array([[1, 2, 3, 4]], dtype=mx.int32), c)
        mx.eval([s.state for s in c])
        for on in (False, True):
            gated_delta.FUSED_DECODE = on
            for _ in range(2 * len(layers)):  # enough clean synchronous tokens for the cache to speculate
                mx.eval(model.forward(tok, c))
            t = timed(lambda: model.forward(tok, c))
            print(f"{'speculative token / layer, ' + ('fused GDN' if on else 'composed GDN'):34s} {t / len(layers):9.1f}"
                  f"  ({t:.0f} us a token over {len(layers)} layers; speculated {model.cache.speculated})", flush=True)
        gated_delta.FUSED_DECODE = fused


if __name__ == "__main__":
    main()

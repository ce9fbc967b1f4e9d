"""K=4's 8-byte router scores in MLX's managed pool, without a model (docs/benchmarks.md, "Why K=4 decodes slower
than K=10"): a GPU chain shaped like a decode token, run as generation.py runs one.

    python benchmarks/pool_probe.py [--layers 6] [--tokens 300] [--rounds 4]     # on the GPU machine
    python benchmarks/pool_probe.py --small --tokens 8 --rounds 1                 # smoke test, any machine

Per layer: a router matmul's bfloat16 logits (1, 512) -> ``route_topk`` (K) -> the fused expert FFN on resident
experts at Qwen3.5-397B shapes -> the next hidden state. Per token: a sampled id and its log-normaliser, which the
host reads with ``.item()``, and the next token's input gathered by that id. "ahead" builds and queues token t+1
(``mx.async_eval``) before reading token t, as ``generate_step`` does when decoding ahead; "read first" does not.
Each (K, order) pair runs with ``kernels.PAD_SMALL_OUTPUTS`` on and off in alternating rounds of one process, so the
A/B shares the process's allocation history and clocks. If the pool costs K=4, "off" is slower than "on" at K=4
(most with "ahead") and the same at K=10 (its scores are 20 bytes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from flash_moe import kernels
from flash_moe.kernels import expert_ffn, route_topk
from flash_moe.layout import ExpertLayout


def make_model(d: int, i: int, e: int, layers: int, vocab: int) -> dict:
    layout = ExpertLayout(hidden=d, intermediate=i, bits=4, group_size=64, dtype="bfloat16")
    slots = {}
    for t in layout.tensors:
        shape = (e, *t.shape)
        if t.dtype == "uint32":
            slots[t.name] = mx.random.randint(0, 2**31 - 1, shape, dtype=mx.int32).view(mx.uint32)
        else:
            slots[t.name] = (mx.random.normal(shape) * 0.01).astype(mx.bfloat16)
    model = {
        "slots": slots,
        "routers": [(mx.random.normal((d, e)) * d**-0.5).astype(mx.bfloat16) for _ in range(layers)],
        "embed": (mx.random.normal((vocab, d)) * 0.1).astype(mx.bfloat16),
        "head": (mx.random.normal((d, vocab)) * d**-0.5).astype(mx.bfloat16),
    }
    mx.eval(model)
    return model


def token(model: dict, tok: mx.array, k: int):
    """The lazy graph of one token after id ``tok`` (1,): (sampled id (1,), log-normaliser (1,))."""
    h = model["embed"][tok]  # (1, D): reads the sampled id where MLX put it
    for router in model["routers"]:
        inds, scores = route_topk(h @ router, k)
        h = h + expert_ffn(h, model["slots"], inds, scores, bits=4, group_size=64)
    logits = (h @ model["head"]).astype(mx.float32)[0]
    norm = mx.logsumexp(logits, keepdims=True)
    return mx.argmax(logits - norm, keepdims=True).astype(mx.int32), norm


def decode(model: dict, k: int, tokens: int, ahead: bool) -> float:
    """tok/s of ``tokens`` tokens, each read on the host (norm, then id) as generation.py reads them."""
    start = time.perf_counter()
    nxt = token(model, mx.array([1], mx.int32), k)
    for n in range(tokens):
        tok, norm = nxt
        mx.async_eval(tok, norm)
        if ahead and n + 1 < tokens:
            nxt = token(model, tok, k)
            mx.async_eval(nxt)
        norm.item()
        tok.item()
        if not ahead and n + 1 < tokens:
            nxt = token(model, tok, k)
    return tokens / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--rounds", type=int, default=4, help="alternating on/off rounds per (K, order)")
    p.add_argument("--ks", type=int, nargs="+", default=[4, 10])
    p.add_argument("--small", action="store_true", help="tiny shapes (a smoke test on the CPU)")
    args = p.parse_args()
    d, i, e, vocab = (256, 64, 64, 512) if args.small else (4096, 1024, 512, 32000)
    model = make_model(d, i, e, args.layers, vocab)
    print(f"MLX {mx.__version__}, {mx.default_device()}, backend {kernels.BACKEND}; {args.layers} layers, D={d}, "
          f"I={i}, {e} experts, {args.tokens} tokens a run, {args.rounds} rounds")
    print(f"{'K':>3} {'order':>10} {'pad on tok/s':>14} {'pad off tok/s':>14} {'off / on':>9}")
    for k in args.ks:
        for ahead in (True, False):
            runs = {True: [], False: []}
            for pad in (True, False):  # compile and warm both
                kernels.PAD_SMALL_OUTPUTS = pad
                decode(model, k, 8, ahead)
            for r in range(args.rounds):
                for pad in ((True, False) if r % 2 == 0 else (False, True)):
                    kernels.PAD_SMALL_OUTPUTS = pad
                    runs[pad].append(decode(model, k, args.tokens, ahead))
            on, off = statistics.median(runs[True]), statistics.median(runs[False])
            print(f"{k:>3} {'ahead' if ahead else 'read first':>10} {on:>14.1f} {off:>14.1f} {off / on:>9.3f}")
    kernels.PAD_SMALL_OUTPUTS = False  # the default


if __name__ == "__main__":
    main()

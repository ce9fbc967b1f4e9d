"""Memory tiers on routing traces: prefetch predictors' recall and eviction policies' hit rates (CPU).

Records every MoE layer's input and routed experts over a text (one teacher-forced pass), then:
- predictors for layer L+1's experts: L+1's router on layer L's hidden state ("router"), and the previous
  token's experts at L+1 ("previous"); recall = share of the actually routed experts guessed (k guesses);
- policies: a device tier then a host tier (fractions of all experts) replayed token by token with the
  tiers' own ``Entries`` (frequency-weighted vs LRU), hit rate per tier.

    python benchmarks/tiers.py --model demo --tokens 2048
    python benchmarks/tiers.py --model synthetic --tokens 1024
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flash_moe  # noqa: E402
from flash_moe.expert_source import Entries  # noqa: E402

BOXES = {"24GB+64GB": (0.11, 0.26), "H200": (0.55, 0.45), "H200-all": (0.55, 1.0)}


class Recorder(nn.Module):
    """Wraps a layer's experts: records (x, inds) of every call."""

    def __init__(self, inner, log: list):
        super().__init__()
        self.inner, self._log = inner, log

    def __call__(self, x, inds, scores):
        self._log.append((np.array(x.astype(mx.float32)), np.array(inds)))
        return self.inner(x, inds, scores)


def record(model, tokens: np.ndarray) -> tuple[list[int], dict, dict]:
    """Per MoE layer: hidden states [T, D] and routed experts [T, K] over ``tokens`` (one pass)."""
    layers = [i for i, layer in enumerate(model.model.layers) if hasattr(getattr(layer, "mlp", None), "gate")]
    logs = {i: [] for i in layers}
    for i in layers:
        block = model.model.layers[i].mlp
        block.experts = Recorder(block.experts, logs[i])
    cache = model.make_cache()
    for first in range(0, len(tokens), 256):
        mx.eval(model(mx.array(tokens[first : first + 256])[None], cache))
    xs = {i: np.concatenate([x for x, _ in logs[i]]) for i in layers}
    inds = {i: np.concatenate([d for _, d in logs[i]]) for i in layers}
    return layers, xs, inds


def recall(guess: np.ndarray, truth: np.ndarray) -> float:
    hit = sum(len(set(g) & set(t)) for g, t in zip(guess, truth))
    return hit / truth.size


def predictors(model, layers, xs, inds) -> dict:
    out = {"router": [], "previous": [], "random": []}
    for a, b in zip(layers, layers[1:]):
        block = model.model.layers[b].mlp
        k, truth = inds[b].shape[1], inds[b]
        logits = np.array(block.gate(mx.array(xs[a]).astype(block.gate.weight.dtype)).astype(mx.float32))
        out["router"].append(recall(np.argsort(-logits, axis=1)[:, :k], truth))
        out["previous"].append(recall(truth[:-1], truth[1:]))
        out["random"].append(k / logits.shape[1])
    return {name: float(np.mean(v)) for name, v in out.items()} | {"per_layer_router": out["router"]}


def replay(layers, inds, num_experts: int, device: int, host: int, policy: str) -> dict:
    """Token-by-token fetches through a device tier then a host tier; hits per tier."""
    n_layers = max(layers) + 1
    tiers = [Entries(c, n_layers, num_experts, policy) for c in (device, host) if c > 0]
    hits, asks = [0] * len(tiers), [0] * len(tiers)
    for t in range(len(inds[layers[0]])):
        for layer in layers:
            want = np.unique(inds[layer][t])
            for i, tier in enumerate(tiers):
                asks[i] += len(want)
                if len(want) > tier.capacity:  # more than the tier holds: read past it (as StreamingExperts does)
                    continue
                pos = tier.lookup(layer, want)
                miss = pos < 0
                hits[i] += int((~miss).sum())
                if miss.any():
                    victims = tier.victims(int(miss.sum()), keep=pos[~miss])
                    tier.place(layer, want[miss], victims)
                    pos[miss] = victims
                tier.touch(pos)
                want = want[miss]
                if not len(want):
                    break
    names = [n for n, c in (("device", device), ("host", host)) if c > 0]
    total = asks[0] if asks else 1
    return {f"{n}_hit_rate": h / max(a, 1) for n, h, a in zip(names, hits, asks)} | {
        "disk_share": (asks[-1] - hits[-1]) / max(total, 1) if tiers else 1.0}


def runtime(folder: Path, tokens: np.ndarray, device, host, prefetch: bool) -> dict:
    """The real tiers decoding ``tokens`` one at a time (teacher-forced): their hit and miss counts."""
    model = flash_moe.load(folder, dtype="float32", cache_experts=device, host_cache=host, prefetch=prefetch)
    if model.cache is not None:
        model.cache.speculate = False  # every token fetches: the counts are the tiers'
    cache = model.make_cache()
    for t in tokens:
        mx.eval(model(mx.array([[int(t)]]), cache))
    totals = model.tier_totals()
    model.close()
    keep = ("hits", "misses", "hit_rate", "capacity", "prefetched", "prefetch_used")
    return {tier: {k: v for k, v in t.items() if k in keep} for tier, t in totals.items() if tier != "store"} | {
        "disk_reads": totals["store"]["experts"]}


def load_model(name: str, tokens: int, seed: int):
    if name == "demo":
        from flash_moe.demo import build

        folder = build(progress=False, out=io.StringIO())
        model = flash_moe.load(folder, stream=False, dtype="float32")
        text = (Path(flash_moe.__file__).parent / "data" / "sample.txt").read_text()
        ids = np.array(model.tokenizer.encode(text)[:tokens])
        return model, ids, folder
    from flash_moe.synthetic import QWEN35_SKEW, qwen35_397b_config, write_synthetic

    config = qwen35_397b_config(num_layers=6, vocab_size=1024)
    config.update(hidden_size=256, moe_intermediate_size=128, shared_expert_intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_num_key_heads=2,
                  linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64)
    folder = Path(tempfile.mkdtemp()) / "synthetic"
    write_synthetic(folder, config, bits=4, seed=seed, skew=QWEN35_SKEW, progress=False)
    model = flash_moe.load(folder, stream=False, dtype="float32")
    return model, np.random.default_rng(seed).integers(0, 1024, tokens), folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("demo", "synthetic"), default="demo")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runtime-tokens", type=int, default=256,
                   help="also decode this many tokens through the real tiers, prefetch off and on (0: skip)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    model, tokens, folder = load_model(args.model, args.tokens, args.seed)
    layers, xs, inds = record(model, tokens)
    E, K = model.config.num_experts, model.config.num_experts_per_tok
    result = {"model": args.model, "tokens": len(tokens), "experts": E, "k": K, "moe_layers": len(layers),
              "predictor_recall": predictors(model, layers, xs, inds), "policies": {}}
    total = len(layers) * E
    for box, (dev, host) in BOXES.items():
        for policy in ("frequency", "lru"):
            result["policies"][f"{box}/{policy}"] = replay(layers, inds, E, round(dev * total), round(host * total), policy)
    if args.runtime_tokens:
        result["runtime"] = {}
        for box, (dev, host) in BOXES.items():
            for prefetch in (False, True):
                result["runtime"][f"{box}/prefetch={prefetch}"] = runtime(
                    folder, tokens[: args.runtime_tokens], dev, "all" if host >= 1 else host, prefetch)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

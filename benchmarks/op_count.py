"""Primitives and kernel launches in one decode step, per layer type and per token (issue 20).

    python benchmarks/op_count.py [--k 4] [--json OUT]        # FLASH_MOE_FUSED_GDN=0 for the unfused GDN

Writes a small Qwen3.5-shaped model (``flash_moe.synthetic``: 3 GatedDeltaNet layers + 1 full attention,
every layer MoE, 4-bit resident matrices and experts; the shapes are small, the structure is the 397B
model's), preloads the device expert cache and builds one speculative decode token's graph the way
``LoadedModel._speculative_step`` does, without evaluating it. ``mx.export_to_dot`` writes the graph and
its primitive nodes are counted. Views (reshape, slice, broadcast, transpose, ...) launch nothing on a GPU;
every other primitive is one kernel launch (a compiled elementwise chain is one "Compiled" primitive).

On the CPU backend MLX decomposes its fast ops (rms_norm, rope, sdpa, gated_delta_update) into plain ops
and has no custom kernels, so there each is stood in for by one marker primitive (= one GPU launch) and
the expert kernels run through the "cuda" code path with the launch itself stood in for; on a GPU the
graph is counted as MLX builds it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flash_moe  # noqa: E402
from flash_moe import kernels  # noqa: E402
from flash_moe.synthetic import qwen35_397b_config, write_synthetic  # noqa: E402

VIEWS = {"Reshape", "Broadcast", "Slice", "Squeeze", "ExpandDims", "Transpose", "AsStrided", "Depends",
         "StopGradient", "Split", "Flatten", "Unflatten", "BroadcastAxes"}
# CPU stand-ins: one marker primitive per GPU launch of a fast op or custom kernel
MARKERS = {"CumMax": "fast.rms_norm", "CumMin": "fast.rope", "CumProd": "fast.sdpa",
           "CumLogAddExp": "fast.gated_delta_update", "Sort": "custom kernel"}


def _after(marker, like, deps):
    """A marker primitive shaped like ``like`` that depends on ``deps`` (so their producers stay in the graph)."""
    out = marker(like, axis=-1) if marker is not mx.sort else mx.sort(like, axis=-1)
    deps = [d for d in deps if isinstance(d, mx.array)]
    return mx.depends([out], deps)[0] if deps else out


_zeros: dict = {}


def install_stand_ins() -> list[str]:
    """Replace the GPU-only pieces by markers; returns the list that collects custom kernel names."""
    launched: list[str] = []
    mx.fast.rms_norm = lambda x, w, eps, **kw: _after(mx.cummax, x, [w])
    mx.fast.rope = lambda x, dims, **kw: _after(mx.cummin, x, [])
    mx.fast.scaled_dot_product_attention = lambda q, k, v, **kw: _after(mx.cumprod, q, [k, v, kw.get("mask")])

    def gdn(q, k, v, g, beta, initial_state=None, **kw):
        y = _after(mx.logcumsumexp, v, [q, k, g, beta, initial_state])
        state = initial_state if initial_state is not None else mx.zeros((v.shape[0], v.shape[2], v.shape[3], q.shape[3]))
        return y, mx.depends([state], [y])[0]

    mx.fast.gated_delta_update = gdn

    def launch(name, backend, inputs, outputs, template, grid, init_value=None):
        launched.append(name)
        outs = []
        for shape, dtype in outputs.values():
            key = (tuple(shape), dtype)
            if key not in _zeros:  # a leaf: evaluated here, outside any graph being counted
                _zeros[key] = mx.zeros(shape, dtype)
                mx.eval(_zeros[key])
            # one marker per launch; further outputs only depend on it
            outs.append(_after(mx.sort, _zeros[key], list(inputs.values())) if not outs
                        else mx.depends([_zeros[key]], [outs[0]])[0])
        return outs

    kernels.launch = launch
    for module in list(sys.modules.values()):  # the kernel modules imported launch by name
        if module is not None and getattr(module, "__name__", "").startswith("flash_moe.kernels.") and hasattr(module, "launch"):
            module.launch = launch
    kernels.BACKEND = "cuda"
    return launched


def count(outputs, path: Path) -> Counter:
    mx.export_to_dot(str(path), *[o for o in outputs if isinstance(o, mx.array)])
    return Counter(re.findall(r'label ="([^"]+)"', path.read_text()))


def summary(c: Counter) -> dict:
    launches = {k: v for k, v in c.items() if k not in VIEWS}
    return {"primitives": sum(c.values()), "launches": sum(launches.values()),
            "views": sum(v for k, v in c.items() if k in VIEWS),
            "by_kind": dict(sorted(((MARKERS.get(k, k), v) for k, v in launches.items()), key=lambda kv: -kv[1]))}


def tiny_model(dst: Path, k: int) -> Path:
    config = qwen35_397b_config(num_layers=4, vocab_size=256)
    config.update(hidden_size=256, moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=16,
                  num_experts_per_tok=k, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64)
    return write_synthetic(dst, config, bits=4, seed=0, resident_bits=4, progress=False)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--model", help="a converted model folder (default: a tiny synthetic one)")
    p.add_argument("--json")
    args = p.parse_args()
    on_gpu = kernels.BACKEND != "ops"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = Path(args.model) if args.model else tiny_model(tmp / "m", args.k)
        model = flash_moe.load(path, dtype="bfloat16", experts_per_token=args.k, cache_experts="all", preload=True)
        cache = model.make_cache()
        model.forward(mx.array(np.arange(8, dtype=np.int32))[None], cache)  # a prompt in the caches, evaluated
        mx.eval([c.state for c in cache])
        if not on_gpu:
            launched = install_stand_ins()
        layers = model.model.layers
        D = model.config.hidden_size
        x = (mx.random.normal((1, 1, D)) * 0.1).astype(mx.bfloat16)
        mx.eval(x)
        rows = {}

        def measure(name, fn, c=None):
            saved = c.snapshot() if c is not None else None
            model.device_cache.speculation.begin()
            try:
                out = fn()
            finally:
                lookups = model.device_cache.speculation.end()
            outs = (list(out) if isinstance(out, (tuple, list)) else [out]) + [lookups] + (c.state if c is not None else [])
            rows[name] = summary(count(outs, tmp / "g.dot"))
            if c is not None:  # KVCache writes its buffers in place: evaluate them so no call sees another's ops
                c.restore(saved)
                mx.eval(c.state)

        gdn = next(i for i, l in enumerate(layers) if l.is_linear)
        full = next(i for i, l in enumerate(layers) if not l.is_linear)
        G, F = layers[gdn], layers[full]
        measure("GatedDeltaNet mixer", lambda: G.linear_attn(G.input_layernorm(x), cache[gdn]), cache[gdn])
        measure("full-attention mixer", lambda: F.self_attn(F.input_layernorm(x), cache[full]), cache[full])
        from flash_moe.layers.moe import route

        h = x.reshape(1, D)
        measure("router (gate + route)", lambda: route(G.mlp.gate(h), G.mlp.top_k, G.mlp.norm_topk_prob))
        measure("MoE block (router, experts, shared)", lambda: G.mlp(x))
        from flash_moe import model as model_module

        if model_module.FUSED_ADD_NORM:  # as TextModel runs them on a GPU: the adds ride in the norms
            measure("GatedDeltaNet decoder layer", lambda: G.residual_step(x, x, cache[gdn]), cache[gdn])
            measure("full-attention decoder layer", lambda: F.residual_step(x, x, cache[full]), cache[full])
        else:
            measure("GatedDeltaNet decoder layer", lambda: G(x, cache[gdn]), cache[gdn])
            measure("full-attention decoder layer", lambda: F(x, cache[full]), cache[full])
        tok = mx.array([[3]], dtype=mx.int32)
        measure("token (embed, 4 layers, norm, lm_head)", lambda: model.model(tok, cache))
        model.close()
    from flash_moe import model as model_module
    from flash_moe.layers import gated_delta, moe

    print(f"MLX {mx.__version__}, {mx.default_device()}, counted as {'built (GPU)' if on_gpu else 'CPU graph with GPU stand-ins'}; "
          f"K={args.k}, fused: GDN decode {getattr(gated_delta, 'FUSED_DECODE', False)}, router "
          f"{getattr(moe, 'FUSED_ROUTE', False)}, add+norm {getattr(model_module, 'FUSED_ADD_NORM', False)}")
    print(f"{'piece':40s} {'launches':>8s} {'views':>6s}  launches by kind")
    for name, r in rows.items():
        kinds = ", ".join(f"{k} {v}" for k, v in r["by_kind"].items())
        print(f"{name:40s} {r['launches']:8d} {r['views']:6d}  {kinds}")
    if not on_gpu:
        print(f"custom kernels launched: {sorted(set(launched))}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

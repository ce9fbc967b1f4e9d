"""Where flash_moe's float32 model departs from transformers on a GPU backend: a diagnostic for test_model.

    FLASH_MOE_BACKEND=cuda python benchmarks/cuda_diag.py [--configs interval2_e16_top4,interval4_e8_top2] [--seed 0]

On the H200 (MLX 0.32.4 CUDA) test_model failed 3 of 29, all on ``interval2_e16_top4``; the other configs pass.
What only that config has: attention with 8 query heads on 2 KV heads (GQA 4; the others 2), GatedDeltaNet
with 1 key head for 4 value heads (4; the others 2) and Dk = Dv = 32, rotary over 16 of 32 dims with an
mrope section [3, 3, 2], 16 experts top-4 (the pattern of MLX CUDA's sorted gather_mm bug, worked around in
experts.SORTED_GATHER). This prints, per config (test_model's own fixtures, TF32 off as in its conftest):

1. the logits' relative error vs transformers: on the GPU as the test runs; with compile off; with the
   reference GatedDeltaNet recurrence (FLASH_MOE_GDN=ops); on the CPU stream. The test's bound is 1e-4.
2. per layer, each piece (mixer, router top-k, routed experts, MoE block) run on the GPU and on the CPU
   from the same GPU-made input (compile off): relative error and router choices that differ. Errors do
   not accumulate here: the first piece far above ~1e-6 is the one that is wrong.
3. per layer, the GPU's hidden state vs transformers' (output_hidden_states): where the drift starts.
4. primitives at each config's shapes, GPU vs CPU: gated_delta_update (fast vs the ops recurrence),
   scaled_dot_product_attention (prefill with a causal mask, one-token decode), partial RoPE, argpartition top-k.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("MLX_ENABLE_TF32", "0")  # as tests/conftest.py: float32 means float32

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

import hf_models  # noqa: E402
import flash_moe  # noqa: E402
from flash_moe.layers import gated_delta  # noqa: E402
from flash_moe.layers.moe import route  # noqa: E402
from test_model import CASES, CONFIGS  # noqa: E402  (the test's own configs and layouts)

# Without a GPU (the CPU box) both sides run on the CPU: every GPU-vs-CPU line then reads 0, and the script
# is only checked to run.
GPU = mx.gpu if mx.cuda.is_available() or mx.metal.is_available() else mx.cpu


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def on(device, fn, *args):
    """fn(*args) with every op on ``device``'s stream, evaluated, as float32 numpy (several outputs: a tuple)."""
    with mx.stream(device):
        out = fn(*args)
        mx.eval(out)
    if isinstance(out, (tuple, list)):
        return tuple(np.array(o.astype(mx.float32) if o.dtype != mx.int32 else o) for o in out)
    return np.array(out.astype(mx.float32))


def logits_checks(model, torch_model, tokens: np.ndarray) -> None:
    with torch.no_grad():
        ref = torch_model(input_ids=torch.from_numpy(tokens)).logits.numpy()
    ids = mx.array(tokens.astype(np.int32))
    print(f"  logits vs transformers (test bound 1e-4): GPU {rel(on(GPU, model, ids), ref):.2e}", end="")
    mx.disable_compile()
    print(f" | GPU, compile off {rel(on(GPU, model, ids), ref):.2e}", end="")
    gated_delta.USE_FAST = False
    print(f" | GPU, GDN ops recurrence {rel(on(GPU, model, ids), ref):.2e}", end="")
    gated_delta.USE_FAST = True
    print(f" | CPU stream {rel(on(mx.cpu, model, ids), ref):.2e}")
    mx.enable_compile()


def layer_checks(model, torch_model, tokens: np.ndarray) -> None:
    """Each piece of each layer on both devices from the same input; the GPU's running state vs transformers'."""
    with torch.no_grad():
        hidden = torch_model(input_ids=torch.from_numpy(tokens), output_hidden_states=True).hidden_states
    mx.disable_compile()
    h = mx.array(on(GPU, model.model.model.embed_tokens, mx.array(tokens.astype(np.int32))))
    for i, layer in enumerate(model.model.layers):
        mixer = layer.linear_attn if layer.is_linear else layer.self_attn
        kind = "GDN " if layer.is_linear else "attn"
        x = mx.array(on(GPU, layer.input_layernorm, h))
        parts = [f"mixer {rel(on(GPU, mixer, x), on(mx.cpu, mixer, x)):.1e}"]
        mid = mx.array(on(GPU, lambda a: a + mixer(layer.input_layernorm(a)), h))
        y = mx.array(on(GPU, layer.post_attention_layernorm, mid))
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            flat = y.reshape(-1, y.shape[-1])
            logits = mx.array(on(GPU, mlp.gate, flat))
            gi, gs = on(GPU, route, logits, mlp.top_k, mlp.norm_topk_prob)
            ci, cs = on(mx.cpu, route, logits, mlp.top_k, mlp.norm_topk_prob)
            flips = int(sum(set(a) != set(b) for a, b in zip(gi.tolist(), ci.tolist())))
            inds, scores = mx.array(gi), mx.array(gs)
            experts = rel(on(GPU, mlp.experts, flat, inds, scores), on(mx.cpu, mlp.experts, flat, inds, scores))
            parts += [f"top-k sets differing {flips}/{len(gi)}", f"routed experts {experts:.1e}"]
        parts.append(f"mlp block {rel(on(GPU, mlp, y), on(mx.cpu, mlp, y)):.1e}")
        h = mx.array(on(GPU, layer, h))
        drift = rel(np.array(h), hidden[i + 1].numpy()) if i + 1 < len(hidden) - 1 else float("nan")
        print(f"  layer {i} {kind}: GPU vs CPU: " + ", ".join(parts) + f" | GPU state vs transformers {drift:.1e}")
    mx.enable_compile()


def primitive_checks(cfg: dict, rng: np.random.Generator) -> None:
    B, T = 2, 20
    hk, hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    a = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))
    for t in (1, 7, T):
        q, k, v = a(B, t, hk, dk) * 0.2, a(B, t, hk, dk) * 0.2, a(B, t, hv, dv)
        g = mx.array(rng.uniform(0.5, 1.0, (B, t, hv)).astype(np.float32))
        beta = mx.array(rng.uniform(0, 1, (B, t, hv)).astype(np.float32))
        state = a(B, hv, dv, dk) * 0.1
        fast = on(GPU, lambda *x: mx.fast.gated_delta_update(*x[:5], initial_state=x[5]), q, k, v, g, beta, state)
        ref = on(mx.cpu, gated_delta.gated_delta_ops, q, k, v, g, beta, state)
        print(f"  gated_delta_update Hk={hk} Hv={hv} Dk={dk} Dv={dv} T={t}: y {rel(fast[0], ref[0]):.1e}, "
              f"state {rel(fast[1], ref[1]):.1e}")
    hq, hkv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    # as the model lays them out: [B, L, H, D] projections viewed as [B, H, L, D] (strided), and contiguous
    view = lambda *s: a(s[0], s[2], s[1], s[3]).transpose(0, 2, 1, 3)
    for layout, make in (("strided", view), ("contiguous", a)):
        for t, s, mask in ((T, T, "causal"), (1, 13, None)):
            q, k, v = make(B, hq, t, d), make(B, hkv, s, d), make(B, hkv, s, d)
            sdpa = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask=mask)
            print(f"  sdpa {layout} Hq={hq} Hkv={hkv} D={d} T={t} S={s} mask={mask}: "
                  f"{rel(on(GPU, sdpa, q, k, v), on(mx.cpu, sdpa, q, k, v)):.1e}")
        rope = cfg.get("rope_parameters", {})
        dims, base = int(d * rope.get("partial_rotary_factor", 1.0)), rope.get("rope_theta", 10000.0)
        x = make(B, hq, T, d)
        for offset in (0, 13):
            fn = lambda x: mx.fast.rope(x, dims, traditional=False, base=base, scale=1.0, offset=offset)
            print(f"  rope {layout} dims={dims} of {d} base={base:g} offset={offset}: "
                  f"{rel(on(GPU, fn, x), on(mx.cpu, fn, x)):.1e}")
    e, kk = cfg["num_experts"], cfg["num_experts_per_tok"]
    logits = a(B * T, e)
    top = lambda x: mx.argpartition(-x, kth=kk - 1, axis=-1)[..., :kk]
    gi, ci = on(GPU, top, logits), on(mx.cpu, top, logits)
    print(f"  argpartition E={e} K={kk}: top-k sets differing {sum(set(x) != set(y) for x, y in zip(gi.tolist(), ci.tolist()))}"
          f"/{B * T}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="interval2_e16_top4,interval4_e8_top2",
                   help="test_model config names (the failing one and a passing one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", type=int, default=16)
    args = p.parse_args()
    print(f"MLX {mx.__version__} compared device {GPU}, MLX_ENABLE_TF32={os.environ['MLX_ENABLE_TF32']}, "
          f"FLASH_MOE_BACKEND={os.environ.get('FLASH_MOE_BACKEND')}")
    cases = {name: (builder, layout) for builder, name, layout, _ in CASES}
    for name in args.configs.split(","):
        builder, layout = cases[name]
        rng = np.random.default_rng(args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            folder, torch_model = hf_models.BUILDERS[builder](Path(tmp), CONFIGS[name], seed=args.seed, layout=layout)
            model = flash_moe.load(folder, dtype="float32")
            tokens = hf_models.random_tokens(rng, CONFIGS[name]["vocab_size"], (2, args.tokens))
            margin = hf_models.router_margin(torch_model, torch.from_numpy(tokens))
            print(f"== {name} ({builder}, {layout}), seed {args.seed}: router margin {margin:.1e} (tests need > 1e-4)")
            logits_checks(model, torch_model, tokens)
            layer_checks(model, torch_model, tokens)
            primitive_checks(CONFIGS[name], rng)


if __name__ == "__main__":
    main()

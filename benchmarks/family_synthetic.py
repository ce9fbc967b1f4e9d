"""Synthetic checkpoints of MoE families at their real per-layer shapes, as mlx-lm's quantized releases are.

    python benchmarks/family_synthetic.py --family deepseek_v3 --layers 3 --src /root/fam/dsv3-src --out /root/fam/dsv3
    python benchmarks/family_synthetic.py --family qwen3_moe --layers 4 --dry-run

Writes what ``mlx_lm.convert -q`` writes (config.json with its "quantization" block, safetensors with each
layer's routed experts stacked under ``switch_mlp`` as 4-bit words, scales and biases, the other modules
quantized by the family's own ``quant_predicate``), with random weights: the resident tensors are drawn in
MLX and quantized by mlx-lm's ``quantize_model``; the experts are random words with scales of sane size
(``flash_moe.synthetic.random_expert``) written straight into the safetensors files, so writing runs at
about the disk's speed. ``--out`` then converts it with ``flash_moe.convert`` (the families path: mlx-lm's
model class and sanitize, experts repacked without requantizing), so the same weights are both mlx-lm's
(``mlx_lm.utils.load_model(src)``) and ours. Everything runs on the CPU device: it is data movement, and a
fresh CUDA machine would spend minutes compiling kernels for it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flash_moe.families import architecture, expert_shape, layer_of, model_args, switches  # noqa: E402
from flash_moe.layout import ExpertLayout  # noqa: E402
from flash_moe.synthetic import ROUTER_NORM, random_expert  # noqa: E402

# The released config.json of each model (deepseek-ai/DeepSeek-V3, Qwen/Qwen3-235B-A22B), less what
# mlx-lm does not read; --layers and --vocab replace num_hidden_layers and vocab_size.
FAMILIES = {
    "deepseek_v3": dict(
        model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
        n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        n_group=8, topk_group=4, num_experts_per_tok=8, moe_layer_freq=1, first_k_dense_replace=3,
        max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
        rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0,
                          original_max_position_embeddings=4096, type="yarn"),
        vocab_size=129280, tie_word_embeddings=False, attention_bias=False, bos_token_id=0, eos_token_id=1),
    "qwen3_moe": dict(
        model_type="qwen3_moe", hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=40960, vocab_size=151936, tie_word_embeddings=False,
        attention_bias=False, bos_token_id=151643, eos_token_id=151645),
}
# The same families at test size (tests/test_families_decode.py): every structure kept (MLA, groups, shared expert).
TINY = {
    "deepseek_v3": dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                        kv_lora_rank=64, q_lora_rank=64, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32),
    "qwen3_moe": dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=4),
}


def family_config(family: str, layers: int, vocab: int, tiny: bool = False) -> dict:
    """The family's config with ``layers`` decoder layers, all of them MoE layers, and a ``vocab``-token vocabulary."""
    config = {**FAMILIES[family], **(TINY[family] if tiny else {}), "num_hidden_layers": layers, "vocab_size": vocab}
    if family == "deepseek_v3":
        config["first_k_dense_replace"] = 0  # per-layer shapes of the MoE layers (58 of DeepSeek-V3's 61)
    return config


class _NoExperts(nn.Module):
    """Stands in for a SwitchGLU while the resident weights are drawn: its experts are never materialised."""


def draw(name: str, shape: tuple, key: mx.array, dtype) -> mx.array:
    """A resident tensor of sane size: norms near 1, fan-in scaled matrices, decisive routers (rows of norm
    ROUTER_NORM), small biases. Uniform, not normal: MLX's CPU draws uniform values ~4x faster, and a
    DeepSeek-V3 layer holds 232M resident weights."""
    leaf = name.rsplit(".", 2)[-2] if "." in name else name
    uniform = lambda: mx.random.uniform(-1.0, 1.0, shape, dtype=dtype, key=key)
    if "norm" in leaf:
        return mx.random.uniform(0.8, 1.2, shape, dtype=dtype, key=key)
    if name.endswith("mlp.gate.weight"):
        w = uniform().astype(mx.float32)
        return (ROUTER_NORM * w / mx.linalg.norm(w, axis=-1, keepdims=True)).astype(dtype)
    std = {"embed_tokens": 1.0, "lm_head": 3.0 / shape[-1] ** 0.5}.get(leaf, 0.1 if len(shape) == 1 else shape[-1] ** -0.5)
    return uniform() * (std * 3**0.5)  # uniform on [-a, a] has std a / sqrt(3)


def write_experts(path: Path, prefix: str, layout: ExpertLayout, num_experts: int, seed: int, layer: int,
                  pool: ThreadPoolExecutor) -> int:
    """One layer's routed experts as an mlx-lm safetensors file: ``{prefix}.{proj}.{weight,scales,biases}``
    stacked (E, ...), each expert's bytes those ``random_expert`` draws for (seed, layer, expert)."""
    kinds = {"uint32": "U32", "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
    header, at = {"__metadata__": {"format": "mlx"}}, 0
    starts = {}
    for t in layout.tensors:
        n = num_experts * t.nbytes
        header[f"{prefix}.{t.name}"] = {"dtype": kinds[t.dtype], "shape": [num_experts, *t.shape], "data_offsets": [at, at + n]}
        starts[t.name], at = at, at + n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = 8 + len(raw)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(fd, data + at)

        def one(e: int) -> None:
            buf = memoryview(random_expert(layout, np.random.Generator(np.random.PCG64([seed, layer, e]))))
            for t in layout.tensors:
                os.pwrite(fd, buf[t.offset : t.offset + t.nbytes], data + starts[t.name] + e * t.nbytes)

        list(pool.map(one, range(num_experts)))
    finally:
        os.close(fd)
    return data + at


def write_family_source(dst: str | Path, config: dict, *, bits: int = 4, group_size: int = 64, dtype: str = "bfloat16",
                        seed: int = 0, threads: int | None = None) -> Path:
    """Write an mlx-lm-quantized checkpoint of ``config``'s family with random weights into ``dst``; returns it."""
    from mlx_lm.utils import quantize_model, save_config

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    arch = architecture(config, dst)
    model = arch.Model(model_args(arch, config, dst))
    found = switches(model)
    num_experts, hidden, intermediate = expert_shape(next(iter(found.values())))
    model.update_modules(tree_unflatten([(p, _NoExperts()) for p in found]))
    target = getattr(mx, dtype)
    keep = getattr(model, "cast_predicate", None) or (lambda k: True)  # DeepSeek's routing bias stays float32
    # Drawn on several CPU streams at once (each has its own thread), a round of tensors at a time.
    streams = [mx.new_stream(mx.cpu) for _ in range(min(8, os.cpu_count() or 1))]
    drawn = []
    for i, (name, p) in enumerate(sorted(tree_flatten(model.parameters()))):
        with mx.stream(streams[i % len(streams)]):
            drawn.append((name, draw(name, tuple(p.shape), mx.random.key(seed * 1_000_003 + i),
                                     target if keep(name) else mx.float32)))
        if len(drawn) % len(streams) == 0:
            mx.eval([w for _, w in drawn[-len(streams):]])
    mx.eval([w for _, w in drawn])
    model.update(tree_unflatten(drawn))
    model, qconfig = quantize_model(model, {k: v for k, v in config.items() if k != "quantization"}, group_size, bits)
    resident = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dst / "model-resident.safetensors"), resident, metadata={"format": "mlx"})
    layout = ExpertLayout(hidden, intermediate, bits, group_size, dtype)
    with ThreadPoolExecutor(threads or min(16, os.cpu_count() or 1)) as pool:
        for path in found:
            layer = layer_of(path)
            write_experts(dst / f"model-layer-{layer:03d}.safetensors", path, layout, num_experts, seed, layer, pool)
    save_config(qconfig, dst / "config.json")
    return dst


def expert_bytes(config: dict, bits: int = 4, group_size: int = 64, dtype: str = "bfloat16") -> int:
    """Bytes of routed experts the family's checkpoint holds (the same again once converted)."""
    arch = architecture(config, "config")
    model = arch.Model(model_args(arch, config, "config"))  # lazy: nothing is evaluated
    found = switches(model)
    e, d, i = expert_shape(next(iter(found.values())))
    return len(found) * e * ExpertLayout(d, i, bits, group_size, dtype).expert_bytes


def build(family: str, layers: int, src: Path, out: Path | None, *, vocab: int = 32000, tiny: bool = False,
          dtype: str = "bfloat16", seed: int = 0) -> dict:
    """Source (unless its config.json exists) and, with ``out``, its conversion (unless layout.json exists), on
    the CPU device; returns what was done and how long it took."""
    from flash_moe.convert import convert

    config = family_config(family, layers, vocab, tiny)
    done = {"family": family, "layers": layers, "expert_bytes": expert_bytes(config, dtype=dtype)}
    with mx.stream(mx.cpu):
        if not (src / "config.json").exists():
            need = 2 * done["expert_bytes"] if out else done["expert_bytes"]
            free = shutil.disk_usage(src.parent if src.parent.exists() else Path.cwd()).free
            if need > free:
                sys.exit(f"{src}: {free / 1e9:.1f} GB free, source and conversion need {need / 1e9:.1f} GB; use fewer --layers")
            start = time.perf_counter()
            write_family_source(src, config, dtype=dtype, seed=seed)
            done["source_s"] = time.perf_counter() - start
        if out is not None and not (out / "layout.json").exists():
            start = time.perf_counter()
            convert(src, out, progress=False)
            done["convert_s"] = time.perf_counter() - start
    return done


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", required=True, choices=sorted(FAMILIES))
    p.add_argument("--layers", type=int, default=3, help="decoder layers, all MoE")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (the released ones only cost resident bytes)")
    p.add_argument("--src", type=Path, help="folder for the mlx-lm-quantized checkpoint")
    p.add_argument("--out", type=Path, default=None, help="convert it into this folder (flash_moe's format)")
    p.add_argument("--tiny", action="store_true", help="test-sized dims, same structure")
    p.add_argument("--dtype", default="bfloat16", help="scales, biases and resident floats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the sizes and exit")
    args = p.parse_args(argv)
    config = family_config(args.family, args.layers, args.vocab, args.tiny)
    size = expert_bytes(config, dtype=args.dtype)
    print(f"{args.family}, {args.layers} layers: experts {size / 1e9:.2f} GB ({size / args.layers / 1e9:.2f} GB a layer)")
    if args.dry_run:
        return
    if args.src is None:
        p.error("--src is required unless --dry-run")
    done = build(args.family, args.layers, args.src, args.out, vocab=args.vocab, tiny=args.tiny, dtype=args.dtype,
                 seed=args.seed)
    print(json.dumps(done))


if __name__ == "__main__":
    main()

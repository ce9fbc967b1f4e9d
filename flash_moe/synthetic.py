"""Synthetic converted models: a flash_moe streaming folder of real shape filled with random weights.

For benchmarks and tests that need the 397B model's bytes and shapes but not its knowledge. The folder
is written in the converted format directly (no source checkpoint, no quantization pass): resident
weights drawn per tensor, packed experts as random words with scales and biases of sane size (a
dequantized weight has mean ~0 and std ~1/sqrt(fan_in), so activations stay near unit size), and
``layout.json`` with real checksums, last. RAM stays bounded by the resident weights plus a few experts.

Routing popularity: with ``skew`` the router rows get per-expert norms exp(skew * z), z a shuffled
normal quantile per expert. For isotropic hidden states an expert whose logit spread is larger lands
in the top-k more often. ``QWEN35_SKEW`` reproduces Qwen3.5-397B's measured skew at E=512, K=10.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import NormalDist

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .convert import resident_quant
from .layout import ExpertLayout, ModelLayout, expert_checksum
from .model import Model, ModelArgs

# Top 20% of experts take ~42% of activations, 50% by ~130 of 512, Gini ~0.38 (E=512, K=10, isotropic
# hidden states); Qwen3.5-397B measured 42.3%, 132 (90-189), 0.376. Popularity rises steeply with skew:
# 0.1 gives ~35%, 0.2 ~51%.
QWEN35_SKEW = 0.15
ROUTER_NORM = 4.0  # router row norm: logits of std ~4 on unit-RMS hidden states, a decisive top-k


def qwen35_397b_config(num_layers: int = 60, vocab_size: int = 248320) -> dict:
    """Qwen3.5-397B-A17B's text config (per-layer shapes as released), optionally fewer layers or a smaller vocab."""
    return {
        "model_type": "qwen3_5_moe_text",
        "hidden_size": 4096,
        "num_hidden_layers": num_layers,
        "vocab_size": vocab_size,
        "num_attention_heads": 32,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 64,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "num_experts": 512,
        "num_experts_per_tok": 10,
        "moe_intermediate_size": 1024,
        "shared_expert_intermediate_size": 1024,
        "full_attention_interval": 4,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(num_layers)],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e7,
        "partial_rotary_factor": 0.25,
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
        "eos_token_id": 248044,
    }


class _NoExperts(nn.Module):
    """Stands in for the routed experts while the resident parameters are enumerated: it has none."""

    def __call__(self, x, inds, scores):
        raise RuntimeError("placeholder experts: load the written folder with flash_moe.load")


def _tensor_key(seed: int, name: str) -> mx.array:
    return mx.random.key((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _router(shape, key, skew: float | None) -> mx.array:
    """Rows of norm ROUTER_NORM * exp(skew * z_e) in random directions; z_e spread as normal quantiles."""
    E = shape[0]
    k_dir, k_perm = mx.random.split(key)
    w = mx.random.normal(shape, key=k_dir)
    w = w / mx.linalg.norm(w, axis=-1, keepdims=True)
    scale = np.full(E, ROUTER_NORM, np.float32)
    if skew:
        z = np.array([NormalDist().inv_cdf((i + 0.5) / E) for i in range(E)], np.float32)
        z = z[np.array(mx.random.permutation(E, key=k_perm))]
        scale *= np.exp(skew * z)
    return w * mx.array(scale)[:, None]


def _draw(name: str, shape: tuple, key: mx.array, skew: float | None, dtype) -> mx.array:
    """A resident tensor, in this model's naming (norm weights are stored as used, no +1 later).
    Drawn in ``dtype``: a 248320 x 4096 embedding never exists in float32."""
    normal = lambda std: mx.random.normal(shape, dtype=dtype, key=key) * std
    uniform = lambda lo, hi: mx.random.uniform(lo, hi, shape, dtype=dtype, key=key)
    D = shape[-1]
    if name.endswith("norm.weight"):
        return uniform(0.8, 1.2)
    if name.endswith("A_log"):
        return mx.log(uniform(0.1, 1.5))  # A in 0.1..1.5: GDN decays neither all ~0 (no memory) nor all ~1
    if name.endswith("dt_bias"):
        return normal(0.5)
    if name.endswith("conv1d.weight"):
        return normal(0.5)
    if name.endswith("mlp.gate.weight"):
        return _router(shape, key, skew).astype(dtype)
    if name.endswith("embed_tokens.weight"):
        return normal(1.0)
    if name.endswith("lm_head.weight"):
        return normal(3.0 / D**0.5)
    if len(shape) == 1:
        return normal(0.1)
    return normal(1.0 / D**0.5)  # fan-in scaling keeps activations near unit size


def _write_resident(dst: Path, args: ModelArgs, dtype: str, bits: int | None, group_size: int, seed: int,
                    skew: float | None) -> dict | None:
    """Random resident weights -> resident.safetensors; returns the config "quantization" block (or None)."""
    model = Model(args, experts_factory=lambda layer: _NoExperts())
    target = getattr(mx, dtype)
    quant = {"group_size": group_size, "bits": bits, "mode": "affine"} if bits else None
    out = {}
    for name, p in sorted(tree_flatten(model.parameters())):
        w = _draw(name, tuple(p.shape), _tensor_key(seed, name), skew,
                  mx.float32 if name.endswith("A_log") else target)
        b = resident_quant(name, w, bits, group_size) if bits else None
        if b:
            path = name[: -len(".weight")]
            out[name], out[path + ".scales"], out[path + ".biases"] = mx.quantize(w, group_size=group_size, bits=b)
            mx.eval(out[name], out[path + ".scales"], out[path + ".biases"])
            if b != bits:
                quant[path] = {"group_size": group_size, "bits": b}
        else:
            out[name] = w
            mx.eval(w)  # one tensor's float temporaries at a time
    partial = dst / "resident.partial.safetensors"  # mx.save_safetensors wants the suffix
    mx.save_safetensors(str(partial), out, metadata={"format": "mlx", "producer": "flash_moe.synthetic"})
    os.replace(partial, dst / "resident.safetensors")
    return quant


def _as_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as the stored dtype's bytes (bf16: the top half of the float32, truncated)."""
    if dtype == "bfloat16":
        return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return a.astype(dtype)


def random_expert(layout: ExpertLayout, rng: np.random.Generator) -> bytearray:
    """One expert's bytes: random packed words, scales of random sign (as mx.quantize may give) with
    biases that centre each group, so the dequantized weight has mean ~0 and std ~1/sqrt(fan_in)."""
    buf = bytearray(layout.expert_bytes)
    view = np.frombuffer(buf, np.uint8)
    qmax = 2**layout.bits - 1
    q_std = ((qmax + 1) ** 2 - 1) ** 0.5 / 12**0.5  # std of a uniform integer on 0..qmax
    scales = {}
    for t in layout.tensors:
        proj, kind = t.name.split(".")
        fan_in = layout.intermediate if proj == "down_proj" else layout.hidden
        std = fan_in**-0.5
        n = int(np.prod(t.shape))
        if kind == "weight" and t.dtype == "uint32":
            data = rng.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
        elif kind == "weight":
            data = _as_dtype(rng.standard_normal(n, np.float32) * std, t.dtype)
        elif kind == "scales":
            s = std / q_std * rng.uniform(0.75, 1.25, n).astype(np.float32) * rng.choice(np.float32([-1, 1]), n)
            scales[proj] = s
            data = _as_dtype(s, t.dtype)
        else:  # biases, after their scales
            s = scales[proj]
            data = _as_dtype(-s * (qmax / 2) + rng.standard_normal(n, np.float32) * (0.1 * std), t.dtype)
        view[t.offset : t.offset + t.nbytes] = np.ascontiguousarray(data).view(np.uint8)
    return buf


def _write_layer(path: Path, layout: ExpertLayout, num_experts: int, seed: int, layer: int, pool, bar) -> list[str]:
    """Random experts into ``path`` (as path.partial, renamed when complete); returns their checksums."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def one(e: int) -> str:
        # A generator per expert: the bytes do not depend on the thread count.
        buf = random_expert(layout, np.random.Generator(np.random.PCG64([seed, layer, e])))
        os.pwrite(fd, buf, e * layout.stride)
        bar.update(1)
        return expert_checksum(buf)

    try:
        os.ftruncate(fd, num_experts * layout.stride)
        sums = list(pool.map(one, range(num_experts)))  # pool threads bound the experts in memory
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)
    return sums


def write_synthetic(dst: str | Path, config: dict, *, bits: int = 4, group_size: int = 64, dtype: str = "bfloat16",
                    skew: float | None = None, seed: int = 0, resident_bits: int | None = None,
                    threads: int | None = None, progress: bool = True) -> Path:
    """Write a converted flash_moe model folder with random weights.

    Args:
        dst: output folder (created; an existing layout.json is removed first).
        config: a Hugging Face style config.json dict (``qwen35_397b_config()`` for the 397B shapes).
        bits, group_size, dtype: expert format, as ``flash_moe.convert.convert`` takes them.
        skew: spread of router row norms (log scale); None gives every expert the same popularity,
            ``QWEN35_SKEW`` the measured Qwen3.5-397B skew.
        seed: every byte follows from it.
        resident_bits: quantize the big resident matrices as ``convert(resident_bits=...)`` does.
        threads: expert writer threads (default: CPU count, at most 8).
    Returns:
        the DST path.
    """
    from tqdm.auto import tqdm

    dst = Path(dst).expanduser()
    args = ModelArgs.from_config(config)
    layout = ExpertLayout(args.hidden_size, args.moe_intermediate_size, bits, group_size, dtype)
    moe_layers = [i for i in range(args.num_hidden_layers) if args.is_moe(i)]
    (dst / "experts").mkdir(parents=True, exist_ok=True)
    (dst / "layout.json").unlink(missing_ok=True)  # until it is rewritten, the folder is not a model

    quant = _write_resident(dst, args, dtype, resident_bits, group_size, seed, skew)
    checksums = {}
    total = len(moe_layers) * args.num_experts
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool, tqdm(total=total, desc="experts", unit="expert",
                                                   disable=not progress) as bar:
        for layer in moe_layers:
            path = dst / ModelLayout.layer_file(layer)
            checksums[layer] = _write_layer(path, layout, args.num_experts, seed, layer, pool, bar)

    out_config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    if quant:
        out_config["quantization"] = quant
    out_config["flash_moe"] = {"expert_bits": bits, "expert_group_size": group_size, "dtype": dtype,
                               "synthetic": {"seed": seed, "skew": skew}}
    (dst / "config.json").write_text(json.dumps(out_config, indent=1))
    model_layout = ModelLayout(layout, args.num_experts, moe_layers, checksums)
    tmp = dst / "layout.json.tmp"
    tmp.write_text(json.dumps(model_layout.to_json(), indent=1))
    os.replace(tmp, dst / "layout.json")
    return dst


def synthetic_bytes(config: dict, *, bits: int = 4, group_size: int = 64, dtype: str = "bfloat16") -> int:
    """Bytes of the layer files ``write_synthetic`` would write (the resident file comes on top)."""
    args = ModelArgs.from_config(config)
    layout = ModelLayout(ExpertLayout(args.hidden_size, args.moe_intermediate_size, bits, group_size, dtype),
                         args.num_experts, [i for i in range(args.num_hidden_layers) if args.is_moe(i)])
    return layout.layer_bytes() * len(layout.moe_layers)


def routing_stats(inds: np.ndarray, num_experts: int) -> dict:
    """Popularity of a token sequence's expert choices ``inds`` [T, K] in one layer.

    Returns top20_share (activations taken by the most used 20% of experts), experts_for_half (how
    many experts cover 50%) and consecutive_overlap (mean share of a token's experts the previous
    token also used).
    """
    inds = np.asarray(inds)
    counts = np.sort(np.bincount(inds.ravel(), minlength=num_experts))[::-1]
    cum = np.cumsum(counts) / counts.sum()
    K = inds.shape[1]
    overlap = [len(set(a) & set(b)) / K for a, b in zip(inds[1:].tolist(), inds[:-1].tolist())]
    return {
        "top20_share": float(cum[max(1, num_experts // 5) - 1]),
        "experts_for_half": int(np.searchsorted(cum, 0.5) + 1),
        "consecutive_overlap": float(np.mean(overlap)) if overlap else float("nan"),
    }

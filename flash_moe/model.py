"""Qwen3.5-MoE (and Qwen3-Next) text model in MLX: math only.

Reads like mlx-lm's model files: ``ModelArgs`` from the Hugging Face config.json, plain modules,
``sanitize`` for checkpoint names. Routed experts come from ``experts_factory(layer)``; the model
does not know whether their bytes are in memory or on disk.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .cache import ArraysCache, KVCache
from .experts import ResidentExperts
from .kernels.add_rms_norm import add_rms_norm
from .layers.attention import Attention
from .layers.gated_delta import GatedDeltaNet
from .layers.moe import MLP, SparseMoeBlock

# On a GPU each residual add rides in the RMSNorm kernel after it (kernels/add_rms_norm.body);
# FLASH_MOE_FUSED_ADD_NORM=0 keeps separate adds and norms.
FUSED_ADD_NORM = os.environ.get("FLASH_MOE_FUSED_ADD_NORM", "1") != "0"
SUPPORTED_MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next")
_POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "num_key_value_heads",
                  "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                  "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                  "head_dim", "linear_conv_kernel_dim", "full_attention_interval", "decoder_sparse_step",
                  "intermediate_size")


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    head_dim: int | None = None
    linear_conv_kernel_dim: int = 4
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_theta: float = 1e7
    partial_rotary_factor: float = 0.25
    norm_topk_prob: bool = True
    full_attention_interval: int = 4
    layer_types: list[str] | None = None
    tie_word_embeddings: bool = False
    intermediate_size: int | None = None  # dense MLP of Qwen3-Next's mlp_only_layers
    mlp_only_layers: list[int] = field(default_factory=list)
    decoder_sparse_step: int = 1
    eos_token_id: int | list[int] | None = None
    max_position_embeddings: int | None = None  # the context it was trained for; longer prompts are warned about

    def __post_init__(self):
        self.check()
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.layer_types:
            self.layer_types = [
                "full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
                for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"config: layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )

    def check(self) -> None:
        """Types and ranges of every field: a string "128", a 2.5 or a True where an int belongs, or a count that
        MLX would only trip over deep inside a layer (0 experts per token), is a ValueError naming the key."""
        def fail(key, want):
            raise ValueError(f"config.json: {key} must be {want}, got {getattr(self, key)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v):
            return is_int(v) or (isinstance(v, float) and math.isfinite(v))

        optional = {"head_dim", "intermediate_size"}
        for key in _POSITIVE_INTS:
            v = getattr(self, key)
            if not (is_int(v) and v >= 1) and not (v is None and key in optional):
                fail(key, "a positive integer")
        if not self.num_experts_per_tok <= self.num_experts:
            fail("num_experts_per_tok", f"an integer in 1..num_experts ({self.num_experts})")
        for key in ("attention_bias", "norm_topk_prob", "tie_word_embeddings"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "true or false")
        for key, low in (("rms_norm_eps", 0.0), ("rope_theta", 0.0), ("partial_rotary_factor", 0.0)):
            v = getattr(self, key)
            if not (is_real(v) and v > low):
                fail(key, "a finite number > 0")
        if self.partial_rotary_factor > 1:
            fail("partial_rotary_factor", "in (0, 1]")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"a divisor of num_attention_heads ({self.num_attention_heads})")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            fail("linear_num_key_heads", f"a divisor of linear_num_value_heads ({self.linear_num_value_heads})")
        if self.layer_types is not None and not (
                isinstance(self.layer_types, list) and set(self.layer_types) <= {"full_attention", "linear_attention"}):
            fail("layer_types", "a list of 'full_attention' / 'linear_attention'")
        if not (isinstance(self.mlp_only_layers, list)
                and all(is_int(i) and 0 <= i < self.num_hidden_layers for i in self.mlp_only_layers)):
            fail("mlp_only_layers", f"a list of layer numbers in 0..{self.num_hidden_layers - 1}")
        if self.mlp_only_layers and self.intermediate_size is None:
            fail("intermediate_size", "set when mlp_only_layers is not empty")
        eos = self.eos_token_id
        if not (eos is None or (is_int(eos) and eos >= 0)
                or (isinstance(eos, list) and all(is_int(t) and t >= 0 for t in eos))):
            fail("eos_token_id", "a token id or a list of token ids")

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """From a Hugging Face config.json (nested ``text_config`` for the multimodal release)."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json: model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        text = (config.get("text_config") or {}) if model_type == "qwen3_5_moe" else config
        if not isinstance(text, dict):
            raise ValueError(f"config.json: text_config must be an object, got {type(text).__name__}")
        text = dict(text)
        if model_type == "qwen3_5_moe":
            text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
            text.setdefault("eos_token_id", config.get("eos_token_id"))
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"config.json: rope_parameters must be an object, got {type(rope).__name__}")
        text.setdefault("rope_theta", rope.get("rope_theta", 1e7 if model_type != "qwen3_next" else 5e6))
        text.setdefault("partial_rotary_factor", rope.get("partial_rotary_factor", 0.25))
        if text.get("full_attention_interval") is None:
            text.pop("full_attention_interval", None)
        if text.get("mlp_only_layers") is None:
            text.pop("mlp_only_layers", None)
        text["model_type"] = model_type
        names = inspect.signature(cls).parameters
        missing = [k for k, p in names.items() if p.default is p.empty and k not in text]
        if missing:
            raise ValueError(f"config.json: missing {', '.join(missing)}")
        return cls(**{k: v for k, v in text.items() if k in names})

    def is_linear(self, layer: int) -> bool:
        return self.layer_types[layer] == "linear_attention"

    def is_moe(self, layer: int) -> bool:
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


def check_token_ids(tokens, vocab_size: int, what: str = "token id", note: str = "") -> None:
    """Refuse ids outside [0, vocab_size): the embedding lookup does not bounds-check (an id of 10**6 reads
    outside the table, or crashes the process). An ``mx.array`` costs one min/max reduction and one sync;
    a list is checked on the host."""
    if isinstance(tokens, mx.array):
        if not mx.issubdtype(tokens.dtype, mx.integer):
            raise ValueError(f"{what}s must be integers, got an array of {tokens.dtype}")
        if tokens.size == 0:
            return
        lo, hi = mx.stack([tokens.min(), tokens.max()]).tolist()
    else:
        ids = list(tokens)
        bad = next((t for t in ids if isinstance(t, bool) or not hasattr(t, "__index__")), None)
        if bad is not None:
            raise ValueError(f"{what}s must be integers, got {bad!r}")
        if not ids:
            return
        lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{what} {hi if hi >= vocab_size else lo} is out of range for this model "
                         f"(0 <= id < vocab_size {vocab_size}){note}")


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, experts: nn.Module | None):
        super().__init__()
        self.is_linear = args.is_linear(layer)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = Attention(args)
        if experts is not None:
            self.mlp = SparseMoeBlock(args, experts)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        mixer = self.linear_attn if self.is_linear else self.self_attn
        h = x + mixer(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def residual_step(self, x: mx.array, delta: mx.array | None, cache=None) -> tuple[mx.array, mx.array]:
        """The layer on x + delta (delta: the previous layer's MLP output, not yet added), returning the residual
        stream before its own MLP output and that output: each add rides in the norm after it."""
        mixer = self.linear_attn if self.is_linear else self.self_attn
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        x, xn = add_rms_norm(x, delta, norm1.weight, norm1.eps)
        h, hn = add_rms_norm(x, mixer(xn, cache), norm2.weight, norm2.eps)
        return h, self.mlp(hn)


class TextModel(nn.Module):
    def __init__(self, args: ModelArgs, experts_factory: Callable[[int], nn.Module]):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            DecoderLayer(args, i, experts_factory(i) if args.is_moe(i) else None)
            for i in range(args.num_hidden_layers)
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.embed_tokens(inputs)
        caches = cache or [None] * len(self.layers)
        if FUSED_ADD_NORM and kernels.BACKEND != "ops":
            delta = None
            for layer, c in zip(self.layers, caches):
                h, delta = layer.residual_step(h, delta, c)
            return add_rms_norm(h, delta, self.norm.weight, self.norm.eps)[1]
        for layer, c in zip(self.layers, caches):
            h = layer(h, c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs, experts_factory: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.args = args
        if experts_factory is None:
            experts_factory = lambda layer: ResidentExperts(
                args.num_experts, args.hidden_size, args.moe_intermediate_size
            )
        self.model = TextModel(args, experts_factory)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.model(inputs, cache)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self) -> list:
        return [ArraysCache(2) if layer.is_linear else KVCache() for layer in self.layers]


# ---- checkpoint names -> module names -------------------------------------------------------

class WeightError(ValueError):
    """A checkpoint tensor that does not fit the model; ``key`` is its name in the checkpoint."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


ZERO_CENTRED_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight", "k_norm.weight")


def checkpoint_name(key: str) -> str | None:
    """Map one checkpoint key to this model's naming; None drops it (vision tower, MTP head)."""
    for prefix in ("model.visual.", "visual.", "vision_tower.", "model.vision_tower.", "mtp.", "model.mtp."):
        if key.startswith(prefix):
            return None
    for old, new in (
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    ):
        if key.startswith(old):
            key = new + key[len(old) :]
    return key.replace(".mlp.switch_mlp.", ".mlp.experts.")


def _ungroup_qwen3_next(weights: dict, args: ModelArgs, origin: dict) -> None:
    """Qwen3-Next groups in_proj_qkvz / in_proj_ba rows per key head: split them into Qwen3.5's
    separate in_proj_qkv, in_proj_z, in_proj_b, in_proj_a (a row permutation, exact for any dtype)."""
    Hk, Hv, Dk, Dv = (args.linear_num_key_heads, args.linear_num_value_heads,
                      args.linear_key_head_dim, args.linear_value_head_dim)
    r = Hv // Hk
    for key in [k for k in weights if ".in_proj_qkvz." in k or ".in_proj_ba." in k]:
        w = weights.pop(key)
        src = origin.pop(key)
        head, suffix = key.split(".in_proj_")
        suffix = suffix.split(".", 1)[1]
        g = w.reshape(Hk, -1, w.shape[-1])
        if ".in_proj_qkvz." in key:
            q, k, v, z = mx.split(g, [Dk, 2 * Dk, 2 * Dk + r * Dv], axis=1)
            parts = {"qkv": mx.concatenate([a.reshape(-1, w.shape[-1]) for a in (q, k, v)]), "z": z.reshape(-1, w.shape[-1])}
        else:
            b, a = mx.split(g, [r], axis=1)
            parts = {"b": b.reshape(-1, w.shape[-1]), "a": a.reshape(-1, w.shape[-1])}
        for name, part in parts.items():
            weights[f"{head}.in_proj_{name}.{suffix}"] = part
            origin[f"{head}.in_proj_{name}.{suffix}"] = src


def sanitize(weights: dict, args: ModelArgs, hf_norms: bool = True) -> tuple[dict, dict]:
    """Hugging Face (or mlx-community) checkpoint tensors -> this model's parameters.

    Returns (weights, origin) where origin maps each new name to the checkpoint key it came from.
    ``hf_norms``: the checkpoint stores zero-centred RMSNorm weights (HF) that need the +1.
    """
    out, origin, experts = {}, {}, {}
    for key, w in weights.items():
        new = checkpoint_name(key)
        if new is None:
            continue
        if ".mlp.experts." in new:
            base, rest = new.split(".mlp.experts.")
            base += ".mlp.experts"
            if rest == "gate_up_proj":  # fused release layout: (E, 2I, D), gate rows first
                I = w.shape[1] // 2
                for name, part in (("gate_proj", w[:, :I]), ("up_proj", w[:, I:])):
                    out[f"{base}.{name}.weight"], origin[f"{base}.{name}.weight"] = part, key
                continue
            if rest == "down_proj":  # fused release layout: (E, D, I)
                new = f"{base}.down_proj.weight"
            elif rest.split(".")[0].isdigit():  # per-expert keys: mlp.experts.{e}.gate_proj.weight
                e, tail = rest.split(".", 1)
                experts.setdefault(f"{base}.{tail}", {})[int(e)] = (w, key)
                continue
        out[new], origin[new] = w, key
    for new, parts in experts.items():
        missing = sorted(set(range(args.num_experts)) - set(parts))
        extra = sorted(set(parts) - set(range(args.num_experts)))
        if missing or extra:
            key = parts[(extra or sorted(parts))[0]][1]
            raise WeightError(f"{new}: per-expert tensors of experts {missing} missing, of experts {extra} unexpected "
                              f"(the config has {args.num_experts} experts; e.g. {key!r})", key)
        shape = parts[0][0].shape
        for e in range(args.num_experts):
            if parts[e][0].shape != shape:
                raise WeightError(f"tensor {parts[e][1]!r} has shape {tuple(parts[e][0].shape)}, expected "
                                  f"{tuple(shape)} like expert 0", parts[e][1])
        out[new] = mx.stack([parts[e][0] for e in range(args.num_experts)])
        origin[new] = parts[0][1].replace(".0.", ".{e}.", 1)
    if args.model_type == "qwen3_next":
        _ungroup_qwen3_next(out, args, origin)
    for key in list(out):
        w = out[key]
        if key.endswith("conv1d.weight") and w.ndim == 3 and w.shape[-1] != 1:
            out[key] = w.swapaxes(1, 2)  # HF (C, 1, k) -> MLX (C, k, 1)
        elif hf_norms and (key.endswith(ZERO_CENTRED_NORMS) or key == "model.norm.weight"):
            out[key] = w.astype(mx.float32) + 1.0  # in fp32, as HF computes it; load casts to the model dtype
    if args.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out, origin

"""Tiny random transformers reference models (Qwen3.5-MoE, Qwen3-Next), built offline.

Each builder makes a PyTorch model on the CPU in float32, randomises every parameter,
saves it with ``save_pretrained`` and returns ``(folder, torch_model)``. The torch model
holds exactly the weights that were written (also when they were saved in bfloat16), so it
is the numerical reference for whatever loads the folder.

Why the weights are drawn the way they are:
- Fresh HF norms are all zeros (zero-centred, used as 1 + w) or all ones. Such weights hide
  a missing or doubled "+1", so every norm gets random values.
- Fresh ``A_log`` makes most GDN decays exp(-10): the state is forgotten at once and a
  broken recurrence or cache goes unnoticed. Here decays spread over about 0.05..0.97.
- Router weights are large (logits std ~4): the top-k choice is decisive, so float32
  rounding differences cannot flip an expert. ``router_margin`` measures how decisive.
- The lm_head is scaled so logits have std ~3: greedy argmax near-ties are rare.

transformers 5.23 ``save_pretrained`` writes per-expert keys
(``mlp.experts.{e}.{gate,up,down}_proj.weight``); ``set_expert_layout`` rewrites the files to the
released fused layout (``mlp.experts.gate_up_proj`` (E, 2I, H), gate rows first, and
``mlp.experts.down_proj`` (E, H, I)) or back. transformers loads both.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)

# Text configs. Every one differs from the others in head dims, layer pattern, expert count and
# top-k. "layer_types": None means config.json gets no layer_types, only full_attention_interval.
QWEN3_5_CONFIGS = {
    # The released pattern (3 GDN + 1 attention), like the mlx-lm parity model.
    "interval4_e8_top2": dict(
        vocab_size=160, hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=16,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        rope_parameters=dict(rope_type="default", rope_theta=12345.0, partial_rotary_factor=0.25,
                             mrope_section=[2, 1, 1], mrope_interleaved=True),
    ),
    # Explicit non-periodic layer_types starting with attention; head_dim 64; Dk < Dv.
    "explicit_types_e12_top3": dict(
        vocab_size=211, hidden_size=96, num_hidden_layers=5,
        layer_types=["full_attention", "linear_attention", "linear_attention",
                     "full_attention", "linear_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=32,
        num_experts=12, num_experts_per_tok=3, moe_intermediate_size=48,
        shared_expert_intermediate_size=96, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=1.0e6, partial_rotary_factor=0.25,
                             mrope_section=[3, 3, 2], mrope_interleaved=True),
    ),
    # No layer_types in config.json: the pattern comes from full_attention_interval=2.
    # 8 q heads over 2 kv heads, GDN 1 k head for 4 v heads, partial_rotary_factor 0.5.
    "interval2_e16_top4": dict(
        vocab_size=300, hidden_size=128, num_hidden_layers=6, layer_types=None,
        full_attention_interval=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=1, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=32,
        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
        shared_expert_intermediate_size=32,
        rope_parameters=dict(rope_type="default", rope_theta=5.0e5, partial_rotary_factor=0.5,
                             mrope_section=[3, 3, 2], mrope_interleaved=True),
    ),
}

QWEN3_NEXT_CONFIGS = {
    # Grouped in_proj_qkvz / in_proj_ba, 2 v heads per k head, every layer sparse MoE.
    "next_interval3_e16_top4": dict(
        vocab_size=180, hidden_size=64, num_hidden_layers=6, layer_types=None,
        full_attention_interval=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=16,
        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, intermediate_size=64,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        rope_parameters=dict(rope_type="default", rope_theta=5.0e6, partial_rotary_factor=0.25),
    ),
    # norm_topk_prob False: the top-k softmax weights are used as they are (sum < 1).
    "next_unnormed_e8_top3": dict(
        vocab_size=150, hidden_size=80, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=6,
        linear_key_head_dim=16, linear_value_head_dim=16,
        num_experts=8, num_experts_per_tok=3, moe_intermediate_size=40,
        shared_expert_intermediate_size=40, intermediate_size=64,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        rope_parameters=dict(rope_type="default", rope_theta=2.5e4, partial_rotary_factor=0.25),
    ),
}

TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   patch_size=4, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16)

ZERO_CENTRED_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight",
                      "q_norm.weight", "k_norm.weight")
FUSED_RE = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
PER_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _draw(name: str, shape: tuple[int, ...], gen: torch.Generator, hidden: int) -> torch.Tensor:
    def normal(std):
        return torch.randn(shape, generator=gen) * std

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    if name.endswith("linear_attn.norm.weight"):  # not zero-centred: used as is
        return uniform(0.5, 1.5)
    if name.endswith(ZERO_CENTRED_NORMS) or re.search(r"(^|\.)norm\.weight$", name):
        return normal(0.3)
    if name.endswith("A_log"):
        return uniform(0.1, 1.5).log()
    if name.endswith("dt_bias"):
        return normal(0.5)
    if name.endswith("conv1d.weight"):
        return normal(0.5)
    if name.endswith("mlp.gate.weight"):
        return normal(4.0 / math.sqrt(hidden))
    if name.endswith("embed_tokens.weight"):
        return normal(1.0)
    if name.endswith("lm_head.weight"):
        return normal(3.0 / math.sqrt(hidden))
    if len(shape) == 1:  # vision biases and layer norms
        return normal(0.1)
    return normal(1.0 / math.sqrt(shape[-1]))  # fan-in scaling keeps activations near unit size


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter of ``model`` with seeded random values (see module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.get_text_config().hidden_size
    for name, p in model.named_parameters():
        p.copy_(_draw(name, tuple(p.shape), gen, hidden))


def router_margin(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """Smallest gap, over all tokens and MoE layers, between the k-th and (k+1)-th router logit.

    A gap far above float32 noise (~1e-5 here) means no implementation can pick other experts.
    """
    gaps = []

    def hook(module, args, output):
        logits = output[0].float()
        top = logits.topk(module.top_k + 1, dim=-1).values
        gaps.append((top[:, -2] - top[:, -1]).min().item())

    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return min(gaps)


# ---------------------------------------------------------------- checkpoint files


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def read_checkpoint(folder: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """All tensors of a checkpoint folder: name -> (file name, tensor)."""
    out = {}
    for f in checkpoint_files(folder):
        for name, t in load_file(f).items():
            out[name] = (f.name, t)
    return out


def write_checkpoint(folder: Path, tensors: dict[str, tuple[str, torch.Tensor]]) -> None:
    """Replace the folder's safetensors files with ``tensors`` (and rewrite the index if there is one)."""
    folder = Path(folder)
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for name, (fname, t) in tensors.items():
        by_file.setdefault(fname, {})[name] = t.contiguous()
    for f in checkpoint_files(folder):
        f.unlink()
    for fname, group in by_file.items():
        save_file(group, folder / fname, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        meta = json.loads(index.read_text())
        meta["weight_map"] = {name: tensors[name][0] for name in sorted(tensors)}
        meta.setdefault("metadata", {})["total_size"] = sum(
            t.numel() * t.element_size() for _, t in tensors.values())
        index.write_text(json.dumps(meta, indent=2))


def expert_layout(folder: Path) -> str:
    names = read_checkpoint(folder)
    if any(FUSED_RE.match(n) for n in names):
        return "fused"
    if any(PER_EXPERT_RE.match(n) for n in names):
        return "per_expert"
    raise ValueError(f"{folder}: no expert tensors")


def set_expert_layout(folder: Path, layout: str) -> None:
    """Rewrite the expert tensors in ``layout`` ("fused" or "per_expert"), in place.

    A fused tensor goes to the file that held expert 0's gate_proj; per-expert tensors go to
    the file that held the fused tensor they come from.
    """
    if layout not in ("fused", "per_expert"):
        raise ValueError(f"layout must be 'fused' or 'per_expert', got {layout!r}")
    tensors = read_checkpoint(folder)
    out = {}
    if layout == "fused":
        groups: dict[str, dict[int, dict[str, tuple[str, torch.Tensor]]]] = {}
        for name, value in tensors.items():
            m = PER_EXPERT_RE.match(name)
            if m and not name.startswith("mtp."):
                groups.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = value
            else:
                out[name] = value
        for prefix, experts in groups.items():
            n = len(experts)
            if sorted(experts) != list(range(n)):
                raise ValueError(f"{prefix}: experts {sorted(experts)} are not 0..{n - 1}")
            fname = experts[0]["gate_proj"][0]
            out[f"{prefix}.gate_up_proj"] = (fname, torch.stack(
                [torch.cat([experts[e]["gate_proj"][1], experts[e]["up_proj"][1]]) for e in range(n)]))
            out[f"{prefix}.down_proj"] = (fname, torch.stack([experts[e]["down_proj"][1] for e in range(n)]))
    else:
        for name, (fname, t) in tensors.items():
            m = FUSED_RE.match(name)
            if not m:
                out[name] = (fname, t)
            elif m[2] == "gate_up_proj":
                inter = t.shape[1] // 2
                for e in range(t.shape[0]):
                    out[f"{m[1]}.{e}.gate_proj.weight"] = (fname, t[e, :inter].clone())
                    out[f"{m[1]}.{e}.up_proj.weight"] = (fname, t[e, inter:].clone())
            else:
                for e in range(t.shape[0]):
                    out[f"{m[1]}.{e}.down_proj.weight"] = (fname, t[e].clone())
    write_checkpoint(folder, out)


def edit_config(folder: Path, edit) -> None:
    """Apply ``edit(config_dict)`` to the folder's config.json (the text part for composite configs)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    edit(config.get("text_config", config))
    path.write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------- builders


def _text_kwargs(text_config: dict) -> tuple[dict, int | None]:
    """Split our config dict into transformers kwargs and the interval to write (if any)."""
    kw = copy.deepcopy(text_config)
    interval = None
    if "layer_types" in kw and kw["layer_types"] is None:
        interval = kw.pop("full_attention_interval")
        kw.pop("layer_types")
        kw["layer_types"] = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                             for i in range(kw["num_hidden_layers"])]
    kw.pop("full_attention_interval", None)
    return kw, interval


def _save(model, folder: Path, *, seed: int, layout: str, interval: int | None,
          save_dtype: torch.dtype, shard_size: str | None) -> tuple[Path, torch.nn.Module]:
    folder = Path(folder)
    randomize_(model, seed)
    model.eval()
    if save_dtype != torch.float32:
        # The reference must hold exactly the stored values: round, save, and compute in float32.
        model.to(save_dtype)
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kw)
    model.to(torch.float32)
    if interval is not None:
        def use_interval(cfg):
            cfg.pop("layer_types", None)
            cfg["full_attention_interval"] = interval
        edit_config(folder, use_interval)
    if expert_layout(folder) != layout:
        set_expert_layout(folder, layout)
    return folder, model


def qwen3_5_moe(folder, text_config: dict, *, seed: int = 0, layout: str = "fused",
                save_dtype=torch.float32, shard_size: str | None = None):
    """Release-style composite checkpoint: ``model.language_model.*``, ``model.visual.*``, ``lm_head``."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    kw, interval = _text_kwargs(text_config)
    config = Qwen3_5MoeConfig(text_config=kw, vision_config=dict(TINY_VISION),
                              tie_word_embeddings=False)
    config.vision_config.out_hidden_size = kw["hidden_size"]
    model = Qwen3_5MoeForConditionalGeneration(config)
    return _save(model, folder, seed=seed, layout=layout, interval=interval,
                 save_dtype=save_dtype, shard_size=shard_size)


def qwen3_5_moe_text(folder, text_config: dict, *, seed: int = 0, layout: str = "fused",
                     save_dtype=torch.float32, shard_size: str | None = None):
    """Text-only checkpoint (``model_type`` qwen3_5_moe_text): keys ``model.layers.*``."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    kw, interval = _text_kwargs(text_config)
    model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**kw, tie_word_embeddings=False))
    return _save(model, folder, seed=seed, layout=layout, interval=interval,
                 save_dtype=save_dtype, shard_size=shard_size)


def qwen3_next(folder, text_config: dict, *, seed: int = 0, layout: str = "per_expert",
               save_dtype=torch.float32, shard_size: str | None = None):
    """Qwen3-Next checkpoint: grouped ``in_proj_qkvz``/``in_proj_ba``; every layer sparse MoE."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    kw, interval = _text_kwargs(text_config)
    config = Qwen3NextConfig(**kw, tie_word_embeddings=False)
    if config.mlp_only_layers or config.decoder_sparse_step != 1:
        raise ValueError("flash_moe fixtures keep every Qwen3-Next layer sparse MoE")
    model = Qwen3NextForCausalLM(config)
    return _save(model, folder, seed=seed, layout=layout, interval=interval,
                 save_dtype=save_dtype, shard_size=shard_size)


BUILDERS = {"qwen3_5_moe": qwen3_5_moe, "qwen3_5_moe_text": qwen3_5_moe_text, "qwen3_next": qwen3_next}


def random_tokens(gen: np.random.Generator, vocab: int, shape: tuple[int, ...]) -> np.ndarray:
    """Random token ids with at least two distinct values per row (never a constant sequence)."""
    while True:
        tokens = gen.integers(0, vocab, size=shape, dtype=np.int64)
        if all(len(np.unique(row)) > 1 for row in tokens.reshape(-1, shape[-1])):
            return tokens

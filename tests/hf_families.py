"""Tiny random transformers checkpoints of the MoE families flash_moe runs through mlx-lm.

Every weight is randomised by ``hf_models.randomize_`` (router biases and DeepSeek/GLM's score
correction bias included); configs are saved by transformers 5 as is (``rope_parameters``, renamed
expert counts), which flash_moe.families reads like the released config.json files. Expert dims are
multiples of 64 so the same checkpoint converts at 4 bits too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import transformers

import hf_models

FAMILIES = {
    # dense layer 1 among MoE layers (mlp_only_layers), renormalised top-k
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=3, mlp_only_layers=[1],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=64, norm_topk_prob=True, rope_theta=25000.0)),
    # softmax over the top-k logits
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        vocab_size=130, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6)),
    # MLA, sigmoid routing limited to 2 of 4 groups, correction bias, scaling 2.5, a shared expert, dense layer 0
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        vocab_size=140, hidden_size=64, intermediate_size=96, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=32,
        q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32, routed_scaling_factor=2.5)),
    # as DeepSeek-V3's routing, with GQA, q/k norms, attention biases and partial rotary
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        vocab_size=150, hidden_size=64, intermediate_size=96, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_shared_experts=1, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        partial_rotary_factor=0.5, use_qk_norm=True, attention_bias=True)),
    # DeepSeek-V3's model under model_type "kimi_k2" (mlx-lm remaps it): one group, 384-expert-like routing
    "kimi_k2": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        vocab_size=140, hidden_size=64, intermediate_size=96, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=12,
        num_experts_per_tok=3, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32,
        q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32, routed_scaling_factor=2.827)),
    # shared expert behind a sigmoid gate, attention q/k/v biases, un-normalised top-k
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
        shared_expert_intermediate_size=96, norm_topk_prob=False)),
    # q/k norms over all heads, experts of intermediate_size
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0)),
    # DeepSeek-V3-like routing (sigmoid, correction bias, groups) with GQA attention and q/k norms
    "dots1": ("Dots1Config", "Dots1ForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        norm_topk_prob=True)),
    # experts with biases and a clamped SwiGLU, shipped in mxfp4; router with a bias; sinks; sliding window 8
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
        # the release's YaRN, but with its correction range rounded: mlx-lm's YarnRoPE always rounds it, the
        # release's "truncate": false does not (a 1e-5 difference between mlx-lm and transformers)
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                             original_max_position_embeddings=4096, truncate=True))),
}


SAVED_AS = {"kimi_k2": "kimi_k2"}


def build(name: str, folder: Path, *, seed: int, **overrides) -> tuple[Path, torch.nn.Module]:
    """Save a random float32 checkpoint of family ``name`` into ``folder``; returns (folder, torch model)."""
    config_cls, model_cls, kwargs = FAMILIES[name]
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    hf_models.randomize_(model, seed)
    if name == "gpt_oss":
        to_mxfp4(model, folder)
    else:
        model.save_pretrained(folder)
    if name in SAVED_AS:  # a release whose config names another model_type than transformers' class
        path = Path(folder) / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "model_type": SAVED_AS[name]}))
    return Path(folder), model


@torch.no_grad()
def to_mxfp4(model: torch.nn.Module, folder: Path) -> None:
    """Ship gpt-oss's experts as its release does: mxfp4 ``*_blocks`` (uint8, 16 bytes per 32 inputs) and
    ``*_scales`` (uint8 exponents), gate and up rows interleaved, ``[out, in]``. The torch model's experts
    are set to the values mxfp4 holds, so it stays the exact reference. Routers are scaled up (logits of
    std ~4) so the top-k choice is decisive."""
    import mlx.core as mx
    from safetensors.torch import load_file, save_file

    for layer in model.model.layers:
        layer.mlp.router.weight.mul_(4.0)
    model.save_pretrained(folder)
    files = sorted(Path(folder).glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(f).items()}
    for name, p in model.named_parameters():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            continue
        w = mx.array(p.transpose(1, 2).contiguous().numpy())  # HF (E, in, out) -> (E, out, in)
        q, scales = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
        p.copy_(torch.from_numpy(np.array(mx.dequantize(q, scales, group_size=32, bits=4, mode="mxfp4").astype(mx.float32)))
                .transpose(1, 2))
        del tensors[name]
        e, out, _ = w.shape
        tensors[name + "_blocks"] = torch.from_numpy(np.array(q).view(np.uint8).reshape(e, out, -1, 16))
        tensors[name + "_scales"] = torch.from_numpy(np.array(scales))
    for f in files:
        f.unlink()
    save_file(tensors, Path(folder) / "model.safetensors", metadata={"format": "pt"})
    (Path(folder) / "model.safetensors.index.json").unlink(missing_ok=True)


def with_top_k(model: torch.nn.Module, k: int) -> torch.nn.Module:
    """The same weights routed to k experts per token."""
    name = type(model).__name__
    config = type(model.config)(**{**model.config.to_dict(), "num_experts_per_tok": k})
    other = getattr(transformers, name)(config).float().eval()
    other.load_state_dict(model.state_dict())
    return other


def routing_margin(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """Smallest gap, over tokens and MoE layers, between the last expert chosen and the first one not
    (and, for group-limited routing, between the last group kept and the first dropped), in the family's
    own ranking score. A gap far above float32 noise means no implementation can route differently."""
    cfg = model.config
    k = cfg.num_experts_per_tok
    sigmoid = hasattr(cfg, "n_group")
    gaps = []

    def gap(scores, n):  # [T, E] -> smallest distance between the n-th and (n+1)-th best per row
        top = np.sort(scores, axis=-1)[:, ::-1]
        return float((top[:, n - 1] - top[:, n]).min())

    def hook(module, args, output):
        x = args[0].reshape(-1, args[0].shape[-1]).double().numpy()
        logits = x @ module.weight.double().numpy().T
        if getattr(module, "bias", None) is not None:
            logits = logits + module.bias.double().numpy()
        if not sigmoid:
            gaps.append(gap(logits, k))
            return
        s = 1 / (1 + np.exp(-logits)) + module.e_score_correction_bias.double().numpy()
        groups = s.reshape(len(s), cfg.n_group, -1)
        group_scores = np.sort(groups, axis=-1)[..., -2:].sum(-1)
        if cfg.n_group > 1:
            gaps.append(gap(group_scores, cfg.topk_group))
        keep = np.argsort(-group_scores, axis=-1)[:, : cfg.topk_group]
        masked = np.full_like(groups, -np.inf)
        np.put_along_axis(masked, keep[..., None], np.take_along_axis(groups, keep[..., None], 1), 1)
        gaps.append(gap(masked.reshape(len(s), -1), k))

    gates = [m for n, m in model.named_modules() if n.endswith(("mlp.gate", "block_sparse_moe.gate", "mlp.router"))]
    handles = [m.register_forward_hook(hook) for m in gates]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return min(gaps)


@torch.no_grad()
def to_fp8(model: torch.nn.Module, folder: Path) -> None:
    """Rewrite a saved DeepSeek-V3 checkpoint as its release ships: every layer matrix but the router in
    float8 e4m3 with a float32 ``weight_scale_inv`` per 128 x 128 block. The scales are powers of two, so
    the dequantized values are exact in bfloat16 (mlx-lm dequantizes to bfloat16); the torch model gets
    them too and stays the exact reference."""
    from safetensors.torch import load_file, save_file

    files = sorted(Path(folder).glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(f).items()}
    params = dict(model.named_parameters())
    for name, w in list(tensors.items()):
        if ".layers." not in name or w.ndim != 2 or name.endswith("mlp.gate.weight") or "norm" in name:
            continue
        out, inp = w.shape
        blocks = -(-out // 128), -(-inp // 128)
        padded = torch.zeros(blocks[0] * 128, blocks[1] * 128)
        padded[:out, :inp] = w
        amax = padded.reshape(blocks[0], 128, blocks[1], 128).abs().amax(dim=(1, 3)).clamp(min=1e-12)
        scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))  # a power of two per block
        full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:out, :inp]
        q = (w / full).to(torch.float8_e4m3fn)
        tensors[name] = q
        tensors[name.replace(".weight", ".weight_scale_inv")] = scale.float()
        target = params.get(name)
        if target is None:  # transformers 5 holds the experts fused: set the expert's rows there
            m = re.match(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", name)
            prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
            if proj == "down":
                params[prefix + ".down_proj"][e].copy_(q.float() * full)
            else:
                rows = params[prefix + ".gate_up_proj"][e]
                half = rows.shape[0] // 2
                (rows[:half] if proj == "gate" else rows[half:]).copy_(q.float() * full)
        else:
            target.copy_(q.float() * full)
    for f in files:
        f.unlink()
    save_file(tensors, Path(folder) / "model.safetensors", metadata={"format": "pt"})
    (Path(folder) / "model.safetensors.index.json").unlink(missing_ok=True)

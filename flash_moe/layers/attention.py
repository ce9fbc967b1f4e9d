"""Gated full attention (Qwen3.5 / Qwen3-Next): per-head [query | gate] rows, q/k RMSNorm, partial RoPE, GQA."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cache import BatchKVCache
from .stacked import stacked


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        D = args.hidden_size
        bias = args.attention_bias
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim * 2, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.rope_dims = int(self.head_dim * args.partial_rotary_factor)
        self.rope_theta = args.rope_theta

    def rope(self, x: mx.array, offset: int) -> mx.array:
        return mx.fast.rope(x, self.rope_dims, traditional=False, base=self.rope_theta, scale=1.0, offset=offset)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, L, _ = x.shape
        qg, k, v = stacked(self, "_qkv", [self.q_proj, self.k_proj, self.v_proj])(x)  # one matmul
        q, gate = mx.split(qg.reshape(B, L, self.n_heads, 2 * self.head_dim), 2, axis=-1)
        q = self.q_norm(q).transpose(0, 2, 1, 3)  # [B, H, L, hd]
        k = self.k_norm(k.reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        if isinstance(cache, BatchKVCache):  # a decode batch: every sequence at its own position
            out = cache.attend(q, k, v, self.rope, self.scale)
        else:
            offset = cache.offset if cache is not None else 0
            q, k = self.rope(q, offset), self.rope(k, offset)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask="causal" if L > 1 else None)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(sigmoid_gate(out, gate.reshape(B, L, -1)))


@mx.compile
def sigmoid_gate(x: mx.array, gate: mx.array) -> mx.array:
    return x * mx.sigmoid(gate)

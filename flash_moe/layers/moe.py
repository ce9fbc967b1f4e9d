"""The MoE block: softmax router, top-k, routed experts from an injected provider, gated shared expert.

The elementwise tails are compiled into single kernels: decoding pays per op, not per byte.

The block does not know where expert weights live: ``experts`` is any callable
``experts(x [N, D], inds [N, K], scores [N, K]) -> [N, D]`` returning the score-weighted sum
of the chosen experts (resident arrays, or bytes streamed from SSD).
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..kernels.route_topk import route_topk, route_topk_ref
from .stacked import stacked

# On a GPU the router's tail is one kernel (kernels/route_topk.body); FLASH_MOE_FUSED_ROUTE=0 keeps the MLX ops.
FUSED_ROUTE = os.environ.get("FLASH_MOE_FUSED_ROUTE", "1") != "0"


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = stacked(self, "_gate_up", [self.gate_proj, self.up_proj])(x)  # one matmul
        return self.down_proj(swiglu(gate, up))


@mx.compile
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


@mx.compile
def add_gated(y: mx.array, gate_logit: mx.array, shared: mx.array) -> mx.array:
    return y + mx.sigmoid(gate_logit) * shared


@mx.compile
def route(logits: mx.array, k: int, normalize: bool = True) -> tuple[mx.array, mx.array]:
    """Softmax over all experts in fp32, top-k (unordered), optionally renormalised over the k; scores in fp32."""
    return route_topk_ref(logits.astype(mx.float32), k, normalize)


# The same with the scores in the logits' dtype, cast inside the compiled tail (one launch less).
route_in_dtype = mx.compile(route_topk_ref)


class SparseMoeBlock(nn.Module):
    def __init__(self, args, experts: nn.Module):
        super().__init__()
        D = args.hidden_size
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = nn.Linear(D, args.num_experts, bias=False)
        self.experts = experts
        self.shared_expert = MLP(D, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(D, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        # the router and the shared expert's gate as one matmul (when quantized alike)
        logits, gate_logit = stacked(self, "_gates", [self.gate, self.shared_expert_gate])(x)
        if FUSED_ROUTE and kernels.BACKEND != "ops":
            inds, scores = route_topk(logits, self.top_k, self.norm_topk_prob)
        else:
            inds, scores = route_in_dtype(logits, self.top_k, self.norm_topk_prob)  # [N, K], scores in x's dtype
        y = self.experts(x, inds, scores)
        y = add_gated(y, gate_logit, self.shared_expert(x))
        return y.reshape(shape)

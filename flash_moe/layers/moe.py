"""The MoE block: softmax router, top-k, routed experts from an injected provider, gated shared expert.

The elementwise tails are compiled into single kernels: decoding pays per op, not per byte.

The block does not know where expert weights live: ``experts`` is any callable
``experts(x [N, D], inds [N, K], scores [N, K]) -> [N, D]`` returning the score-weighted sum
of the chosen experts (resident arrays, or bytes streamed from SSD).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .stacked import stacked


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


def _route(logits: mx.array, k: int, normalize: bool) -> tuple[mx.array, mx.array]:
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    # the k largest land in the last k places: no negated copy of the probabilities to partition
    inds = mx.argpartition(probs, kth=probs.shape[-1] - k, axis=-1)[..., probs.shape[-1] - k :]
    scores = mx.take_along_axis(probs, inds, axis=-1)
    if normalize:
        scores = scores / scores.sum(axis=-1, keepdims=True)
    return inds.astype(mx.int32), scores


@mx.compile
def route(logits: mx.array, k: int, normalize: bool = True) -> tuple[mx.array, mx.array]:
    """Softmax over all experts in fp32, top-k (unordered), optionally renormalised over the k."""
    return _route(logits, k, normalize)


@mx.compile
def route_in_dtype(logits: mx.array, k: int, normalize: bool = True) -> tuple[mx.array, mx.array]:
    """``route`` with the scores cast to the logits' dtype inside the compiled tail (one launch less)."""
    inds, scores = _route(logits, k, normalize)
    return inds, scores.astype(logits.dtype)


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
        inds, scores = route_in_dtype(logits, self.top_k, self.norm_topk_prob)  # [N, K], scores in x's dtype
        y = self.experts(x, inds, scores)
        y = add_gated(y, gate_logit, self.shared_expert(x))
        return y.reshape(shape)

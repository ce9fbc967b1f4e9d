"""Every MoE family mlx-lm implements, with its routed experts streamed.

mlx-lm's MoE models all reach their routed experts through one seam: the MoE block routes, calls a
``SwitchGLU`` (mlx_lm/models/switch_layers.py; ``switch_mlp`` in most models) as
``(x [..., D], indices [..., K]) -> [..., K, D]`` and weights the K outputs itself. Here mlx-lm
builds the model from config.json, every SwitchGLU is swapped, before anything is evaluated, for a
``StreamedSwitch`` with the same call that reads the layer's experts from our packed files (an
``ExpertStore``), and everything else loads from ``resident.safetensors``. Routing, shared experts,
attention and the KV cache stay mlx-lm's own, so each family routes as it was trained to.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .files import CheckpointError
from .layout import PROJECTIONS
from .load import LoadedModel, cache_capacity, host_buffers, host_capacity, read_packed_experts, slot_buffers
from .model import SUPPORTED_MODEL_TYPES

EXTRA = 'pip install "flash-moe[mlx-lm]"'
# Names a transformers-5 config.json uses for fields mlx-lm's ModelArgs read under their released name.
ALIASES = {"num_experts": "num_local_experts", "num_local_experts": "num_experts"}
# Optional in the released configs, but required (no default) by some ModelArgs.
OPTIONAL = {"rope_scaling": None}
ROUTING_ATTRS = ("top_k", "num_experts_per_tok", "k")  # what the families' MoE blocks and routers read K from


def is_family(config: dict) -> bool:
    """A model flash_moe does not implement itself: it runs through mlx-lm's model of its type."""
    return config.get("model_type") not in SUPPORTED_MODEL_TYPES


def architecture(config: dict, where: Path | str):
    """mlx-lm's module for this config's ``model_type`` (its ``Model``, ``ModelArgs``), or a one-line error."""
    model_type = config.get("model_type")
    try:
        from mlx_lm.utils import MODEL_REMAPPING
    except ImportError:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} runs through mlx-lm, which is not installed; {EXTRA}"
        ) from None
    name = MODEL_REMAPPING.get(model_type, model_type)
    if not isinstance(name, str) or not name.isidentifier():
        raise CheckpointError(f"{where}: model_type {model_type!r} is not a model flash_moe or mlx-lm implements")
    try:
        return importlib.import_module(f"mlx_lm.models.{name}")
    except ImportError:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not a model flash_moe or mlx-lm implements"
        ) from None


def model_args(arch, config: dict, where: Path | str):
    """mlx-lm's ModelArgs from a released or a transformers-5 config.json (``rope_parameters``, renamed
    expert counts), with a one-line error naming a missing field."""
    cfg = dict(config)
    rope = cfg.get("rope_parameters") or {}
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in cfg and key in rope:
            cfg[key] = rope[key]
    if cfg.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    fields = inspect.signature(arch.ModelArgs).parameters
    for name, alias in ALIASES.items():
        if name in fields and name not in cfg and alias in cfg:
            cfg[name] = cfg[alias]
    for name, value in OPTIONAL.items():
        cfg.setdefault(name, value)
    missing = [n for n, p in fields.items() if p.default is inspect.Parameter.empty and n not in cfg]
    if missing:
        raise CheckpointError(f"{where}: config.json lacks {missing[0]!r}, which mlx-lm's {cfg.get('model_type')} needs")
    return arch.ModelArgs.from_dict(cfg)


def build(arch, config: dict, where: Path | str) -> nn.Module:
    """mlx-lm's model of the family, its weights lazy random arrays that are never evaluated (every one is
    replaced before use). A config its constructor cannot take is a one-line error."""
    args = model_args(arch, config, where)
    try:
        return arch.Model(args)
    except (TypeError, ValueError, AttributeError, KeyError, AssertionError, ArithmeticError) as e:
        raise CheckpointError(f"{where}: mlx-lm's {config.get('model_type')} cannot be built from it "
                              f"({type(e).__name__}: {e})") from None


def layer_of(path: str) -> int:
    parts = path.split(".")
    return int(parts[parts.index("layers") + 1])


def switches(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> each SwitchGLU of the model (its routed experts), in layer order."""
    from mlx_lm.models.switch_layers import SwitchGLU

    found = {p: m for p, m in model.named_modules() if isinstance(m, SwitchGLU)}
    return dict(sorted(found.items(), key=lambda pm: layer_of(pm[0])))


def expert_form(switch: nn.Module) -> str:
    """"swiglu" for bias-free SwiGLU experts (the fused kernels' form), "own" for any other (gpt-oss's biased,
    clamped one), which runs on MLX ops with the family's own activation module."""
    from mlx_lm.models.switch_layers import SwiGLU

    plain = type(switch.activation) is SwiGLU and not any("bias" in getattr(switch, p) for p in PROJECTIONS)
    return "swiglu" if plain else "own"


def routing_attrs(model: nn.Module, switch_paths=None) -> list[tuple[nn.Module, str]]:
    """(module, attribute) holding K in each MoE block (the parent of a switch; by default of each
    StreamedSwitch) and its direct children (its router): the family's own top-k, read on every call."""
    if switch_paths is None:
        switch_paths = [p for p, m in model.named_modules() if isinstance(m, StreamedSwitch)]
    blocks = {p.rsplit(".", 1)[0] for p in switch_paths}
    found = []
    for path, module in model.named_modules():
        if path in blocks or path.rsplit(".", 1)[0] in blocks:
            found += [(module, n) for n in ROUTING_ATTRS if type(getattr(module, n, None)) is int]
    return found


def expert_shape(switch: nn.Module) -> tuple[int, int, int]:
    """(experts, hidden, intermediate) of a SwitchGLU, from its (lazy, never evaluated) weights' shapes."""
    e, i, d = switch.gate_proj.weight.shape
    return e, d, i


# FLASH_MOE_FAMILY_EXPERTS=gather: a decode token's routed experts by mlx-lm's own ops (``gather_qmm`` per projection
# over the device tier's slot arrays, the family's activation) instead of the fused kernels, for a GPU run to decide
# which is faster at a family's shapes (benchmarks/gpu_suite.sh step families_gather). Default "fused".
FAMILY_EXPERTS = os.environ.get("FLASH_MOE_FAMILY_EXPERTS", "fused")


@functools.lru_cache(maxsize=None)
def constant(kind: str, n: int, dtype) -> mx.array:
    """An evaluated array: (n, 1) ones (unit scores), or (1, n) 0 .. n-1 (gather_qmm's row index of each of a
    token's n rows). Made per call, each is a fill or arange launch per layer and token."""
    a = mx.ones((n, 1), dtype) if kind == "ones" else mx.arange(n, dtype=dtype)[None]
    mx.eval(a)
    return a


def switch_outputs(activation):
    """mlx-lm's SwitchGLU over slot arrays, for ``StreamingExperts(compute=...)``: one token x [1, D] and its
    slots [1, K] -> each expert's output [1, K, D], unweighted (the family's block weights them)."""

    def compute(x, arrays, slots, scores, layout):
        # gather_qmm takes uint32 indices; slots are never negative, so int32 ones are the same bits (a view, no cast)
        idx = slots.view(mx.uint32) if slots.dtype == mx.int32 else slots.astype(mx.uint32)

        def proj(name, a, rows):
            w, cast = arrays[f"{name}.weight"], (lambda t: t if t.dtype == a.dtype else t.astype(a.dtype))
            return mx.gather_qmm(a, w, cast(arrays[f"{name}.scales"]), cast(arrays[f"{name}.biases"]), lhs_indices=rows,
                                 rhs_indices=idx, transpose=True, group_size=layout.group_size, bits=layout.bits)

        h, one = x[:, None, None, :], constant("arange", 1, mx.uint32)  # the token's one row, for every expert
        h = activation(proj("up_proj", h, one), proj("gate_proj", h, one))  # [1, K, 1, I]: row k for expert k
        return proj("down_proj", h, constant("arange", idx.shape[-1], mx.uint32)).squeeze(-2)

    return compute


class StreamedSwitch(nn.Module):
    """SwitchGLU's call over an experts provider (``StreamingExperts`` or ``ResidentExperts``).

    ``(x [..., D], indices [..., K]) -> [..., K, D]``, unweighted: the family's block weights the K
    outputs. Each (token, k) pair becomes one row routed to one expert with score 1, so the providers'
    fused kernels, slot reuse and once-per-chunk reads apply unchanged. ``gather_activation`` (the family's,
    from its SwitchGLU; ``StreamingExperts`` of quantized experts only): a decode token's experts by
    ``switch_outputs`` instead (FLASH_MOE_FAMILY_EXPERTS=gather).
    """

    def __init__(self, experts: nn.Module, gather_activation=None):
        super().__init__()
        self.experts = experts
        self._gather = switch_outputs(gather_activation) if gather_activation is not None else None

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        k, d = indices.shape[-1], x.shape[-1]
        if self._gather is not None and x.size == d:  # one decode token
            y = self.experts(x.reshape(1, d), indices.reshape(1, k), None, compute=self._gather)
            return y.reshape(*indices.shape, d)
        rows = mx.repeat(x.reshape(-1, d), k, axis=0)
        inds = indices.reshape(-1, 1)
        y = self.experts(rows, inds, constant("ones", inds.shape[0], x.dtype))
        return y.reshape(*indices.shape, d)


@dataclass
class FamilyArgs:
    """What LoadedModel and generation read of a model's config, for a model mlx-lm defines."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_experts: int
    num_experts_per_tok: int
    vocab_size: int
    eos_token_id: int | list[int] | None = None


class FamilyModel(LoadedModel):
    """A LoadedModel around mlx-lm's model of the family, its routed experts streamed."""

    def __init__(self, model, config: dict, path: Path, store, args: FamilyArgs):
        super().__init__(model, config, path, store)
        self.args = args

    @property
    def config(self) -> FamilyArgs:
        return self.args

    def forward(self, tokens: mx.array, cache=None) -> mx.array:
        """``self(tokens, cache)`` (LoadedModel's, which checks the ids first) without the id check.
        A decode token whose experts the device tier has held runs as a speculative token (speculation.py),
        rewinding mlx-lm's caches by family_cache.py; a model with caches it cannot rewind never bets."""
        from . import family_cache

        tokens = tokens[None] if tokens.ndim == 1 else tokens
        tier = self.device_cache
        if (tier is not None and cache is not None and tokens.shape[1] == 1 and tier.should_speculate()
                and family_cache.rewindable(cache)):
            return tier.speculation.step(self.model, tokens, cache, family_cache.snapshot, family_cache.restore)
        return self.model(tokens, cache)

    def make_cache(self) -> list:
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def set_experts_per_token(self, k: int) -> None:
        """Route each token to k experts by the family's own rule (its top-k attribute): softmax or sigmoid
        top-k, group-limited or not, renormalised and scaled as the family does."""
        if not 1 <= k <= self.args.num_experts:
            raise ValueError(f"experts_per_token must be in 1..{self.args.num_experts}, got {k}")
        for module, name in routing_attrs(self.model):
            setattr(module, name, k)
        if hasattr(self.model.args, "num_experts_per_tok"):
            self.model.args.num_experts_per_tok = k
        self.args.num_experts_per_tok = k

    def __repr__(self):
        a = self.args
        kind = "streamed" if self.store is not None else "resident"
        return (f"LoadedModel({a.model_type} via mlx-lm, {a.num_hidden_layers} layers, hidden {a.hidden_size}, "
                f"{a.num_experts} experts top-{a.num_experts_per_tok}, {kind} experts, from {self.path})")


def cast_floats(model, weights: dict, dtype) -> dict:
    """Floating weights to ``dtype``, except those the family keeps (its ``cast_predicate``, e.g. DeepSeek's
    float32 routing bias)."""
    keep = getattr(model, "cast_predicate", None) or (lambda k: True)
    return {k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and keep(k) else v) for k, v in weights.items()}


def quantize_like(model: nn.Module, quant: dict | None, names: set[str]) -> None:
    """Quantize the modules whose ``.scales`` the weights hold, with per-module settings (mlx-lm's rule)."""
    if not quant:
        return

    def predicate(path, module):
        if f"{path}.scales" not in names or not hasattr(module, "to_quantized"):
            return False
        own = quant.get(path)
        q = {**quant, **own} if isinstance(own, dict) else quant
        return {"group_size": q["group_size"], "bits": q["bits"], "mode": q.get("mode", "affine")}

    nn.quantize(model, class_predicate=predicate)


def load_family(path: Path, config: dict, *, dtype=None, slots: int | None = None, threads: int = 8,
                stream: bool = True, cache_experts="auto", read_chunk: int = 2 << 20,
                direct_io: bool | str = "auto", verify: str = "off", host_cache="auto") -> FamilyModel:
    """A converted folder of a family mlx-lm implements: mlx-lm's model, routed experts from the ExpertStore."""
    from .checkpoint import load_weights, model_dtype, read_tensors
    from .expert_cache import DeviceExpertCache
    from .host_cache import HostExpertCache
    from .experts import ResidentExperts
    from .family_experts import OwnFormExperts
    from .layer_files import direct_readable
    from .layout import ModelLayout
    from .store import ExpertStore
    from .streaming import StreamingExperts

    where = path / "config.json"
    arch = architecture(config, where)
    model = build(arch, config, where)
    layout = ModelLayout.read(path)
    found = switches(model)
    e = layout.expert
    for p, s in found.items():
        if expert_shape(s) != (layout.num_experts, e.hidden, e.intermediate):
            raise CheckpointError(f"{path / 'layout.json'} disagrees with config.json at {p}: experts, hidden, "
                                  f"intermediate {(layout.num_experts, e.hidden, e.intermediate)} vs {expert_shape(s)}")
    if sorted(layer_of(p) for p in found) != sorted(layout.moe_layers):
        raise CheckpointError(f"{path / 'layout.json'} lists MoE layers {layout.moe_layers}; config.json's model has "
                              f"{[layer_of(p) for p in found]}")
    resident = path / "resident.safetensors"
    if not resident.exists():
        raise CheckpointError(f"{resident}: missing; the conversion did not finish (rerun flash-moe convert)")
    weights, where_from = read_tensors([resident])
    store, cache, host = None, None, None
    k = max((getattr(m, n) for m, n in routing_attrs(model, found)), default=None)
    if k is None:
        raise CheckpointError(f"{where}: mlx-lm's {config.get('model_type')} keeps its top-k under none of "
                              f"{ROUTING_ATTRS}; its experts per token cannot be known or set")
    if stream:
        capacity = slots or min(layout.num_experts, max(32, 2 * k))
        # OwnFormExperts read through the store alone: a device cache would only hold memory for them
        own = all(expert_form(s) == "own" for s in found.values())
        cached = 0 if own else cache_capacity(cache_experts, layout)
        everything = cached >= len(layout.moe_layers) * layout.num_experts
        hosted = 0 if own or (everything and host_cache == "auto") else host_capacity(host_cache, layout)
        if hosted and not cached and host_buffers(layout) is not None:
            raise ValueError("on CUDA the host tier serves a device tier: pass cache_experts > 0 with host_cache")
        if direct_io == "auto":
            direct_io = bool(cached or hosted) and direct_readable(path, layout, read_chunk)
        store = ExpertStore(path, layout, capacity=capacity, threads=threads, read_chunk=read_chunk,
                            buffers=slot_buffers(layout), direct=bool(direct_io), verify=verify)
        host = HostExpertCache(store, hosted, buffers=host_buffers(layout)) if hosted else None
        cache = DeviceExpertCache(store, cached, next=host) if cached else None

    def provider(switch, layer):
        if stream and expert_form(switch) == "swiglu":
            return StreamingExperts(store, layer, cache if cache is not None else host)
        if stream:
            return OwnFormExperts(switch.activation, e, layout.num_experts, store, layer)
        prefix = f"model.layers.{layer}.mlp.experts."
        packed = {n[len(prefix):]: a for n, a in read_packed_experts(path, layout, layer, verify).items()}
        if expert_form(switch) == "own":
            return OwnFormExperts(switch.activation, e, layout.num_experts, arrays=packed)
        experts = ResidentExperts(layout.num_experts, e.hidden, e.intermediate, e.bits, e.group_size)
        experts.update(tree_unflatten(list(packed.items())))
        return experts

    def switch(s, layer):
        gather = FAMILY_EXPERTS == "gather" and stream and e.quantized and expert_form(s) == "swiglu"
        return StreamedSwitch(provider(s, layer), s.activation if gather else None)

    model.update_modules(tree_unflatten([(p, switch(s, layer_of(p))) for p, s in found.items()]))
    quantize_like(model, config.get("quantization"), set(weights))
    if not stream:  # the experts are in the tree already; resident.safetensors holds the rest
        inside = tuple(p + "." for p in found)
        weights.update({n: a for n, a in tree_flatten(model.parameters()) if n.startswith(inside) and n not in weights})
    weights = cast_floats(model, weights, dtype or model_dtype(weights))
    load_weights(model, weights, {}, where_from, path)
    mx.eval(model.parameters())
    fargs = FamilyArgs(config["model_type"], e.hidden, len(model.layers), layout.num_experts, k,
                       getattr(model.args, "vocab_size", config.get("vocab_size")), config.get("eos_token_id"))
    loaded = FamilyModel(model, config, path, store, fargs)
    loaded.device_cache, loaded.host_cache = cache, host
    return loaded

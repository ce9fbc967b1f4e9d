"""``load(path)``: the glue that builds a ready model from a folder or a hub id.

Only this module knows both the model and where its experts come from: a Hugging Face checkpoint
gives resident experts; a converted folder (``layout.json``) gives experts streamed by an ExpertStore.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from . import distributed
from .checkpoint import (CheckpointError, build_model, load_checkpoint, load_weights, model_dtype, read_config,
                         read_tensors)
from .layout import ModelLayout
from .model import Model, ModelArgs


def _dtype(dtype):
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    found = getattr(mx, str(dtype).replace("torch.", ""), None)
    if not isinstance(found, mx.Dtype) or not mx.issubdtype(found, mx.floating):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return found


class LoadedModel:
    """A model ready to run: ``model(tokens, cache)`` -> logits, plus tokenizer, stats and generation."""

    def __init__(self, model: Model, config: dict, path: Path, store=None):
        self.model = model
        self.raw_config = config
        self.path = path
        self.store = store
        self.cache = None  # the ExpertCache, when one was asked for
        self.parallel = None  # expert-parallel runs: this rank's distributed.Parallel (group, expert owners)
        self._tokenizer = None

    @property
    def config(self) -> ModelArgs:
        return self.model.args

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        if tokens.ndim == 1:
            tokens = tokens[None]
        if self.cache is not None and cache is not None and tokens.shape[1] == 1 and self.cache.should_speculate():
            return self._speculative_step(tokens, cache)
        return self.model(tokens, cache)

    def _speculative_step(self, tokens: mx.array, cache: list) -> mx.array:
        """One token with no host sync per layer, betting that every expert it needs is in the device cache
        (see expert_cache.py). A lost bet restores the caches and runs the token again, reading the misses."""
        saved = [c.snapshot() for c in cache]
        self.cache.begin()
        try:
            logits = self.model(tokens, cache)
        finally:
            lookups = self.cache.end()
        mx.eval(logits, lookups)
        if self.cache.commit(lookups):
            return logits
        for c, s in zip(cache, saved):
            c.restore(s)
        return self.model(tokens, cache)

    def make_cache(self) -> list:
        return self.model.make_cache()

    @property
    def experts_per_token(self) -> int:
        return self.config.num_experts_per_tok

    def set_experts_per_token(self, k: int) -> None:
        """Route each token to k experts (renormalised over the k), whatever the model was trained with."""
        if not 1 <= k <= self.config.num_experts:
            raise ValueError(f"experts_per_token must be in 1..{self.config.num_experts}, got {k}")
        self.config.num_experts_per_tok = k
        for layer in self.model.layers:
            if hasattr(layer.mlp, "top_k"):
                layer.mlp.top_k = k

    @property
    def tokenizer(self):
        """The model's Hugging Face tokenizer (transformers' AutoTokenizer), loaded on first use."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{self.path}: no usable tokenizer files ({e})") from None
        return self._tokenizer

    @property
    def stats(self):
        """Expert I/O counters of the ExpertStore (None for resident experts): see ``IOStats``."""
        return self.store.stats if self.store is not None else None

    def stream_generate(self, prompt, **kwargs):
        """Yield ``GenerationResponse``s; arguments as ``generate``."""
        from .generate import stream_generate

        return stream_generate(self, prompt, **kwargs)

    def generate(self, prompt, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, repetition_penalty: float | None = None, stop=None,
                 seed: int = 0, tools=None, enable_thinking=None, chat=None, **kwargs):
        """Complete ``prompt`` and return the text.

        Args:
            prompt: a string (encoded as is; ``chat=True`` wraps it as a user message), token ids, or a list of
                chat messages (``{"role", "content"}``, tool results as ``{"role": "tool", ...}``), which go
                through the model's chat template.
            max_tokens: most new tokens. temperature, top_p, top_k, min_p: sampling (temperature 0 = greedy).
            repetition_penalty: > 1 discourages repeats. stop: string(s) that end generation (not included).
            seed: sampling seed (same seed, same text). tools: OpenAI-style tool schemas, offered to the model
                and used to type the parsed calls' arguments. enable_thinking: passed to the chat template.
        Returns:
            the text (a ``str``) with ``.content``, ``.reasoning``, ``.tool_calls`` and ``.finish_reason``.
        """
        from .generate import generate

        return generate(self, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        min_p=min_p, repetition_penalty=repetition_penalty, stop=stop, seed=seed, tools=tools,
                        enable_thinking=enable_thinking, chat=chat, **kwargs)

    def close(self) -> None:
        if self.parallel is not None:
            self.parallel.close()
        if self.store is not None:
            self.store.close()

    def __repr__(self):
        a = self.config
        kind = "streamed" if self.store is not None else "resident"
        return (f"LoadedModel({a.model_type}, {a.num_hidden_layers} layers, hidden {a.hidden_size}, "
                f"{a.num_experts} experts top-{a.num_experts_per_tok}, {kind} experts, from {self.path})")


HUB_PATTERNS = ["*.json", "*.jinja", "*.txt", "tokenizer*", "*.safetensors", "experts/*.bin"]


def resolve(path_or_repo: str | Path, revision: str | None = None, patterns=HUB_PATTERNS) -> Path:
    """A local folder, or a hub id (``owner/name``) fetched with huggingface_hub, ``patterns`` files only."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name}: no such model folder (and not a hub id of the form owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as e:  # network, auth or missing repo: one clear line
        raise CheckpointError(f"{name}: cannot fetch from the Hugging Face hub ({type(e).__name__}: {e})") from None


def check_layout(layout: ModelLayout, args: ModelArgs, folder: Path) -> None:
    """layout.json must describe the experts config.json says the model has."""
    e = layout.expert
    want = {
        "hidden": (e.hidden, args.hidden_size),
        "intermediate": (e.intermediate, args.moe_intermediate_size),
        "num_experts": (layout.num_experts, args.num_experts),
        "moe layers": (layout.moe_layers, [i for i in range(args.num_hidden_layers) if args.is_moe(i)]),
    }
    bad = [f"{k} {a} vs {b}" for k, (a, b) in want.items() if a != b]
    if bad:
        raise CheckpointError(f"{folder / 'layout.json'} disagrees with config.json: " + "; ".join(bad))


def read_packed_experts(path: Path, layout: ModelLayout, layer: int) -> dict:
    """All experts of one layer file as stacked arrays (for ``stream=False``: small models, tests)."""
    e = layout.expert
    raw = np.fromfile(path / layout.layer_file(layer), np.uint8).reshape(layout.num_experts, e.stride)
    out = {}
    for t in e.tensors:
        storage = {"bfloat16": np.uint16}.get(t.dtype, t.dtype)
        a = np.ascontiguousarray(raw[:, t.offset : t.offset + t.nbytes]).view(storage).reshape(-1, *t.shape)
        a = mx.array(a)
        out[f"model.layers.{layer}.mlp.experts.{t.name}"] = a.view(mx.bfloat16) if t.dtype == "bfloat16" else a
    return out


def slot_buffers(layout: ModelLayout):
    """The slot-buffer kind for this backend: page-locked host memory on CUDA (MLX's host arrays live in
    managed memory there, ~2 GB/s to the GPU), plain MLX arrays on Apple and the CPU."""
    from . import kernels

    if kernels.BACKEND == "cuda" and layout.expert.quantized:
        from .cuda_host import PinnedSlotBuffers

        return PinnedSlotBuffers
    return None


def cache_capacity(spec, layout: ModelLayout) -> int:
    """Experts an ExpertCache should hold: ``spec`` is a count, a fraction in (0, 1) of all the model's
    experts, "all", or "auto": on a discrete GPU (MLX's CUDA backend) as many as fit in its free memory
    less a reserve for activations and KV cache, elsewhere none (on unified memory the page cache wins)."""
    total = len(layout.moe_layers) * layout.num_experts
    if spec in (None, 0, "0", False):
        return 0
    if spec == "all":
        return total
    if spec == "auto":
        from . import kernels

        if kernels.BACKEND != "cuda" or not layout.expert.quantized:
            return 0
        from .cuda_host import CudaRuntime

        free, gpu = CudaRuntime().memory()
        spare = free - max(4 << 30, gpu // 10)
        return max(0, min(total, spare // layout.expert.expert_bytes))
    bad = f"cache_experts must be a count, a fraction in (0, 1), 'all' or 'auto', got {spec!r}"
    try:
        value = float(spec)
    except (TypeError, ValueError):
        raise ValueError(bad) from None
    if value < 0 or (value != int(value) and value >= 1):
        raise ValueError(bad)
    n = round(value * total) if value < 1 else int(value)
    return max(1, min(n, total))


def load_converted(path: Path, dtype=None, slots: int | None = None, threads: int = 8, stream: bool = True,
                   cache_experts: int | float | str = "auto", read_chunk: int = 2 << 20,
                   direct_io: bool | str = "auto", group="auto") -> LoadedModel:
    """A converted folder: resident weights in memory, routed experts read per token by an ExpertStore
    (or, with ``stream=False``, all read into memory once)."""
    from .expert_cache import ExpertCache
    from .experts import ResidentExperts
    from .store import ExpertStore, direct_readable
    from .streaming import StreamingExperts

    config = read_config(path)
    args = ModelArgs.from_config(config)
    layout = ModelLayout.read(path)
    check_layout(layout, args, path)
    resident = path / "resident.safetensors"
    if not resident.exists():
        raise CheckpointError(f"{resident}: missing; the conversion did not finish (rerun flash-moe convert)")
    weights, where = read_tensors([resident])
    e, store, cache = layout.expert, None, None
    parallel = distributed.plan(group, path, layout)
    if parallel is not None and not stream:
        raise ValueError("an expert-parallel run streams its experts: load with stream=True, or group=None")
    if stream:
        capacity = slots or min(args.num_experts, max(32, 2 * args.num_experts_per_tok))
        cached = cache_capacity(cache_experts, layout)
        if parallel is not None:  # a rank caches only what it owns
            cached = min(cached, sum(int(parallel.owned(layer).sum()) for layer in layout.moe_layers))
        if direct_io == "auto":  # around the page cache only when a device cache is the cache tier
            direct_io = bool(cached) and direct_readable(path, layout, read_chunk)
        store = ExpertStore(path, layout, capacity=capacity, threads=threads, read_chunk=read_chunk,
                             buffers=slot_buffers(layout), direct=bool(direct_io))
        if cached:
            cache = ExpertCache(store, cached, owned=parallel and {l: parallel.owned(l) for l in layout.moe_layers})
        factory = lambda layer: StreamingExperts(store, layer, cache)
        if parallel is not None:
            factory = lambda layer: distributed.ExpertParallel(
                StreamingExperts(store, layer, cache, owned=parallel.owned(layer)), parallel)
    else:
        for layer in layout.moe_layers:
            weights.update(read_packed_experts(path, layout, layer))
        factory = lambda layer: ResidentExperts(args.num_experts, e.hidden, e.intermediate, e.bits, e.group_size)
    model = build_model(args, config.get("quantization"), set(weights), factory)
    load_weights(model, weights, {k: k for k in weights}, where, path, dtype or model_dtype(weights))
    mx.eval(model.parameters())
    loaded = LoadedModel(model, config, path, store)
    loaded.cache, loaded.parallel = cache, parallel
    return loaded


def load(path_or_repo: str | Path, *, dtype=None, experts_per_token: int | None = None,
         slots: int | None = None, threads: int = 8, stream: bool = True,
         cache_experts: int | float | str = "auto", read_chunk: int = 2 << 20,
         direct_io: bool | str = "auto", preload: bool = False, group="auto") -> LoadedModel:
    """Load a model folder: a Hugging Face checkpoint, or a folder made by ``flash_moe.convert``.

    Args:
        path_or_repo: local folder.
        dtype: compute dtype for floating weights (``"float32"``, ``"bfloat16"``, ...); None keeps the stored one.
        experts_per_token: route to this many experts instead of the config's ``num_experts_per_tok``.
        slots: experts one read can hold (streamed models); more distinct experts in a prompt chunk are
            read in groups. Default: max(32, 2 K), at most the expert count.
        threads: reader threads of the ExpertStore.
        stream: for a converted folder, False reads every expert into memory once instead of per token.
        cache_experts: keep this many experts (of any layer) in device memory in front of the store (an
            ``ExpertCache``; for discrete GPUs): a count, a fraction in (0, 1) of all experts, "all", or
            "auto" (the default: what fits in free GPU memory on CUDA, none on Apple and the CPU, where the
            page cache is the faster tier); 0 turns it off.
        read_chunk: bytes per read; an expert's reads run in parallel over the reader threads.
        direct_io: read experts around the page cache (O_DIRECT): True, False, or "auto" (the default:
            when a device cache is in front, the layout is 4 KiB-aligned and the filesystem allows it).
        preload: fill the device cache before returning (every expert when they fit; with a progress bar).
            Without a device cache there is nothing to fill and this does nothing.
        group: split each layer's experts over the ranks of an ``mx.distributed`` group (expert-parallel,
            docs/distributed.md): "auto" (the default) uses ``mx.distributed.init()``'s group when the
            process was started by ``mlx.launch`` with more than one rank; None runs this process alone.
            Needs a converted folder with streamed experts.
    """
    path = resolve(path_or_repo)
    if (path / "progress.json").exists() and not (path / "layout.json").exists():
        raise CheckpointError(f"{path}: the conversion into this folder did not finish; rerun flash-moe convert to resume it")
    if (path / "layout.json").exists():
        loaded = load_converted(path, dtype=_dtype(dtype), slots=slots, threads=threads, stream=stream,
                                cache_experts=cache_experts, read_chunk=read_chunk, direct_io=direct_io, group=group)
    else:
        if distributed.resolve_group(group) is not None:
            raise ValueError(f"{path}: an expert-parallel run needs a converted folder (flash-moe convert); "
                             "pass group=None to run each process alone")
        model, config = load_checkpoint(path, dtype=_dtype(dtype))
        loaded = LoadedModel(model, config, path)
    if experts_per_token is not None:
        loaded.set_experts_per_token(experts_per_token)
    if preload and loaded.cache is not None:
        loaded.cache.preload(progress=True)
    return loaded

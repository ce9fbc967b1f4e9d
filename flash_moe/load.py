"""``load(path)``: the glue that builds a ready model from a folder or a hub id.

Only this module knows both the model and where its experts come from: a Hugging Face checkpoint
gives resident experts; a converted folder (``layout.json``) gives experts streamed by an ExpertStore.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import distributed
from .checkpoint import (CheckpointError, build_model, load_checkpoint, load_weights, model_args, model_dtype,
                         read_config, read_tensors)
from .files import open_regular, parse_bytes
from .layout import ModelLayout, expert_checksum, mlx_dtype, numpy_dtype
from .model import Model, ModelArgs, check_token_ids


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
        self.device_cache = None  # the DeviceExpertCache (GPU tier), when one was asked for
        self.host_cache = None  # the HostExpertCache (RAM tier), when one was asked for
        self.prefetcher = None  # the prefetch.Prefetcher, when prefetching
        self.parallel = None  # expert-parallel runs: this rank's distributed.Parallel (group, expert owners)
        self._tokenizer = None

    @property
    def cache(self):
        """``device_cache``'s former name (the word "cache" alone now means the prompt cache: KV/GDN state)."""
        return self.device_cache

    @cache.setter
    def cache(self, tier) -> None:
        self.device_cache = tier

    def tier_totals(self) -> dict:
        """Hits and misses per memory tier (device, host) and the store's reads."""
        out = {}
        if self.device_cache is not None:
            out["device"] = self.device_cache.totals()
        if self.host_cache is not None:
            out["host"] = self.host_cache.totals()
        if self.store is not None:
            out["store"] = self.store.stats.totals()
        return out

    @property
    def config(self) -> ModelArgs:
        return self.model.args

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        """Logits for ``tokens`` ([T] or [B, T] ids); ids outside [0, vocab_size) are a ValueError (one min/max
        reduction and sync per call: generation checks its prompt once and then calls ``forward``)."""
        check_token_ids(tokens, self.config.vocab_size)
        return self.forward(tokens, cache)

    def forward(self, tokens: mx.array, cache=None) -> mx.array:
        """``self(tokens, cache)`` without the id check, for callers whose ids are known to be in range."""
        if tokens.ndim == 1:
            tokens = tokens[None]
        tier = self.device_cache
        if tier is not None and cache is not None and tokens.shape[1] == 1 and tier.should_speculate():
            return tier.speculation.step(self.model, tokens, cache)  # see speculation.py
        return self.model(tokens, cache)

    def make_cache(self) -> list:
        return self.model.make_cache()

    def make_prompt_cache(self, max_checkpoints: int | None = None):
        """A ``PromptCache`` to pass to ``generate(..., prompt_cache=)`` across calls (see prompt_cache.py)."""
        from .prompt_cache import DEFAULT_CHECKPOINTS, make_prompt_cache

        return make_prompt_cache(self, DEFAULT_CHECKPOINTS if max_checkpoints is None else max_checkpoints)

    @property
    def experts_per_token(self) -> int:
        return self.config.num_experts_per_tok

    def set_experts_per_token(self, k: int) -> None:
        """Route each token to k experts (renormalised over the k), whatever the model was trained with."""
        check_experts_per_token(k)
        if not 1 <= k <= self.config.num_experts:
            raise ValueError(f"experts_per_token must be in 1..{self.config.num_experts}, got {k}")
        self.config.num_experts_per_tok = k
        for layer in self.model.layers:
            if hasattr(layer.mlp, "top_k"):
                layer.mlp.top_k = k

    @property
    def tokenizer(self):
        """The model's tokenizer (``flash_moe.tokenizer.Tokenizer``: tokenizer.json and the chat template, with
        transformers' interface), loaded on first use."""
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_folder(self.path)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    @property
    def stats(self):
        """Expert I/O counters of the ExpertStore (None for resident experts): see ``IOStats``."""
        return self.store.stats if self.store is not None else None

    def stream_generate(self, *args, **kwargs):
        """Yield ``GenerationResponse``s; arguments as ``flash_moe.generate`` after the model."""
        from .generation import stream_generate

        return stream_generate(self, *args, **kwargs)

    def generate(self, *args, **kwargs):
        """The completion as a string; arguments as ``flash_moe.generate`` after the model."""
        from .generation import generate

        return generate(self, *args, **kwargs)

    def __iter__(self):
        # ``model, tokenizer = load(path)`` as mlx-lm's load is used; the tokenizer is read then
        return iter((self, self.tokenizer))

    def close(self) -> None:
        if self.parallel is not None:
            self.parallel.close()
        if self.host_cache is not None:
            self.host_cache.close()
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


def check_experts_per_token(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"experts_per_token must be an integer, got {k!r}")


def check_layout(layout: ModelLayout, args: ModelArgs, config: dict, weights: dict, folder: Path) -> None:
    """layout.json must describe the experts config.json says the model has, in the format convert recorded
    in config.json (``flash_moe``: bits, group size, dtype), and resident.safetensors' floating tensors must be
    in the experts' dtype (convert writes both in one dtype). Costs nothing: headers and JSON only."""
    e = layout.expert
    want = {
        "hidden": (e.hidden, args.hidden_size),
        "intermediate": (e.intermediate, args.moe_intermediate_size),
        "num_experts": (layout.num_experts, args.num_experts),
        "moe layers": (layout.moe_layers, [i for i in range(args.num_hidden_layers) if args.is_moe(i)]),
    }
    saved = config.get("flash_moe")
    if isinstance(saved, dict):
        for key, have in (("expert_bits", e.bits), ("expert_group_size", e.group_size), ("dtype", e.dtype)):
            if key in saved:
                want[f"flash_moe.{key}"] = (have, saved[key])
    bad = [f"{k} {a!r} vs {b!r}" for k, (a, b) in want.items() if a != b]
    if bad:
        raise CheckpointError(f"{folder / 'layout.json'} disagrees with config.json: " + "; ".join(bad)
                              + " (layout.json's value first)")
    dtype = getattr(mx, e.dtype)
    for name, w in weights.items():
        if mx.issubdtype(w.dtype, mx.floating) and w.dtype != dtype and not name.endswith("A_log"):
            raise CheckpointError(
                f"{folder / 'layout.json'}: experts are {e.dtype}, but resident.safetensors stores {name!r} as "
                f"{str(w.dtype).removeprefix('mlx.core.')}; the two come from different conversions or one was "
                "edited: reconvert the model"
            )


def read_packed_experts(path: Path, layout: ModelLayout, layer: int, verify: str = "off") -> dict:
    """All experts of one layer file as stacked arrays (for ``stream=False``: small models, tests), their
    checksums checked as the store's ``verify`` would check them on first read."""
    e, file = layout.expert, path / layout.layer_file(layer)
    fd = open_regular(file)
    try:
        size, expected = os.fstat(fd).st_size, layout.layer_bytes()
        if size != expected:
            raise CheckpointError(f"{file}: layer {layer} file has {size:,} bytes, expected {expected:,} "
                                  f"({layout.num_experts} experts x stride {e.stride:,})")
        raw = np.empty((layout.num_experts, e.stride), np.uint8)
        flat, done = raw.reshape(-1), 0
        while done < expected:  # one read returns at most ~2 GiB on Linux: a 397B layer is 3.6 GB
            got = os.preadv(fd, [flat[done: done + (1 << 30)]], done)
            if got <= 0:
                raise CheckpointError(f"{file}: short read at byte {done:,} of {expected:,} (file changed while "
                                      "it was read?)")
            done += got
    finally:
        os.close(fd)
    from .layer_files import experts_to_check

    check = experts_to_check(layout, verify)
    for expert in np.flatnonzero(check[layer]).tolist() if check is not None else []:
        if expert_checksum(raw[expert, : e.expert_bytes]) != layout.checksums[layer][expert]:
            raise CheckpointError(f"{file}: layer {layer} expert {expert}: checksum does not match layout.json "
                                  f"(damaged, or from another conversion); run `flash-moe verify {path}`")
    out = {}
    for t in e.tensors:
        a = np.ascontiguousarray(raw[:, t.offset : t.offset + t.nbytes]).view(numpy_dtype(t.dtype))
        a = mx.array(a.reshape(-1, *t.shape))
        out[f"model.layers.{layer}.mlp.experts.{t.name}"] = a.view(mlx_dtype(t.dtype)) if t.dtype == "bfloat16" else a
    return out


def slot_buffers(layout: ModelLayout):
    """The slot-buffer kind for this backend: page-locked host memory on CUDA (MLX's host arrays live in
    managed memory there, ~2 GB/s to the GPU), plain MLX arrays on Apple and the CPU."""
    from . import kernels

    if kernels.BACKEND == "cuda" and layout.expert.quantized:
        from .cuda_host import PinnedSlotBuffers

        return PinnedSlotBuffers
    return None


def _auto_experts(layout: ModelLayout, total: int, free_and_reserve) -> int:
    """A tier's "auto" size: on a discrete GPU (MLX's CUDA backend) as many experts as fit in the free memory
    ``free_and_reserve()`` reports less its reserve; elsewhere none (unified memory: the page cache wins)."""
    from . import kernels

    if kernels.BACKEND != "cuda" or not layout.expert.quantized:
        return 0
    free, reserve = free_and_reserve()
    return max(0, min(total, (free - reserve) // layout.expert.expert_bytes))


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
        def gpu_memory():
            from .cuda_host import CudaRuntime

            free, gpu = CudaRuntime().memory()
            return free, max(4 << 30, gpu // 10)

        return _auto_experts(layout, total, gpu_memory)
    bad = f"cache_experts must be a count, a fraction in (0, 1), 'all' or 'auto', got {spec!r}"
    try:
        value = float(spec)
    except (TypeError, ValueError):
        raise ValueError(bad) from None
    if value < 0 or (value != int(value) and value >= 1):
        raise ValueError(bad)
    n = round(value * total) if value < 1 else int(value)
    return max(1, min(n, total))


def host_capacity(spec, layout: ModelLayout) -> int:
    """Experts a HostExpertCache should hold: ``spec`` is a fraction in (0, 1) of all the model's experts,
    "all", bytes (an integer >= 1, or a size such as "24G" / "24GiB": files.parse_bytes, binary units), or
    "auto": on a discrete GPU (MLX's CUDA backend) the free RAM less a reserve (8 GiB or 1/8 of RAM), elsewhere
    none (on Apple and the CPU the page cache is the RAM tier). The tiers are inclusive (the host tier keeps what it hands the device tier, as
    the page cache would): "all" holds every expert. load() skips an "auto" host tier when the device tier
    holds every expert already."""
    total = len(layout.moe_layers) * layout.num_experts
    if spec in (None, 0, "0", False, "off"):
        return 0
    if spec == "all":
        return total
    if spec == "auto":
        def host_memory():
            info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
            free, ram = (int(info[k].split()[0]) << 10 for k in ("MemAvailable", "MemTotal"))
            return free, max(8 << 30, ram // 8)

        return _auto_experts(layout, total, host_memory)
    bad = f"host_cache must be a fraction in (0, 1), bytes (e.g. 24G), 'all' or 'auto', got {spec!r}"
    try:
        fraction = float(spec)
    except (TypeError, ValueError):
        fraction = None  # a size with a unit
    try:
        if fraction is not None and 0 < fraction < 1:
            n = round(fraction * total)
        else:
            size = parse_bytes(spec)
            if size <= 0 or (fraction is not None and fraction != int(fraction)):
                raise ValueError(bad)
            n = size // layout.expert.expert_bytes
    except ValueError:
        raise ValueError(bad) from None
    return max(1, min(n, total)) if total else 0


def host_buffers(layout: ModelLayout):
    """The host tier's storage: page-locked, GPU-mapped memory on CUDA; MLX host arrays elsewhere."""
    from . import kernels

    if kernels.BACKEND == "cuda" and layout.expert.quantized:
        from functools import partial

        from .cuda_host import PinnedSlotBuffers

        return partial(PinnedSlotBuffers, upload="mapped")
    return None


def prefetch_default() -> bool:
    """Prefetching by default: on CUDA only (see docs/architecture.md, "Memory tiers")."""
    from . import kernels

    return kernels.BACKEND == "cuda"


def attach_prefetcher(model: Model, host, device=None):
    """A Prefetcher on every streamed MoE layer that has a MoE layer after it; returns it."""
    from .prefetch import Prefetcher
    from .streaming import StreamingExperts

    moe = [i for i, layer in enumerate(model.layers) if isinstance(getattr(getattr(layer, "mlp", None), "experts", None),
                                                                   StreamingExperts)]
    blocks = {a: (b, model.layers[b].mlp) for a, b in zip(moe, moe[1:])}
    prefetcher = Prefetcher(blocks, host, device)
    for i in moe:
        model.layers[i].mlp.experts.prefetch = prefetcher
    return prefetcher


def load_converted(path: Path, dtype=None, slots: int | None = None, threads: int = 8, stream: bool = True,
                   cache_experts: int | float | str = "auto", read_chunk: int = 2 << 20,
                   direct_io: bool | str = "auto", verify: str = "off", group="auto", host_cache="auto",
                   prefetch: bool | str = "auto", host_policy: str = "frequency") -> LoadedModel:
    """A converted folder: resident weights in memory, routed experts read per token by an ExpertStore
    (or, with ``stream=False``, all read into memory once)."""
    from .expert_cache import DeviceExpertCache
    from .experts import ResidentExperts
    from .host_cache import HostExpertCache
    from .families import is_family, load_family
    from .layer_files import direct_readable
    from .store import ExpertStore
    from .streaming import StreamingExperts

    config = read_config(path)
    if is_family(config):  # a model mlx-lm implements, its experts streamed through its SwitchGLU seam
        if distributed.resolve_group(group) is not None:
            raise ValueError(f"{path}: expert-parallel runs support Qwen3.5-MoE and Qwen3-Next only "
                             f"(model_type {config.get('model_type')!r}); pass group=None to run each process alone")
        return load_family(path, config, dtype=dtype, slots=slots, threads=threads, stream=stream,
                           cache_experts=cache_experts, read_chunk=read_chunk, direct_io=direct_io,
                           verify=verify, host_cache=host_cache)
    args = model_args(config, path)
    layout = ModelLayout.read(path)
    resident = path / "resident.safetensors"
    if not resident.exists():
        raise CheckpointError(f"{resident}: missing; the conversion did not finish (rerun flash-moe convert)")
    weights, where = read_tensors([resident])
    check_layout(layout, args, config, weights, path)
    e, store, cache, host = layout.expert, None, None, None
    parallel = distributed.plan(group, path, layout)
    if parallel is not None and not stream:
        raise ValueError("an expert-parallel run streams its experts: load with stream=True, or group=None")
    if stream:
        capacity = slots or min(args.num_experts, max(32, 2 * args.num_experts_per_tok))
        cached = cache_capacity(cache_experts, layout)
        if parallel is not None:  # a rank caches only what it owns
            cached = min(cached, sum(int(parallel.owned(layer).sum()) for layer in layout.moe_layers))
        everything = cached >= len(layout.moe_layers) * layout.num_experts  # the device tier holds every expert
        # an "auto" host tier only where it serves a device tier that misses (on CUDA it feeds that tier's copies)
        skip_auto = host_cache == "auto" and (everything or not cached)
        hosted = 0 if parallel is not None or skip_auto else host_capacity(host_cache, layout)
        if direct_io == "auto":  # around the page cache only when a tier of our own is the cache tier
            direct_io = bool(cached or hosted) and direct_readable(path, layout, read_chunk)
        store = ExpertStore(path, layout, capacity=capacity, threads=threads, read_chunk=read_chunk,
                             buffers=slot_buffers(layout), direct=bool(direct_io), verify=verify)
        if hosted:
            if not cached and host_buffers(layout) is not None:
                raise ValueError("on CUDA the host tier serves a device tier: pass cache_experts > 0 with host_cache")
            host = HostExpertCache(store, hosted, policy=host_policy, buffers=host_buffers(layout))
        if cached:
            cache = DeviceExpertCache(store, cached, owned=parallel and {l: parallel.owned(l) for l in layout.moe_layers},
                                      next=host)
        first = cache if cache is not None else host
        factory = lambda layer: StreamingExperts(store, layer, first)
        if parallel is not None:
            factory = lambda layer: distributed.ExpertParallel(
                StreamingExperts(store, layer, first, owned=parallel.owned(layer)), parallel)
    else:
        for layer in layout.moe_layers:
            weights.update(read_packed_experts(path, layout, layer, verify))
        factory = lambda layer: ResidentExperts(args.num_experts, e.hidden, e.intermediate, e.bits, e.group_size)
    model = build_model(args, config.get("quantization"), set(weights), factory)
    load_weights(model, weights, {k: k for k in weights}, where, path, dtype or model_dtype(weights))
    mx.eval(model.parameters())
    loaded = LoadedModel(model, config, path, store)
    loaded.device_cache, loaded.host_cache, loaded.parallel = cache, host, parallel
    if host is not None and (prefetch_default() if prefetch == "auto" else prefetch):
        loaded.prefetcher = attach_prefetcher(model, host, cache)
    return loaded


def load(path_or_repo: str | Path, *, dtype=None, experts_per_token: int | None = None,
         slots: int | None = None, threads: int = 8, stream: bool = True,
         cache_experts: int | float | str = "auto", read_chunk: int = 2 << 20,
         direct_io: bool | str = "auto", preload: bool = False, verify: str = "off", group="auto",
         host_cache: int | float | str = "auto", prefetch: bool | str = "auto") -> LoadedModel:
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
        host_cache: keep experts in host RAM between the device cache and the store (a ``HostExpertCache``;
            page-locked on CUDA, where a device miss it holds costs a PCIe copy instead of a disk read): a
            fraction in (0, 1) of all experts, bytes ("24GB", or an integer), "all", or "auto" (the default:
            free RAM less a reserve on CUDA, none on Apple and the CPU, where the page cache is that tier).
        prefetch: while a layer computes, read the next layer's likely experts (its router on this layer's
            hidden state) into the host tier: True, False or "auto" (on with a host tier on CUDA only).
        preload: fill the device and host tiers before returning, most used experts first (every expert when
            they fit; with a progress bar). Without a tier there is nothing to fill and this does nothing.
        verify: check experts against layout.json's checksums the first time each is read: "off" (default),
            "sample" (1 in 16 of each layer's experts) or "full" (every expert). Hashing is slower than
            reading (docs/format.md, "What is checked", has the numbers), hence "off". A mismatch is a
            CheckpointError naming the layer and expert; ``flash-moe verify`` checks a whole folder at once.
        group: split each layer's experts over the ranks of an ``mx.distributed`` group (expert-parallel,
            docs/distributed.md): "auto" (the default) uses ``mx.distributed.init()``'s group when the
            process was started by ``mlx.launch`` with more than one rank; None runs this process alone.
            Needs a converted folder with streamed experts.
    """
    from .layer_files import VERIFY_MODES

    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    if experts_per_token is not None:
        check_experts_per_token(experts_per_token)
    path = resolve(path_or_repo)
    if (path / "progress.json").exists() and not (path / "layout.json").exists():
        raise CheckpointError(f"{path}: the conversion into this folder did not finish; rerun flash-moe convert to resume it")
    if (path / "layout.json").exists():
        loaded = load_converted(path, dtype=_dtype(dtype), slots=slots, threads=threads, stream=stream,
                                cache_experts=cache_experts, read_chunk=read_chunk, direct_io=direct_io,
                                verify=verify, group=group, host_cache=host_cache, prefetch=prefetch)
    else:
        if distributed.resolve_group(group) is not None:
            raise ValueError(f"{path}: an expert-parallel run needs a converted folder (flash-moe convert); "
                             "pass group=None to run each process alone")
        from .families import is_family

        if is_family(config := read_config(path)):
            raise CheckpointError(f"{path}: model_type {config.get('model_type')!r} runs through mlx-lm with streamed "
                                  f"experts; convert it first: flash-moe convert {path} DST")
        model, config = load_checkpoint(path, dtype=_dtype(dtype))
        loaded = LoadedModel(model, config, path)
    if experts_per_token is not None:
        loaded.set_experts_per_token(experts_per_token)
    device, host = loaded.device_cache, loaded.host_cache
    if preload and (device is not None or host is not None):
        from .host_cache import preload_tiers

        preload_tiers(loaded.store, device, host, device and device.owned, progress=True)
    return loaded

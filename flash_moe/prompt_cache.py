"""Prompt caches: the decoding state of a conversation kept between generations, so that a prompt which
starts with tokens the cache already holds processes only the rest.

Full-attention layers can be cut back to any length (their KV offset). GatedDeltaNet layers cannot: their
state is a running sum over every token seen. So the cache snapshots the GDN states ("checkpoints") at a
few points of each prompt, and a prompt that diverges inside the cached tokens (a chat template that
re-renders the last assistant turn without its thinking, a regenerated reply) restarts from the longest
checkpoint at or before the divergence. A checkpoint is cheap for attention (an offset) and costs the GDN
state for the rest (conv + recurrent state of every GDN layer; 192 MB for Qwen3.5-397B's 45 layers):
their number is bounded (``max_checkpoints``, the newest are kept) and ``checkpoint_nbytes`` counts them.

Usage::

    cache = make_prompt_cache(model)
    for turn in ...:
        text = generate(model, messages, prompt_cache=cache)   # response.cached_tokens: reused tokens
    save_prompt_cache("doc.safetensors", cache, model); cache = load_prompt_cache("doc.safetensors", model)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .cache import ArraysCache, KVCache
from .files import CheckpointError, atomic_write, open_regular, read_bytes

FORMAT = "flash_moe.prompt_cache/1"
DEFAULT_CHECKPOINTS = 4


@dataclass(eq=False)  # compared by identity: its arrays have no truth value
class Checkpoint:
    """The state after the first ``length`` cached tokens: per layer None (attention: the offset is
    ``length``) or the GDN layer's [conv state, recurrent state] arrays."""

    length: int
    states: list

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for s in self.states if s for a in s if a is not None)


class PromptCache:
    """Per-layer caches plus the token ids whose effect they hold, and GDN checkpoints to fall back to.

    ``tokens``: the ids the state has absorbed, in order (after a generation: the prompt and every generated
    token but the last, which was sampled and never fed back). Generation keeps it in step; calling the model
    on ``layers`` directly does not (the cache notices the mismatch and falls back to a checkpoint).
    """

    def __init__(self, layers: list, max_checkpoints: int = DEFAULT_CHECKPOINTS):
        if max_checkpoints < 0:
            raise ValueError(f"max_checkpoints must be >= 0, got {max_checkpoints}")
        self.layers = layers
        self.tokens: list[int] = []
        self.checkpoints: list[Checkpoint] = []  # increasing length
        self.max_checkpoints = max_checkpoints
        # Without GDN layers any prefix is reachable by moving the KV offsets back: no snapshots needed.
        self.trimmable = not any(isinstance(c, ArraysCache) for c in layers)

    def __repr__(self):
        return (f"PromptCache({len(self.tokens)} tokens, {len(self.checkpoints)} checkpoints at "
                f"{[c.length for c in self.checkpoints]}, {self.nbytes / 2**20:.1f} MiB)")

    # ---- what a prompt can reuse ---------------------------------------------------------------------

    def reusable(self, ids) -> int:
        """How many leading tokens of ``ids`` a generation with this cache would not process again.
        Runs nothing; at least one token of ``ids`` is always processed (its logits start generation)."""
        return self._plan(ids)[0]

    def _intact(self) -> bool:
        """Every layer holds exactly ``tokens`` (false after an interrupted forward pass or a direct model call)."""
        return all(c.offset == len(self.tokens) for c in self.layers)

    def _plan(self, ids) -> tuple[int, Checkpoint | None]:
        """(tokens to reuse, checkpoint to restore first, or None when the live state or a trim serves)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = min(len(self.tokens), len(ids))
        cached = np.asarray(self.tokens[:n], dtype=np.int64)
        differ = np.flatnonzero(cached != ids[:n])
        limit = min(int(differ[0]) if differ.size else n, len(ids) - 1)
        intact = self._intact()
        if intact and limit == len(self.tokens):
            return limit, None
        if intact and self.trimmable:
            return max(limit, 0), None
        best = max((c for c in self.checkpoints if c.length <= limit), key=lambda c: c.length, default=None)
        return (best.length, best) if best else (0, None)

    # ---- used by generation ----------------------------------------------------------------------

    def prepare(self, ids) -> int:
        """Bring the state to the longest reusable prefix of ``ids`` and return its length; the caller
        processes ``ids[n:]``. KV beyond the new offset is dead; checkpoints past it are dropped."""
        n, checkpoint = self._plan(ids)
        if n == len(self.tokens) and checkpoint is None and self._intact():
            return n
        for i, c in enumerate(self.layers):
            if isinstance(c, ArraysCache):
                c.cache = list(checkpoint.states[i]) if checkpoint else [None] * len(c.cache)
            c.offset = n  # KVCache: later writes overwrite from here
        del self.tokens[n:]
        self.checkpoints = [c for c in self.checkpoints if c.length <= n]
        return n

    def extend(self, ids) -> None:
        """The layers have just absorbed ``ids`` (called by generation after each forward pass)."""
        self.tokens.extend(ids)

    def checkpoint(self) -> None:
        """Snapshot the GDN states at the current length (the newest ``max_checkpoints`` are kept).

        The snapshot holds the arrays themselves: a GDN layer replaces its state arrays rather than writing
        into them, and MLX never changes an array another reference still holds, so later tokens leave the
        snapshot as it was. Attention needs only the offset: KV below it is never written again while the
        checkpoint lives (a restore to an earlier point drops every checkpoint past that point)."""
        if self.trimmable or self.max_checkpoints == 0 or not self.tokens or not self._intact():
            return
        states = [list(c.cache) if isinstance(c, ArraysCache) else None for c in self.layers]
        self.checkpoints = [c for c in self.checkpoints if c.length < len(self.tokens)]
        self.checkpoints.append(Checkpoint(len(self.tokens), states))
        del self.checkpoints[: -self.max_checkpoints]

    # ---- size ------------------------------------------------------------------------------------

    @property
    def state_nbytes(self) -> int:
        """Bytes of the live state (KV buffers as allocated, GDN states)."""
        return sum(c.nbytes for c in self.layers)

    @property
    def checkpoint_nbytes(self) -> int:
        """Bytes the checkpoints hold beyond the live state (an array shared with the live state counts once)."""
        live = {id(a) for c in self.layers if isinstance(c, ArraysCache) for a in c.cache if a is not None}
        seen, total = set(live), 0
        for cp in self.checkpoints:
            for s in cp.states:
                for a in s or ():
                    if a is not None and id(a) not in seen:
                        seen.add(id(a))
                        total += a.nbytes
        return total

    @property
    def nbytes(self) -> int:
        """Everything this cache keeps alive: live state + checkpoints."""
        return self.state_nbytes + self.checkpoint_nbytes


def make_prompt_cache(model, max_checkpoints: int = DEFAULT_CHECKPOINTS) -> PromptCache:
    """An empty prompt cache for ``model`` (a ``LoadedModel`` or a bare ``Model``)."""
    return PromptCache(model.make_cache(), max_checkpoints)


# ---- files ---------------------------------------------------------------------------------------------

def model_fingerprint(model) -> dict:
    """What a saved cache records about its model: type and sizes, and a checksum of the file that pins the
    weights' layout (layout.json of a converted folder, which holds every expert's checksum; config.json of
    a checkpoint folder)."""
    a = model.config
    path = Path(model.path)
    source = path / "layout.json" if (path / "layout.json").exists() else path / "config.json"
    digest = hashlib.blake2b(read_bytes(source, 256 << 20), digest_size=16).hexdigest()
    sizes = {k: getattr(a, k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                                        "num_experts", "num_experts_per_tok", "layer_types")}
    dtype = str(model.model.model.norm.weight.dtype).replace("mlx.core.", "")  # the compute dtype (never quantized)
    return {**sizes, "dtype": dtype, "checksum": f"{source.name}:{digest}"}


def save_prompt_cache(path: str | Path, cache: PromptCache, model, metadata: dict | None = None) -> None:
    """Write ``cache`` (state, tokens, checkpoints) to a safetensors file, atomically.

    ``metadata``: extra strings kept in the file (``flash-moe cache-prompt`` records the prompt text there)."""
    if not cache._intact():
        raise ValueError("the prompt cache is in the middle of a forward pass (interrupted?); nothing saved")
    arrays = {"tokens": mx.array(np.asarray(cache.tokens, np.int32).reshape(-1))}
    for i, c in enumerate(cache.layers):
        if isinstance(c, KVCache):
            for name, a in zip(("keys", "values"), c.state):
                arrays[f"layers.{i}.{name}"] = a
        else:
            for name, a in zip(("conv", "recurrent"), c.cache):
                if a is not None:
                    arrays[f"layers.{i}.{name}"] = a
    for j, cp in enumerate(cache.checkpoints):
        for i, s in enumerate(cp.states):
            for name, a in zip(("conv", "recurrent"), s or ()):
                if a is not None:
                    arrays[f"checkpoints.{j}.layers.{i}.{name}"] = a
    info = {"format": FORMAT, "model": json.dumps(model_fingerprint(model)),
            "checkpoints": json.dumps([cp.length for cp in cache.checkpoints]),
            "max_checkpoints": str(cache.max_checkpoints), **(metadata or {})}
    buf = io.BytesIO()
    mx.save_safetensors(buf, arrays, info)
    atomic_write(path, buf.getvalue())


def load_prompt_cache(path: str | Path, model, return_metadata: bool = False):
    """Read a cache written by ``save_prompt_cache`` for this model; one written for another model (other
    config, other converted weights) is refused with a ``CheckpointError``."""
    path = Path(path)
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb") as f:
            arrays, info = mx.load(f, format="safetensors", return_metadata=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a flash_moe prompt cache (format {info.get('format')!r})")
    try:
        saved, want = json.loads(info["model"]), model_fingerprint(model)
        lengths = [int(n) for n in json.loads(info["checkpoints"])]
        max_checkpoints = int(info["max_checkpoints"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged prompt cache metadata ({e})") from None
    if saved != want:
        diff = ", ".join(f"{k} {saved.get(k)!r} vs {want[k]!r}" for k in want if saved.get(k) != want[k])
        raise CheckpointError(f"{path}: a prompt cache of another model ({diff}); it cannot be used with {model.path}")
    cache = make_prompt_cache(model, max_checkpoints)
    tokens = arrays.pop("tokens", None)
    cache.tokens = tokens.tolist() if tokens is not None else []
    n = len(cache.tokens)
    for i, c in enumerate(cache.layers):
        if isinstance(c, KVCache):
            k, v = arrays.get(f"layers.{i}.keys"), arrays.get(f"layers.{i}.values")
            if n and (k is None or v is None or k.shape[2] != n or v.shape[2] != n):
                raise CheckpointError(f"{path}: layer {i} keys/values missing or not {n} tokens long")
            if n:
                c.update_and_fetch(k, v)
        else:
            c.cache, c.offset = _gdn_state(arrays, f"layers.{i}", n, path), n
    for j, length in enumerate(lengths):
        if not 0 < length <= n:
            raise CheckpointError(f"{path}: checkpoint {j} at {length} tokens is outside the {n} cached tokens")
        states = [_gdn_state(arrays, f"checkpoints.{j}.layers.{i}", length, path) if isinstance(c, ArraysCache)
                  else None for i, c in enumerate(cache.layers)]
        cache.checkpoints.append(Checkpoint(length, states))
    return (cache, info) if return_metadata else cache


def _gdn_state(arrays: dict, prefix: str, n: int, path: Path) -> list:
    """A GDN layer's [conv, recurrent] state from a file: both present once any token was seen."""
    state = [arrays.get(f"{prefix}.conv"), arrays.get(f"{prefix}.recurrent")]
    if n and any(a is None for a in state):
        raise CheckpointError(f"{path}: {prefix}.conv / .recurrent missing")
    return state if n else [None, None]

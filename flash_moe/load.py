"""``load(path)``: the glue that builds a ready model from a folder or a hub id.

Only this module knows both the model and where its experts come from: a Hugging Face checkpoint
gives resident experts; a converted folder (``layout.json``) gives experts streamed by an ExpertStore.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from .checkpoint import CheckpointError, load_checkpoint
from .model import Model, ModelArgs


def _dtype(dtype):
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    try:
        return getattr(mx, str(dtype).replace("torch.", ""))
    except AttributeError:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


class LoadedModel:
    """A model ready to run: ``model(tokens, cache)`` -> logits, plus tokenizer, stats and generation."""

    def __init__(self, model: Model, config: dict, path: Path, store=None):
        self.model = model
        self.raw_config = config
        self.path = path
        self.store = store
        self._tokenizer = None

    @property
    def config(self) -> ModelArgs:
        return self.model.args

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        if tokens.ndim == 1:
            tokens = tokens[None]
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

    def __repr__(self):
        a = self.config
        kind = "streamed" if self.store is not None else "resident"
        return (f"LoadedModel({a.model_type}, {a.num_hidden_layers} layers, hidden {a.hidden_size}, "
                f"{a.num_experts} experts top-{a.num_experts_per_tok}, {kind} experts, from {self.path})")


def load(path_or_repo: str | Path, *, dtype=None, experts_per_token: int | None = None) -> LoadedModel:
    """Load a model folder: a Hugging Face checkpoint, or a folder made by ``flash_moe.convert``.

    Args:
        path_or_repo: local folder.
        dtype: compute dtype for floating weights (``"float32"``, ``"bfloat16"``, ...); None keeps the stored one.
        experts_per_token: route to this many experts instead of the config's ``num_experts_per_tok``.
    """
    path = Path(path_or_repo).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model folder")
    model, config = load_checkpoint(path, dtype=_dtype(dtype))
    loaded = LoadedModel(model, config, path)
    if experts_per_token is not None:
        loaded.set_experts_per_token(experts_per_token)
    return loaded

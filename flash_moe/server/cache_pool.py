"""Prompt caches kept between requests: an LRU bounded by bytes, searched for the longest reusable prefix.

Clients resend the whole conversation each turn, so the state a finished request leaves behind is usually
what the next request of that conversation starts with. Used by the worker thread only (it holds MLX
arrays).
"""

from __future__ import annotations

from ..cache import ArraysCache, KVCache
from ..prompt_cache import PromptCache, make_prompt_cache


class PromptCachePool:
    def __init__(self, model, max_bytes: int):
        self.model, self.max_bytes = model, max_bytes
        self.entries: list[PromptCache] = []  # least recently used first

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.entries)

    def take(self, ids: list[int]) -> PromptCache:
        """The cache to run ``ids`` with: the kept one that reuses the most of them (taken out when the
        prompt extends all it holds; otherwise a fork, so the kept one stays whole), else a new one."""
        best, reuse = None, 0
        for c in self.entries:
            n = c.reusable(ids)
            if n > reuse:
                best, reuse = c, n
        if best is None:
            return make_prompt_cache(self.model)
        if reuse == len(best.tokens):
            self.entries.remove(best)
            return best
        return fork(best)

    def put(self, cache: PromptCache) -> None:
        """Keep ``cache`` as the most recently used; drop the least recently used past ``max_bytes``."""
        if self.max_bytes <= 0 or not cache.tokens:
            return
        self.entries.append(cache)
        total = self.nbytes
        while self.entries and total > self.max_bytes:
            total -= self.entries.pop(0).nbytes


def fork(cache: PromptCache) -> PromptCache:
    """A PromptCache in the same state that later tokens can change without touching ``cache``.

    GatedDeltaNet layers replace their state arrays, so sharing them is safe. A KV cache writes into its
    buffer in place: the fork gets the keys and values up to its offset as new arrays (the next token
    grows them into a buffer of its own)."""
    layers = []
    for c in cache.layers:
        if isinstance(c, KVCache):
            new = KVCache()
            if c.keys is not None:
                new.keys, new.values = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
            new.offset = c.offset
        else:
            new = ArraysCache(len(c.cache))
            new.cache, new.offset = list(c.cache), c.offset
        layers.append(new)
    out = PromptCache(layers, cache.max_checkpoints)
    out.tokens, out.checkpoints = list(cache.tokens), list(cache.checkpoints)
    return out

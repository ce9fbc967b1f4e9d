"""Rewinding mlx-lm's prompt caches, so family models can run speculative tokens (speculation.py).

A voided speculative token must leave the caches as they were before it. mlx-lm's caches have no
snapshot, but their state is a few attributes: arrays and integers. A snapshot keeps those attributes
(the arrays by reference, the lists copied) and a restore puts them back. Holding references suffices
though ``KVCache``/``RotatingKVCache.update_and_fetch`` write in place (slice assignment into a
preallocated buffer): the voided token writes only the slots that the same token, re-run from the
restored offset and index, writes again before anything reads them (a plain KV cache writes past the
restored offset; a rotating one's slot at the restored index holds the entry that token evicts anyway).
Growth, trimming and ``ArraysCache`` (recurrent state) replace arrays rather than write into them.

Only cache types known to follow these rules rewind; a model with any other cache does not speculate.
"""

from __future__ import annotations


def _kinds():
    from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, RotatingKVCache

    return ArraysCache, CacheList, KVCache, RotatingKVCache


def rewindable(cache) -> bool:
    """Whether every cache of ``cache`` (a list of layer caches, or one) can be snapshot and restored."""
    arrays, nested, kv, rotating = _kinds()
    if isinstance(cache, (list, tuple)):
        return all(rewindable(c) for c in cache)
    if type(cache) is nested:
        return rewindable(list(cache.caches))
    if type(cache) is arrays:  # batch padding bookkeeping (lengths, left_padding) is updated in place
        return cache.lengths is None and cache.left_padding is None
    return type(cache) in (kv, rotating)


def snapshot(cache):
    """The cache's attributes as they are now (arrays by reference, lists copied), for ``restore``."""
    if type(cache) is _kinds()[1]:  # CacheList
        return [snapshot(c) for c in cache.caches]
    return {k: (list(v) if isinstance(v, list) else v) for k, v in vars(cache).items()}


def restore(cache, saved) -> None:
    """Back to a ``snapshot``: the cache continues as if the tokens since were never run."""
    if type(cache) is _kinds()[1]:
        for c, s in zip(cache.caches, saved):
            restore(c, s)
        return
    vars(cache).clear()
    vars(cache).update({k: (list(v) if isinstance(v, list) else v) for k, v in saved.items()})

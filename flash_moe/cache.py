"""Per-layer decoding state: a growing KV cache for full attention, conv + recurrent state for GatedDeltaNet."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values (B, n_kv, T, head_dim), grown in steps so decode does not reallocate every token."""

    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev = self.offset
        n = keys.shape[2]
        if self.keys is None or prev + n > self.keys.shape[2]:
            B, H, _, Dk = keys.shape
            Dv = values.shape[3]
            grow = ((n + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, Dk), keys.dtype)
            new_v = mx.zeros((B, H, grow, Dv), values.dtype)
            if self.keys is not None:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
            else:
                self.keys, self.values = new_k, new_v
        self.offset += n
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def snapshot(self):
        # The offset alone: later writes land at or past it and a grow keeps the prefix, so the arrays of the
        # moment of ``restore`` hold the same keys below it. Holding the arrays themselves would stop MLX from
        # writing the next token's keys in place (a copy of the whole cache per token while a snapshot lives).
        return self.offset

    def restore(self, saved) -> None:
        """Back to a ``snapshot``: later writes are forgotten (used to re-run a token, or drop one built ahead)."""
        self.offset = saved

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.values) if a is not None)


class ArraysCache:
    """GatedDeltaNet state: [conv state (B, kernel-1, conv_dim), recurrent state (B, Hv, Dv, Dk) fp32]."""

    def __init__(self, size: int = 2):
        self.cache: list[mx.array | None] = [None] * size
        self.offset = 0

    def __getitem__(self, i: int):
        return self.cache[i]

    def __setitem__(self, i: int, value: mx.array):
        self.cache[i] = value

    def snapshot(self):
        return list(self.cache), self.offset

    def restore(self, saved) -> None:
        self.cache, self.offset = list(saved[0]), saved[1]

    @property
    def state(self) -> list[mx.array]:
        return [c for c in self.cache if c is not None]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class BatchKVCache:
    """The full-attention caches of a decode batch: one KVCache per sequence, since each sequence sits at its
    own position (its own RoPE offset and key length). Projections run batched; attention runs per sequence."""

    def __init__(self, caches: list[KVCache]):
        self.caches = caches

    def attend(self, q: mx.array, k: mx.array, v: mx.array, rope, scale: float) -> mx.array:
        """One new token per sequence: q, k, v [B, heads, 1, head_dim] -> [B, heads, 1, head_dim]."""
        out = []
        for i, c in enumerate(self.caches):
            pos = c.offset
            keys, values = c.update_and_fetch(rope(k[i : i + 1], pos), v[i : i + 1])
            out.append(mx.fast.scaled_dot_product_attention(rope(q[i : i + 1], pos), keys, values, scale=scale))
        return mx.concatenate(out, axis=0)

    def snapshot(self):
        return [c.snapshot() for c in self.caches]

    def restore(self, saved) -> None:
        for c, s in zip(self.caches, saved):
            c.restore(s)

    @property
    def state(self) -> list[mx.array]:
        return [a for c in self.caches for a in c.state]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

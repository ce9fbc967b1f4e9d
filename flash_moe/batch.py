"""Continuous batching: several sequences decoded together, one forward per step.

A sequence is prefilled alone (in chunks, one chunk per ``Batch.step`` so running sequences keep flowing),
then joins the decode batch: its GatedDeltaNet state (position-free) is stacked on the batch axis with the
others', its attention KV cache stays its own (``BatchKVCache``: sequences sit at different positions).
Each decode step is then one forward over the batch, and each MoE layer reads the union of the batch's
experts once (StreamingExperts reads the distinct experts of all rows it is given).

Sampling per sequence is exactly ``generate_step``'s (same keys for the same seed, same processors), so a
greedy sequence in a batch produces what it produces alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from .cache import ArraysCache, BatchKVCache, KVCache
from .sample import make_logits_processors, make_sampler, step_keys


@dataclass(eq=False)
class BatchSequence:
    """One sequence of a Batch: its sampling state, and its caches while it is prefilled."""

    prompt: mx.array
    sampler: object
    processors: list
    keys: object
    cache: list | None = None  # its own per-layer caches until it joins the batch
    todo: mx.array | None = None  # prompt tokens still to prefill
    last: mx.array | None = None  # the token fed at the next decode step, shape [1]
    tokens: mx.array | None = None  # prompt + generated, for logits processors
    generated: int = 0
    data: dict = field(default_factory=dict)  # whatever the caller keeps with it


class Batch:
    """Sequences being prefilled (one chunk per step) and sequences decoded together."""

    def __init__(self, model, prefill_step_size: int = 512):
        self.model, self.prefill_step_size = model, prefill_step_size
        self.prefilling: list[BatchSequence] = []
        self.running: list[BatchSequence] = []
        self.cache: list | None = None  # per layer: ArraysCache stacked on the batch axis, or BatchKVCache

    @property
    def busy(self) -> bool:
        return bool(self.prefilling or self.running)

    def add(self, ids, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
            repetition_penalty: float | None = None, seed: int = 0, cache: list | None = None,
            cached_tokens: int = 0) -> BatchSequence:
        """Queue a prompt (token ids). ``cache``: caches that already hold its first ``cached_tokens`` tokens."""
        prompt = mx.array(list(ids), mx.int32)
        if prompt.size == 0:
            raise ValueError("the prompt is empty")
        seq = BatchSequence(prompt=prompt, sampler=make_sampler(temperature, top_p, top_k, min_p),
                            processors=make_logits_processors(repetition_penalty), keys=step_keys(seed),
                            cache=cache if cache is not None else self.model.make_cache(), todo=prompt[cached_tokens:])
        seq.tokens = prompt
        self.prefilling.append(seq)
        return seq

    def remove(self, seq: BatchSequence) -> list:
        """Take ``seq`` out; returns its per-layer caches (batch 1), e.g. to keep as a prompt cache."""
        if seq in self.prefilling:
            self.prefilling.remove(seq)
            return seq.cache
        i = self.running.index(seq)
        keep = mx.array([j for j in range(len(self.running)) if j != i], mx.int32)
        own = []
        for layer, c in enumerate(self.cache):
            if isinstance(c, BatchKVCache):
                own.append(c.caches.pop(i))
                continue
            mine = ArraysCache(len(c.cache))
            mine.cache = [a[i : i + 1] if a is not None else None for a in c.cache]
            mine.offset = seq.prompt.size + seq.generated
            own.append(mine)
            c.cache = [a[keep] if a is not None and keep.size else None for a in c.cache]
        self.running.pop(i)
        if not self.running:
            self.cache = None
        return own

    def step(self) -> list[tuple[BatchSequence, int, mx.array]]:
        """One prefill chunk (of the oldest waiting prompt), then one decode step of every running sequence:
        [(sequence, token, logprobs)]."""
        if self.prefilling:
            self._prefill_chunk(self.prefilling[0])
        return self._decode() if self.running else []

    def _prefill_chunk(self, seq: BatchSequence) -> None:
        if seq.todo.size > 1:  # all but the last prompt token, in chunks, as generate_step does
            n = min(self.prefill_step_size, seq.todo.size - 1)
            self.model(seq.todo[:n][None], seq.cache)
            mx.eval([c.state for c in seq.cache])
            seq.todo = seq.todo[n:]
        if seq.todo.size == 1:
            seq.last, seq.todo = seq.todo, None
            self.prefilling.remove(seq)
            self._join(seq)

    def _join(self, seq: BatchSequence) -> None:
        own, seq.cache = seq.cache, None
        if self.cache is None:
            self.cache = [BatchKVCache([c]) if isinstance(c, KVCache) else c for c in own]
            for c, layer in zip(self.cache, self.model.model.layers):
                if isinstance(c, ArraysCache):
                    _materialize(c, layer)
        else:
            for c, mine, layer in zip(self.cache, own, self.model.model.layers):
                if isinstance(c, BatchKVCache):
                    c.caches.append(mine)
                else:
                    _materialize(mine, layer)
                    c.cache = [mx.concatenate([a, b]) for a, b in zip(c.cache, mine.cache)]
        self.running.append(seq)

    def _decode(self) -> list[tuple[BatchSequence, int, mx.array]]:
        tokens = mx.concatenate([s.last for s in self.running])[:, None]  # [B, 1]
        logits = self.model(tokens, self.cache)[:, -1].astype(mx.float32)  # float32 as in generate_step
        picked = []
        for i, s in enumerate(self.running):
            row = logits[i]
            for process in s.processors:
                row = process(s.tokens, row)
            logprobs = row - mx.logsumexp(row, keepdims=True)
            y = s.sampler(logprobs, next(s.keys)).reshape(1).astype(mx.int32)
            picked.append((s, y, logprobs))
        mx.eval([(y, lp) for _, y, lp in picked])
        out = []
        for s, y, logprobs in picked:
            s.last, s.generated = y, s.generated + 1
            if s.processors:
                s.tokens = mx.concatenate([s.tokens, y])
            out.append((s, y.item(), logprobs))
        return out


def _materialize(cache: ArraysCache, layer) -> None:
    """A sequence whose prompt was one token has no GatedDeltaNet state yet: the zeros the layer would start
    from, so it can be stacked with the others."""
    if cache[0] is not None:
        return
    gdn = layer.linear_attn
    dtype = layer.input_layernorm.weight.dtype  # the activations' dtype, which the conv state has
    cache[0] = mx.zeros((1, gdn.kernel - 1, gdn.conv_dim), dtype)
    cache[1] = mx.zeros((1, gdn.Hv, gdn.Dv, gdn.Dk), mx.float32)


def batch_generate(model, prompts: list, *, max_tokens: int = 256, stop=None, max_batch: int | None = None,
                   **sampling) -> list:
    """Complete several prompts (text, token ids or chat messages) decoded together; returns one
    ``GeneratedText`` per prompt, in order (greedy ones equal to ``generate``'s).

    ``max_batch``: most sequences decoded at once (default: all). ``sampling``: ``temperature``, ``top_p``,
    ``top_k``, ``min_p``, ``repetition_penalty``, ``seed`` as ``generate`` takes them.
    """
    from .generate import GeneratedText, TextStream, eos_token_ids, prompt_tokens

    tok = model.tokenizer
    eos = eos_token_ids(model, tok)
    stop = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
    ids = [list(p) if isinstance(p, list) and p and isinstance(p[0], int) else prompt_tokens(tok, p) for p in prompts]
    batch, todo, texts = Batch(model), list(range(len(ids))), [""] * len(ids)
    finish = [None] * len(ids)
    limit = max_batch or len(ids)
    while todo or batch.busy:
        while todo and len(batch.running) + len(batch.prefilling) < limit:
            i = todo.pop(0)
            seq = batch.add(ids[i], **sampling)
            seq.data.update(index=i, text=TextStream(tok, eos, stop, max_tokens))
        for seq, token, _ in batch.step():
            delta, done = seq.data["text"].add(token)
            texts[seq.data["index"]] += delta
            if done:
                finish[seq.data["index"]] = done
                batch.remove(seq)
    out = []
    for text, reason in zip(texts, finish):
        g = GeneratedText(text)
        g.content, g.reasoning, g.tool_calls, g.finish_reason, g.response = text, "", [], reason, None
        out.append(g)
    return out

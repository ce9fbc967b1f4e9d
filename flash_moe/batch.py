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

import math
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import ArraysCache, BatchKVCache, KVCache
from .files import CheckpointError
from .model import check_token_ids
from .prompt_cache import PromptCache, make_prompt_cache
from .sample import make_logits_processors, make_sampler, step_keys


@dataclass(eq=False)
class BatchSequence:
    """One sequence of a Batch: its sampling state and its prompt cache (whose layers are the sequence's
    own caches while it is prefilled; the batch holds its state while it decodes)."""

    prompt: mx.array
    ids: list[int]
    sampler: object
    processors: list
    keys: object
    cache: PromptCache
    cached_tokens: int = 0  # leading prompt tokens the prompt cache already held
    pos: int = 0  # prompt tokens absorbed so far
    marks: list = field(default_factory=list)  # prompt positions where the prompt cache takes a checkpoint
    last: mx.array | None = None  # the token fed at the next decode step, shape [1]
    last_id: int = 0
    tokens: mx.array | None = None  # prompt + generated, for logits processors
    generated: int = 0
    data: dict = field(default_factory=dict)  # whatever the caller keeps with it


class Batch:
    """Sequences being prefilled (one chunk per step) and sequences decoded together."""

    def __init__(self, model, prefill_step_size: int = 512):
        self.model, self.prefill_step_size = model, prefill_step_size
        self.forward = getattr(model, "forward", model)  # the model call without its per-call id check
        self.prefilling: list[BatchSequence] = []
        self.running: list[BatchSequence] = []
        self.cache: list | None = None  # per layer: ArraysCache stacked on the batch axis, or BatchKVCache

    @property
    def busy(self) -> bool:
        return bool(self.prefilling or self.running)

    def add(self, ids, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
            repetition_penalty: float | None = None, seed: int = 0, prompt_cache: PromptCache | None = None,
            checkpoint_at=()) -> BatchSequence:
        """Queue a prompt (token ids). ``prompt_cache``: its leading tokens that the cache holds are not
        processed again (``seq.cached_tokens``), and when the sequence leaves, the cache holds its state.
        ``checkpoint_at``: prompt positions where the cache takes a checkpoint (the end of the prompt always)."""
        ids = list(ids)
        if not ids:
            raise ValueError("the prompt is empty")
        check_token_ids(ids, self.model.config.vocab_size)  # once: sampled ids are in range by construction
        cache = prompt_cache if prompt_cache is not None else make_prompt_cache(self.model)
        start = cache.prepare(ids)
        prompt = mx.array(ids, mx.int32)
        seq = BatchSequence(prompt=prompt, ids=ids, sampler=make_sampler(temperature, top_p, top_k=top_k, min_p=min_p),
                            processors=make_logits_processors(repetition_penalty), keys=step_keys(seed),
                            cache=cache, cached_tokens=start, pos=start, tokens=prompt,
                            marks=sorted({p for p in checkpoint_at if start < p < len(ids) - 1} | {len(ids) - 1}))
        self.prefilling.append(seq)
        return seq

    def remove(self, seq: BatchSequence) -> PromptCache:
        """Take ``seq`` out; returns its prompt cache, which then holds the sequence's state (its prompt and
        every token fed back), ready to be kept for a later prompt."""
        if seq in self.prefilling:
            self.prefilling.remove(seq)
            return seq.cache
        i = self.running.index(seq)
        keep = mx.array([j for j in range(len(self.running)) if j != i], mx.int32)
        own = []
        for c in self.cache:
            if isinstance(c, BatchKVCache):
                own.append(c.caches.pop(i))
                continue
            mine = ArraysCache(len(c.cache))
            mine.cache = [a[i : i + 1] for a in c.cache]
            mine.offset = len(seq.cache.tokens)
            own.append(mine)
            c.cache = [a[keep] for a in c.cache] if keep.size else c.cache
        seq.cache.layers = own
        self.running.pop(i)
        if not self.running:
            self.cache = None
        return seq.cache

    def step(self) -> list[tuple[BatchSequence, int, mx.array]]:
        """One prefill chunk (of the oldest waiting prompt), then one decode step of every running sequence:
        [(sequence, token, logprobs)]."""
        if self.prefilling:
            self._prefill_chunk(self.prefilling[0])
        return self._decode() if self.running else []

    def _prefill_chunk(self, seq: BatchSequence) -> None:
        # All but the last prompt token, in chunks as generate_step takes them; the prompt cache takes a
        # checkpoint at each mark (the last one: the end of the prompt, before its last token).
        if seq.pos < seq.marks[0]:
            n = min(self.prefill_step_size, seq.marks[0] - seq.pos)
            self.forward(seq.prompt[seq.pos : seq.pos + n][None], seq.cache.layers)
            seq.cache.extend(seq.ids[seq.pos : seq.pos + n])
            mx.eval([c.state for c in seq.cache.layers])
            seq.pos += n
        if seq.pos == seq.marks[0]:
            seq.cache.checkpoint()
            seq.marks.pop(0)
        if not seq.marks:
            seq.last, seq.last_id = seq.prompt[-1:], seq.ids[-1]
            self.prefilling.remove(seq)
            self._join(seq)

    def _join(self, seq: BatchSequence) -> None:
        layers = self.model.model.layers
        own = seq.cache.layers
        for c, layer in zip(own, layers):
            if isinstance(c, ArraysCache):
                _materialize(c, layer)
        if self.cache is None:
            self.cache = [BatchKVCache([c]) if isinstance(c, KVCache) else _stacked([c]) for c in own]
        else:
            for c, mine in zip(self.cache, own):
                if isinstance(c, BatchKVCache):
                    c.caches.append(mine)
                else:
                    c.cache = [mx.concatenate([a, b]) for a, b in zip(c.cache, mine.cache)]
        self.running.append(seq)

    def _decode(self) -> list[tuple[BatchSequence, int, mx.array]]:
        tokens = mx.concatenate([s.last for s in self.running])[:, None]  # [B, 1]
        logits = self.forward(tokens, self.cache)[:, -1].astype(mx.float32)  # float32 as in generate_step
        picked, norms = [], []
        for i, s in enumerate(self.running):
            row = logits[i]
            for process in s.processors:
                row = process(s.tokens, row[None])[0]  # [1, V] as mlx-lm's processors index it
            norms.append(mx.logsumexp(row, keepdims=True))
            logprobs = row - norms[-1]
            y = s.sampler(logprobs, next(s.keys)).reshape(1).astype(mx.int32)
            picked.append((s, y, logprobs))
        norms = mx.concatenate(norms)
        mx.eval([(y, lp) for _, y, lp in picked], norms)
        if not all(math.isfinite(v) for v in norms.tolist()):  # a NaN or +inf logit: damaged weights
            raise CheckpointError(f"the model's logits are not finite ({norms.tolist()}): damaged weights? Run "
                                  f"`flash-moe verify {getattr(self.model, 'path', 'MODEL')}`, or load with verify='full'")
        out = []
        for s, y, logprobs in picked:
            s.cache.extend((s.last_id,))  # the token just fed is now in the state
            s.last, s.last_id, s.generated = y, y.item(), s.generated + 1
            if s.processors:
                s.tokens = mx.concatenate([s.tokens, y])
            out.append((s, s.last_id, logprobs))
        return out


def _stacked(caches: list[ArraysCache]) -> ArraysCache:
    """A batch's GatedDeltaNet cache: the sequences' states stacked on the batch axis (a new object: the
    sequences' own caches are left as they were)."""
    out = ArraysCache(len(caches[0].cache))
    out.cache = [mx.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*(c.cache for c in caches))]
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
    from .generation import GeneratedText, TextStream, eos_token_ids, prompt_tokens

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

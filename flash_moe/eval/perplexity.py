"""``evaluate``: perplexity, KL to a reference and top-1 agreement for models x experts per token (K).

The token stream is cut into windows of ``context`` tokens that start ``stride`` tokens apart; each token
(after the first) is scored once, in the first window that holds it, with at least ``context - stride``
tokens before it (fewer only in the first window). A run is one (model, K); the reference run goes first
and its log-probabilities over the whole vocabulary are kept (in a temporary file: vocab x tokens x 4
bytes) so every other run is compared with it token by token.

Quality comes from whole windows (prefill: a window reads each expert it routes to once per layer); the
cost columns come from a short teacher-forced decode after them, one token at a time as generation runs:
expert bytes read per decoded token (from the ExpertStore's counters) and decoded tokens per second.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .data import read_text


@dataclass
class Row:
    """One (model, K) result; ``kl`` and ``top1`` are against the reference run."""

    model: str
    bits: int | None  # expert bits from layout.json; None for a Hugging Face folder (resident experts)
    k: int
    perplexity: float
    kl: float
    top1: float
    bytes_per_token: float | None  # expert bytes read per decoded token; None when experts are resident
    tok_per_s: float  # decoded tokens per second (teacher-forced, warm page cache)
    tokens: int  # tokens scored
    nll: float = 0.0  # mean negative log-likelihood (nats); perplexity = exp(nll)
    reference: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first)`` per window over ``n`` tokens: the model reads tokens ``begin .. end-2`` and
    the targets ``first .. end-1`` are scored (each token from 1 to n-1 exactly once)."""
    if context < 2:
        raise ValueError(f"--context must be at least 2 tokens, got {context}")
    if not 1 <= stride < context:
        raise ValueError(f"--stride must be in 1..{context - 1} (below --context {context}), got {stride}")
    out, begin, first = [], 0, 1
    while first < n:
        end = min(begin + context, n)
        out.append((begin, end, first))
        first, begin = end, begin + stride
    return out


def window_logprobs(model, ids: list[int], begin: int, end: int, first: int) -> mx.array:
    """Log-probabilities [end - first, vocab] (float32) of the window's scored positions."""
    logits = model(mx.array(ids[begin : end - 1], mx.int32)[None], model.make_cache())[0, first - 1 - begin :]
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def token_nlls(model, ids: list[int], context: int = 2048, stride: int = 1024) -> np.ndarray:
    """Negative log-likelihood (nats) of ``ids[1:]``, each token given the ones before it in its window."""
    out = []
    for begin, end, first in windows(len(ids), context, stride):
        lp = window_logprobs(model, ids, begin, end, first)
        targets = mx.array(ids[first:end], mx.int32)[:, None]
        out.append(np.array(-mx.take_along_axis(lp, targets, axis=-1)[:, 0]))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def expert_bits(model) -> int | None:
    """Expert bits of a converted folder (layout.json), None for resident experts."""
    store = getattr(model, "store", None)
    return store.layout.expert.bits if store is not None else None


def parse_reference(spec: str | None, models: list[str]) -> tuple[str, int | None]:
    """``M@K`` (or ``M``: its config's K) -> (model, K); default: the first model at its config's K."""
    if not spec:
        return models[0], None
    name, sep, k = spec.rpartition("@")
    if not sep:
        return spec, None
    try:
        return name, int(k)
    except ValueError:
        raise ValueError(f"--reference {spec}: expected MODEL@K with K an integer") from None


class OneAtATime:
    """Models loaded one at a time (a 397B model's resident part is large): the current one stays loaded."""

    def __init__(self, load_options: dict):
        self.options, self.name, self.model = load_options, None, None

    def get(self, name):
        if not isinstance(name, (str, Path)):  # an already loaded model: used as is, never closed here
            return name
        if name != self.name:
            from ..load import load

            self.close()
            self.model, self.name = load(name, **self.options), name
        return self.model

    def close(self):
        if self.model is not None:
            self.model.close()
        self.name = self.model = None


def label(model) -> str:
    return str(model) if isinstance(model, (str, Path)) else str(model.path)


def evaluate(models, data=None, *, k=None, reference=None, context: int = 2048, stride: int = 1024,
             max_tokens: int | None = None, decode_tokens: int = 16, progress: bool = True,
             load_options: dict | None = None) -> list[Row]:
    """Perplexity, KL(reference || model) per token, top-1 agreement and cost for every (model, K).

    Args:
        models: model folders or hub ids (or already loaded models), one or more. Several conversions of
            one source at different bits compare against each other.
        data: what to score: a file path or ``hub:NAME`` (see ``read_text``), ``{"text": STRING}``, or a list
            of token ids; None: the bundled sample.
        k: experts per token to try, e.g. ``[1, 2, 4, 10]``; None: each model's own.
        reference: ``"MODEL@K"`` or ``(model, K)``; default: the first model at its config's K.
        context, stride: window length and the step between windows (tokens).
        max_tokens: score only the first this many tokens of the data.
        decode_tokens: tokens decoded one by one per run to measure bytes per token and tok/s (0: skip).
        load_options: keyword arguments for ``load`` (e.g. ``cache_experts``).
    Returns:
        one ``Row`` per run, the reference first.
    """
    from tqdm.auto import tqdm

    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if not models:
        raise ValueError("--model: give at least one model")
    ks = [None] if k is None else ([k] if isinstance(k, int) else list(k))
    ref_model, ref_k = reference if isinstance(reference, tuple) else parse_reference(reference, models)
    loaded = OneAtATime(load_options or {})
    try:
        ref = loaded.get(ref_model)
        ref_k = ref_k or ref.experts_per_token
        ids = _token_ids(ref, data, max_tokens)
        spans = windows(len(ids), context, stride)
        runs = [(ref_model, ref_k)] + [(m, kk) for m in models for kk in ks]
        with tempfile.TemporaryFile() as f, tqdm(total=len(spans) * len(runs), unit="window",
                                                 disable=not progress, desc="eval") as bar:
            store, rows, done = None, [], set()
            for m, kk in runs:
                model = loaded.get(m)
                kk = kk or model.experts_per_token
                if (label(m), kk) in done:  # the reference again, or a K listed twice
                    bar.total -= len(spans)
                    continue
                done.add((label(m), kk))
                if not 1 <= kk <= model.config.num_experts:
                    flag = "--reference" if store is None else "--k"
                    raise ValueError(f"{flag} {kk}: {label(m)} has {model.config.num_experts} experts")
                if store is None:  # the reference run: keep its log-probabilities
                    store = np.memmap(f, np.float32, "w+", shape=(len(ids) - 1, model.config.vocab_size))
                elif model.config.vocab_size != store.shape[1]:
                    raise ValueError(f"--model {label(m)}: vocabulary of {model.config.vocab_size} tokens, the "
                                     f"reference has {store.shape[1]}; KL needs one tokenizer")
                rows.append(_run(model, label(m), kk, ids, spans, store, not rows, decode_tokens, bar))
            del store
    finally:
        loaded.close()
    return rows


def _token_ids(model, data, max_tokens) -> list[int]:
    if isinstance(data, (list, tuple)) and (not data or isinstance(data[0], int)):
        ids = list(data)
    else:
        text = data["text"] if isinstance(data, dict) else read_text(data)
        ids = list(model.tokenizer.encode(text, add_special_tokens=False))
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"--max-tokens must be at least 2, got {max_tokens}")
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"--data: {len(ids)} token(s); at least 2 are needed to score one")
    return ids


def _run(model, name, k, ids, spans, ref, is_ref, decode_tokens, bar) -> Row:
    before = model.experts_per_token
    model.set_experts_per_token(k)
    try:
        nll, kl, agree = 0.0, 0.0, 0
        for begin, end, first in spans:
            lp = window_logprobs(model, ids, begin, end, first)
            targets = mx.array(ids[first:end], mx.int32)[:, None]
            nll_w = -mx.take_along_axis(lp, targets, axis=-1).sum()
            if is_ref:
                mx.eval(lp, nll_w)
                ref[first - 1 : end - 1] = np.array(lp)
            else:
                r = mx.array(ref[first - 1 : end - 1])
                kl_w = (mx.exp(r) * (r - lp)).sum()
                agree_w = (mx.argmax(r, axis=-1) == mx.argmax(lp, axis=-1)).sum()
                mx.eval(nll_w, kl_w, agree_w)
                kl, agree = kl + kl_w.item(), agree + agree_w.item()
            nll += nll_w.item()
            bar.update(1)
        n = len(ids) - 1
        bytes_per_token, tok_per_s = _decode_cost(model, ids, decode_tokens)
        return Row(name, expert_bits(model), k, math.exp(nll / n), 0.0 if is_ref else kl / n,
                   1.0 if is_ref else agree / n, bytes_per_token, tok_per_s, n, nll / n, is_ref)
    finally:
        model.set_experts_per_token(before)


def _decode_cost(model, ids, n) -> tuple[float | None, float]:
    """Teacher-forced decode of ``n`` tokens after one warm-up token: (expert bytes per token, tok/s)."""
    n = min(n, len(ids) - 1)
    if n <= 0:
        return None, float("nan")
    cache, tokens = model.make_cache(), mx.array(ids[: n + 1], mx.int32)[None]
    mx.eval(model(tokens[:, :1], cache))
    stats = model.stats
    start = stats.snapshot() if stats is not None else None
    tic = time.perf_counter()
    for i in range(1, n + 1):
        mx.eval(model(tokens[:, i : i + 1], cache))
    seconds = time.perf_counter() - tic
    read = stats.snapshot().delta(start).totals()["bytes"] / n if stats is not None else None
    return read, n / seconds

"""``flash-moe bench``: prompt and generation speed on random prompts, as ``mlx_lm.benchmark`` reports them
(prompt_tps, generation_tps, peak_memory; per trial and averaged), plus the expert I/O of the generated
tokens: experts and bytes read per token, page-cache and device-cache hit rates.

Each trial draws a fresh random prompt (seeded), prefills it and generates exactly ``generation_tokens``
greedy tokens (end-of-sequence does not stop it). The prompt's time runs to the first generated token; the
generation rate and the I/O counters cover the tokens after it.
"""

from __future__ import annotations

import math
import time

import mlx.core as mx
import numpy as np

from ..generation import generate_step

KEYS = ("prompt_tps", "generation_tps", "peak_memory", "experts_per_token", "bytes_per_token",
        "page_cache_hit_rate", "device_cache_hit_rate")


def _device_counts(model) -> tuple[int, int] | None:
    cache = getattr(model, "cache", None)
    if cache is None:
        return None
    t = cache.totals()
    return t["hits"], t["misses"]


def trial(model, prompt_tokens: int, generation_tokens: int, seed: int) -> dict:
    """One prompt of ``prompt_tokens`` random ids, then ``generation_tokens`` tokens."""
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, prompt_tokens)
    stats = model.stats
    mx.reset_peak_memory()
    tic = time.perf_counter()
    steps = generate_step(mx.array(ids, mx.int32), model, max_tokens=generation_tokens)
    next(steps)
    first = time.perf_counter()
    io0, dev0 = (stats.snapshot() if stats is not None else None), _device_counts(model)
    n = sum(1 for _ in steps)
    end = time.perf_counter()
    row = {"prompt_tps": prompt_tokens / (first - tic),
           "generation_tps": n / (end - first) if n else math.nan,
           "peak_memory": mx.get_peak_memory() / 1e9}
    per = max(n, 1)
    if io0 is not None:
        io = stats.snapshot().delta(io0).totals()
        row.update(experts_per_token=io["experts"] / per, bytes_per_token=io["bytes"] / per,
                   page_cache_hit_rate=io["hit_rate"])
    else:
        row.update(experts_per_token=math.nan, bytes_per_token=math.nan, page_cache_hit_rate=math.nan)
    dev1 = _device_counts(model)
    if dev0 is not None:
        hits, misses = dev1[0] - dev0[0], dev1[1] - dev0[1]
        row["device_cache_hit_rate"] = hits / (hits + misses) if hits + misses else math.nan
    else:
        row["device_cache_hit_rate"] = math.nan
    return row


def bench(model, prompt_tokens: int = 512, generation_tokens: int = 128, trials: int = 3, k: int | None = None,
          seed: int = 0, on_trial=None) -> dict:
    """Run ``trials`` trials on a loaded model (at ``k`` experts per token if given); returns
    ``{"model", "k", "prompt_tokens", "generation_tokens", "trials": [row, ...], "average": row}``."""
    for name, value, low in (("-p", prompt_tokens, 1), ("-g", generation_tokens, 2), ("-n", trials, 1)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    before = model.experts_per_token
    if k is not None:
        model.set_experts_per_token(k)
    try:
        rows = []
        for i in range(trials):
            rows.append(trial(model, prompt_tokens, generation_tokens, seed + i))
            if on_trial:
                on_trial(i, rows[-1])
        k = model.experts_per_token
    finally:
        model.set_experts_per_token(before)
    average = {key: float(np.mean([r[key] for r in rows])) for key in KEYS}
    return {"model": str(model.path), "k": k, "prompt_tokens": prompt_tokens,
            "generation_tokens": generation_tokens, "trials": rows, "average": average}


def format_row(row: dict) -> str:
    def f(key, fmt, scale=1.0):
        v = row[key]
        return f"{key}={'-' if v is None or math.isnan(v) else format(v * scale, fmt)}"

    return ", ".join([f("prompt_tps", ".3f"), f("generation_tps", ".3f"), f("peak_memory", ".3f"),
                      f("experts_per_token", ".1f"), "bytes_per_token=" + _mb(row["bytes_per_token"]),
                      f("page_cache_hit_rate", ".3f"), f("device_cache_hit_rate", ".3f")])


def _mb(v) -> str:
    return "-" if v is None or math.isnan(v) else f"{v / 1e6:.3f}MB"

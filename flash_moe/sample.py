"""Token sampling and logits processors for generation.

Samplers take the last position's logits (or log-probabilities: every filter here is
invariant to adding a constant) of shape [..., V] and an explicit PRNG key, and return
token ids of shape [...]. Seeded runs are reproducible because no global random state is
used: draw one key per step from `step_keys(seed)`.

Order of operations follows Hugging Face and vLLM (temperature, then top-k, top-p,
min-p), which is what Qwen's recommended settings (T=0.6, top_p=0.95, top_k=20) assume.
mlx-lm filters before applying the temperature, so with T != 1 its top-p/min-p sets
differ from ours.
"""

import math
import operator
from typing import Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx

Sampler = Callable[[mx.array, Optional[mx.array]], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def check_seed(seed) -> int:
    """A sampling seed must be an integer in [0, 2**64) (MLX's key is 64 bits); anything else is a ValueError."""
    if isinstance(seed, bool) or not hasattr(seed, "__index__") or not 0 <= operator.index(seed) < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return operator.index(seed)


def check_real(name: str, value, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` as a float: a real number (not a bool, not NaN or infinite) in [low, high], else a ValueError
    naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def step_keys(seed: int) -> Iterator[mx.array]:
    """One PRNG key per decoding step (an iterator); the same seed gives the same keys. The seed is checked now."""
    key = mx.random.key(check_seed(seed))

    def keys(key):
        while True:
            key, sub = mx.random.split(key)
            yield sub

    return keys(key)


def apply_top_k(logits: mx.array, top_k: int) -> mx.array:
    """Keep the `top_k` largest logits (and any tied with the k-th), mask the rest.

    Ties at the boundary are all kept, as Hugging Face does: dropping one of two equally
    likely tokens would be an arbitrary choice.
    """
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = mx.topk(logits, top_k, axis=-1).min(axis=-1, keepdims=True)
    return mx.where(logits < kth, -mx.inf, logits)


def apply_top_p(logits: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability mass is >= top_p.

    A token is kept when the mass of the tokens ranked above it is still below top_p, so
    the most likely token always survives; ties with the last kept token are kept too.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits = mx.sort(logits, axis=-1)  # ascending
    probs = mx.softmax(sorted_logits, axis=-1)
    mass_above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
    num_kept = (mass_above < top_p).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(sorted_logits, logits.shape[-1] - num_kept, axis=-1)
    return mx.where(logits < threshold, -mx.inf, logits)


def apply_min_p(logits: mx.array, min_p: float, min_tokens_to_keep: int = 1) -> mx.array:
    """Keep tokens whose probability is at least `min_p` times the top token's, and at least the
    `min_tokens_to_keep` most likely ones."""
    if min_p <= 0.0:
        return logits
    threshold = logits.max(axis=-1, keepdims=True) + math.log(min_p)
    if min_tokens_to_keep > 1:
        kth = mx.topk(logits, min(min_tokens_to_keep, logits.shape[-1]), axis=-1).min(axis=-1, keepdims=True)
        threshold = mx.minimum(threshold, kth)
    return mx.where(logits < threshold, -mx.inf, logits)


def make_sampler(
    temp: float = 0.0,
    top_p: float = 1.0,
    *,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
    temperature: Optional[float] = None,
) -> Sampler:
    """Make a sampler `(logits, key) -> token ids`, called as mlx-lm's `make_sampler` is.

    Args:
        temp: Softmax temperature; 0 picks the argmax (the key is then unused).
            `temperature` is the same, by its longer name.
        top_p: Nucleus mass in (0, 1]; 1 disables it (mlx-lm's 0-for-off is refused).
        min_p: Drop tokens less likely than `min_p` times the top token, in [0, 1];
            0 disables it.
        min_tokens_to_keep: min-p keeps at least this many of the most likely tokens.
        top_k: Keep the k most likely tokens; 0 disables it.

    Returns:
        A function of logits [..., V] and an optional PRNG key (`mx.random.key`) returning
        uint32 token ids of shape [...]. A key of None falls back to MLX's global generator.
    """
    temperature = check_real("temperature", temp if temperature is None else temperature, 0.0)
    if not check_real("top_p", top_p, 0.0, 1.0) > 0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
    min_p = check_real("min_p", min_p, 0.0, 1.0)
    if not isinstance(min_tokens_to_keep, int) or isinstance(min_tokens_to_keep, bool) or min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep must be a positive integer, got {min_tokens_to_keep!r}")

    if temperature == 0:
        return lambda logits, key=None: mx.argmax(logits, axis=-1)

    def sampler(logits: mx.array, key: Optional[mx.array] = None) -> mx.array:
        logits = logits.astype(mx.float32) * (1.0 / temperature)
        logits = apply_top_k(logits, top_k)
        logits = apply_top_p(logits, top_p)
        logits = apply_min_p(logits, min_p, min_tokens_to_keep)
        return mx.random.categorical(logits, axis=-1, key=key)

    return sampler


def _token_counts(tokens: Union[mx.array, Sequence[int]], vocab_size: int) -> mx.array:
    tokens = (
        mx.array(tokens, dtype=mx.int32) if not isinstance(tokens, mx.array) else tokens
    )
    return mx.zeros((vocab_size,), mx.float32).at[tokens.reshape(-1)].add(1.0)


def make_repetition_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """Penalise tokens seen in the last `context_size` tokens (CTRL, Keskar et al. 2019).

    Positive logits are divided by `penalty` and negative ones multiplied, so a penalty
    > 1 always makes a repeated token less likely, whatever its sign.
    """
    if not check_real("repetition_penalty", penalty) > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        if len(tokens) == 0 or context_size <= 0:
            return logits
        seen = _token_counts(tokens[-context_size:], logits.shape[-1]) > 0
        penalised = mx.where(logits < 0, logits * penalty, logits / penalty)
        return mx.where(seen, penalised, logits)

    return processor


def make_presence_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """Subtract `penalty` from every token seen in the last `context_size` tokens (OpenAI)."""

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        if len(tokens) == 0 or context_size <= 0:
            return logits
        seen = _token_counts(tokens[-context_size:], logits.shape[-1]) > 0
        return logits - penalty * seen.astype(logits.dtype)

    return processor


def make_frequency_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """Subtract `penalty` once per occurrence in the last `context_size` tokens (OpenAI)."""

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        if len(tokens) == 0 or context_size <= 0:
            return logits
        counts = _token_counts(tokens[-context_size:], logits.shape[-1])
        return logits - (penalty * counts).astype(logits.dtype)

    return processor


def make_logits_processors(
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
    presence_penalty: Optional[float] = None,
    frequency_penalty: Optional[float] = None,
    penalty_context_size: int = 20,
) -> List[LogitsProcessor]:
    """Make logits processors `(tokens, logits) -> logits` for generation.

    Args:
        repetition_penalty: Sign-aware multiplicative penalty (> 1 discourages repeats);
            None or 1 disables it.
        repetition_context_size: How many of the most recent tokens (prompt included)
            the repetition penalty looks at.
        presence_penalty: OpenAI-style additive penalty for tokens seen at least once.
        frequency_penalty: OpenAI-style additive penalty per occurrence.
        penalty_context_size: Window for the presence and frequency penalties.

    Returns:
        A list of processors to apply in order. `tokens` is the 1-D history (mx.array or
        list of ints); `logits` has shape [V] or [1, V].
    """
    for name, value in (("repetition_penalty", repetition_penalty), ("presence_penalty", presence_penalty),
                        ("frequency_penalty", frequency_penalty)):
        if value is not None:
            check_real(name, value)
    for name, value in (("repetition_context_size", repetition_context_size),
                        ("penalty_context_size", penalty_context_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    processors = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(
            make_repetition_penalty(repetition_penalty, repetition_context_size)
        )
    if presence_penalty:
        processors.append(make_presence_penalty(presence_penalty, penalty_context_size))
    if frequency_penalty:
        processors.append(
            make_frequency_penalty(frequency_penalty, penalty_context_size)
        )
    return processors

"""Samplers and logits processors against numpy references and statistics.

Every test draws fresh random logits; the seed is printed and put in assertion messages.
Statistical checks use batched draws (one categorical over an [N, V] matrix) and
thresholds with a false-failure rate around 1e-7.
"""

import math
import random

import mlx.core as mx
import numpy as np
import pytest

from flash_moe.sample import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
    step_keys,
)

Z = 5.3  # one-sided normal quantile for ~6e-8


@pytest.fixture
def seed():
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed={seed}")
    return seed


def random_logits(seed, vocab, scale=2.0):
    return np.random.default_rng(seed).normal(0.0, scale, vocab).astype(np.float32)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def draw(sampler, logits, n, key_seed):
    """n independent samples from one logits row, as a numpy int array."""
    batch = mx.broadcast_to(mx.array(logits), (n, len(logits)))
    return np.array(sampler(batch, mx.random.key(key_seed))).astype(np.int64)


def chi_square_ok(samples, probs, msg):
    """Pearson chi-square of samples vs probs, tail bins (expected < 5) merged."""
    n = len(samples)
    counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    assert counts[probs == 0].sum() == 0, f"{msg}: drew a token of probability 0"
    order = np.argsort(-probs)
    expected, observed = n * probs[order], counts[order]
    big = expected >= 5
    exp_bins = np.append(expected[big], expected[~big].sum())
    obs_bins = np.append(observed[big], observed[~big].sum())
    keep = exp_bins > 0
    stat = (((obs_bins - exp_bins) ** 2)[keep] / exp_bins[keep]).sum()
    df = keep.sum() - 1
    # Wilson-Hilferty approximation of the chi-square quantile
    limit = df * (1 - 2 / (9 * df) + Z * math.sqrt(2 / (9 * df))) ** 3
    assert stat < limit, f"{msg}: chi-square {stat:.1f} >= {limit:.1f} (df={df})"


def test_temperature_zero_is_argmax(seed):
    logits = random_logits(seed, 1000)
    sampler = make_sampler(temperature=0.0, top_k=5, top_p=0.5)
    want = int(np.argmax(logits))
    assert int(sampler(mx.array(logits), None)) == want, f"seed={seed}"
    assert sampler(mx.array(logits)[None], mx.random.key(1)).tolist() == [want]
    bf16 = mx.array(logits).astype(mx.bfloat16)
    assert int(sampler(bf16, None)) == int(np.argmax(np.array(bf16.astype(mx.float32))))


def test_output_shapes_and_dtypes(seed):
    logits = mx.array(random_logits(seed, 64))
    sampler = make_sampler(temperature=0.8, top_k=10, top_p=0.9, min_p=0.01)
    key = mx.random.key(seed)
    assert sampler(logits, key).shape == ()
    assert sampler(logits[None], key).shape == (1,)
    assert sampler(logits.astype(mx.bfloat16)[None], key).shape == (1,)
    assert 0 <= int(sampler(logits, key)) < 64


def test_top_k_never_leaves_top_k(seed):
    vocab, k = 200, 7
    logits = random_logits(
        seed, vocab, scale=0.5
    )  # flat, so outside tokens would show up
    top = set(np.argsort(-logits)[:k].tolist())
    samples = draw(make_sampler(temperature=1.5, top_k=k), logits, 20000, seed)
    assert set(samples.tolist()) <= top, f"seed={seed}: drew outside the top {k}"
    assert set(samples.tolist()) == top, f"seed={seed}: some top-{k} token never drawn"


def test_top_k_keeps_ties_and_exactly_k_otherwise(seed):
    logits = random_logits(seed, 50)
    kept = np.isfinite(np.array(apply_top_k(mx.array(logits), 5)))
    assert kept.sum() == 5 and set(np.flatnonzero(kept)) == set(np.argsort(-logits)[:5])
    tied = logits.copy()
    order = np.argsort(-tied)
    tied[order[3]] = tied[order[4]] = tied[
        order[5]
    ]  # 4th, 5th, 6th tie at the boundary
    kept = np.isfinite(np.array(apply_top_k(mx.array(tied), 5)))
    assert set(np.flatnonzero(kept)) == set(order[:6].tolist()), f"seed={seed}"
    assert np.isfinite(np.array(apply_top_k(mx.array(logits), 0))).all()
    assert np.isfinite(np.array(apply_top_k(mx.array(logits), 50))).all()


def test_top_p_keeps_smallest_set_with_enough_mass(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        logits = rng.normal(0.0, rng.uniform(0.5, 3.0), 100).astype(np.float32)
        probs = softmax(logits.astype(np.float64))
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        # p must sit clear of float32 rounding: only cut where the next token is not tiny
        j = int(rng.choice(np.flatnonzero(probs[order][1:] > 1e-3) + 1))
        top_p = float(
            (cum[j - 1] + cum[j]) / 2
        )  # mass of j tokens < p <= mass of j + 1
        kept = np.isfinite(np.array(apply_top_p(mx.array(logits), top_p)))
        assert set(np.flatnonzero(kept)) == set(
            order[: j + 1].tolist()
        ), f"seed={seed} p={top_p}"
        batched = np.array(
            apply_top_p(mx.array(np.stack([logits, logits[::-1]])), top_p)
        )
        assert (
            np.isfinite(batched[1]) == kept[::-1]
        ).all(), f"seed={seed}: rows mixed up"


def test_top_p_keeps_at_least_one_and_disables_at_one(seed):
    logits = random_logits(seed, 30)
    kept = np.isfinite(np.array(apply_top_p(mx.array(logits), 1e-9)))
    assert np.flatnonzero(kept).tolist() == [int(np.argmax(logits))]
    assert np.isfinite(np.array(apply_top_p(mx.array(logits), 1.0))).all()
    samples = draw(make_sampler(temperature=1.0, top_p=1e-9), logits, 500, seed)
    assert (samples == np.argmax(logits)).all()


def test_min_p(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, 80).astype(np.float32)
    ratio = np.sort(np.exp(logits.astype(np.float64) - logits.max()))[::-1]
    j = int(rng.integers(2, 40))
    min_p = float(
        math.sqrt(ratio[j - 1] * ratio[j])
    )  # between the j-th and (j+1)-th ratio
    kept = np.isfinite(np.array(apply_min_p(mx.array(logits), min_p)))
    assert set(np.flatnonzero(kept)) == set(
        np.argsort(-logits)[:j].tolist()
    ), f"seed={seed}"
    only_top = np.isfinite(np.array(apply_min_p(mx.array(logits), 1.0)))
    assert np.flatnonzero(only_top).tolist() == [int(np.argmax(logits))]


def test_same_seed_same_tokens_different_seed_different(seed):
    logits = mx.array(random_logits(seed, 40, scale=0.3))
    sampler = make_sampler(temperature=1.0, top_k=30, top_p=0.95)

    def run(s):
        keys = step_keys(s)
        return [int(sampler(logits, next(keys))) for _ in range(60)]

    assert run(seed) == run(seed), f"seed={seed}: not reproducible"
    assert run(seed) != run(
        seed + 1
    ), f"seed={seed}: different seeds gave the same tokens"
    # per-step keys differ, so one run is not a constant sequence
    assert len(set(run(seed))) > 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_distribution_matches_softmax(seed, temperature):
    logits = random_logits(seed, 20, scale=1.0)
    samples = draw(make_sampler(temperature=temperature), logits, 100_000, seed)
    chi_square_ok(
        samples, softmax(logits.astype(np.float64) / temperature), f"seed={seed}"
    )


def test_filtered_distribution_is_renormalised_softmax(seed):
    logits = random_logits(seed, 30, scale=1.0)
    temperature, k = 0.8, 12
    scaled = logits.astype(np.float64) / temperature
    probs = softmax(scaled)
    probs[np.argsort(-scaled)[k:]] = 0.0
    probs /= probs.sum()
    samples = draw(
        make_sampler(temperature=temperature, top_k=k), logits, 100_000, seed
    )
    chi_square_ok(samples, probs, f"seed={seed}")


def test_large_vocab_runs_vectorised(seed):
    logits = mx.array(random_logits(seed, 248_320))
    sampler = make_sampler(temperature=0.6, top_p=0.95, top_k=20, min_p=0.05)
    tokens = {
        int(sampler(logits[None], key)[0])
        for key in mx.random.split(mx.random.key(seed), 8)
    }
    top20 = set(np.argsort(-np.array(logits))[:20].tolist())
    assert tokens <= top20, f"seed={seed}"


def test_bad_arguments():
    for kwargs in [
        dict(temperature=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(top_k=2.5),
        dict(min_p=1.5),
    ]:
        with pytest.raises(ValueError):
            make_sampler(**kwargs)
    with pytest.raises(ValueError):
        make_logits_processors(repetition_penalty=0.0)


def test_repetition_penalty_by_hand():
    logits = mx.array([[2.0, -1.0, 0.5, -3.0, 4.0]])
    (penalty,) = make_logits_processors(repetition_penalty=2.0)
    out = penalty(mx.array([0, 1, 1]), logits)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0, 4.0]]
    (windowed,) = make_logits_processors(
        repetition_penalty=2.0, repetition_context_size=2
    )
    assert windowed([3, 0, 1], logits[0]).tolist() == [1.0, -2.0, 0.5, -3.0, 4.0]
    assert windowed([], logits).tolist() == logits.tolist()
    assert make_logits_processors(repetition_penalty=1.0) == []
    assert make_logits_processors() == []


def test_repetition_penalty_matches_reference(seed):
    rng = np.random.default_rng(seed)
    vocab, penalty, window = 300, float(rng.uniform(1.05, 2.0)), 20
    logits = rng.normal(0.0, 3.0, vocab).astype(np.float32)
    history = rng.integers(0, vocab, 50)
    want = logits.copy()
    for token in set(history[-window:].tolist()):  # HF RepetitionPenaltyLogitsProcessor
        want[token] = (
            want[token] * penalty if want[token] < 0 else want[token] / penalty
        )
    (processor,) = make_logits_processors(repetition_penalty=penalty)
    got = np.array(processor(mx.array(history), mx.array(logits)[None]))[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"seed={seed}")


def test_presence_and_frequency_penalties(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.0, 10).astype(np.float32)
    history = [3, 3, 7, 3, 1]
    presence, frequency = make_logits_processors(
        presence_penalty=0.5, frequency_penalty=0.25
    )
    want_presence = logits - 0.5 * np.isin(np.arange(10), history)
    want_frequency = logits - 0.25 * np.bincount(history, minlength=10)
    np.testing.assert_allclose(
        np.array(presence(history, mx.array(logits))), want_presence, rtol=1e-6
    )
    np.testing.assert_allclose(
        np.array(frequency(history, mx.array(logits))), want_frequency, rtol=1e-6
    )

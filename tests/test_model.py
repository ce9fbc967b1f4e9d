"""flash_moe's Qwen3.5-MoE / Qwen3-Next model against transformers, in float32 (issue 3 proof).

Each case builds a tiny random transformers model (tests/hf_models.py), saves it, loads the
folder with ``flash_moe.load`` and compares: full-sequence logits, prefill + chunked and
single-token cached decoding, and a 32-token greedy continuation.

Inputs are redrawn until the reference is decisive (no router near-tie, no argmax near-tie),
so a failure means a real difference, never float32 rounding picking another expert or token.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

import hf_models
from conftest import derive_seed, seed_note

import flash_moe

REL_TOL = 1e-4  # float32 vs float32; transformers' own cached-vs-full differs by ~2e-6
ROUTER_MARGIN = 1e-4  # smallest gap between the k-th and (k+1)-th router logit we accept
ARGMAX_MARGIN = 1e-3  # smallest gap between the two best logits on a greedy step

# (builder, config name, expert layout, safetensors shard size)
CASES = [
    ("qwen3_5_moe", "interval4_e8_top2", "fused", None),
    ("qwen3_5_moe_text", "explicit_types_e12_top3", "per_expert", "150KB"),
    ("qwen3_5_moe", "interval2_e16_top4", "per_expert", None),
    ("qwen3_next", "next_interval3_e16_top4", "per_expert", None),
    ("qwen3_next", "next_unnormed_e8_top3", "fused", "100KB"),
]
CONFIGS = {**hf_models.QWEN3_5_CONFIGS, **hf_models.QWEN3_NEXT_CONFIGS}


class Case:
    def __init__(self, builder, name, layout, shard, folder):
        self.name, self.layout = name, layout
        self.seed = derive_seed(name)
        self.folder, self.torch_model = hf_models.BUILDERS[builder](
            folder, CONFIGS[name], seed=self.seed, layout=layout, shard_size=shard)
        self.vocab = CONFIGS[name]["vocab_size"]
        self.model = flash_moe.load(self.folder, dtype="float32")

    def note(self, seed=None) -> str:
        return f"[{self.name}, {self.layout}] " + seed_note(self.seed if seed is None else seed)

    def reference(self, tokens: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.torch_model(input_ids=torch.from_numpy(tokens)).logits.numpy()

    def decisive_tokens(self, gen, shape) -> np.ndarray:
        """Random tokens on which no router choice is within ROUTER_MARGIN of a tie."""
        for _ in range(20):
            tokens = hf_models.random_tokens(gen, self.vocab, shape)
            if hf_models.router_margin(self.torch_model, torch.from_numpy(tokens)) > ROUTER_MARGIN:
                return tokens
        raise AssertionError(f"no decisive input in 20 draws; weights too weak {self.note()}")


@pytest.fixture(scope="module", params=CASES, ids=[c[1] for c in CASES])
def case(request, tmp_path_factory):
    builder, name, layout, shard = request.param
    return Case(builder, name, layout, shard, tmp_path_factory.mktemp(name))


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def run(model, tokens: np.ndarray, cache=None) -> np.ndarray:
    out = model(mx.array(tokens.astype(np.int32)), cache=cache)
    return np.array(out.astype(mx.float32))


def test_config(case):
    hf = case.torch_model.config.get_text_config()
    args = case.model.config
    for field in ("hidden_size", "num_hidden_layers", "vocab_size", "num_experts", "num_experts_per_tok",
                  "moe_intermediate_size", "shared_expert_intermediate_size", "head_dim"):
        assert getattr(args, field) == getattr(hf, field), f"{field} {case.note()}"
    assert list(args.layer_types) == list(hf.layer_types), case.note()


def test_full_sequence_logits(case, seed):
    gen = np.random.default_rng(seed)
    tokens = case.decisive_tokens(gen, (2, int(gen.integers(12, 21))))
    ref = case.reference(tokens)
    out = run(case.model, tokens)
    assert out.shape == ref.shape, case.note(seed)
    for b in range(tokens.shape[0]):
        err = rel_err(out[b], ref[b])
        assert err <= REL_TOL, f"batch row {b}: relative error {err:.2e} {case.note(seed)}"


def test_cached_decode(case, seed):
    """Prefill, then a multi-token chunk, then 16 single tokens, all through one cache."""
    gen = np.random.default_rng(seed)
    prefill, chunk, steps = int(gen.integers(3, 8)), int(gen.integers(2, 7)), 16
    tokens = case.decisive_tokens(gen, (2, prefill + chunk + steps))
    ref = case.reference(tokens)
    cache = case.model.make_cache()
    bounds = [0, prefill, prefill + chunk] + list(range(prefill + chunk + 1, tokens.shape[1] + 1))
    for start, end in zip(bounds, bounds[1:]):
        out = run(case.model, tokens[:, start:end], cache)
        err = rel_err(out, ref[:, start:end])
        assert err <= REL_TOL, (
            f"positions {start}..{end - 1} (prefill {prefill}, chunk {chunk}): "
            f"relative error {err:.2e} {case.note(seed)}")


def flash_greedy(model, prompt: np.ndarray, n: int) -> list[int]:
    cache = model.make_cache()
    logits = model(mx.array(prompt.astype(np.int32)), cache=cache)
    out = []
    for _ in range(n):
        token = mx.argmax(logits[:, -1], axis=-1)
        out.append(int(token.item()))
        logits = model(token.reshape(1, 1).astype(mx.int32), cache=cache)
    return out


def test_greedy_continuation(case, seed):
    gen = np.random.default_rng(seed)
    for _ in range(20):
        prompt = case.decisive_tokens(gen, (1, int(gen.integers(4, 10))))
        with torch.no_grad():
            ids = torch.from_numpy(prompt)
            # an explicit mask: otherwise generate() takes prompt tokens equal to pad_token_id for padding
            full = case.torch_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                do_sample=False, pad_token_id=0).numpy()
        logits = case.reference(full[:, :-1])[0, prompt.shape[1] - 1:]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        if (top2[:, 1] - top2[:, 0]).min() > ARGMAX_MARGIN and \
                hf_models.router_margin(case.torch_model, torch.from_numpy(full)) > ROUTER_MARGIN:
            break
    else:
        raise AssertionError(f"no decisive greedy run in 20 prompts {case.note(seed)}")
    expected = full[0, prompt.shape[1]:].tolist()
    assert logits.argmax(-1).tolist() == expected, "transformers' generate() is not greedy " + case.note(seed)
    got = flash_greedy(case.model, prompt, 32)
    first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    assert got == expected, f"first difference at step {first}: {got} vs {expected} {case.note(seed)}"


def test_reference_is_sound(case, seed):
    """The fixture itself: transformers reloads the rewritten folder to the same logits, and its
    cached decoding matches its full forward (the floor our own cache test stands on)."""
    from transformers import AutoModelForCausalLM, Qwen3_5MoeForConditionalGeneration

    tokens = case.decisive_tokens(np.random.default_rng(seed), (2, 14))
    ref = case.reference(tokens)
    composite = case.torch_model.config.model_type == "qwen3_5_moe"
    cls = Qwen3_5MoeForConditionalGeneration if composite else AutoModelForCausalLM
    reloaded = cls.from_pretrained(case.folder, dtype=torch.float32)
    assert hf_models.expert_layout(case.folder) == case.layout
    with torch.no_grad():
        again = reloaded(input_ids=torch.from_numpy(tokens)).logits.numpy()
        assert rel_err(again, ref) <= 1e-5, case.note(seed)
        out = reloaded(input_ids=torch.from_numpy(tokens[:, :6]), use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for i in range(6, tokens.shape[1]):
            out = reloaded(input_ids=torch.from_numpy(tokens[:, i:i + 1]), past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert rel_err(torch.cat(steps, 1).numpy(), ref) <= 1e-5, case.note(seed)


BF16_CASES = [("qwen3_5_moe", "interval4_e8_top2"), ("qwen3_next", "next_unnormed_e8_top3")]


def bf16_checkpoint(tmp_path, seed, builder, name):
    folder, reference = hf_models.BUILDERS[builder](
        tmp_path, CONFIGS[name], seed=seed, layout="fused", save_dtype=torch.bfloat16)
    gen = np.random.default_rng(seed)
    for _ in range(20):
        tokens = hf_models.random_tokens(gen, CONFIGS[name]["vocab_size"], (2, 12))
        if hf_models.router_margin(reference, torch.from_numpy(tokens)) > ROUTER_MARGIN:
            break
    with torch.no_grad():
        ref = reference(input_ids=torch.from_numpy(tokens)).logits.numpy()
    return folder, tokens, ref


@pytest.mark.parametrize("builder,name", BF16_CASES)
def test_bfloat16_checkpoint_in_float32(tmp_path, seed, builder, name):
    """dtype float32 (str or mx.Dtype) on a bfloat16 checkpoint computes exactly on the stored values
    (the reference holds the same bfloat16-rounded weights, in float32)."""
    folder, tokens, ref = bf16_checkpoint(tmp_path, seed, builder, name)
    for dtype in ("float32", mx.float32):
        err = rel_err(run(flash_moe.load(folder, dtype=dtype), tokens), ref)
        assert err <= REL_TOL, f"dtype {dtype}: relative error {err:.2e} " + seed_note(seed)


@pytest.mark.parametrize("builder,name", BF16_CASES)
def test_bfloat16_checkpoint_kept(tmp_path, seed, builder, name):
    """dtype None keeps bfloat16. Only a loose check: bfloat16 rounding flips some expert choices
    of a tiny random model (transformers' own bfloat16 run is off by up to ~0.15); a wrong model is ~1."""
    folder, tokens, ref = bf16_checkpoint(tmp_path, seed, builder, name)
    out = flash_moe.load(folder)(mx.array(tokens.astype(np.int32)))
    assert out.dtype == mx.bfloat16, seed_note(seed)
    err = rel_err(np.array(out.astype(mx.float32)), ref)
    assert err <= 0.35, f"relative error {err:.2e} " + seed_note(seed)

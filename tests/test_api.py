"""The public API as an mlx-lm user writes it (issue 13, item 4) and the context-length notice (item 5), on the
shipped demo model: top-level callables, both call shapes, mlx-lm's argument names beside ours, ``verbose``,
``make_sampler``'s shape, and a prompt longer than ``max_position_embeddings``.
"""

from __future__ import annotations

import importlib
import random
import warnings

import mlx.core as mx
import numpy as np
import pytest

from conftest import seed_note

import flash_moe
from flash_moe import GenerationResponse, convert, generate, load, make_sampler, stream_generate
from flash_moe.generation import ContextLengthWarning
from flash_moe.sample import apply_min_p

PROMPTS = ["def main", "import os\n", "class Parser(", 'def read(self, path):\n    """']


def test_top_level_names_are_the_callables():
    assert callable(generate) and callable(stream_generate) and callable(convert) and callable(load)
    assert generate is importlib.import_module("flash_moe.generation").generate
    assert isinstance(GenerationResponse, type) and callable(make_sampler)
    assert set(flash_moe.__all__) >= {"load", "generate", "stream_generate", "convert", "make_sampler", "GenerationResponse"}
    assert flash_moe.generate is generate  # the function: its module is flash_moe.generation


def test_both_call_shapes_give_the_same_text(demo, demo_folder, seed):
    rng = random.Random(seed)
    prompt, n = rng.choice(PROMPTS), rng.randint(6, 16)
    want = demo.generate(prompt, max_tokens=n)
    model, tokenizer = load(demo_folder)  # mlx-lm's unpacking
    assert tokenizer is model.tokenizer
    forms = [generate(model, prompt, max_tokens=n), generate(model, tokenizer, prompt, max_tokens=n),
             generate(model, tokenizer, prompt=prompt, max_tokens=n), generate(model, prompt=prompt, max_tokens=n),
             generate(model, prompt=prompt, tokenizer=tokenizer, max_tokens=n),
             "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=n)),
             "".join(r.text for r in stream_generate(model, prompt, max_tokens=n))]
    assert forms == [want] * len(forms), f"prompt {prompt!r} {seed_note(seed)}"
    model.close()


def test_a_transformers_tokenizer_works_in_its_place(demo):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(demo.path, local_files_only=True)
    messages = [{"role": "user", "content": "write a loop"}]
    for prompt in ("def main", messages):
        ours = generate(demo, prompt, max_tokens=8, enable_thinking=False)
        theirs = generate(demo, ref, prompt, max_tokens=8, enable_thinking=False)
        assert theirs == ours and theirs.response.prompt_tokens == ours.response.prompt_tokens, prompt


@pytest.mark.parametrize("args,kwargs,message", [
    ((), {}, "needs a prompt"),
    (("def", "main"), {}, "expected a tokenizer"),
    (("a", "b", "c"), {}, r"takes \(model, prompt\) or \(model, tokenizer, prompt\)"),
    (("def",), {"prompt": "x", "tokenizer": "y"}, "tokenizer twice"),
])
def test_call_shape_errors(demo, args, kwargs, message):
    with pytest.raises(TypeError, match=message):
        generate(demo, *args, **kwargs)


def test_sampler_and_our_sampling_names_agree(demo, seed):
    rng = random.Random(seed)
    prompt = rng.choice(PROMPTS)
    ours = generate(demo, prompt, max_tokens=12, temperature=0.9, top_p=0.9, top_k=30, seed=seed)
    assert generate(demo, demo.tokenizer, prompt, max_tokens=12, seed=seed,
                    sampler=make_sampler(temp=0.9, top_p=0.9, top_k=30)) == ours, seed_note(seed)
    assert generate(demo, prompt, max_tokens=12, temp=0.9, top_p=0.9, top_k=30, seed=seed) == ours, seed_note(seed)
    # an mlx-lm sampler takes the log-probabilities alone
    greedy = generate(demo, prompt, max_tokens=12, sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
    assert greedy == generate(demo, prompt, max_tokens=12), seed_note(seed)
    with pytest.raises(ValueError, match="either sampler= or temperature"):
        generate(demo, prompt, sampler=make_sampler(), temperature=0.5)
    with pytest.raises(TypeError, match="both temp and temperature"):
        generate(demo, prompt, temp=0.5, temperature=0.5)
    with pytest.raises(ValueError, match="max_tokens must be a non-negative integer"):
        generate(demo, prompt, max_tokens=-1)


def test_logits_processors_in_mlx_lm_form(demo, seed):
    """mlx-lm's processors index logits as [1, V]; one banning the greedy continuation's tokens changes it."""
    prompt = random.Random(seed).choice(PROMPTS)
    first = [r.token for r in stream_generate(demo, prompt, max_tokens=6)]
    shapes = []

    def ban(tokens, logits):
        shapes.append(logits.shape)
        mask = mx.zeros(logits.shape[-1], mx.bool_).at[mx.array(first)].add(True)
        return mx.where(mask[None], -mx.inf, logits)

    out = [r.token for r in stream_generate(demo, prompt, max_tokens=6, logits_processors=[ban])]
    assert not set(out) & set(first) and set(shapes) == {(1, demo.config.vocab_size)}, seed_note(seed)
    # with repetition_penalty as well: both apply
    both = [r.token for r in stream_generate(demo, prompt, max_tokens=6, logits_processors=[ban], repetition_penalty=1.3)]
    assert not set(both) & set(first)


def test_verbose_prints_text_and_stats(demo, capsys):
    out = generate(demo, "def main", max_tokens=5, verbose=True)
    printed = capsys.readouterr().out
    assert printed.startswith(out + "\n") and "prompt: 2 tokens" in printed and "generation: 5 tokens" in printed
    assert "peak memory" in printed
    generate(demo, "def main", max_tokens=5)
    assert capsys.readouterr().out == ""


def test_make_sampler_is_shaped_like_mlx_lm(seed):
    logits = mx.array(np.random.default_rng(seed).normal(size=(1, 64)).astype(np.float32))
    key = mx.random.key(seed)
    a = make_sampler(0.7, 0.9, min_p=0.05, min_tokens_to_keep=2, top_k=10)
    b = make_sampler(temperature=0.7, top_p=0.9, min_p=0.05, min_tokens_to_keep=2, top_k=10)
    assert a(logits, key).item() == b(logits, key).item()
    a(logits)  # the key is optional, as mlx-lm's sampler takes the logits alone
    with pytest.raises(TypeError):  # the old positional order (temperature, top_p, top_k, min_p) fails loudly
        make_sampler(0.7, 0.9, 10, 0.05)
    # min_tokens_to_keep: min-p keeps at least that many tokens
    kept = np.isfinite(np.array(apply_min_p(logits, 0.99, 5))).sum()
    assert kept == 5 and np.isfinite(np.array(apply_min_p(logits, 0.99))).sum() < 5, seed_note(seed)
    with pytest.raises(ValueError, match="min_tokens_to_keep"):
        make_sampler(0.5, min_tokens_to_keep=0)


# ---- context length ----------------------------------------------------------------------------------------


def test_context_length_warns_once_with_both_numbers(demo, monkeypatch):
    assert demo.config.max_position_embeddings == 4096  # read from config.json
    monkeypatch.setattr(demo.config, "max_position_embeddings", 12)
    ids = demo.tokenizer.encode("def main(argv):\n    return parse(argv) or 0\n")
    assert len(ids) > 12
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(demo, ids, max_tokens=3)
        generate(demo, ids[:12], max_tokens=3)  # at the limit: quiet
    assert [w.category for w in caught] == [ContextLengthWarning], [str(w.message) for w in caught]
    assert f"{len(ids)} tokens" in str(caught[0].message) and "12" in str(caught[0].message)
    with pytest.raises(ValueError, match=f"the prompt has {len(ids)} tokens, more than the 12"):
        generate(demo, ids, max_tokens=3, strict_context=True)
    monkeypatch.setattr(demo.config, "max_position_embeddings", None)  # absent from config.json: no check
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(demo, ids, max_tokens=1, strict_context=True)


def test_transformers_long_sequence_warning_is_silenced(demo, capfd):
    """transformers' "Token indices sequence length is longer..." is not shown; flash_moe's own notice is."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(demo.path, local_files_only=True)
    text = "x = 1\n" * 3000  # > 4096 tokens, the tokenizer's model_max_length
    with pytest.raises(ValueError, match="more than the 4096"):
        generate(demo, ref, text, strict_context=True)
    assert "Token indices sequence length" not in capfd.readouterr().err

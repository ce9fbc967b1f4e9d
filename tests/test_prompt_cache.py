"""The prompt cache (issue 13 item 1): a cached turn gives the logits of processing the whole history fresh.

Random tiny float32 models, hybrid (3 GatedDeltaNet layers + 1 attention), loaded both resident (a
transformers checkpoint) and streamed (converted at 16 bits): turn 1 runs with a cache, turn 2 extends it,
diverges inside it (back to a checkpoint), resets, or repeats it exactly; the first logprobs of turn 2 must
equal a fresh run over the same ids to 1e-5 relative, and the cache must process exactly the tokens it
claims it does not hold.
"""

from __future__ import annotations

import numpy as np
import mlx.core as mx
import pytest

import hf_models
from conftest import derive_seed, seed_note

from flash_moe import load, load_prompt_cache, make_prompt_cache, save_prompt_cache
from flash_moe.cache import ArraysCache
from flash_moe.convert import convert
from flash_moe.files import CheckpointError
from flash_moe.generation import generate_step

CONFIG = dict(hf_models.QWEN3_5_CONFIGS["interval4_e8_top2"], hidden_size=128, num_experts=16,
              num_experts_per_tok=4, moe_intermediate_size=64, shared_expert_intermediate_size=64)
VOCAB = CONFIG["vocab_size"]
TOL = 1e-5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    seed = derive_seed("test_prompt_cache.folders")
    hf, _ = hf_models.qwen3_5_moe_text(tmp_path_factory.mktemp("hf"), CONFIG, seed=seed)
    conv = convert(hf, tmp_path_factory.mktemp("conv"), bits=16, dtype="float32", progress=False)
    return {"resident": hf, "streamed": conv}


@pytest.fixture(scope="module", params=["resident", "streamed", "speculating"])
def model(request, folders):
    """``speculating``: streamed through a device expert cache of 56 of the 64 experts, every
    one-token step a bet (``Speculation.step``): lost bets restore the layer caches."""
    if request.param == "speculating":
        m = load(folders["streamed"], cache_experts=56)
        m.cache.should_speculate = lambda: True
    else:
        m = load(folders[request.param])
    yield m
    if request.param == "speculating":
        totals = m.cache.totals()
        assert totals["speculated"] > totals["voided"] > 0, totals  # bets both held and lost
    m.close()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run(model, ids, cache=None, max_tokens=4, **kwargs):
    """(generated ids, first logprobs, processed) of a greedy generation of ``ids``."""
    before = cache.reusable(ids) if cache is not None else 0
    steps = list(generate_step(mx.array(ids, mx.int32), model, max_tokens=max_tokens, prompt_cache=cache, **kwargs))
    return [t for t, _ in steps], np.array(steps[0][1]), len(ids) - before


def tokens(rng, n) -> list[int]:
    return rng.integers(0, VOCAB, n).tolist()


def check_turn(model, cache, ids, *, reused: int, seed: int, label: str):
    """Turn 2 through the cache reuses exactly ``reused`` tokens and matches a fresh run."""
    assert cache.reusable(ids) == reused, (label, cache, seed_note(seed))
    got, first, processed = run(model, ids, cache)
    want, fresh, _ = run(model, ids)
    err = rel_err(first, fresh)
    assert err <= TOL and got == want, (label, err, seed_note(seed))
    assert cache.tokens == ids + got[:-1], (label, seed_note(seed))  # the last sampled token is not processed
    assert all(c.offset == len(cache.tokens) for c in cache.layers), label
    return got


def turn_one(model, rng, history=12, tail=6):
    """A first turn with a checkpoint where its 'history' ends (as chat's template boundary gives)."""
    cache = make_prompt_cache(model)
    ids = tokens(rng, history + tail)
    got, _, processed = run(model, ids, cache, checkpoint_at=(history,))
    assert processed == len(ids) and [c.length for c in cache.checkpoints] == [history, len(ids) - 1]
    return cache, ids, got


def test_continuation(model, seed):
    rng = np.random.default_rng(seed)
    cache, ids, got = turn_one(model, rng)
    second = ids + got + tokens(rng, 7)
    check_turn(model, cache, second, reused=len(ids) + len(got) - 1, seed=seed, label="extends")
    third = cache.tokens + tokens(rng, 3)  # and again, from the state after turn 2's reply
    check_turn(model, cache, third, reused=len(cache.tokens), seed=seed, label="extends twice")


def test_diverging_retemplate(model, seed):
    """Turn 2 differs a few tokens before turn 1's end (the template drops the generation prompt's
    thinking block): back to the checkpoint at the history end; past it KV is dead and overwritten."""
    rng = np.random.default_rng(seed)
    cache, ids, got = turn_one(model, rng, history=12, tail=6)
    second = ids[:14] + [(ids[14] + 1) % VOCAB] + tokens(rng, 9)
    check_turn(model, cache, second, reused=12, seed=seed, label="diverges after the checkpoint")
    assert [c.length for c in cache.checkpoints] == [12, len(second) - 1], "the old path's checkpoints are gone"
    inside = second[:5] + [(second[5] + 1) % VOCAB] + tokens(rng, 4)
    check_turn(model, cache, inside, reused=0, seed=seed, label="diverges before any checkpoint")


def test_reset(model, seed):
    rng = np.random.default_rng(seed)
    cache, ids, _ = turn_one(model, rng)
    other = [(ids[0] + 1) % VOCAB] + tokens(rng, 10)
    check_turn(model, cache, other, reused=0, seed=seed, label="reset")


def test_prompt_equal_to_cached_ids(model, seed):
    """At least one token is processed for logits: the same prompt again reuses all but its last token
    (the checkpoint at the prompt's end), and the cached ids as a prompt fall back to that checkpoint too."""
    rng = np.random.default_rng(seed)
    cache, ids, got = turn_one(model, rng)
    check_turn(model, cache, list(ids), reused=len(ids) - 1, seed=seed, label="the same prompt")
    check_turn(model, cache, list(cache.tokens), reused=len(ids) - 1, seed=seed, label="the cached ids")


def test_random_conversation(model, seed):
    """Ten prompts, each an extension, a cut-and-diverge at a random point, the same ids, or something new,
    with random checkpoint marks and a bound of 3 checkpoints: every turn equals a fresh run, and reuses
    exactly the longest checkpoint (or the whole cache) at or before where it diverges."""
    rng = np.random.default_rng(seed)
    cache = make_prompt_cache(model, max_checkpoints=3)
    for turn in range(10):
        held = cache.tokens
        kind = rng.choice(["extend", "diverge", "same", "new"]) if held else "new"
        if kind == "extend":
            ids = held + tokens(rng, int(rng.integers(1, 9)))
        elif kind == "diverge":
            at = int(rng.integers(0, len(held)))
            ids = held[:at] + [(held[at] + 1) % VOCAB] + tokens(rng, int(rng.integers(0, 6)))
        elif kind == "same":
            ids = list(held)
        else:
            ids = tokens(rng, int(rng.integers(2, 20)))
        common = next((i for i, (a, b) in enumerate(zip(held, ids)) if a != b), min(len(held), len(ids)))
        limit = min(common, len(ids) - 1)
        want = limit if limit == len(held) else max((c.length for c in cache.checkpoints if c.length <= limit), default=0)
        mark = int(rng.integers(1, len(ids))) if len(ids) > 1 else 1  # a one-token prompt has no inner position
        assert cache.reusable(ids) == want, (turn, kind, seed_note(seed))
        got, first, _ = run(model, ids, cache, max_tokens=int(rng.integers(1, 4)), checkpoint_at=(mark,))
        fresh = run(model, ids, max_tokens=1)[1]
        assert rel_err(first, fresh) <= TOL, (turn, kind, seed_note(seed))
        assert cache.tokens == ids + got[:-1] and len(cache.checkpoints) <= 3, (turn, kind)


def test_interrupted_forward_is_noticed(model, seed):
    """A forward pass that did not finish (Ctrl-C, or a direct model call) leaves layers ahead of
    ``tokens``: the next prompt restarts from a checkpoint instead of using the torn state."""
    rng = np.random.default_rng(seed)
    cache, ids, got = turn_one(model, rng)
    model(mx.array(tokens(rng, 3), mx.int32)[None], cache.layers)
    check_turn(model, cache, cache.tokens + tokens(rng, 2), reused=len(ids) - 1, seed=seed, label="torn")


def test_snapshot_survives_later_writes(model, seed):
    """KVCache writes with slice assignment and GDN layers replace their state: later tokens (growing the KV
    buffers, writing over KV positions after a restore) must leave a checkpoint as it was."""
    rng = np.random.default_rng(seed)
    cache, ids, got = turn_one(model, rng)
    mark = cache.checkpoints[-1]
    saved = [[np.array(a) for a in s] if s else None for s in mark.states]
    run(model, cache.tokens + tokens(rng, 300), cache, max_tokens=2)  # past the KV step of 256
    check_turn(model, cache, ids + [(got[0] + 1) % VOCAB] + tokens(rng, 3), reused=len(ids) - 1, seed=seed,
               label="back over written KV")
    assert mark in cache.checkpoints
    for s, now in zip(saved, mark.states):
        for x, y in zip(s or (), now or ()):
            assert np.array_equal(x, np.array(y)), seed_note(seed)
    check_turn(model, cache, ids + [(got[0] + 2) % VOCAB], reused=len(ids) - 1, seed=seed, label="and again")


def test_checkpoints_bounded_and_counted(model, seed):
    rng = np.random.default_rng(seed)
    cache = make_prompt_cache(model, max_checkpoints=2)
    ids = tokens(rng, 5)
    for _ in range(4):
        got, _, _ = run(model, ids, cache, max_tokens=2)
        ids = ids + got + tokens(rng, 3)
    assert len(cache.checkpoints) == 2 and cache.checkpoints[0].length < cache.checkpoints[1].length
    a = model.config
    gdn, conv = sum(isinstance(c, ArraysCache) for c in cache.layers), a.linear_conv_kernel_dim - 1
    conv_dim = 2 * a.linear_num_key_heads * a.linear_key_head_dim + a.linear_num_value_heads * a.linear_value_head_dim
    per_layer = 4 * (conv * conv_dim + a.linear_num_value_heads * a.linear_value_head_dim * a.linear_key_head_dim)
    assert cache.checkpoints[0].nbytes == gdn * per_layer
    assert cache.checkpoint_nbytes == 2 * gdn * per_layer  # neither is the live state after more tokens
    assert cache.nbytes == cache.state_nbytes + cache.checkpoint_nbytes > 2 * gdn * per_layer
    none = make_prompt_cache(model, max_checkpoints=0)
    run(model, ids, none)
    assert none.checkpoints == [] and none.checkpoint_nbytes == 0


def test_save_load_round_trip(model, seed, tmp_path):
    rng = np.random.default_rng(seed)
    cache, ids, got = turn_one(model, rng)
    path = tmp_path / "cache.safetensors"
    save_prompt_cache(path, cache, model, metadata={"note": "hi"})
    loaded, info = load_prompt_cache(path, model, return_metadata=True)
    assert info["note"] == "hi" and loaded.tokens == cache.tokens and not path.with_name(path.name + ".tmp").exists()
    assert [c.length for c in loaded.checkpoints] == [c.length for c in cache.checkpoints]
    assert loaded.nbytes > 0 and loaded.checkpoint_nbytes == cache.checkpoint_nbytes
    turn = cache.tokens + tokens(rng, 5)
    want, first_saved, _ = run(model, turn, cache)
    got2 = check_turn(model, loaded, turn, reused=len(turn) - 5, seed=seed, label="loaded, extends")
    assert got2 == want and rel_err(run(model, turn, load_prompt_cache(path, model))[1], first_saved) <= TOL
    check_turn(model, load_prompt_cache(path, model), ids[:13] + tokens(rng, 4), reused=12, seed=seed,
               label="loaded, back to a checkpoint")


def test_load_into_another_model_refused(folders, tmp_path, seed):
    rng = np.random.default_rng(seed)
    resident, streamed = load(folders["resident"]), load(folders["streamed"])
    cache = make_prompt_cache(resident)
    run(resident, tokens(rng, 6), cache)
    path = tmp_path / "c.safetensors"
    save_prompt_cache(path, cache, resident)
    with pytest.raises(CheckpointError, match="another model") as e:
        load_prompt_cache(path, streamed)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    other = hf_models.qwen3_5_moe_text(tmp_path / "other", dict(CONFIG, num_hidden_layers=8), seed=seed)[0]
    with pytest.raises(CheckpointError, match="num_hidden_layers 4 vs 8"):
        load_prompt_cache(path, load(other))
    half = load(folders["resident"], dtype="bfloat16")
    with pytest.raises(CheckpointError, match="dtype 'float32' vs 'bfloat16'"):
        load_prompt_cache(path, half)
    arrays, info = mx.load(str(path), return_metadata=True)
    del arrays["layers.0.recurrent"]
    mx.save_safetensors(str(tmp_path / "damaged.safetensors"), arrays, info)
    with pytest.raises(CheckpointError, match="layers.0.conv / .recurrent missing"):
        load_prompt_cache(tmp_path / "damaged.safetensors", resident)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_prompt_cache(tmp_path / "junk.safetensors", resident)
    streamed.close()


# ---- through stream_generate and the CLI, on the demo model (its real chat template) ---------------------


@pytest.fixture(scope="module")
def demo32(demo_folder):
    m = load(demo_folder, dtype="float32")
    yield m
    m.close()


def test_chat_turn_restarts_at_the_history_end(demo32, seed):
    """The template renders turn 1's reply without the generation prompt's ``<think>\\n\\n</think>``: turn 2
    diverges inside the cached ids, at the checkpoint stream_generate put where turn 1's history ended."""
    rng = np.random.default_rng(seed)
    words = lambda n: " ".join(rng.choice(["apple", "river", "seven", "blue", "code", "moon"], n))
    messages = [{"role": "system", "content": words(5)}, {"role": "user", "content": words(6)}]
    tok, cache = demo32.tokenizer, demo32.make_prompt_cache()
    first = list(demo32.stream_generate(messages, max_tokens=6, enable_thinking=False, prompt_cache=cache))
    assert first[-1].cached_tokens == 0 and first[-1].prompt_tokens == len(cache.tokens) - len(first) + 1
    history = len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False),
                             add_special_tokens=False))
    messages += [{"role": "assistant", "content": "".join(r.content for r in first)},
                 {"role": "user", "content": words(4)}]
    second = list(demo32.stream_generate(messages, max_tokens=6, enable_thinking=False, prompt_cache=cache))
    fresh = list(demo32.stream_generate(messages, max_tokens=6, enable_thinking=False))
    assert second[0].cached_tokens == history, (history, cache, seed_note(seed))
    assert [r.token for r in second] == [r.token for r in fresh]
    assert rel_err(second[0].logprobs, fresh[0].logprobs) <= TOL, seed_note(seed)


def test_cache_prompt_command(demo, demo_folder, tmp_path, capsys, seed):
    from flash_moe.cli import main

    rng = np.random.default_rng(seed)
    doc = "Notes: " + " ".join(rng.choice(["alpha", "beta", "gamma", "delta"], 12)) + ". Question: "
    out = tmp_path / "doc.safetensors"
    main(["cache-prompt", "--model", str(demo_folder), "--prompt", doc, "--out", str(out)])
    cache, info = load_prompt_cache(out, demo, return_metadata=True)
    n = len(cache.tokens)
    assert capsys.readouterr().out == f"{out}: {n} prompt tokens cached ({cache.nbytes / 2**20:.1f} MiB)\n"
    assert info["prompt"] == doc and demo.tokenizer.decode(cache.tokens).endswith(doc.strip())
    main(["generate", "--model", str(demo_folder), "--prompt-cache", str(out), "--prompt", "why?", "--max-tokens", "6"])
    run = capsys.readouterr()
    # The same text as without the cache (then, if the demo started a tool call, the CLI's line about it).
    assert run.out.startswith(demo.generate(doc + "why?", chat=True, max_tokens=6) + "\n"), run.out
    assert f"tokens ({n} cached)" in run.err, run.err
    generate = ["generate", "--model", str(demo_folder), "--prompt", "x"]
    for flags, error in ((["--prompt-cache", str(out), "--raw"], "--raw: .* was cached with the chat template"),
                         (["--prompt-cache", str(tmp_path / "nope")], "--prompt-cache: .*nope: no such file"),
                         (["--prompt-cache", str(out), "--k", "2"], "--prompt-cache: .*another model")):
        with pytest.raises(SystemExit, match=error):
            main(generate + flags)
    with pytest.raises(SystemExit, match="--out: cannot write"):
        main(["cache-prompt", "--model", str(demo_folder), "--prompt", "x", "--out", str(tmp_path / "no" / "f")])

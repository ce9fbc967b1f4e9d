"""Generation on the shipped demo model (issue 5 proof): generate == stream, sampling, stop, eos, chat template,
response fields, tool calls, timing.

The demo checkpoint is built once into a temporary FLASH_MOE_HOME and loaded with streamed experts. A
3M-parameter model writes no tool calls, so those tests script its reply: ``generate_step`` is replaced by one
that yields the token ids of a given text, and everything after it (detokenizer, stop strings, eos, parser,
chat template) runs as usual.
"""

from __future__ import annotations

import json
import math
import random
import string
import time

import mlx.core as mx
import pytest

from conftest import seed_note

import flash_moe.generation as gen
from flash_moe import load
from flash_moe.layout import ModelLayout
from flash_moe.timing import PHASES, PhaseTimer
from flash_moe.tool_calls import ToolCall, ToolCallError, format_tool_calls_openai, parse_tool_call

IM_END, ENDOFTEXT = "<|im_end|>", "<|endoftext|>"
# Starts of code lines; the model may also end the document (<|endoftext|>) after a few tokens.
CODE_STARTS = ["def {}(", "class {}(", "for i in range({}", "    return {}(", "if not {}", "from os import {}, "]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]


def code_prompt(rng: random.Random) -> str:
    name = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 6)))
    return rng.choice(CODE_STARTS).format(name)


def docstring_prompt(rng: random.Random) -> str:
    """The model answers an open docstring with words ("Return a list of ..."): tokens of several characters."""
    args = ", ".join(["self"] + [word(rng) for _ in range(rng.randint(0, 2))])
    return f'def {word(rng)}({args}):\n    """'


def word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))


def spy(monkeypatch) -> dict:
    """Record the prompt ids and tokens of each generate_step run (the real one still runs)."""
    real, seen = gen.generate_step, {"prompts": [], "tokens": []}

    def recording(prompt, model, **kwargs):
        seen["prompts"].append(prompt.tolist())
        seen["tokens"].append(tokens := [])
        for token, logprobs in real(prompt, model, **kwargs):
            tokens.append(token)
            yield token, logprobs

    monkeypatch.setattr(gen, "generate_step", recording)
    return seen


class Script:
    """Stands in for generate_step: each run 'writes' the next scripted reply, token by token. A text reply
    ends with <|im_end|> as a model's turn does; token ids are written as given."""

    def __init__(self, tokenizer, replies):
        self.replies = []
        for reply in replies:
            if isinstance(reply, str):
                ids = tokenizer.encode(reply, add_special_tokens=False)
                assert tokenizer.decode(ids, skip_special_tokens=False) == reply
                reply = ids + [token_id(tokenizer, IM_END)]
            self.replies.append(reply)
        self.prompts = []

    def __call__(self, prompt, model, *, max_tokens=256, **kwargs):
        self.prompts.append(prompt.tolist())
        vocab = model.config.vocab_size
        for token in self.replies.pop(0)[:max_tokens]:
            yield token, mx.full((vocab,), -math.log(vocab))


def script(monkeypatch, tokenizer, *replies) -> Script:
    fake = Script(tokenizer, list(replies))
    monkeypatch.setattr(gen, "generate_step", fake)
    return fake


def token_id(tokenizer, text: str) -> int:
    return tokenizer.convert_tokens_to_ids(text)


# ---- generate == stream, sampling ------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_p": 0.9, "top_k": 40}])
def test_generate_equals_stream(demo, seed, monkeypatch, sampling):
    rng = random.Random(seed)
    prompt, n = code_prompt(rng), rng.randint(8, 24)
    seen = spy(monkeypatch)
    text = demo.generate(prompt, max_tokens=n, seed=seed, **sampling)
    stream = list(demo.stream_generate(prompt, max_tokens=n, seed=seed, **sampling))
    note = f"prompt {prompt!r} {seed_note(seed)}"
    assert seen["tokens"][0] == [r.token for r in stream] == seen["tokens"][1], note
    assert text == "".join(r.text for r in stream), note
    assert text.finish_reason == stream[-1].finish_reason and text.response.generation_tokens == len(stream), note
    eos = gen.eos_token_ids(demo, demo.tokenizer)
    assert text == demo.tokenizer.decode([t for t in seen["tokens"][0] if t not in eos]), note


def test_decode_matches_uncached_forward(demo_folder, seed):
    """Each step's logprobs (prefill in chunks of 1, 3 or 512, then cached decode) equal those of one
    uncached forward over prompt + generated tokens; greedy picks their argmax."""
    model = load(demo_folder, dtype="float32")
    rng = random.Random(seed)
    ids = [rng.randrange(4087) for _ in range(rng.randint(2, 30))]  # below the special tokens
    runs = []
    for step in (1, 3, 512):
        stream = list(model.stream_generate(ids, max_tokens=10, prefill_step_size=step))
        tokens = [r.token for r in stream]
        logits = model(mx.array(ids + tokens[:-1], mx.int32))[0].astype(mx.float32)
        ref = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for i, r in enumerate(stream):
            err = mx.abs(ref[len(ids) - 1 + i] - r.logprobs).max().item()
            assert err < 1e-4, f"step {i}, prefill chunks of {step}: logprob error {err} {seed_note(seed)}"
            assert r.token == mx.argmax(r.logprobs).item()
        runs.append(tokens)
    assert runs[0] == runs[1] == runs[2], seed_note(seed)
    model.close()


def test_seeded_sampling(demo, seed):
    rng = random.Random(seed)
    prompt, k = docstring_prompt(rng), rng.randint(5, 40)
    kwargs = dict(max_tokens=24, temperature=1.0, top_k=k, top_p=0.8)
    runs = {s: list(demo.stream_generate(prompt, seed=s, **kwargs)) for s in (seed, seed + 1, seed + 2)}
    again = demo.generate(prompt, seed=seed, **kwargs)
    texts = {s: "".join(r.text for r in rs) for s, rs in runs.items()}
    note = f"prompt {prompt!r} {seed_note(seed)}"
    assert again == texts[seed], note
    assert texts[seed + 1] != texts[seed] and texts[seed + 2] != texts[seed], note
    for rs in runs.values():
        for r in rs:  # inside the top k, and inside the nucleus: less than top_p of the top-k mass lies above it
            above = r.logprobs > r.logprobs[r.token]
            assert above.sum().item() < k, note
            in_top_k = r.logprobs >= mx.topk(r.logprobs, k).min()  # ties with the k-th are kept
            probs = mx.exp(r.logprobs)
            mass_above = mx.where(above, probs, 0).sum() / mx.where(in_top_k, probs, 0).sum()
            assert mass_above.item() < kwargs["top_p"] + 1e-5, note


def test_greedy_is_deterministic(demo, seed):
    prompt = code_prompt(random.Random(seed))
    a = list(demo.stream_generate(prompt, max_tokens=16, seed=seed))
    b = list(demo.stream_generate(prompt, max_tokens=16, seed=seed + 1))
    assert [r.token for r in a] == [r.token for r in b], seed_note(seed)
    assert all(r.token == mx.argmax(r.logprobs).item() for r in a), seed_note(seed)


# ---- stop strings, max_tokens, eos -----------------------------------------------------------------------


def expected_stop(pieces: list[str], stops: list[str]) -> tuple[str, int]:
    """The text and token count at which generation must end: the first token after which a stop string
    is in the text, cut where the earliest stop string starts."""
    for k in range(1, len(pieces) + 1):
        text = "".join(pieces[:k])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[: min(hits)], k
    raise AssertionError("no stop string in the text")


def test_stop_strings(demo, seed):
    rng = random.Random(seed)
    prompt = docstring_prompt(rng)
    free = list(demo.stream_generate(prompt, max_tokens=24))
    pieces = [r.text for r in free]
    full = "".join(pieces)
    ends = [len("".join(pieces[: j + 1])) for j in range(len(pieces))]

    def across(j):  # the last character of token j and the start of token j + 1
        return pieces[j][-1] + pieces[j + 1][:2]

    # j whose stop string starts inside token j (so token j must not be shown whole) and first occurs there
    spans = [j for j in range(1, len(pieces) - 1) if len(pieces[j]) >= 2 and pieces[j + 1].strip()
             and full.find(across(j)) == ends[j] - 1]
    assert spans, f"no stop string spanning two tokens in {pieces} {seed_note(seed)}"
    j = rng.choice(spans)
    single = pieces[j].strip() or pieces[j]
    late = "".join(pieces[-3:])
    cases = [[across(j)], [single], [pieces[j] + pieces[j + 1]], [late, across(j)], [across(j), late]]
    for stops in cases:
        want, count = expected_stop(pieces, stops)
        stream = list(demo.stream_generate(prompt, max_tokens=24, stop=stops))
        text = demo.generate(prompt, max_tokens=24, stop=stops if len(stops) > 1 else stops[0])
        note = f"stop {stops}, pieces {pieces} {seed_note(seed)}"
        assert text == "".join(r.text for r in stream) == want, note
        assert text.finish_reason == stream[-1].finish_reason == "stop" and len(stream) == count, note
        assert not any(s in text for s in stops), note
    never = demo.generate(prompt, max_tokens=24, stop=["\x00never"])
    assert never == "".join(pieces) and never.finish_reason == free[-1].finish_reason


def test_max_tokens(demo, seed):
    rng = random.Random(seed)
    prompt, n = docstring_prompt(rng), rng.randint(1, 12)
    eos = gen.eos_token_ids(demo, demo.tokenizer)
    for sampling in ({}, {"temperature": 0.7, "top_p": 0.9}):
        stream = list(demo.stream_generate(prompt, max_tokens=n, seed=seed, **sampling))
        note = f"prompt {prompt!r}, max_tokens {n}, {sampling} {seed_note(seed)}"
        # Greedy writes on ("Return a list of ..."); a sampled docstring may end the turn, and then must say so.
        ended = sampling and stream[-1].token in eos
        m = len(stream) if ended else n
        assert [r.generation_tokens for r in stream] == list(range(1, m + 1)), note
        assert [r.finish_reason for r in stream] == [None] * (m - 1) + ["stop" if ended else "length"], note


def test_eos_ends_generation(demo, seed, monkeypatch):
    """Make a token the greedy run writes an eos token: generation ends there, without its text."""
    rng = random.Random(seed)
    prompt = docstring_prompt(rng)
    free = list(demo.stream_generate(prompt, max_tokens=16))
    tokens = [r.token for r in free]
    firsts = [j for j in range(1, len(tokens)) if tokens[j] not in tokens[:j]]
    j = rng.choice(firsts)
    monkeypatch.setattr(demo.config, "eos_token_id", [demo.config.eos_token_id, tokens[j]])
    stream = list(demo.stream_generate(prompt, max_tokens=16))
    text = demo.generate(prompt, max_tokens=16)
    note = f"eos {tokens[j]} at step {j} of {tokens} {seed_note(seed)}"
    assert [r.token for r in stream] == tokens[: j + 1], note
    assert [r.finish_reason for r in stream] == [None] * j + ["stop"] and text.finish_reason == "stop", note
    assert text == "".join(r.text for r in free[:j]) == demo.tokenizer.decode(tokens[:j]), note


def test_eos_tokens_of_the_demo(demo):
    """<|im_end|> (tokenizer and config.json) and <|endoftext|> (generation_config.json) both end generation;
    the model writes <|endoftext|> after the end of a script, as after each training document."""
    tok = demo.tokenizer
    assert gen.eos_token_ids(demo, tok) == {token_id(tok, IM_END), token_id(tok, ENDOFTEXT)}
    out = demo.generate("if __name__ == '__main__':\n    main()\n", max_tokens=8)
    assert out.response.token == token_id(tok, ENDOFTEXT) and out.finish_reason == "stop"
    assert ENDOFTEXT not in out and out.response.generation_tokens < 8


def test_scripted_eos_in_chat(demo, seed, monkeypatch):
    tok = demo.tokenizer
    reply = word(random.Random(seed)).capitalize() + " there."
    tail = tok.encode("never shown", add_special_tokens=False)
    script(monkeypatch, tok, tok.encode(reply, add_special_tokens=False) + [token_id(tok, IM_END)] + tail)
    out = demo.generate([{"role": "user", "content": "hi"}], enable_thinking=False, max_tokens=64)
    assert out == out.content == reply and out.finish_reason == "stop" and IM_END not in out


# ---- chat template and thinking ------------------------------------------------------------------------


def test_chat_template_applied(demo, seed, monkeypatch):
    tok, rng = demo.tokenizer, random.Random(seed)
    messages = [{"role": "system", "content": f"You are {word(rng)}."},
                {"role": "user", "content": " ".join(word(rng) for _ in range(rng.randint(1, 8)))}]
    prompts = script(monkeypatch, tok, *["x"] * 6).prompts
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}, {"tools": TOOLS}):
        demo.generate(messages, max_tokens=1, **kwargs)
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        assert prompts[-1] == tok.encode(rendered, add_special_tokens=False), (kwargs, seed_note(seed))
        text = tok.decode(prompts[-1])
        assert messages[1]["content"] in text and "<|im_start|>assistant\n" in text
        thinking_off = kwargs.get("enable_thinking") is False
        assert text.endswith("<|im_start|>assistant\n<think>\n" + ("\n</think>\n\n" if thinking_off else ""))
        assert ('"name": "get_weather"' in text) == ("tools" in kwargs)
    demo.generate(messages[1]["content"], chat=True, max_tokens=1)
    user_only = tok.apply_chat_template(messages[1:], add_generation_prompt=True, tokenize=False)
    assert prompts[-1] == tok.encode(user_only, add_special_tokens=False)
    demo.generate(messages[1]["content"], max_tokens=1)  # a plain string is encoded as is
    assert prompts[-1] == tok.encode(messages[1]["content"], add_special_tokens=False)


def test_thinking_split_from_content(demo, seed, monkeypatch):
    tok, rng = demo.tokenizer, random.Random(seed)
    thought, answer = f"The user wants {word(rng)}.", f"Here is {word(rng)}."
    script(monkeypatch, tok, f"{thought}\n</think>\n\n{answer}", answer)
    messages = [{"role": "user", "content": word(rng)}]
    on = demo.generate(messages)  # the template opens <think>: the reply starts as reasoning
    assert (on.reasoning, on.content) == (thought, answer) and on == f"{thought}\n</think>\n\n{answer}"
    off = demo.generate(messages, enable_thinking=False)
    assert (off.reasoning, off.content) == ("", answer)


# ---- response fields ------------------------------------------------------------------------------------


def test_response_fields(demo, demo_folder, seed):
    rng = random.Random(seed)
    prompt, n = docstring_prompt(rng), rng.randint(4, 12)
    ids = demo.tokenizer.encode(prompt, add_special_tokens=False)
    layout = ModelLayout.read(demo_folder)
    per_token = len(layout.moe_layers) * demo.config.num_experts_per_tok
    before = demo.stats.snapshot()
    stream = list(demo.stream_generate(prompt, max_tokens=n))
    run = demo.stats.snapshot().delta(before).totals()
    vocab = demo.config.vocab_size
    for i, r in enumerate(stream):
        assert r.prompt_tokens == len(ids) and r.prompt_tps > 0 and r.generation_tps > 0
        assert r.generation_tokens == i + 1 and isinstance(r.peak_memory, float) and r.peak_memory >= 0
        assert r.logprobs.shape == (vocab,) and abs(mx.logsumexp(r.logprobs).item()) < 1e-5
        assert r.io["bytes"] == r.io["experts"] * layout.expert.expert_bytes
        if i:  # one token reads K distinct experts in every MoE layer
            assert r.io["experts"] == per_token, (i, r.io, seed_note(seed))
    assert stream[0].io["experts"] >= per_token
    assert sum(r.io["bytes"] for r in stream) == run["bytes"] > 0
    assert len({r.prompt_tps for r in stream}) == 1

    resident = load(demo_folder, stream=False)
    assert all(r.io == {} for r in resident.stream_generate(prompt, max_tokens=2))


# ---- tool calls -----------------------------------------------------------------------------------------


def xml_call(city: str, days) -> str:
    return (f"<tool_call>\n<function=get_weather>\n<parameter=city>\n{city}\n</parameter>\n"
            f"<parameter=days>\n{days}\n</parameter>\n</function>\n</tool_call>")


def json_call(city: str, days) -> str:
    body = json.dumps({"name": "get_weather", "arguments": {"city": city, "days": days}})
    return f"<tool_call>\n{body}\n</tool_call>"


def test_tool_calls_both_formats(demo, seed, monkeypatch):
    rng = random.Random(seed)
    city, days, other = word(rng).capitalize(), rng.randint(1, 14), word(rng).capitalize()
    reply = f"Checking.\n\n{xml_call(city, days)}\n{json_call(other, str(days + 1))}"
    fake = script(monkeypatch, demo.tokenizer, reply, reply)
    messages = [{"role": "user", "content": f"Weather in {city}?"}]
    out = demo.generate(messages, tools=TOOLS, enable_thinking=False)
    stream = list(demo.stream_generate(messages, tools=TOOLS, enable_thinking=False))
    for calls in (out.tool_calls, [c for r in stream for c in r.tool_calls]):
        assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": city, "days": days}),
                                                         ("get_weather", {"city": other, "days": days + 1})]
        assert all(isinstance(c, ToolCall) and type(c.arguments["days"]) is int for c in calls)
    assert out.content == "Checking." and out == reply and out.finish_reason == "stop"
    assert "<tool_call>" not in "".join(r.content for r in stream)
    assert '"name": "get_weather"' in demo.tokenizer.decode(fake.prompts[0])  # the tools were offered


def test_malformed_tool_calls_are_values(demo, seed, monkeypatch):
    rng = random.Random(seed)
    city = word(rng).capitalize()
    missing_city = "<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    bad_json = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    unknown = xml_call(city, 2).replace("get_weather", "get_time")
    unterminated = "<tool_call>\n<function=get_weather>\n<parameter=city>\n" + city
    script(monkeypatch, demo.tokenizer, f"{missing_city}{bad_json}{unknown}", unterminated)
    out = demo.generate("q", tools=TOOLS)
    assert [type(c) for c in out.tool_calls] == [ToolCallError] * 3, out.tool_calls
    assert "city" in out.tool_calls[0].message and "get_time" in out.tool_calls[2].message
    cut = demo.generate("q", tools=TOOLS, max_tokens=8)
    assert cut.finish_reason == "length" and [type(c) for c in cut.tool_calls] == [ToolCallError]
    assert "unterminated" in cut.tool_calls[0].message


def test_tool_call_inside_thinking_is_not_a_call(demo, seed, monkeypatch):
    call = xml_call(word(random.Random(seed)), 1)
    script(monkeypatch, demo.tokenizer, f"maybe {call}\n</think>\n\nNo.")
    out = demo.generate([{"role": "user", "content": "hi"}], tools=TOOLS)
    assert out.tool_calls == [] and out.content == "No." and call in out.reasoning


def test_tool_results_round_trip_through_the_template(demo, seed, monkeypatch):
    """A parsed call goes back as an assistant message (ToolCall objects, OpenAI dicts with JSON-string
    arguments, or dict arguments: one rendering), its result as {"role": "tool"}; the model sees both."""
    tok, rng = demo.tokenizer, random.Random(seed)
    city, days = word(rng).capitalize(), rng.randint(1, 14)
    result = json.dumps({"temp": rng.randint(-10, 35), "sky": word(rng)})
    fake = script(monkeypatch, tok, xml_call(city, days), "It is fine.", "x", "x", "x", "x")
    messages = [{"role": "user", "content": f"Weather in {city}?"}]
    first = demo.generate(messages, tools=TOOLS, enable_thinking=False)
    calls = first.tool_calls
    openai = format_tool_calls_openai(calls)
    assert json.loads(openai[0]["function"]["arguments"]) == {"city": city, "days": days}
    variants = [calls, openai, [{"function": {"name": "get_weather", "arguments": {"city": city, "days": days}}}],
                calls + [ToolCallError("bad", "<tool_call>x</tool_call>")]]
    prompts = []
    for tool_calls in variants:
        history = messages + [{"role": "assistant", "content": first.content, "tool_calls": tool_calls},
                              {"role": "tool", "content": result}]
        out = demo.generate(history, tools=TOOLS, enable_thinking=False)
        prompts.append(fake.prompts[-1])
    assert out == "x" and prompts.count(prompts[0]) == len(prompts), "each way of passing the call renders the same"
    text = tok.decode(prompts[0])
    rendered = text[text.rindex("<tool_call>"): text.rindex("</tool_call>") + len("</tool_call>")]
    again = parse_tool_call(rendered[len("<tool_call>"): -len("</tool_call>")], TOOLS)
    assert (again.name, again.arguments) == ("get_weather", {"city": city, "days": days}), rendered
    assert f"<tool_response>\n{result}\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


# ---- detokenizer, timing --------------------------------------------------------------------------------


def test_multibyte_text_streams_whole_characters(demo, seed, monkeypatch):
    rng = random.Random(seed)
    chars = "é中文🙂naïve€ß\n"
    text = "".join(rng.choice(chars) for _ in range(rng.randint(10, 30)))
    ids = demo.tokenizer.encode(text, add_special_tokens=False)
    for n in (len(ids), rng.randint(1, len(ids))):  # the second may end inside a character
        script(monkeypatch, demo.tokenizer, ids)
        stream = list(demo.stream_generate("q", max_tokens=n))
        assert "".join(r.text for r in stream) == demo.tokenizer.decode(ids[:n]), (n, text, seed_note(seed))
        assert all("\ufffd" not in r.text for r in stream[:-1]), (n, text, seed_note(seed))


def test_phase_timer(demo, seed):
    """The table describes the latest generation's decode: its tokens, no idle time, phases within the wall."""
    rng = random.Random(seed)
    timer = PhaseTimer(demo).install()
    try:
        demo.generate(docstring_prompt(rng), max_tokens=rng.randint(2, 6), timer=timer)
        time.sleep(0.3)
        tic = time.perf_counter()
        n = demo.generate(docstring_prompt(rng), max_tokens=rng.randint(2, 6), timer=timer).response.generation_tokens
        elapsed = time.perf_counter() - tic
    finally:
        timer.uninstall()
    s = timer.summary()
    phases = sum(v for p, v in s["total"].items() if p != "other")
    assert s["tokens"] == n and 0 < s["ms_per_token"] * n / 1e3 <= elapsed, (s, elapsed, seed_note(seed))
    assert phases <= s["ms_per_token"] * 1.01 and all(v >= 0 for v in s["total"].values()), s
    moe_layers = sum(demo.config.is_moe(i) for i in range(demo.config.num_hidden_layers))
    assert s["io"]["experts"] == n * demo.config.num_experts_per_tok * moe_layers, s["io"]
    assert set(s["total"]) == set(PHASES) and f"decode: {n} tokens" in timer.table()
    assert type(demo.model.layers[0].mlp).__name__ != "_Timed", "uninstall restores the modules"

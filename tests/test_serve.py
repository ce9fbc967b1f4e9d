"""flash-moe serve (issue 14): a live server on 127.0.0.1 driven by the real openai and anthropic clients.

The demo model (float32) answers greedily; where a reply must be a tool call, the generation seam
(``generate_step``) is scripted (tests/serving.py) and everything after it runs as served: detokenizer, stop
strings, worker, parser, formats.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time

import pytest

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

from conftest import seed_note
from flash_moe.server import check_binding, make_state, parse_bytes
from serving import FAIL, LiveServer, endless, model, scripted  # noqa: F401  (model: the shared fixture)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
NO_THINK = {"enable_thinking": False}


@pytest.fixture(scope="module")
def server(model):
    with LiveServer(make_state(model, max_batch=2)) as s:
        yield s


def oai(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=60, **kw)


def anth(server, **kw):
    return anthropic.Anthropic(base_url=server.url, api_key=kw.pop("api_key", "none"), max_retries=0, timeout=60, **kw)


def raw(server, method, path, body=None, headers=None):
    """One plain HTTP request: (status, headers, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, dict(r.getheaders()), json.loads(text)
    except ValueError:
        return r.status, dict(r.getheaders()), text


def metric(server, name: str) -> float:
    _, _, text = raw(server, "GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---- chat, streamed and not ------------------------------------------------------------------------------


@pytest.mark.parametrize("think", [False, None])
def test_chat_matches_generate(server, model, seed, think):
    """Greedy answers equal LoadedModel.generate's, whole and streamed; <think> goes to reasoning_content."""
    rng = random.Random(seed)
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": rng.choice(["def main", "class Foo", "import os"])}]
    n = rng.randint(6, 20)
    extra = {} if think is None else {"enable_thinking": think}
    ref = model.generate(messages, max_tokens=n, enable_thinking=think)
    client, note = oai(server), f"{messages} {seed_note(seed)}"
    r = client.chat.completions.create(model="demo", messages=messages, max_tokens=n, extra_body=extra)
    msg = r.choices[0].message
    assert (msg.content or "") == ref.content, note
    assert (getattr(msg, "reasoning_content", None) or "") == ref.reasoning, note
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.completion_tokens == ref.response.generation_tokens
    assert r.usage.prompt_tokens == ref.response.prompt_tokens
    content, reasoning, finish, usage = "", "", None, None
    for chunk in client.chat.completions.create(model="demo", messages=messages, max_tokens=n, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=extra):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            content += c.delta.content or ""
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            finish = c.finish_reason or finish
    assert (content, reasoning, finish) == (ref.content, ref.reasoning, ref.finish_reason), note
    assert usage.completion_tokens == r.usage.completion_tokens


def test_logprobs_and_completions(server, model, seed):
    """logprobs/top_logprobs are the model's; /v1/completions takes text or ids and gives the same tokens."""
    rng = random.Random(seed)
    ids = [rng.randrange(4087) for _ in range(rng.randint(2, 12))]
    n = rng.randint(4, 10)
    ref = list(model.stream_generate(ids, max_tokens=n))
    client = oai(server)
    r = client.completions.create(model="demo", prompt=ids, max_tokens=n, logprobs=3)
    choice = r.choices[0]
    assert choice.text == "".join(s.text for s in ref), seed_note(seed)
    for lp, s, top in zip(choice.logprobs.token_logprobs, ref, choice.logprobs.top_logprobs):
        assert abs(lp - s.logprobs[s.token].item()) < 1e-4
        assert max(top.values()) == pytest.approx(s.logprobs.max().item(), abs=1e-4)
    text = model.tokenizer.decode(ids)
    again = client.completions.create(model="demo", prompt=text, max_tokens=4)
    assert again.usage.prompt_tokens == len(model.tokenizer.encode(text, add_special_tokens=False))
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="demo", prompt=ids, max_tokens=n,
                                                                            stream=True) if c.choices)
    assert streamed == choice.text
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "def main"}], max_tokens=5,
                                          logprobs=True, top_logprobs=2, extra_body=NO_THINK)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 5 and all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-6
                                     for e in entries)


def test_models_health_metrics(server):
    status, _, body = raw(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    models = oai(server).models.list()
    assert [m.id for m in models.data] == [server.state.model_id]
    before = metric(server, "flash_moe_generated_tokens_total")
    oai(server).completions.create(model="demo", prompt="def", max_tokens=3)
    assert metric(server, "flash_moe_generated_tokens_total") == before + 3
    assert metric(server, "flash_moe_expert_bytes_read_total") > 0
    for name in ("flash_moe_queue_depth", "flash_moe_active_sequences", "flash_moe_generation_tokens_per_second",
                 "flash_moe_prompt_tokens_total", "flash_moe_page_cache_hit_rate", "flash_moe_prompt_cache_hits_total"):
        metric(server, name)


# ---- stop strings ----------------------------------------------------------------------------------------


def test_stop_string_across_tokens(server, model, seed):
    """A stop string made of the end of one token and the start of the next cuts the text before it."""
    rng = random.Random(seed)
    prompts = ["def main", "class A", "import sys", "for i in", "while True", "return self"]
    rng.shuffle(prompts)
    for prompt in prompts:  # the first prompt whose reply has two adjacent tokens of two characters or more
        texts = [r.text for r in model.stream_generate(prompt, max_tokens=24)]
        cuts = [i for i in range(2, len(texts) - 1) if len(texts[i]) >= 2 and len(texts[i + 1]) >= 2]
        if cuts:
            break
    assert cuts, f"no reply with two long adjacent tokens {seed_note(seed)}"
    full = "".join(texts)
    i = rng.choice(cuts)
    stop = texts[i][-2:] + texts[i + 1][:2]
    want = full[: full.find(stop)]
    client, note = oai(server), f"stop {stop!r} in {full!r} {seed_note(seed)}"
    r = client.completions.create(model="demo", prompt=prompt, max_tokens=24, stop=["\x00never", stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop", note
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="demo", prompt=prompt, max_tokens=24, stop=stop, stream=True) if c.choices)
    assert streamed == want, note


def test_anthropic_stop_sequence(model):
    with scripted(model, "Sunny and mild. END more text") as (server, script):
        m = anth(server).messages.create(model="demo", max_tokens=50, stop_sequences=["END"],
                                         messages=[{"role": "user", "content": "weather?"}], thinking={"type": "disabled"})
        assert m.stop_reason == "stop_sequence" and m.stop_sequence == "END"
        assert m.content[0].text == "Sunny and mild."


# ---- tools -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_tool_round_trip_openai(model, stream):
    with scripted(model, "Let me look.\n" + CALL, "It is sunny in Paris.") as (server, script):
        client = oai(server)
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        kwargs = dict(model="demo", tools=TOOLS, max_tokens=200, extra_body=NO_THINK)
        if stream:
            content, calls, finish, order = "", {}, None, []
            for chunk in client.chat.completions.create(messages=messages, stream=True, **kwargs):
                for c in chunk.choices:
                    content += c.delta.content or ""
                    finish = c.finish_reason or finish
                    for d in c.delta.tool_calls or []:
                        if d.id:  # id and name come first, then argument deltas
                            assert d.function.name == "get_weather" and d.function.arguments == ""
                            calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                            order.append("head")
                        else:
                            calls[d.index]["arguments"] += d.function.arguments
                            order.append("args")
            assert order[0] == "head" and "args" in order
            call = calls[0]
        else:
            r = client.chat.completions.create(messages=messages, **kwargs)
            content, finish = r.choices[0].message.content, r.choices[0].finish_reason
            tc = r.choices[0].message.tool_calls[0]
            call = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments}
        assert finish == "tool_calls" and content == "Let me look."
        assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
        assert "get_weather" in script.prompt_text(0)  # the tools reached the chat template
        messages += [{"role": "assistant", "content": content, "tool_calls": [
                         {"id": call["id"], "type": "function",
                          "function": {"name": call["name"], "arguments": call["arguments"]}}]},
                     {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}]
        r = client.chat.completions.create(messages=messages, **kwargs)
        assert r.choices[0].message.content == "It is sunny in Paris." and r.choices[0].finish_reason == "stop"
        second = script.prompt_text(1)
        assert "sunny, 21 C" in second and "<function=get_weather>" in second and "Paris" in second


@pytest.mark.parametrize("stream", [False, True])
def test_tool_round_trip_anthropic(model, stream):
    with scripted(model, CALL, "Sunny.") as (server, script):
        client = anth(server)
        tools = [{"name": "get_weather", "description": "Weather forecast", "input_schema": TOOLS[0]["function"]["parameters"]}]
        messages = [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]}]
        kwargs = dict(model="demo", max_tokens=200, tools=tools, system="Be brief.", thinking={"type": "disabled"})
        if stream:
            with client.messages.stream(messages=messages, **kwargs) as s:
                kinds = [e.type for e in s]
                m = s.get_final_message()
            assert kinds[0] == "message_start" and "content_block_start" in kinds and kinds[-1] == "message_stop"
        else:
            m = client.messages.create(messages=messages, **kwargs)
        assert m.stop_reason == "tool_use"
        use = [b for b in m.content if b.type == "tool_use"][0]
        assert use.name == "get_weather" and use.input == {"city": "Paris"}
        messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]}]
        m = client.messages.create(messages=messages, **kwargs)
        assert m.stop_reason == "end_turn" and m.content[0].text == "Sunny."
        second = script.prompt_text(1)
        assert "Be brief." in second and "sunny, 21 C" in second and "<function=get_weather>" in second


def test_tool_choice_none_named_and_malformed(model):
    with scripted(model, CALL, "<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>",
                  "<tool_call>\n<function=nope>\n</function>\n</tool_call> done") as (server, script):
        client = oai(server)
        ask = [{"role": "user", "content": "Weather?"}]
        r = client.chat.completions.create(model="demo", messages=ask, tools=TOOLS, tool_choice="none", extra_body=NO_THINK)
        assert "get_weather" not in script.prompt_text(0)  # no tools offered
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content == CALL  # the call text stays content
        r = client.chat.completions.create(model="demo", messages=ask, tools=TOOLS, extra_body=NO_THINK,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert script.prompt_text(1).endswith("<tool_call>\n<function=get_weather>\n")  # forced by its opening
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
        r = client.chat.completions.create(model="demo", messages=ask, tools=TOOLS, extra_body=NO_THINK)
        text = r.choices[0].message.content
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
        assert "<function=nope>" in text and "malformed tool call" in text and "unknown function 'nope'" in text
        assert text.endswith("done")


# ---- errors, limits --------------------------------------------------------------------------------------


def test_bad_requests(server, model):
    client = oai(server)
    cases = [
        ({"model": "demo"}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
        ({"messages": [{"role": "pirate", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
          "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
        ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, "response_format"),
    ]
    for body, param in cases:
        status, _, err = raw(server, "POST", "/v1/chat/completions", body)
        assert status == 400 and err["error"]["param"] == param and err["error"]["type"] == "invalid_request_error", (body, err)
    status, _, err = raw(server, "POST", "/v1/chat/completions", "{not json")
    assert status == 400 and "error" in err
    vocab = model.config.vocab_size
    for ids in ([1, 2, vocab], [-1]):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="demo", prompt=ids, max_tokens=2)
        assert e.value.body["param"] == "prompt" and "out of range" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # past the context (4096 for the demo)
        client.completions.create(model="demo", prompt=[5] * server.state.context, max_tokens=2)
    assert "context" in e.value.body["message"]
    with pytest.raises(anthropic.BadRequestError):
        anth(server).messages.create(model="demo", max_tokens=0, messages=[{"role": "user", "content": "hi"}])


def test_api_key(model):
    with LiveServer(make_state(model, max_batch=1, api_key="s3cret")) as s:
        with pytest.raises(openai.AuthenticationError):
            oai(s).models.list()
        with pytest.raises(openai.AuthenticationError):
            oai(s, api_key="wrong").completions.create(model="demo", prompt="def", max_tokens=2)
        assert oai(s, api_key="s3cret").completions.create(model="demo", prompt="def", max_tokens=2).choices
        with pytest.raises(anthropic.AuthenticationError):
            anth(s, api_key="wrong").messages.create(model="demo", max_tokens=2, messages=[{"role": "user", "content": "x"}])
        assert anth(s, api_key="s3cret").messages.create(model="demo", max_tokens=2,
                                                        messages=[{"role": "user", "content": "x"}]).content is not None
        assert raw(s, "GET", "/health")[0] == 200
        assert raw(s, "GET", "/metrics")[0] == 401
    check_binding("127.0.0.1", None)
    check_binding("::1", None)
    with pytest.raises(ValueError, match="--api-key"):
        check_binding("0.0.0.0", None)
    check_binding("0.0.0.0", "key")
    assert parse_bytes("8G") == 8 << 30 and parse_bytes("512M") == 512 << 20 and parse_bytes("0") == 0
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_queue_full_429(model):
    """One running, one waiting: the third gets 429 with Retry-After."""
    gate = threading.Event()
    with scripted(model, "one", "two", "three", gate=gate, max_batch=1, max_queue=1) as (s, script):
        results = []
        body = {"prompt": "x", "max_tokens": 5}
        threads = [threading.Thread(target=lambda: results.append(raw(s, "POST", "/v1/completions", body)))
                   for _ in range(2)]
        threads[0].start()
        wait_for(lambda: len(script.prompts) == 1)  # running (held by the gate)
        threads[1].start()
        wait_for(lambda: s.state.worker.pending.qsize() == 1)  # waiting
        status, headers, err = raw(s, "POST", "/v1/completions", body)
        assert status == 429 and headers.get("retry-after") == "1" and err["error"]["type"] == "rate_limit_error"
        gate.set()
        for t in threads:
            t.join(30)
        assert sorted(r[2]["choices"][0]["text"] for r in results) == ["one", "two"]
        assert metric(s, 'flash_moe_requests_rejected_total{reason="queue_full"}') == 1


def test_disconnect_frees_the_slot(model):
    """A client that leaves mid-stream stops its sequence at the next step; the next request gets the slot."""
    with scripted(model, endless("spam "), "next", delay=0.005, max_batch=1, max_queue=1) as (s, script):
        client = oai(s)
        stream = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "go"}],
                                                max_tokens=100000, stream=True, extra_body=NO_THINK)
        for _ in zip(range(4), stream):
            pass
        stream.close()
        wait_for(lambda: script.yielded)  # the worker took the sequence out of the engine
        assert script.yielded[0] < 1000  # stopped long before max_tokens (the context: ~4080 tokens, 20 s)
        wait_for(lambda: metric(s, "flash_moe_requests_cancelled_total") == 1)
        assert metric(s, "flash_moe_active_sequences") == 0
        r = client.completions.create(model="demo", prompt="x", max_tokens=5)
        assert r.choices[0].text == "next"


def test_cli_refusals(demo_folder):
    from flash_moe.cli import main

    for argv, words in ((["--host", "0.0.0.0"], "--api-key"), (["--prompt-cache-bytes", "lots"], "--prompt-cache-bytes"),
                        (["--max-batch", "0"], "--max-batch")):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--model", str(demo_folder), *argv])
        assert words in str(e.value) and "\n" not in str(e.value)


def test_json_object_checked(model):
    with scripted(model, '{"answer": 42}', "not json at all") as (server, script):
        client = oai(server)
        ask = [{"role": "user", "content": "Answer in JSON."}]
        kwargs = dict(model="demo", messages=ask, response_format={"type": "json_object"}, extra_body=NO_THINK)
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].message.content == '{"answer": 42}' and not getattr(r, "warnings", None)
        r = client.chat.completions.create(**kwargs)
        assert "not a JSON object" in r.warnings[0]


def test_limits_on_body(server, monkeypatch):
    import flash_moe.server.app as app

    status, _, err = raw(server, "POST", "/v1/completions", {"prompt": "x", "stop": [str(i) for i in range(17)]})
    assert status == 400 and err["error"]["param"] == "stop"
    monkeypatch.setattr(app, "MAX_BODY", 1000)
    status, _, err = raw(server, "POST", "/v1/completions", {"prompt": "x" * 2000})
    assert status == 413 and err["error"]["param"] == "body"


def test_engine_failure_is_reported_and_serving_goes_on(model):
    with scripted(model, "ok " + FAIL, "a b " + FAIL, "c " + FAIL, "fine") as (server, script):
        status, _, err = raw(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 9})
        assert status == 500 and "scripted failure" in err["error"]["message"]
        texts = []
        with pytest.raises(openai.APIError, match="scripted failure"):  # an error event ends the stream
            for chunk in oai(server).completions.create(model="demo", prompt="x", max_tokens=9, stream=True):
                texts.append(chunk.choices[0].text)
        assert "".join(texts).startswith("a b")  # the tokens before the failure arrived
        with pytest.raises(anthropic.APIStatusError, match="scripted failure"):
            with anth(server).messages.stream(model="demo", max_tokens=9, messages=[{"role": "user", "content": "x"}],
                                              thinking={"type": "disabled"}) as s:
                for _ in s:
                    pass
        assert oai(server).completions.create(model="demo", prompt="x", max_tokens=5).choices[0].text == "fine"
        assert metric(server, "flash_moe_engine_failures_total") == 3


def test_forced_call_in_json_format():
    """Qwen3's JSON tool-call format: a named tool_choice writes the call's opening; the parser sees it
    first, so the model's continuation completes one call (unit test of turn.Output, no model)."""
    from flash_moe.server.turn import Output, Turn

    prefix = '<tool_call>\n{"name": "get_weather", "arguments": '
    out = Output(Turn(ids=[1], max_tokens=9, sampling={}, tools=TOOLS, prefix=prefix))
    ups = [out.feed(t, None) for t in ('{"city": ', '"Oslo", "days": "3"}', "}\n</tool_call>")]
    ups.append(out.feed("", "stop"))
    calls = [c for u in ups for c in u.calls]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Oslo", "days": 3})]
    assert ups[-1].finish_reason == "tool_calls" and not any(u.content for u in ups)

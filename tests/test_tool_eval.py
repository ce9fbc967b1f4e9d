"""``flash-moe eval --tool-calls`` (issue 15): the bundled suite, the scorer on scripted replies in both Qwen
formats, and the whole path (chat template with tools, generation, scoring) with a scripted model reply."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

import flash_moe.generation as gen
from flash_moe.cli import main
from flash_moe.eval.tools import SUITE, evaluate_tool_calls, read_suite, schema_errors, score_reply

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["city"], "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {"name": "create_event", "parameters": {
        "type": "object", "required": ["title"], "properties": {
            "title": {"type": "string"}, "attendees": {"type": "array", "items": {"type": "string"}},
            "urgent": {"type": "boolean"}}}}},
]
EXPECTED = {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}


def xml(name, **params) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def js(name, arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


SCORES = {  # reply -> (parsed, real_tool, valid, exact)
    "xml exact": (xml("get_weather", city="Paris", days=3), (1, 1, 1, 1)),
    "json exact": (js("get_weather", {"city": "Paris", "days": 3}), (1, 1, 1, 1)),
    "text first, then the call": ("Let me check.\n" + xml("get_weather", city="Paris", days=3), (1, 1, 1, 1)),
    "valid, other arguments": (xml("get_weather", city="Rome", days=3), (1, 1, 1, 0)),
    "valid, other tool": (js("create_event", {"title": "x", "attendees": ["a"]}), (1, 1, 1, 0)),
    "wrong tool": (xml("get_forecast", city="Paris"), (1, 0, 0, 0)),
    "xml wrong type": (xml("get_weather", city="Paris", days="three"), (1, 1, 0, 0)),
    "json wrong type": (js("get_weather", {"city": "Paris", "days": "3"}), (1, 1, 0, 0)),
    "json float for integer": (js("get_weather", {"city": "Paris", "days": 2.5}), (1, 1, 0, 0)),
    "json bool for integer": (js("get_weather", {"city": "Paris", "days": True}), (1, 1, 0, 0)),
    "enum": (js("get_weather", {"city": "Paris", "unit": "kelvin"}), (1, 1, 0, 0)),
    "missing required": (xml("get_weather", days=3), (1, 1, 0, 0)),
    "unexpected argument": (js("get_weather", {"city": "Paris", "mood": "sunny"}), (1, 1, 0, 0)),
    "array item type": (js("create_event", {"title": "x", "attendees": ["a", 3]}), (1, 1, 0, 0)),
    "xml array and boolean": (xml("create_event", title="x", attendees='["a", "b"]', urgent="true"), (1, 1, 1, 0)),
    "unterminated": ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis", (0, 0, 0, 0)),
    "bad json": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>', (0, 0, 0, 0)),
    "xml unclosed function": ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</tool_call>",
                              (0, 0, 0, 0)),
    "neither format": ("<tool_call>get_weather(city='Paris')</tool_call>", (0, 0, 0, 0)),
    "no call": ("It is sunny in Paris.", (0, 0, 0, 0)),
    "call inside thinking only": ("<think>" + xml("get_weather", city="Paris", days=3) + "</think>Done.", (0, 0, 0, 0)),
}


@pytest.mark.parametrize("case", list(SCORES))
def test_score_reply(case):
    text, want = SCORES[case]
    score = score_reply(text, TOOLS, EXPECTED)
    got = tuple(int(score[k]) for k in ("parsed", "real_tool", "valid", "exact"))
    assert got == want, score["error"]
    assert bool(score["error"]) == (want != (1, 1, 1, 1))


def test_schema_errors_subset():
    schema = TOOLS[0]["function"]["parameters"]
    assert schema_errors({"city": "a", "days": 2, "unit": "celsius"}, schema) == []
    assert schema_errors({"city": "a", "days": 2.0}, schema) == []  # JSON 2.0 is an integer
    assert schema_errors({"days": 2}, schema) == ["arguments: missing required 'city'"]
    assert schema_errors({"city": None}, schema) == ["arguments.city: None is not of type string"]
    assert schema_errors([1], schema) == ["arguments: [1] is not of type object"]
    assert schema_errors(None, {"type": ["string", "null"]}) == []


def test_bundled_suite():
    items = read_suite()
    assert len(items) >= 40
    names = set()
    for item in items:
        tools = item["tools"]
        offered = [t["function"]["name"] for t in tools]
        assert item["expected"]["name"] in offered and len(offered) == len(set(offered)) >= 2
        names.add(item["expected"]["name"])
        schema = next(t for t in tools if t["function"]["name"] == item["expected"]["name"])["function"]["parameters"]
        assert schema_errors(item["expected"]["arguments"], schema) == [], item  # the expected call is valid
        # and the scorer gives it full marks in both formats
        text = js(item["expected"]["name"], item["expected"]["arguments"])
        assert score_reply(text, tools, item["expected"])["exact"], item
        args = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in item["expected"]["arguments"].items()}
        assert score_reply(xml(item["expected"]["name"], **args), tools, item["expected"])["exact"], item
    assert len(names) >= 8
    assert SUITE.name == "tool_calls.jsonl"


def test_read_suite_errors(tmp_path):
    (tmp_path / "s.jsonl").write_text(json.dumps({"messages": [], "tools": []}) + "\n")
    with pytest.raises(ValueError, match=r"--suite .*s.jsonl:1: expected"):
        read_suite(tmp_path / "s.jsonl")
    with pytest.raises(ValueError, match="--suite .*nope.jsonl: no such file"):
        read_suite(tmp_path / "nope.jsonl")


def scripted(monkeypatch, tokenizer, replies: list[str]):
    """The model's replies, in order: generate_step yields the tokens of each (then <|im_end|>)."""
    queue = list(replies)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def step(prompt, model, max_tokens=256, **kwargs):
        ids = tokenizer.encode(queue.pop(0), add_special_tokens=False) + [end]
        for t in ids[:max_tokens]:
            yield t, mx.zeros((1,))

    monkeypatch.setattr(gen, "generate_step", step)


def test_suite_through_the_chat_template(demo, tmp_path, monkeypatch):
    """Scripted replies go through the real generation path (stream parser, detokenizer, special tokens)."""
    items = read_suite()[:3]
    suite = tmp_path / "s.jsonl"
    suite.write_text("".join(json.dumps(i) + "\n" for i in items))
    exact = xml(items[0]["expected"]["name"], **{k: v if isinstance(v, str) else json.dumps(v)
                                               for k, v in items[0]["expected"]["arguments"].items()})
    replies = [exact, js(items[1]["expected"]["name"], {}), "I cannot help."]
    scripted(monkeypatch, demo.tokenizer, replies)
    seen = []
    rows = evaluate_tool_calls([demo], suite, progress=False, replies=seen)
    assert [s[3] for s in seen] == replies
    (row,) = rows
    assert (row.items, row.parsed, row.real_tool, row.valid, row.exact) == (3, 2 / 3, 2 / 3, 1 / 3, 1 / 3)
    assert row.k == 4 and row.bits == 4


def test_cli_tool_calls_on_the_demo(demo_folder, tmp_path, capsys):
    """The real demo model (which was not trained to call tools) through the CLI: a table and JSON rows."""
    suite = tmp_path / "s.jsonl"
    suite.write_text(json.dumps(read_suite()[0]) + "\n")
    main(["eval", "--tool-calls", "--model", str(demo_folder), "--suite", str(suite), "--k", "1,2",
          "--gen-tokens", "6", "--json", str(tmp_path / "t.json")])
    assert "parsed" in capsys.readouterr().out
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [(r["k"], r["items"], r["bits"]) for r in rows] == [(1, 1, 4), (2, 1, 4)]
    assert all(0 <= r["exact"] <= r["valid"] <= r["real_tool"] <= r["parsed"] <= 1 for r in rows)

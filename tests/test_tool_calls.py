"""Tool-call and thinking parsing: both Qwen formats, schema typing, errors, streaming.

The streaming parser is checked against the one-shot parser on random outputs cut into
random chunks (fresh seed per run, printed and named in assertion messages), and with
hypothesis on random text and random mutations of valid calls in both formats.
"""

import json
import random
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flash_moe.tool_calls import (
    ParsedOutput,
    ToolCall,
    ToolCallError,
    ToolCallStreamParser,
    format_tool_calls_openai,
    parse_output,
    parse_tool_call,
    parse_tool_calls,
    tool_call_format,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "threshold": {"type": "number"},
                "metric": {"type": "boolean"},
                "hours": {"type": "array", "items": {"type": "integer"}},
                "options": {"type": "object"},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "limit": {"type": ["integer", "null"]},
                "when": {"anyOf": [{"type": "integer"}, {"type": "boolean"}]},
                "note": {"description": "no type given"},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
        },
    },
}
TOOLS = [WEATHER, SEARCH]


def xml_call(name, **params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def json_call(name, **arguments):
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


@pytest.fixture
def seed():
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed={seed}")
    return seed


# ---- one-shot --------------------------------------------------------------------------


def test_xml_single_call_typed_by_schema():
    text = xml_call(
        "get_weather",
        city="Paris",
        days="3",
        threshold="2.5",
        metric="true",
        hours="[6, 12]",
        options='{"lang": "fr"}',
    )
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == ""
    assert calls == [
        ToolCall(
            "get_weather",
            {
                "city": "Paris",
                "days": 3,
                "threshold": 2.5,
                "metric": True,
                "hours": [6, 12],
                "options": {"lang": "fr"},
            },
            raw=text,
        )
    ]
    assert calls[0].id.startswith("call_") and calls[0].raw == text


def test_json_single_call():
    text = json_call("get_weather", city="Oslo", days=2)
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "" and calls == [
        ToolCall("get_weather", {"city": "Oslo", "days": 2}, raw=text)
    ]


def test_multiple_calls_with_text_and_thinking():
    first = xml_call("search", query="flash moe")
    second = json_call("get_weather", city="Rome")
    text = (
        f"<think>\nThe user wants two things.\n</think>\n\nLet me look.\n\n{first}\n{second}"
        "\n\nDone."
    )
    parsed = parse_output(text, TOOLS)
    assert parsed.reasoning == "The user wants two things."
    assert parsed.content == "Let me look.\n\nDone."
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        ("search", {"query": "flash moe"}),
        ("get_weather", {"city": "Rome"}),
    ]
    assert parse_tool_calls(text, TOOLS) == (parsed.content, parsed.tool_calls)
    ids = [c.id for c in parsed.tool_calls]
    assert len(set(ids)) == 2


def test_prompt_opened_think_block_and_calls_inside_thinking():
    call = xml_call("search", query="x")
    text = f"maybe {call} would help\n</think>\n\nSure.\n{call}"
    parsed = parse_output(text, TOOLS, in_reasoning=True)
    assert parsed.reasoning == f"maybe {call} would help"  # a drafted call is a thought
    assert parsed.content == "Sure."
    assert [c.name for c in parsed.tool_calls] == ["search"]
    unclosed = parse_output("still thinking <tool_call>", TOOLS, in_reasoning=True)
    assert unclosed == ParsedOutput("", "still thinking <tool_call>", [])


def test_string_values_lose_exactly_one_newline_each_side():
    text = xml_call(
        "search", query="\n  two lines\nhere  \n"
    )  # xml_call adds one each side
    (call,) = parse_tool_calls(text, TOOLS)[1]
    assert call.arguments == {"query": "\n  two lines\nhere  \n"}
    inline = "<tool_call><function=search><parameter=query>a b</parameter></function></tool_call>"
    assert parse_tool_calls(inline, TOOLS)[1][0].arguments == {"query": "a b"}


@pytest.mark.parametrize(
    "param, text, want",
    [
        ("days", "42", 42),
        ("days", " -7 ", -7),
        ("days", "3.0", 3),
        ("threshold", "3", 3),
        ("threshold", "-1e-3", -0.001),
        ("metric", "False", False),
        ("hours", "[1, 2, 3]", [1, 2, 3]),
        ("options", "{'nested': [True, None]}", {"nested": [True, None]}),
        ("unit", "c", "c"),
        ("limit", "null", None),
        ("limit", "5", 5),
        ("when", "true", True),
        ("when", "12", 12),
        ("note", '{"k": 1}', {"k": 1}),
        ("note", "12", "12"),
        ("city", "123", "123"),
        ("city", "null", "null"),
        ("extra_unknown", "7", "7"),
        ("extra_unknown", "[7]", [7]),
    ],
)
def test_xml_schema_typing(param, text, want):
    city = "" if param == "city" else "<parameter=city>\nX\n</parameter>\n"
    call = parse_tool_call(
        f"<function=get_weather>\n{city}"
        f"<parameter={param}>\n{text}\n</parameter>\n</function>",
        TOOLS,
    )
    assert isinstance(call, ToolCall), call
    got = call.arguments[param]
    assert got == want and type(got) is type(want), (got, want)


@pytest.mark.parametrize(
    "value, param, want",
    [
        ("5", "days", 5),
        (5.0, "days", 5),
        (5, "threshold", 5),
        (2.5, "threshold", 2.5),
        (12345, "city", "12345"),
        ("true", "metric", True),
        (None, "limit", None),
        ("[1]", "note", "[1]"),
    ],
)
def test_json_values_checked_against_schema(value, param, want):
    text = json.dumps({"name": "get_weather", "arguments": {"city": "X", param: value}})
    call = parse_tool_call(text, TOOLS)
    assert isinstance(call, ToolCall), call
    assert call.arguments[param] == want and type(call.arguments[param]) is type(want)


def test_json_arguments_as_encoded_string_and_parameters_key():
    encoded = json.dumps({"name": "search", "arguments": json.dumps({"query": "q"})})
    assert parse_tool_call(encoded, TOOLS).arguments == {"query": "q"}
    llama_style = json.dumps({"name": "search", "parameters": {"query": "q"}})
    assert parse_tool_call(llama_style, TOOLS).arguments == {"query": "q"}


def test_no_tools_keeps_text_values():
    text = xml_call("anything", a="1", b="true", c='["x"]')
    (call,) = parse_tool_calls(text)[1]
    assert call == ToolCall("anything", {"a": "1", "b": "true", "c": ["x"]}, raw=text)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "<tool_call>\n<function=search>\n<parameter=query>\nq\n</parameter>\n</function>",
            "unterminated",
        ),
        (xml_call("search", query="q").replace("</parameter>", ""), "not closed"),
        (
            xml_call("search", query="q").replace("</function>", ""),
            "not closed by </function>",
        ),
        ("<tool_call>\n<function=>\n</function>\n</tool_call>", "bad function name"),
        (
            "<tool_call>\n<function=search>\nhello\n</function>\n</tool_call>",
            "unexpected text",
        ),
        (
            xml_call("search", query="q").replace("</function>", "</function>junk"),
            "not closed",
        ),
        (
            '<tool_call>\n{"name": "search", "arguments": {"query": }\n</tool_call>',
            "bad JSON",
        ),
        ('<tool_call>\n{"arguments": {}}\n</tool_call>', "needs"),
        (
            '<tool_call>\n{"name": "search", "arguments": [1]}\n</tool_call>',
            "must be an object",
        ),
        ("<tool_call>\n</tool_call>", "neither"),
        ("<tool_call>call search(q)</tool_call>", "neither"),
        (xml_call("delete_all", query="q"), "unknown function 'delete_all'"),
        (xml_call("get_weather", days="3"), "missing required parameter(s) ['city']"),
        (
            xml_call("get_weather", city="X", days="3.5"),
            "'days': '3.5' is not of type integer",
        ),
        (xml_call("get_weather", city="X", days="three"), "is not of type integer"),
        (xml_call("get_weather", city="X", threshold="nan"), "is not of type number"),
        (xml_call("get_weather", city="X", metric="yes"), "is not of type boolean"),
        (xml_call("get_weather", city="X", hours="[1, 2"), "is not of type array"),
        (xml_call("get_weather", city="X", hours='{"a": 1}'), "is not of type array"),
        (xml_call("get_weather", city="X", when="soon"), "boolean or integer"),
        (json_call("get_weather", city="X", days=None), "is not of type integer"),
        (json_call("get_weather", city=["X"]), "is not of type string"),
        (
            xml_call("search", query="a").replace(
                "</function>", "<parameter=query>\nb\n</parameter>\n</function>"
            ),
            "given twice",
        ),
        # JSON with a key given twice, at any depth: the call shown and the call run must not differ
        ('<tool_call>{"name": "search", "name": "x", "arguments": {"query": "q"}}</tool_call>', "'name' given twice"),
        (
            '<tool_call>{"name": "search", "arguments": {"query": "a"}, "arguments": {"query": "b"}}</tool_call>',
            "'arguments' given twice",
        ),
        ('<tool_call>{"name": "search", "arguments": {"query": "a", "query": "b"}}</tool_call>', "'query' given twice"),
        (
            '<tool_call>{"name": "get_weather", "arguments": {"city": "X", "options": {"a": [{"k": 1, "k": 2}]}}}'
            "</tool_call>",
            "'k' given twice",
        ),
        (
            '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"a\\", \\"query\\": \\"b\\"}"}</tool_call>',
            "'query' given twice",
        ),
        (
            '<tool_call>{"name": "search", "arguments": {"query": "a"}, "parameters": {"query": "b"}}</tool_call>',
            'both "arguments" and "parameters"',
        ),
        (xml_call("get_weather", city="X", options='{"a": 1, "a": 2}'), "'options': key 'a' given twice"),
        (xml_call("get_weather", city="X", options="{'a': 1, 'a': 2}"), "'options': key 'a' given twice"),
        (xml_call("search", query="q", extra='{"a": {"b": 1, "b": 2}}'), "'extra': key 'b' given twice"),
    ],
)
def test_malformed_calls_are_error_values(text, message):
    content, calls = parse_tool_calls(text, TOOLS)
    assert len(calls) == 1 and isinstance(calls[0], ToolCallError), calls
    assert message in calls[0].message, calls[0].message
    assert calls[0].raw == text
    assert content == ""


def test_format_openai_and_template_detection():
    calls = parse_tool_calls(xml_call("search", query="ü") + json_call("nope"), TOOLS)[
        1
    ]
    (formatted,) = format_tool_calls_openai(calls)  # the error is left out
    assert formatted["id"] == calls[0].id and formatted["type"] == "function"
    assert formatted["function"]["name"] == "search"
    assert json.loads(formatted["function"]["arguments"]) == {"query": "ü"}
    assert (
        tool_call_format("...<tool_call>\\n<function=example_function_name>...")
        == "xml"
    )
    assert (
        tool_call_format('<tool_call>\\n{"name": <function-name>, "arguments": ...}')
        == "json"
    )
    assert tool_call_format(None) == "json"


# ---- streaming -------------------------------------------------------------------------


def run_stream(text, chunks, tools=TOOLS, in_reasoning=False, parse_tools=True):
    """Feed `text` cut at `chunks` boundaries; return (merged ParsedOutput, events)."""
    parser = ToolCallStreamParser(tools, in_reasoning=in_reasoning, parse_tools=parse_tools)
    events, pos = [], 0
    for size in chunks:
        events += parser.feed(text[pos : pos + size])
        pos += size
    events += parser.feed(text[pos:])
    events += parser.finish()
    merged = ParsedOutput(
        "".join(s for kind, s in events if kind == "text"),
        "".join(s for kind, s in events if kind == "reasoning"),
        [s for kind, s in events if kind == "tool_call"],
    )
    return merged, events


def random_output(rng):
    """A plausible or broken model output built from random pieces."""
    words = [
        "Hello",
        "world",
        "ü",
        "<",
        "<t",
        "<tool",
        "</think",
        "<think",
        "</tool_call",
        "<function=",
        "x<y",
        "\n",
        "\n\n",
        " ",
        "  ",
        "done.",
    ]
    pieces = []
    for _ in range(rng.randint(1, 8)):
        choice = rng.random()
        if choice < 0.3:
            pieces.append(
                "".join(
                    rng.choice(words) + rng.choice(["", " ", "\n"])
                    for _ in range(rng.randint(1, 6))
                )
            )
        elif choice < 0.45:
            pieces.append(
                f"<think>\n{rng.choice(words)} plan {rng.choice(words)}\n</think>\n\n"
            )
        elif choice < 0.65:
            pieces.append(
                xml_call(
                    "get_weather",
                    city=rng.choice(["Paris", "<b>", "a\nb"]),
                    days=rng.choice(["3", "3.5", "x"]),
                )
            )
        elif choice < 0.8:
            pieces.append(json_call("search", query=rng.choice(["q", "</tool", "{}"])))
        elif choice < 0.9:
            pieces.append(
                rng.choice(
                    [
                        "<tool_call>\n{bad json}\n</tool_call>",
                        xml_call("unknown_fn"),
                        "<tool_call><function=search>",
                    ]
                )
            )
        else:
            pieces.append(rng.choice(["\n", "  ", "\n\n"]))
    if rng.random() < 0.2:
        pieces.append(
            rng.choice(
                [
                    "<tool_call>\n<function=search>\n<param",
                    "<thi",
                    "<tool_c",
                    "<think>unfinished",
                ]
            )
        )
    return "".join(pieces)


def test_stream_equals_one_shot_char_by_char_and_random_chunks(seed):
    rng = random.Random(seed)
    fixed = [
        f"<think>\nplan\n</think>\n\nLet me look.\n\n{xml_call('search', query='a')}\n"
        f"{json_call('get_weather', city='Rome', days='2')}",
        "Plain answer with < and <t but no tags.\n",
        xml_call("get_weather", days="3"),
        "<tool_call>\n<function=search>\n<parameter=query>\nq",
    ]
    for case in range(200):
        text = fixed[case] if case < len(fixed) else random_output(rng)
        in_reasoning = case >= len(fixed) and rng.random() < 0.3
        want = parse_output(text, TOOLS, in_reasoning=in_reasoning)
        chunkings = {"one char": [1] * len(text), "whole": [len(text)]}
        chunkings["random"] = [rng.randint(1, 12) for _ in range(len(text))]
        for label, chunks in chunkings.items():
            got, events = run_stream(text, chunks, in_reasoning=in_reasoning)
            assert got == want, f"seed={seed} case={case} {label}: {text!r}"
            assert all(s for kind, s in events if kind != "tool_call"), "empty event"


def test_parse_tools_off_leaves_calls_as_text(seed):
    """chat --no-tools: tool-call markup is content, thinking is still split off."""
    text = f"<think>\nplan {xml_call('search', query='x')}\n</think>\nOK.\n{json_call('search', query='y')}"
    want = ParsedOutput(f"OK.\n{json_call('search', query='y')}", f"plan {xml_call('search', query='x')}", [])
    assert parse_output(text, TOOLS, parse_tools=False) == want
    assert parse_output(text, TOOLS).tool_calls != [], "on by default"
    rng = random.Random(seed)
    for case in range(50):
        text = random_output(rng)
        want = parse_output(text, TOOLS, parse_tools=False)
        assert want.tool_calls == []
        got, _ = run_stream(text, [rng.randint(1, 8) for _ in text], parse_tools=False)
        assert got == want, f"seed={seed} case={case}: {text!r}"


def test_stream_holds_back_partial_tags():
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("Checking <tool_") == [("text", "Checking")]
    assert parser.feed("call>\n<function=search>\n<parameter=query>\nq\n") == []
    events = parser.feed("</parameter>\n</function>\n</tool_call>")
    assert [kind for kind, _ in events] == ["tool_call"] and events[0][1].arguments == {
        "query": "q"
    }
    assert parser.feed("<") == [] and parser.feed("b>") == [("text", "\n\n<b>")]
    assert parser.finish() == []


def test_stream_is_incremental_and_finish_flushes():
    parser = ToolCallStreamParser(None, in_reasoning=True)
    assert parser.feed("step one ") == [("reasoning", "step one")]
    assert parser.feed("</thi") == []
    assert parser.feed("nk>\n\nAnswer: 4 <") == [("text", "Answer: 4")]
    assert parser.finish() == [("text", " <")]
    open_call = ToolCallStreamParser(TOOLS)
    assert open_call.feed("<tool_call>\n<function=search>") == []
    ((kind, error),) = open_call.finish()
    assert kind == "tool_call" and isinstance(error, ToolCallError)
    assert (
        error.raw == "<tool_call>\n<function=search>"
        and "unterminated" in error.message
    )


def test_stream_never_raises_on_garbage(seed):
    rng = random.Random(seed)
    alphabet = list('<>/=_{}"\n :tool_cahinkfuepr') + [
        "<tool_call>",
        "</tool_call>",
        "<think>",
        "</think>",
        "<function=",
        "<parameter=",
    ]
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        got, _ = run_stream(text, [rng.randint(1, 5) for _ in range(len(text))])
        assert got == parse_output(text, TOOLS), f"seed={seed}: {text!r}"


# ---- property tests (hypothesis) -------------------------------------------------------

FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<think>", "</think>", "<function=", "</function>",
    "<parameter=", "</parameter>", "<", ">", "/", "=", "\n", " ", "{", "}", "[", "]",
    '"', "'", ":", ",", "\\", "name", "arguments", "parameters", "search", "query",
    "get_weather", "city", "days", "hours", "options", "true", "null", "1e999", "\u202e",
]
noise = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=30
).map("".join)
# XML values cannot hold their closing tag, and no call can hold `</tool_call>`.
value = st.text(max_size=12).filter(lambda v: "</" not in v)
weather_args = st.fixed_dictionaries(
    {"city": value},
    optional={
        "days": st.integers(-(10**20), 10**20),
        "metric": st.booleans(),
        "hours": st.lists(st.integers(0, 23), max_size=3),
        "options": st.dictionaries(value, st.integers() | value | st.none(), max_size=3),
    },
)
valid_call = st.one_of(
    st.tuples(st.just("search"), st.fixed_dictionaries({"query": value})),
    st.tuples(st.just("get_weather"), weather_args),
)


def render(name, arguments, fmt):
    """A call as the model writes it, in the XML or the JSON format."""
    if fmt == "json":
        return json_call(name, **arguments)
    as_text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in arguments.items()}
    return xml_call(name, **as_text)


@st.composite
def mutated(draw, text):
    """`text` with a few random edits: cuts, inserted fragments, duplicated or swapped slices."""
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 12)))
        edit = draw(st.sampled_from(["cut", "insert", "repeat", "replace"]))
        if edit == "cut":
            text = text[:i] + text[j:]
        elif edit == "insert":
            text = text[:i] + draw(noise) + text[i:]
        elif edit == "repeat":
            text = text[:j] + text[i:j] + text[j:]
        else:
            text = text[:i] + draw(st.sampled_from(FRAGMENTS)) + text[j:]
    return text


def chunks_of(text):
    return st.lists(st.integers(1, 16), max_size=len(text) + 1)


@pytest.fixture
def no_hang():
    """An example running past 10 s fails as a hang (the timer interrupts even an endless loop)."""

    def hung(signum, frame):
        raise TimeoutError("parser hung")

    previous = signal.signal(signal.SIGALRM, hung)
    yield lambda: signal.setitimer(signal.ITIMER_REAL, 10)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def check_parsers(text, chunks, **kwargs):
    """Both parsers take `text` without raising, agree for this chunking, and report
    malformed calls as ToolCallError values, never as a parser failure."""
    want = parse_output(text, TOOLS, **kwargs)
    got, _ = run_stream(text, chunks, **kwargs)
    assert got == want
    for call in want.tool_calls:
        assert isinstance(call, (ToolCall, ToolCallError))
        if isinstance(call, ToolCallError):
            assert not call.message.startswith("tool call parser failed"), call.message
    return want


SETTINGS = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@SETTINGS
@given(data=st.data())
def test_property_noise_never_breaks_the_parsers(no_hang, data):
    text = data.draw(noise)
    no_hang()
    check_parsers(
        text,
        data.draw(chunks_of(text)),
        in_reasoning=data.draw(st.booleans()),
        parse_tools=data.draw(st.booleans()),
    )


@SETTINGS
@given(call=valid_call, fmt=st.sampled_from(["xml", "json"]), data=st.data())
def test_property_mutated_calls_never_break_the_parsers(no_hang, call, fmt, data):
    text = data.draw(mutated(render(*call, fmt)))
    no_hang()
    check_parsers(text, data.draw(chunks_of(text)))


@settings(SETTINGS, max_examples=80)
@given(call=valid_call, fmt=st.sampled_from(["xml", "json"]), data=st.data())
def test_property_valid_call_parses_the_same_in_any_chunking(no_hang, call, fmt, data):
    name, arguments = call
    prefix = data.draw(st.text(max_size=10).filter(lambda t: "<" not in t))
    text = prefix + render(name, arguments, fmt) + "\n"
    no_hang()
    parsed = check_parsers(text, data.draw(chunks_of(text)))
    assert parsed.content == prefix.strip() and len(parsed.tool_calls) == 1
    (got,) = parsed.tool_calls
    assert isinstance(got, ToolCall), got
    assert (got.name, got.arguments) == (name, arguments)

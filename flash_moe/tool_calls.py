"""Parse tool calls and thinking out of Qwen model output, one-shot or streaming.

Two tool-call bodies exist between `<tool_call>` and `</tool_call>`:
- XML (Qwen3.5, Qwen3-Coder): `<function=NAME>` + `<parameter=P>\\nvalue\\n</parameter>`
  blocks + `</function>`; values are text, typed here by the tool's JSON schema.
- JSON (Qwen2.5, Qwen3, Qwen3-Next): `{"name": ..., "arguments": {...}}`.
The body's first character decides, so one parser serves both families.

Output is split into segments at the tags: text, reasoning (inside `<think>…</think>`;
tool calls there are thoughts, not calls) and tool calls. Each text or reasoning segment
is stripped of surrounding whitespace, and segments of one kind are joined by a blank
line. A malformed call becomes a `ToolCallError`: parsing never raises on model output.
This module knows strings only; tokens and chat templates live elsewhere.
"""

import ast
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
THINK_START, THINK_END = "<think>", "</think>"
_SEPARATOR = "\n\n"  # between two segments of the same kind


def _new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    name: str
    arguments: Dict[str, Any]
    id: str = field(default_factory=_new_call_id, compare=False)
    raw: str = ""


@dataclass
class ToolCallError:
    message: str
    raw: str = ""


ParsedCall = Union[ToolCall, ToolCallError]


@dataclass
class ParsedOutput:
    content: str
    reasoning: str
    tool_calls: List[ParsedCall]


class _Malformed(ValueError):
    pass


class _DuplicateKey(_Malformed):
    pass


def _unique_keys(pairs: list) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(f"key {key!r} given twice")
        seen.add(key)
    return dict(pairs)


def _loads(text: str) -> Any:
    """json.loads that refuses an object with a key given twice (at any depth): the call shown to the user
    and the call another reader of the same text sees must not differ."""
    return json.loads(text, strict=False, object_pairs_hook=_unique_keys)


def _literal(text: str) -> Any:
    """ast.literal_eval that refuses a dict with a key given twice (at any depth)."""
    tree = ast.parse(text, mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict) and None not in node.keys:
            _unique_keys([(ast.literal_eval(key), None) for key in node.keys])
    return ast.literal_eval(tree)


def tool_call_format(chat_template: str) -> str:
    """'xml' when the chat template teaches `<function=…>` calls (Qwen3.5), else 'json'."""
    return "xml" if "<function=" in (chat_template or "") else "json"


# ---- JSON-schema typing ------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")
_CONTAINERS = {"array": list, "object": dict}


def _schema_types(schema: Any) -> Optional[set]:
    """JSON types a property schema allows; None when it says nothing usable."""
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list) and kind:
        return set(kind)
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            subtypes = [_schema_types(sub) for sub in schema[key]]
            if subtypes and all(t is not None for t in subtypes):
                return set().union(*subtypes)
            return None
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        names = {str: "string", bool: "boolean", int: "integer", float: "number"}
        names.update({list: "array", dict: "object", type(None): "null"})
        return {names.get(type(v), "string") for v in schema["enum"]}
    return None


def _text_to(kind: str, text: str) -> Any:
    """Read `text` as a value of JSON type `kind`; raise ValueError if it is not one."""
    word = text.strip()
    if kind == "boolean" and word.lower() in ("true", "false"):
        return word.lower() == "true"
    if kind in ("integer", "number") and _NUMBER.fullmatch(word):
        if _INTEGER.fullmatch(word):
            return int(word)
        value = float(word)
        if math.isfinite(value) and kind == "number":
            return value
        if math.isfinite(value) and value.is_integer():
            return int(value)
    if kind in ("array", "object"):
        try:
            value = _loads(word)
        except _DuplicateKey:
            raise
        except ValueError:
            try:  # Python-literal spelling ('a', True, None) is a common slip
                value = _literal(word)
            except _DuplicateKey:
                raise
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                value = None
        if isinstance(value, _CONTAINERS[kind]):
            return value
    raise ValueError


def _coerce(name: str, value: Any, schema: Any, from_text: bool) -> Any:
    """Type one argument by its property schema.

    `from_text` marks XML values, which are always text: untyped ones become JSON
    containers when they parse as one. JSON values keep their type unless the schema
    asks for another one that they can be read as ("3" -> 3, 3 -> "3").
    """
    types = _schema_types(schema)
    if types is None:
        if from_text:
            try:
                parsed = _loads(value)
                return parsed if isinstance(parsed, (dict, list)) else value
            except _DuplicateKey as e:
                raise _Malformed(f"parameter {name!r}: {e}") from None
            except ValueError:
                return value
        return value
    if isinstance(value, str):
        if "null" in types and value.strip() == "null":
            return None
        if "string" in types:
            return value
        for kind in ("boolean", "integer", "number", "array", "object"):
            if kind in types:
                try:
                    return _text_to(kind, value)
                except _DuplicateKey as e:
                    raise _Malformed(f"parameter {name!r}: {e}") from None
                except ValueError:
                    pass
    elif value is None:
        if "null" in types:
            return None
    elif isinstance(value, bool):
        if "boolean" in types:
            return value
    elif isinstance(value, (int, float)):
        if "number" in types or (isinstance(value, int) and "integer" in types):
            return value
        if "integer" in types and value.is_integer():
            return int(value)
    elif (
        isinstance(value, list)
        and "array" in types
        or isinstance(value, dict)
        and "object" in types
    ):
        return value
    if "string" in types and isinstance(value, (bool, int, float)):
        return json.dumps(value)
    raise _Malformed(
        f"parameter {name!r}: {value!r} is not of type {' or '.join(sorted(types))}"
    )


def _find_tool(name: str, tools: Optional[list]) -> Optional[dict]:
    """The tool's `function` dict (OpenAI format, or a bare function dict)."""
    for tool in tools or []:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(function, dict) and function.get("name") == name:
            return function
    return None


def _typed_arguments(
    name: str, arguments: dict, tools: Optional[list], from_text: bool
) -> dict:
    if not tools:
        return {
            key: _coerce(key, value, None, from_text)
            for key, value in arguments.items()
        }
    function = _find_tool(name, tools)
    if function is None:
        known = [_tool_name(t) for t in tools]
        raise _Malformed(
            f"unknown function {name!r} (tools: {', '.join(map(str, known))})"
        )
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties") or {}
    typed = {
        key: _coerce(key, value, properties.get(key), from_text)
        for key, value in arguments.items()
    }
    missing = [p for p in parameters.get("required") or [] if p not in typed]
    if missing:
        raise _Malformed(f"function {name!r}: missing required parameter(s) {missing}")
    return typed


def _tool_name(tool: Any) -> Any:
    function = tool.get("function", tool) if isinstance(tool, dict) else None
    return function.get("name") if isinstance(function, dict) else None


# ---- one call body -----------------------------------------------------------------

_FUNCTION_OPEN = re.compile(r"\s*<function=([^>\n]*)>")
_PARAMETER_OPEN = re.compile(r"\s*<parameter=([^>\n]*)>")
_NAME = re.compile(r"[^\s<>=]+")


def _strip_one_newline(value: str) -> str:
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def _parse_xml_body(body: str) -> Tuple[str, dict]:
    opened = _FUNCTION_OPEN.match(body)
    if not opened:
        raise _Malformed("expected <function=NAME>")
    name = opened.group(1).strip()
    if not _NAME.fullmatch(name):
        raise _Malformed(f"bad function name {name!r}")
    end = body.rfind("</function>")
    if end < opened.end() or body[end + len("</function>") :].strip():
        raise _Malformed(f"<function={name}> is not closed by </function>")
    inner, pos, arguments = body[:end], opened.end(), {}
    while inner[pos:].strip():
        param = _PARAMETER_OPEN.match(inner, pos)
        if not param:
            junk = inner[pos:].strip()[:40]
            raise _Malformed(
                f"function {name!r}: unexpected text {junk!r}, expected <parameter=P>"
            )
        key = param.group(1).strip()
        if not _NAME.fullmatch(key):
            raise _Malformed(f"function {name!r}: bad parameter name {key!r}")
        close = inner.find("</parameter>", param.end())
        if close < 0:
            raise _Malformed(f"function {name!r}: <parameter={key}> is not closed")
        if key in arguments:
            raise _Malformed(f"function {name!r}: parameter {key!r} given twice")
        arguments[key] = _strip_one_newline(inner[param.end() : close])
        pos = close + len("</parameter>")
    return name, arguments


def _parse_json_body(body: str) -> Tuple[str, dict]:
    try:
        call = _loads(body)
    except _DuplicateKey as e:
        raise _Malformed(f"JSON tool call: {e}") from None
    except ValueError as e:
        raise _Malformed(f"bad JSON in tool call: {e}") from None
    except RecursionError:
        raise _Malformed("bad JSON in tool call: nested too deeply") from None
    if (
        not isinstance(call, dict)
        or not isinstance(call.get("name"), str)
        or not call["name"]
    ):
        raise _Malformed('JSON tool call needs {"name": str, "arguments": {...}}')
    if "arguments" in call and "parameters" in call:
        raise _Malformed(f"function {call['name']!r}: both \"arguments\" and \"parameters\" given")
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # some models send the arguments JSON-encoded
        try:
            arguments = _loads(arguments) if arguments.strip() else {}
        except _DuplicateKey as e:
            raise _Malformed(f"function {call['name']!r}: arguments: {e}") from None
        except ValueError as e:
            raise _Malformed(
                f"function {call['name']!r}: bad JSON arguments: {e}"
            ) from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise _Malformed(f"function {call['name']!r}: arguments must be an object")
    return call["name"], arguments


def parse_tool_call(
    body: str, tools: Optional[list] = None, raw: Optional[str] = None
) -> ParsedCall:
    """Parse the text between `<tool_call>` and `</tool_call>` (XML or JSON body).

    Args:
        body: The call's body.
        tools: OpenAI-format tool list; when given, the name must be one of them, the
            required parameters must be present, and values are typed by the schema.
        raw: The text to keep as `raw` (defaults to the body wrapped in the tags).

    Returns:
        A ToolCall, or a ToolCallError saying what is wrong; never raises.
    """
    raw = TOOL_CALL_START + body + TOOL_CALL_END if raw is None else raw
    try:
        stripped = body.strip()
        is_xml = stripped.startswith("<function=")
        if is_xml:
            name, arguments = _parse_xml_body(body)
        elif stripped.startswith("{"):
            name, arguments = _parse_json_body(stripped)
        else:
            raise _Malformed(
                f"tool call is neither <function=…> nor JSON: {stripped[:40]!r}"
            )
        arguments = _typed_arguments(name, arguments, tools, from_text=is_xml)
        return ToolCall(name, arguments, raw=raw)
    except _Malformed as e:
        return ToolCallError(str(e), raw)
    except Exception as e:  # a parser bug must not end a generation stream
        return ToolCallError(f"tool call parser failed: {type(e).__name__}: {e}", raw)


# ---- whole outputs -----------------------------------------------------------------

_THINK_BLOCK = re.escape(THINK_START) + r"(.*?)(?:" + re.escape(THINK_END) + r"|\Z)"
_BLOCK = re.compile(
    _THINK_BLOCK
    + "|"
    + re.escape(TOOL_CALL_START)
    + r"(.*?)("
    + re.escape(TOOL_CALL_END)
    + r"|\Z)",
    re.DOTALL,
)
_THINK_ONLY = re.compile(_THINK_BLOCK, re.DOTALL)


def parse_output(
    text: str,
    tools: Optional[list] = None,
    in_reasoning: bool = False,
    parse_tools: bool = True,
) -> ParsedOutput:
    """Split a complete model output into content, reasoning and tool calls.

    Args:
        text: The generated text (special tokens such as <|im_end|> removed).
        tools: OpenAI-format tool list used to check and type the calls.
        in_reasoning: True when the prompt ended inside `<think>` (Qwen templates that open
            the think block for the model), so the output starts as reasoning.
        parse_tools: False leaves tool-call markup in the content as text (no calls are
            parsed: a chat with its tools off must not run what the model writes).
    """
    if in_reasoning:
        text = THINK_START + text
    content, reasoning, calls, pos = [], [], [], 0
    for block in (_BLOCK if parse_tools else _THINK_ONLY).finditer(text):
        content.append(text[pos : block.start()])
        if block.group(1) is not None:
            reasoning.append(block.group(1))
        elif block.group(3):
            calls.append(parse_tool_call(block.group(2), tools))
        else:
            calls.append(ToolCallError("unterminated <tool_call>", block.group(0)))
        pos = block.end()
    content.append(text[pos:])
    return ParsedOutput(_join_segments(content), _join_segments(reasoning), calls)


def _join_segments(parts: List[str]) -> str:
    return _SEPARATOR.join(p.strip() for p in parts if p.strip())


def parse_tool_calls(
    text: str, tools: Optional[list] = None
) -> Tuple[str, List[ParsedCall]]:
    """Return (content without tool calls or thinking, tool calls and errors in order)."""
    parsed = parse_output(text, tools)
    return parsed.content, parsed.tool_calls


def format_tool_calls_openai(calls: List[ParsedCall]) -> List[dict]:
    """OpenAI `message.tool_calls` for the well-formed calls (errors are left out)."""
    return [
        {
            "id": call.id,
            "type": "function",
            "function": {
                "name": call.name,
                "arguments": json.dumps(call.arguments, ensure_ascii=False),
            },
        }
        for call in calls
        if isinstance(call, ToolCall)
    ]


# ---- streaming ---------------------------------------------------------------------


def partial_tag_len(text: str, tags: Tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    for size in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        if any(tag.startswith(text[-size:]) for tag in tags):
            return size
    return 0


_MODE_AFTER = {TOOL_CALL_START: "tool", THINK_START: "reasoning", THINK_END: "text"}


class ToolCallStreamParser:
    """Incremental twin of `parse_output`: feed text deltas, get events.

    Events are ("text", str), ("reasoning", str) and ("tool_call", ToolCall |
    ToolCallError); with `parse_tools=False` tool-call markup is text. A delta ending in a
    possible tag prefix ("<tool_") is held back until the next delta decides it, and
    whitespace at segment edges is held until it is known not to be an edge, so
    concatenating the events gives exactly `parse_output`'s result for any split of the
    text.
    """

    def __init__(
        self,
        tools: Optional[list] = None,
        in_reasoning: bool = False,
        parse_tools: bool = True,
    ):
        self.tools = tools
        self._starts = (TOOL_CALL_START, THINK_START) if parse_tools else (THINK_START,)
        self._mode = "reasoning" if in_reasoning else "text"
        self._buffer = ""
        self._held_space = ""  # trailing whitespace of the open segment
        self._segment_started = False  # open segment has shown non-whitespace text
        self._shown = {"text": False, "reasoning": False}

    def feed(self, delta: str) -> List[tuple]:
        self._buffer += delta
        events = []
        while True:
            if self._mode == "tool":
                end = self._buffer.find(TOOL_CALL_END)
                if end < 0:
                    return events
                body = self._buffer[:end]
                self._buffer = self._buffer[end + len(TOOL_CALL_END) :]
                events.append(("tool_call", parse_tool_call(body, self.tools)))
                self._mode = "text"
                continue
            tags = self._starts if self._mode == "text" else (THINK_END,)
            found = [(i, tag) for tag in tags if (i := self._buffer.find(tag)) >= 0]
            if not found:
                keep = partial_tag_len(self._buffer, tags)
                self._show(self._buffer[: len(self._buffer) - keep], events)
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return events
            start, tag = min(found)
            self._show(self._buffer[:start], events)
            self._buffer = self._buffer[start + len(tag) :]
            self._end_segment()
            self._mode = _MODE_AFTER[tag]

    def finish(self) -> List[tuple]:
        """Flush what is held back; an open tool call becomes a ToolCallError."""
        events = []
        if self._mode == "tool":
            raw = TOOL_CALL_START + self._buffer
            events.append(("tool_call", ToolCallError("unterminated <tool_call>", raw)))
        else:
            self._show(self._buffer, events)
        self._buffer = ""
        self._end_segment()
        self._mode = "text"
        return events

    def _show(self, text: str, events: list) -> None:
        kind = self._mode
        if not self._segment_started:
            text = text.lstrip()
            if not text:
                return
            self._segment_started = True
            if self._shown[kind]:
                text = _SEPARATOR + text
        text = self._held_space + text
        shown = text.rstrip()
        self._held_space = text[len(shown) :]
        if shown:
            events.append((kind, shown))
            self._shown[kind] = True

    def _end_segment(self) -> None:
        self._held_space, self._segment_started = "", False

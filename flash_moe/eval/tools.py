"""``flash-moe eval --tool-calls``: how often a model's replies are valid tool calls, per (model, K).

The bundled suite (``flash_moe/data/tool_calls.jsonl``) holds 44 user requests, each offered 3 tools
(OpenAI schemas) and paired with the call a correct answer makes. Each reply is scored four ways, each
implying the ones before it: it parses into a call (either Qwen format: XML ``<function=...>`` or JSON), the
call names one of the offered tools, its arguments validate against that tool's schema, and it equals the
expected call. Arguments are validated as the model wrote them; XML values, which are text, are first read
as the schema's type (as ``flash_moe.tool_calls`` hands them to an application).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import read_bytes
from ..tool_calls import TOOL_CALL_START, ToolCall, parse_output, parse_tool_call
from .data import DATA
from .perplexity import expert_bits

SUITE = DATA / "tool_calls.jsonl"
_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
          "null": type(None)}


def schema_errors(value, schema: dict, where: str = "arguments") -> list[str]:
    """What makes ``value`` invalid under ``schema``, for the subset tool schemas use: type (one or a list),
    enum, properties, required, additionalProperties (false), items. Empty when valid."""
    if not isinstance(schema, dict):
        return []
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds or []
    if kinds and not any(_is(value, k) for k in kinds):
        return [f"{where}: {value!r} is not of type {' or '.join(kinds)}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        errors += [f"{where}: missing required {key!r}" for key in schema.get("required") or [] if key not in value]
        for key, v in value.items():
            if key in props:
                errors += schema_errors(v, props[key], f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unexpected {key!r}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            errors += schema_errors(v, schema["items"], f"{where}[{i}]")
    return errors


def _is(value, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):  # JSON true is no number
        return False
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(kind, object))


def _function(tools: list, name: str) -> dict | None:
    for tool in tools:
        fn = tool.get("function", tool)
        if fn.get("name") == name:
            return fn
    return None


def score_reply(text: str, tools: list, expected: dict) -> dict:
    """Score one reply (the raw generated text): ``{"parsed", "real_tool", "valid", "exact", "error"}``."""
    out = {"parsed": False, "real_tool": False, "valid": False, "exact": False, "error": ""}
    calls = parse_output(text).tool_calls
    if not calls or not isinstance(calls[0], ToolCall):
        out["error"] = calls[0].message if calls else "no tool call"
        return out
    call = calls[0]
    out["parsed"] = True
    fn = _function(tools, call.name)
    if fn is None:
        out["error"] = f"unknown tool {call.name!r}"
        return out
    out["real_tool"] = True
    body = call.raw[len(TOOL_CALL_START):].rsplit("</tool_call>", 1)[0]
    arguments = call.arguments
    if body.strip().startswith("<function="):  # XML: text values, read as the schema's types
        typed = parse_tool_call(body, tools)
        if not isinstance(typed, ToolCall):
            out["error"] = typed.message
            return out
        arguments = typed.arguments
    errors = schema_errors(arguments, fn.get("parameters") or {})
    if errors:
        out["error"] = errors[0]
        return out
    out["valid"] = True
    out["exact"] = call.name == expected["name"] and arguments == expected["arguments"]
    if not out["exact"]:
        out["error"] = f"expected {json.dumps(expected)}"
    return out


def read_suite(path: str | Path | None = None) -> list[dict]:
    """The suite's items: ``{"messages", "tools", "expected": {"name", "arguments"}}`` per JSONL line."""
    path = Path(path) if path else SUITE
    try:
        lines = read_bytes(path, 64 << 20).decode("utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"--suite {path}: no such file") from None
    items = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            ok = (isinstance(item["messages"], list) and isinstance(item["tools"], list)
                  and isinstance(item["expected"]["name"], str) and isinstance(item["expected"]["arguments"], dict))
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"--suite {path}:{n}: expected {{\"messages\": [...], \"tools\": [...], "
                             f"\"expected\": {{\"name\": ..., \"arguments\": {{...}}}}}}")
        items.append(item)
    if not items:
        raise ValueError(f"--suite {path}: no items")
    return items


@dataclass
class ToolRow:
    """Shares of the suite's replies, per (model, K)."""

    model: str
    bits: int | None
    k: int
    items: int
    parsed: float
    real_tool: float
    valid: float
    exact: float

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_tool_calls(models, suite=None, *, k=None, max_tokens: int = 256, enable_thinking: bool = False,
                        progress: bool = True, load_options: dict | None = None, replies: list | None = None) -> list[ToolRow]:
    """Generate a greedy reply to every suite item per (model, K) and score it; ``replies``, when a list, collects
    ``(model, k, item id, text, score)`` for inspection."""
    from tqdm.auto import tqdm

    from .perplexity import OneAtATime, label

    items = read_suite(suite)
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    ks = [None] if k is None else ([k] if isinstance(k, int) else list(k))
    loaded, rows = OneAtATime(load_options or {}), []
    try:
        with tqdm(total=len(items) * len(models) * len(ks), unit="reply", disable=not progress, desc="tool calls") as bar:
            for m in models:
                model = loaded.get(m)
                before = model.experts_per_token
                for kk in ks:
                    kk = kk or before
                    if not 1 <= kk <= model.config.num_experts:
                        raise ValueError(f"--k {kk}: {label(m)} has {model.config.num_experts} experts")
                    model.set_experts_per_token(kk)
                    scores = []
                    for item in items:
                        text = model.generate(item["messages"], tools=item["tools"], max_tokens=max_tokens,
                                              enable_thinking=enable_thinking)
                        scores.append(score_reply(str(text), item["tools"], item["expected"]))
                        if replies is not None:
                            replies.append((label(m), kk, item.get("id"), str(text), scores[-1]))
                        bar.update(1)
                    n = len(scores)
                    rows.append(ToolRow(label(m), expert_bits(model), kk, n,
                                        *(sum(s[key] for s in scores) / n for key in ("parsed", "real_tool", "valid", "exact"))))
                model.set_experts_per_token(before)
    finally:
        loaded.close()
    return rows


def tool_table(rows) -> str:
    lines = [f"{'model':<32} {'bits':>4} {'K':>3} {'parsed':>7} {'real tool':>9} {'valid':>6} {'exact':>6} {'items':>6}"]
    for r in rows:
        name = r.model if len(r.model) <= 32 else "…" + r.model[-31:]
        lines.append(f"{name:<32} {r.bits if r.bits else '-':>4} {r.k:>3} {r.parsed:>7.3f} {r.real_tool:>9.3f} "
                     f"{r.valid:>6.3f} {r.exact:>6.3f} {r.items:>6}")
    return "\n".join(lines)

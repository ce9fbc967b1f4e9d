"""The Anthropic Messages format: requests converted to template messages, answers as content blocks or
streamed events (message_start, content_block_start/delta/stop, message_delta, message_stop)."""

from __future__ import annotations

import json
import uuid

from .turn import BadRequest


def _text(blocks, param: str) -> str:
    if isinstance(blocks, str):
        return blocks
    parts = []
    for j, b in enumerate(blocks or []):
        if b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise BadRequest(f"{param}[{j}]: block of type {b.get('type')!r} is not supported here (text only)",
                             f"{param}[{j}]")
        parts.append(b["text"])
    return "".join(parts)


def to_messages(body) -> list[dict]:
    """Messages request -> template messages: tool_result blocks become tool messages, tool_use blocks calls."""
    out = [{"role": "system", "content": _text(body.system, "system")}] if body.system else []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text, reasoning, calls = [], [], []
        for j, b in enumerate(m.content):
            kind, param = b.get("type"), f"messages[{i}].content[{j}]"
            if kind == "text" and isinstance(b.get("text"), str):
                text.append(b["text"])
            elif kind == "thinking" and m.role == "assistant":
                reasoning.append(str(b.get("thinking", "")))
            elif kind == "tool_use" and m.role == "assistant":
                if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                    raise BadRequest(f"{param}: tool_use needs a name and an input object", param)
                calls.append({"id": b.get("id"), "type": "function",
                              "function": {"name": b["name"], "arguments": b.get("input", {})}})
            elif kind == "tool_result" and m.role == "user":
                content = _text(b.get("content") or "", f"{param}.content")
                if b.get("is_error"):
                    content = f"error: {content}"
                out.append({"role": "tool", "content": content, "tool_call_id": b.get("tool_use_id")})
            else:
                raise BadRequest(f"{param}: block of type {kind!r} is not supported in a {m.role} message", param)
        if text or calls or reasoning:
            msg = {"role": m.role, "content": "".join(text)}
            if calls:
                msg["tool_calls"] = calls
            if reasoning:
                msg["reasoning_content"] = "".join(reasoning)
            out.append(msg)
    return out


def to_tools(body) -> tuple[list | None, str]:
    """Anthropic tools and tool_choice -> OpenAI-format tools and a tool mode (auto/none/required/name)."""
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                               "parameters": t.input_schema}} for t in body.tools or []] or None
    choice = body.tool_choice
    if choice is None or choice.type == "auto":
        return tools, "auto"
    if choice.type == "none":
        return tools, "none"
    if choice.type == "any":
        return tools, "required"
    if not choice.name:
        raise BadRequest("tool_choice: type 'tool' needs a name", "tool_choice.name")
    return tools, choice.name


def stop_reason(finish: str | None, stop_sequence: str | None) -> str:
    if finish == "tool_calls":
        return "tool_use"
    if finish == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence else "end_turn"


def usage(prompt_tokens: int, output_tokens: int, cached: int) -> dict:
    return {"input_tokens": prompt_tokens - cached, "output_tokens": output_tokens,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


class MessageFormatter:
    def __init__(self, model_id: str):
        self.id, self.model = f"msg_{uuid.uuid4().hex[:24]}", model_id
        self.blocks = 0  # index of the next content block
        self.open: str | None = None  # kind of the block being streamed

    def message(self, updates: list, finish: str | None, stop_sequence, usage_: dict) -> dict:
        content = []
        reasoning = "".join(u.reasoning for u in updates)
        text = "".join(u.content for u in updates)
        if reasoning:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        if text:
            content.append({"type": "text", "text": text})
        for call in (c for u in updates for c in u.calls):
            content.append({"type": "tool_use", "id": _tool_id(call.id), "name": call.name, "input": call.arguments})
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason(finish, stop_sequence), "stop_sequence": stop_sequence, "usage": usage_}

    def start(self, usage_: dict) -> list[tuple[str, dict]]:
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": usage_}
        return [("message_start", {"type": "message_start", "message": message})]

    def _close(self) -> list:
        if self.open is None:
            return []
        self.open = None
        self.blocks += 1
        return [("content_block_stop", {"type": "content_block_stop", "index": self.blocks - 1})]

    def _delta(self, kind: str, value: str) -> list:
        out = []
        if self.open != kind:
            out += self._close()
            block = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "", "signature": ""}
            out.append(("content_block_start", {"type": "content_block_start", "index": self.blocks, "content_block": block}))
            self.open = kind
        delta = {"type": "text_delta", "text": value} if kind == "text" else {"type": "thinking_delta", "thinking": value}
        out.append(("content_block_delta", {"type": "content_block_delta", "index": self.blocks, "delta": delta}))
        return out

    def events(self, up) -> list[tuple[str, dict]]:
        out = []
        if up.reasoning:
            out += self._delta("thinking", up.reasoning)
        if up.content:
            out += self._delta("text", up.content)
        for call in up.calls:
            out += self._close()
            block = {"type": "tool_use", "id": _tool_id(call.id), "name": call.name, "input": {}}
            out.append(("content_block_start", {"type": "content_block_start", "index": self.blocks, "content_block": block}))
            delta = {"type": "input_json_delta", "partial_json": json.dumps(call.arguments, ensure_ascii=False)}
            out.append(("content_block_delta", {"type": "content_block_delta", "index": self.blocks, "delta": delta}))
            self.open = "tool_use"
            out += self._close()
        return out

    def end(self, finish: str | None, stop_sequence, output_tokens: int) -> list[tuple[str, dict]]:
        delta = {"stop_reason": stop_reason(finish, stop_sequence), "stop_sequence": stop_sequence}
        return self._close() + [("message_delta", {"type": "message_delta", "delta": delta,
                                                   "usage": {"output_tokens": output_tokens}}),
                                ("message_stop", {"type": "message_stop"})]


def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")

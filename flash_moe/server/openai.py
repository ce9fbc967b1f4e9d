"""The OpenAI formats: chat completions and text completions, whole and streamed (chunks)."""

from __future__ import annotations

import json
import time
import uuid

from ..tool_calls import format_tool_calls_openai
from .turn import BadRequest


def to_messages(messages) -> list[dict]:
    """Request messages -> the chat template's (text content, developer -> system, tool calls as given)."""
    out = []
    for i, m in enumerate(messages):
        msg = {"role": "system" if m.role == "developer" else m.role, "content": text_of(m.content, f"messages[{i}].content")}
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.name:
            msg["name"] = m.name
        if m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        out.append(msg)
    return out


def text_of(content, param: str) -> str:
    """A message's content as text: a string, or text parts (this model reads text only)."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind not in ("text", "input_text") or not isinstance(part.get("text"), str):
            raise BadRequest(f"{param}[{j}]: content of type {kind!r} is not supported (text only)", f"{param}[{j}]")
        parts.append(part["text"])
    return "".join(parts)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def token_logprobs(tokenizer, step) -> dict:
    """One token's entry of ``logprobs.content``."""

    def entry(token, logprob):
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {**entry(step.token, step.logprob), "top_logprobs": [entry(t, lp) for t, lp in step.top_logprobs or []]}


class ChatFormatter:
    """Builds chat.completion objects and chat.completion.chunk events from worker steps and parsed updates."""

    def __init__(self, model_id: str, tokenizer, logprobs: bool):
        self.id, self.created, self.model = new_id("chatcmpl"), int(time.time()), model_id
        self.tokenizer, self.logprobs = tokenizer, logprobs
        self.pending_logprobs: list = []
        self.calls = 0

    def _chunk(self, delta: dict, finish_reason=None, logprobs=None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}

    def first_chunk(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""})

    def chunks(self, step, up) -> list[dict]:
        """The chunks of one step: reasoning, content (with the logprobs of the tokens so far), tool calls."""
        if self.logprobs:
            self.pending_logprobs.append(token_logprobs(self.tokenizer, step))
        out = []
        if up.reasoning:
            out.append(self._chunk({"reasoning_content": up.reasoning}))
        if up.content or (up.finish_reason and self.pending_logprobs):
            lp = {"content": self.pending_logprobs} if self.logprobs else None
            out.append(self._chunk({"content": up.content}, logprobs=lp))
            self.pending_logprobs = []
        for call in format_tool_calls_openai(up.calls):
            # as OpenAI streams a call: its id and name first, then the arguments
            head = {"index": self.calls, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""}}
            out.append(self._chunk({"tool_calls": [head]}))
            args = call["function"]["arguments"]
            for k in range(0, len(args), 32):
                out.append(self._chunk({"tool_calls": [{"index": self.calls, "function": {"arguments": args[k:k + 32]}}]}))
            self.calls += 1
        if up.finish_reason:
            out.append(self._chunk({}, finish_reason=up.finish_reason))
        return out

    def usage_chunk(self, usage_: dict) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage_}

    def completion(self, steps: list, updates: list, usage_: dict, warnings: list) -> dict:
        content = "".join(u.content for u in updates)
        reasoning = "".join(u.reasoning for u in updates)
        calls = [c for u in updates for c in u.calls]
        message = {"role": "assistant", "content": content or (None if calls else "")}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = format_tool_calls_openai(calls)
        lp = {"content": [token_logprobs(self.tokenizer, s) for s in steps]} if self.logprobs else None
        out = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "message": message, "logprobs": lp,
                            "finish_reason": updates[-1].finish_reason if updates else "stop"}],
               "usage": usage_}
        if warnings:
            out["warnings"] = warnings
        return out


def json_object_warning(content: str) -> list[str]:
    """response_format json_object is checked, not enforced: say so when the answer is not a JSON object."""
    try:
        ok = isinstance(json.loads(content), dict)
    except ValueError:
        ok = False
    return [] if ok else ["response_format json_object: the answer is not a JSON object (flash-moe checks it, "
                          "it does not constrain decoding)"]


class CompletionFormatter:
    """text_completion objects and chunks."""

    def __init__(self, model_id: str, tokenizer, logprobs: int | None):
        self.id, self.created, self.model = new_id("cmpl"), int(time.time()), model_id
        self.tokenizer, self.logprobs = tokenizer, logprobs

    def _logprobs(self, steps) -> dict | None:
        if self.logprobs is None:
            return None
        dec = lambda t: self.tokenizer.decode([t])
        return {"tokens": [dec(s.token) for s in steps], "token_logprobs": [s.logprob for s in steps],
                "top_logprobs": [{dec(t): lp for t, lp in s.top_logprobs or []} for s in steps]}

    def chunk(self, step) -> dict:
        choice = {"index": 0, "text": step.text, "logprobs": self._logprobs([step]), "finish_reason": step.finish_reason}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice]}

    def completion(self, steps: list, usage_: dict) -> dict:
        choice = {"index": 0, "text": "".join(s.text for s in steps), "logprobs": self._logprobs(steps),
                  "finish_reason": steps[-1].finish_reason if steps else "stop"}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage_}

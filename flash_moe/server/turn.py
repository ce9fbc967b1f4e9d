"""One generation request, whatever API it came through: the prompt ids to run and the parsed output.

``prepare`` turns template-ready messages (OpenAI's shape; anthropic.py converts to it) into a ``Turn``;
``Output`` turns the worker's text steps into content, reasoning and tool calls with the tool-call parser.
Both run on the HTTP side and never touch MLX.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..generation import history_end, prompt_tokens
from ..model import check_token_ids
from ..tool_calls import THINK_START, TOOL_CALL_START, ToolCall, ToolCallStreamParser, tool_call_format


class BadRequest(ValueError):
    """A request the server refuses (400); ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Turn:
    ids: list[int]
    max_tokens: int
    sampling: dict
    stop: list[str] = field(default_factory=list)
    tools: list | None = None  # the tools the output is parsed against (None: no tool calls)
    in_reasoning: bool = False  # the prompt ends inside <think>
    prefix: str = ""  # text already in the prompt that the parser must see first (a forced call's opening)
    top_logprobs: int | None = None
    parse_calls: bool = True  # False (tool_choice "none"): tool-call markup stays content
    checkpoint_at: tuple = ()  # where the chat history ends (a prompt-cache checkpoint)


def tool_mode(choice) -> str:
    """'auto' | 'none' | 'required' | a function name."""
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    name = (choice.function or {}).get("name") if hasattr(choice, "function") else choice.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("tool_choice: a named choice needs function.name", "tool_choice")
    return name


def prepare(tokenizer, messages: list[dict], *, tools: list | None, mode: str, enable_thinking,
            max_tokens: int | None, default_max_tokens: int, context: int, sampling: dict, stop, top_logprobs=None) -> Turn:
    """Render and tokenize the prompt, force a tool call where ``mode`` asks, and check it fits the context."""
    offered = tools or None
    if mode == "none":
        offered = None
    elif mode not in ("auto", "required"):
        offered = [t for t in tools or [] if t["function"]["name"] == mode]
        if not offered:
            raise BadRequest(f"tool_choice: no tool named {mode!r} in tools", "tool_choice")
    elif mode == "required" and not tools:
        raise BadRequest("tool_choice: 'required' needs tools", "tool_choice")
    try:
        ids = prompt_tokens(tokenizer, messages, tools=offered, enable_thinking=enable_thinking)
    except Exception as e:  # the chat template refused the conversation (jinja raise_exception, bad roles, ...)
        raise BadRequest(f"messages: the chat template cannot render them ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                         "messages") from None
    marks = history_end(tokenizer, messages, ids, tools=offered, enable_thinking=enable_thinking)
    in_reasoning = tokenizer.decode(ids[-8:]).rstrip().endswith(THINK_START)
    prefix = ""
    if offered and mode != "auto":
        # No constrained decoding: a required or named call is forced by writing its opening into the prompt.
        prefix = TOOL_CALL_START + "\n"
        if mode != "required":
            xml = tool_call_format(getattr(tokenizer, "chat_template", "") or "") == "xml"
            prefix += f"<function={mode}>\n" if xml else f'{{"name": "{mode}", "arguments": '
        if in_reasoning:
            prefix = "</think>\n\n" + prefix
        ids = ids + list(tokenizer.encode(prefix, add_special_tokens=False))
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    return Turn(ids=ids, max_tokens=check_length(ids, max_tokens, default_max_tokens, context), sampling=sampling,
                stop=[s for s in stop if s], tools=offered, in_reasoning=in_reasoning, prefix=prefix,
                top_logprobs=top_logprobs, parse_calls=mode != "none", checkpoint_at=marks)


def check_length(ids: list[int], max_tokens: int | None, default_max_tokens: int, context: int) -> int:
    """The tokens this request may generate: what it asks (or the default), at most what the context leaves."""
    if len(ids) >= context:
        raise BadRequest(f"messages: the prompt is {len(ids)} tokens, the model's context is {context}", "messages")
    return min(max_tokens or default_max_tokens, context - len(ids))


def check_ids(ids: list[int], vocab: int, param: str = "prompt") -> None:
    """Token ids a client sent: out of range is a 400 naming the field (the model's own check, reworded)."""
    try:
        check_token_ids(ids, vocab)
    except ValueError as e:
        raise BadRequest(f"{param}: {e}", param) from None


@dataclass
class Update:
    """What one worker step adds to the answer."""

    content: str = ""
    reasoning: str = ""
    calls: list = field(default_factory=list)  # ToolCall objects completed at this step
    notes: list = field(default_factory=list)  # malformed calls, already added to content
    finish_reason: str | None = None


class Output:
    """Parses the streamed text of one Turn; ``finish_reason`` becomes 'tool_calls' once a call was made."""

    def __init__(self, turn: Turn):
        self.turn, self.calls = turn, 0
        self.parser = ToolCallStreamParser(turn.tools, in_reasoning=turn.in_reasoning, parse_tools=turn.parse_calls)
        self.parser.feed(turn.prefix)  # a forced call's opening is held by the parser until the call ends

    def feed(self, text: str, finish_reason: str | None) -> Update:
        events = self.parser.feed(text) + (self.parser.finish() if finish_reason else [])
        up = Update()
        for kind, value in events:
            if kind == "text":
                up.content += value
            elif kind == "reasoning":
                up.reasoning += value
            elif isinstance(value, ToolCall):
                up.calls.append(value)
            else:  # a malformed call: the text stays visible, with what was wrong
                up.content += value.raw + f"\n[flash-moe: malformed tool call, returned as text: {value.message}]"
                up.notes.append(value.message)
        self.calls += len(up.calls)
        if finish_reason:
            up.finish_reason = "tool_calls" if self.calls else finish_reason
        return up

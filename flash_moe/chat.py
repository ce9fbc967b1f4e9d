"""``flash-moe chat``: an interactive chat with history and tool calling.

Tools run only after the user confirms each call at the prompt; a declined or malformed call is
reported back to the model as the tool's result, so the conversation goes on.
"""

from __future__ import annotations

import sys

from .tool_calls import ToolCall
from .tools import BUILTIN_TOOLS, confirm_and_run

MAX_TOOL_ROUNDS = 4


def _ask(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def chat(model_path: str, *, system: str | None = None, experts_per_token: int | None = None, tools: bool = True,
         enable_thinking=None, out=sys.stdout, load_options: dict | None = None, **sampling) -> None:
    """``load_options``: more keyword arguments of ``load`` (``cache_experts``, ``direct_io``, ...)."""
    from . import load

    model = load(model_path, experts_per_token=experts_per_token, **(load_options or {}))
    schemas = BUILTIN_TOOLS if tools else None
    reset = [{"role": "system", "content": system}] if system else []
    history = list(reset)
    print(f"flash-moe chat: {model}\n/reset clears the history, /exit quits.", file=out)
    while True:
        line = _ask(">>> ")
        if line is None or line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = list(reset)
            print("(history cleared)", file=out)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        for _ in range(MAX_TOOL_ROUNDS):
            content, calls = _reply(model, history, schemas, enable_thinking, out, sampling)
            history.append({"role": "assistant", "content": content,
                            "tool_calls": [c for c in calls if isinstance(c, ToolCall)] or None})
            if not calls:
                break
            for call in calls:
                history.append({"role": "tool", "content": confirm_and_run(call, _ask, out)})
    print("bye", file=out)


def _reply(model, history, schemas, enable_thinking, out, sampling) -> tuple[str, list]:
    content, calls, shown = "", [], None
    # With tools off (--no-tools) tool-call markup is plain text: nothing is parsed, so nothing can run.
    for r in model.stream_generate(history, tools=schemas, parse_tools=schemas is not None,
                                   enable_thinking=enable_thinking, **sampling):
        # Thinking is shown (a thinking model may spend the whole reply on it), marked off from the answer.
        for kind, text in (("reasoning", r.reasoning), ("content", r.content)):
            if text and kind != shown:
                print("\n" * (shown is not None) + ("[thinking] " if kind == "reasoning" else ""), end="", file=out)
                shown = kind
            print(text, end="", flush=True, file=out)
        content, calls = content + r.content, calls + r.tool_calls
    print(file=out)
    return content, calls

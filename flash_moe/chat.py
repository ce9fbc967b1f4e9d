"""``flash-moe chat``: an interactive chat with history and tool calling.

Tools run only after the user confirms each call at the prompt; a declined or malformed call is
reported back to the model as the tool's result, so the conversation goes on.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

from .tool_calls import ToolCall

MAX_TOOL_OUTPUT = 16_000
MAX_TOOL_ROUNDS = 4


def _tool(name, description, **params):
    required = [k for k, v in params.items() if not v.pop("optional", False)]
    return {"type": "function", "function": {"name": name, "description": description,
            "parameters": {"type": "object", "properties": params, "required": required}}}


BUILTIN_TOOLS = [
    _tool("current_time", "The local date and time."),
    _tool("list_directory", "List the entries of a directory.", path={"type": "string", "description": "directory path"}),
    _tool("read_file", "Read a text file (at most 16 kB).", path={"type": "string", "description": "file path"}),
    _tool("run_shell", "Run a shell command and return its output.", command={"type": "string", "description": "the command"}),
]


def run_tool(call: ToolCall) -> str:
    args = call.arguments
    try:
        if call.name == "current_time":
            return datetime.datetime.now().isoformat(timespec="seconds")
        if call.name == "list_directory":
            return "\n".join(sorted(os.listdir(Path(args["path"]).expanduser())))
        if call.name == "read_file":
            return Path(args["path"]).expanduser().read_text(errors="replace")[:MAX_TOOL_OUTPUT]
        if call.name == "run_shell":
            p = subprocess.run(args["command"], shell=True, capture_output=True, text=True, timeout=60)
            return (p.stdout + p.stderr)[:MAX_TOOL_OUTPUT] + f"\n(exit status {p.returncode})"
        return f"error: unknown tool {call.name!r}"
    except Exception as e:  # the model gets the failure as the tool's result
        return f"error: {type(e).__name__}: {e}"


def _ask(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def chat(model_path: str, *, system: str | None = None, experts_per_token: int | None = None, tools: bool = True,
         enable_thinking=None, out=sys.stdout, load_options: dict | None = None, **sampling) -> None:
    """``load_options``: more keyword arguments of ``load`` (``cache_experts``, ``direct_io``, ...)."""
    from . import load
    from .distributed import finish, follow, following

    model = load(model_path, experts_per_token=experts_per_token, **(load_options or {}))
    if following(model):  # an expert-parallel rank other than 0: rank 0 talks, this one computes its experts
        follow(model)
        return
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
                history.append({"role": "tool", "content": _handle_call(call, out)})
    print("bye", file=out)
    finish(model)  # a split run: the other ranks stop following


def _reply(model, history, schemas, enable_thinking, out, sampling) -> tuple[str, list]:
    content, calls, shown = "", [], None
    for r in model.stream_generate(history, tools=schemas, enable_thinking=enable_thinking, **sampling):
        # Thinking is shown (a thinking model may spend the whole reply on it), marked off from the answer.
        for kind, text in (("reasoning", r.reasoning), ("content", r.content)):
            if text and kind != shown:
                print("\n" * (shown is not None) + ("[thinking] " if kind == "reasoning" else ""), end="", file=out)
                shown = kind
            print(text, end="", flush=True, file=out)
        content, calls = content + r.content, calls + r.tool_calls
    print(file=out)
    return content, calls


def _handle_call(call, out) -> str:
    if not isinstance(call, ToolCall):
        print(f"[malformed tool call: {call.message}]", file=out)
        return f"error: malformed tool call ({call.message})"
    shown = json.dumps(call.arguments, ensure_ascii=False)
    answer = _ask(f"[tool] {call.name}({shown}) — run it? [y/N] ")
    if (answer or "").strip().lower() not in ("y", "yes"):
        print("[declined]", file=out)
        return "error: the user declined to run this tool"
    result = run_tool(call)
    print(result[:2000], file=out)
    return result

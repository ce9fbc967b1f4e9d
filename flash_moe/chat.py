"""``flash-moe chat``: an interactive chat with history and tool calling.

Tools run only after the user confirms each call at the prompt; a declined or malformed call is
reported back to the model as the tool's result, so the conversation goes on.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .tool_calls import ToolCall
from .tools import BUILTIN_TOOLS, confirm_and_run

MAX_TOOL_ROUNDS = 4


def _ask(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


HELP = ("/reset clears the history, /stats shows per-turn speed, /exit quits. Enter sends; "
        "Alt-Enter (or Esc Enter) starts a new line; Ctrl-C stops a reply.")
INTERRUPTED = " [interrupted]"  # how a reply stopped with Ctrl-C stays in the history


@dataclass
class Reply:
    content: str
    calls: list
    response: object | None  # the last GenerationResponse (stats), None if interrupted before the first
    interrupted: bool = False


def chat(model_path: str, *, system: str | None = None, experts_per_token: int | None = None, tools: bool = True,
         enable_thinking=None, out=sys.stdout, load_options: dict | None = None, verbose: bool = False,
         **sampling) -> None:
    """``load_options``: more keyword arguments of ``load`` (``cache_experts``, ``direct_io``, ...).
    ``verbose``: start with the per-turn stats line on (``/stats`` toggles it)."""
    from . import load
    from .distributed import finish, follow, following

    model = load(model_path, experts_per_token=experts_per_token, **(load_options or {}))
    if following(model):  # an expert-parallel rank other than 0: rank 0 talks, this one computes its experts
        follow(model)
        return
    schemas = BUILTIN_TOOLS if tools else None
    reset = [{"role": "system", "content": system}] if system else []
    history, cache, stats = list(reset), model.make_prompt_cache(), verbose
    read = line_reader(out)
    print(f"flash-moe chat: {model}\n{HELP}", file=out)
    armed = False  # a Ctrl-C at the prompt asks; a second one in a row exits
    while True:
        try:
            line = read(">>> ")
        except KeyboardInterrupt:
            if armed:
                break
            armed = True
            print("\n(Ctrl-C again, Ctrl-D or /exit quits)", file=out)
            continue
        except EOFError:
            break
        armed = False
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = list(reset)  # the cache needs no reset: the next prompt diverges and it starts over
            print("(history cleared)", file=out)
            continue
        if command == "/stats":
            stats = not stats
            print(f"(stats {'on' if stats else 'off'})", file=out)
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        try:
            for _ in range(MAX_TOOL_ROUNDS):
                reply = _reply(model, history, schemas, enable_thinking, out, sampling, prompt_cache=cache)
                if stats and reply.response is not None:
                    print(stats_line(reply.response), file=out)
                if reply.interrupted:
                    history.append({"role": "assistant", "content": reply.content + INTERRUPTED})
                    break
                history.append({"role": "assistant", "content": reply.content,
                                "tool_calls": [c for c in reply.calls if isinstance(c, ToolCall)] or None})
                if not reply.calls:
                    break
                for call in reply.calls:
                    history.append({"role": "tool", "content": confirm_and_run(call, _ask, out)})
        except KeyboardInterrupt:  # at a tool's confirmation: the calls not answered are reported declined
            print("\n[interrupted]", file=out)
            _close_tool_calls(history)
    print("bye", file=out)
    finish(model)  # a split run: the other ranks stop following


def _close_tool_calls(history: list) -> None:
    """Give every tool call of the last assistant turn a result, so the history renders as a whole turn."""
    last = max((i for i, m in enumerate(history) if m["role"] == "assistant"), default=None)
    if last is None:
        return
    answered = sum(m["role"] == "tool" for m in history[last + 1 :])
    for _ in (history[last].get("tool_calls") or [])[answered:]:
        history.append({"role": "tool", "content": "error: the user interrupted before this call ran"})


def stats_line(r) -> str:
    """Per turn: prompt tokens (reused from the prompt cache), prefill and generation speed."""
    return (f"[stats] prompt {r.prompt_tokens} tokens ({r.cached_tokens} cached), prefill {r.prompt_tps:.1f} tok/s"
            f" | generation {r.generation_tokens} tokens, {r.generation_tps:.1f} tok/s")


def line_reader(out=sys.stdout):
    """``read(prompt) -> str``: prompt_toolkit on a terminal (line editing, history in
    ``$FLASH_MOE_HOME/chat_history``, multi-line input and pastes), plain lines otherwise (pipes, tests).
    Both raise EOFError at the end of input (Ctrl-D) and KeyboardInterrupt on Ctrl-C."""
    if not (sys.stdin.isatty() and out is sys.stdout and sys.stdout.isatty()):
        return input
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    from .demo import home

    keys = KeyBindings()

    @keys.add("enter")
    def _send(event):
        event.current_buffer.validate_and_handle()

    @keys.add("escape", "enter")  # Alt-Enter sends Esc Enter in most terminals
    def _newline(event):
        event.current_buffer.insert_text("\n")

    home().mkdir(parents=True, exist_ok=True)
    session = PromptSession(history=FileHistory(str(home() / "chat_history")), multiline=True, key_bindings=keys,
                            prompt_continuation="... ")
    return session.prompt


def _reply(model, history, schemas, enable_thinking, out, sampling, prompt_cache=None) -> Reply:
    """Stream one assistant reply to ``out``; Ctrl-C stops it (what was said is returned, ``interrupted``)."""
    content, calls, shown, last = "", [], None, None
    try:
        # With tools off (--no-tools) tool-call markup is plain text: nothing is parsed, so nothing can run.
        for r in model.stream_generate(history, tools=schemas, parse_tools=schemas is not None,
                                       enable_thinking=enable_thinking, prompt_cache=prompt_cache, **sampling):
            # Thinking is shown (a thinking model may spend the whole reply on it), marked off from the answer.
            for kind, text in (("reasoning", r.reasoning), ("content", r.content)):
                if text and kind != shown:
                    print("\n" * (shown is not None) + ("[thinking] " if kind == "reasoning" else ""), end="", file=out)
                    shown = kind
                print(text, end="", flush=True, file=out)
            content, calls, last = content + r.content, calls + r.tool_calls, r
    except KeyboardInterrupt:
        print("\n[interrupted]", file=out)
        return Reply(content, [], last, interrupted=True)
    print(file=out)
    return Reply(content, calls, last)

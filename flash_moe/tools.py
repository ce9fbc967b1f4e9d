"""The chat's built-in tools, and how a call is shown to the user and confirmed before it runs.

The tools read what the model asks for, so every read is bounded: ``read_file`` opens regular files only
(a FIFO would block forever, ``/dev/zero`` would fill memory) and reads at most the limit; ``list_directory``
lists at most a number of entries; ``run_shell`` streams the command's output, keeps at most the limit, and
kills the command's whole process group on timeout. A command's background children are left running
(they are in their own session), but their holding the output pipe does not keep us waiting.

A call is shown with its arguments escaped (control, zero-width and bidi characters as ``\\u202e``), so the
command the user approves looks like the command that runs.
"""

from __future__ import annotations

import codecs
import datetime
import heapq
import json
import os
import selectors
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, TextIO

from .files import CheckpointError, open_regular
from .tool_calls import ParsedCall, ToolCall

MAX_OUTPUT = 16_000  # bytes of a file or of a command's output given to the model
MAX_ENTRIES = 500  # entries of a directory listing
SHELL_TIMEOUT = 60.0  # seconds
GRACE = 0.5  # seconds we keep reading after the shell exits
MAX_SHOWN = 2_000  # characters of a tool's result echoed to the user


def _tool(name, description, **params):
    required = [k for k, v in params.items() if not v.pop("optional", False)]
    return {"type": "function", "function": {"name": name, "description": description,
            "parameters": {"type": "object", "properties": params, "required": required}}}


BUILTIN_TOOLS = [
    _tool("current_time", "The local date and time."),
    _tool("list_directory", f"List the entries of a directory (at most {MAX_ENTRIES}).",
          path={"type": "string", "description": "directory path"}),
    _tool("read_file", f"Read a text file (at most {MAX_OUTPUT // 1000} kB).",
          path={"type": "string", "description": "file path"}),
    _tool("run_shell", "Run a shell command and return its output.",
          command={"type": "string", "description": "the command"}),
]


def run_tool(call: ToolCall, *, timeout: float = SHELL_TIMEOUT) -> str:
    """Run a built-in tool; a failure is returned as the result (``error: ...``), for the model to read."""
    args = call.arguments
    try:
        if call.name == "current_time":
            return datetime.datetime.now().isoformat(timespec="seconds")
        if call.name == "list_directory":
            return list_directory(args["path"])
        if call.name == "read_file":
            return read_file(args["path"])
        if call.name == "run_shell":
            return run_shell(args["command"], timeout=timeout)
        return f"error: unknown tool {call.name!r}"
    except Exception as e:  # the model gets the failure as the tool's result
        return f"error: {type(e).__name__}: {e}"


def read_file(path: str, limit: int = MAX_OUTPUT) -> str:
    """The first ``limit`` bytes of a regular file as text, with a note when the file is longer."""
    path = Path(path).expanduser()
    try:
        fd = open_regular(path)
    except CheckpointError as e:  # a FIFO, a device, a folder: said in one line
        return f"error: {e}"
    try:
        size = os.fstat(fd).st_size  # 0 for /proc files, whose length is only known by reading
        data, n = [], 0
        while n <= limit:
            chunk = os.read(fd, min(1 << 16, limit + 1 - n))
            if not chunk:
                break
            data.append(chunk)
            n += len(chunk)
    finally:
        os.close(fd)
    text = _decode(b"".join(data)[:limit], final=n <= limit)
    if n > limit:
        total = f"{size} bytes" if size > limit else "more bytes"
        text += f"\n[cut: the first {limit} bytes of {total}]"
    return text


def list_directory(path: str, limit: int = MAX_ENTRIES) -> str:
    """The first ``limit`` names of a directory in sorted order, with the count of the others."""
    total = 0

    def names(entries):
        nonlocal total
        for entry in entries:
            total += 1
            yield entry.name + ("/" if entry.is_dir(follow_symlinks=False) else "")

    with os.scandir(Path(path).expanduser()) as entries:
        shown = heapq.nsmallest(limit, names(entries))  # bounded memory however large the directory
    more = f"\n[{total - len(shown)} more entries not shown]" if total > len(shown) else ""
    return "\n".join(shown) + more


def run_shell(command: str, *, timeout: float = SHELL_TIMEOUT, limit: int = MAX_OUTPUT) -> str:
    """Run ``command`` with ``sh``; its output (stdout and stderr together) up to ``limit`` bytes, then the
    exit status. The command runs in its own process group, all of which is killed on timeout; we stop
    reading when the shell exits, even if a background child still holds the output pipe."""
    p = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    kept, total, eof, exited_by = bytearray(), 0, False, None
    deadline = time.monotonic() + timeout
    fd = p.stdout.fileno()
    os.set_blocking(fd, False)
    with p.stdout, selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not eof:
            now = time.monotonic()
            if exited_by is None and p.poll() is not None:
                # The shell has exited: read what is in the pipe, for GRACE seconds at most, and stop. A
                # background child may hold the pipe open (and even keep writing) for as long as it lives.
                exited_by = now + GRACE
            if now >= (exited_by or deadline):
                break
            if sel.select(0 if exited_by else min(0.1, deadline - now)):
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                eof, total = not chunk, total + len(chunk)
                kept += chunk[: max(0, limit - len(kept))]  # the rest is read and dropped
            elif exited_by:
                break
    timed_out = exited_by is None and not eof
    if timed_out:
        _kill_group(p)
    if eof:  # the output is closed but the shell may still run (`exec >&-; sleep 100`)
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(p)
    status = p.wait()
    text = _decode(bytes(kept), final=total <= limit)
    if total > limit:
        text += f"\n[output cut: the first {limit} of {total} bytes]"
    if timed_out:
        return text + f"\n(killed after {timeout:g} s: the command and its children)"
    return text + f"\n(exit status {status})"


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is already gone
        pass


def _decode(data: bytes, final: bool) -> str:
    """UTF-8 text (bad bytes replaced); a character cut in half at the limit is dropped, not replaced."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data, final=final)


# ---- showing a call -----------------------------------------------------------------------------------

# Letters and marks that print as nothing (str.isprintable() accepts them): shown escaped as well.
_INVISIBLE = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u180e\u3164\uffa0")


def escape(text: str, keep: str = "") -> str:
    """``text`` with every character that does not print as itself written as ``\\uXXXX``: control
    characters (C0, DEL, C1), format characters (zero-width, bidi overrides and isolates, BOM), separators
    other than the space, unassigned and private-use code points. Letters of any script stay as they are.
    Characters in ``keep`` (e.g. a newline) are left alone."""
    if text.isprintable() and not _INVISIBLE.intersection(text):
        return text
    return "".join(c if (c.isprintable() and c not in _INVISIBLE) or c in keep else _code(c) for c in text)


def _code(c: str) -> str:
    n = ord(c)
    return f"\\u{n:04x}" if n <= 0xFFFF else f"\\U{n:08x}"


def describe_call(call: ToolCall) -> str:
    """``name({"arg": value})`` as the user is asked to approve it, escaped (see ``escape``)."""
    return f"{escape(call.name)}({escape(json.dumps(call.arguments, ensure_ascii=False))})"


def confirm_and_run(call: ParsedCall, ask: Callable[[str], Optional[str]], out: TextIO) -> str:
    """Show ``call``, ask the user (``ask(prompt)`` returns the answer, or None at end of input), run it on
    "y"; returns the tool's result for the model. A malformed or declined call is not run."""
    if not isinstance(call, ToolCall):
        print(f"[malformed tool call: {escape(call.message)}]", file=out)
        return f"error: malformed tool call ({call.message})"
    answer = ask(f"[tool] {describe_call(call)} — run it? [y/N] ")
    if (answer or "").strip().lower() not in ("y", "yes"):
        print("[declined]", file=out)
        return "error: the user declined to run this tool"
    result = run_tool(call)
    print(escape(result[:MAX_SHOWN], keep="\n\t"), file=out)
    return result

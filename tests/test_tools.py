"""The chat's built-in tools under hostile input (issue 12, items 7-9).

Bounded reads: a FIFO or a device is refused at once, a file is read only up to the limit, a directory
listing and a command's output are capped. ``run_shell`` kills the command's whole process group on timeout
and returns as soon as the shell exits, even when a background child keeps the output pipe open. A call is
shown to the user escaped, so the command approved is the command that runs. ``chat --no-tools`` shows
tool-call markup as text and runs nothing.
"""

from __future__ import annotations

import io
import os
import shlex
import sys
import threading
import time

import mlx.core as mx
import pytest

import flash_moe
import flash_moe.generation as gen
from flash_moe import chat as chat_mod
from flash_moe import tools
from flash_moe.tool_calls import ToolCall, ToolCallError


def within(seconds: float, fn, *args, unblock=None, **kwargs):
    """fn(*args) run in a thread; fails the test if it is still running after ``seconds`` (``unblock``
    then releases it, so a failing test does not leave a thread stuck)."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=fn(*args, **kwargs)), daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if unblock:
            unblock()
        pytest.fail(f"{fn.__name__}{args} still running after {seconds} s")
    return result["value"], time.monotonic() - start


def gone(pid: int) -> bool:
    """The process no longer runs (a zombie waiting for its parent counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, seconds: float = 3.0) -> bool:
    end = time.monotonic() + seconds
    while not gone(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


# ---- read_file, list_directory ------------------------------------------------------------------


def test_read_file_refuses_a_fifo_at_once(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def release():  # a reader blocked in open() is freed by a writer opening and closing the FIFO
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    result, _ = within(5, tools.read_file, str(fifo), unblock=release)
    assert result == f"error: {fifo}: not a regular file (a FIFO)"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_read_file_refuses_a_device():
    result, _ = within(5, tools.read_file, "/dev/zero")
    assert result == "error: /dev/zero: not a regular file (a character device)"


def test_read_file_reads_at_most_the_limit(tmp_path, monkeypatch):
    limit = 1000
    big = tmp_path / "big.txt"
    big.write_text("é" * 50_000)  # 100,000 bytes; the limit cuts the 500th character in half
    read = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: read.append(real_read(fd, n)) or read[-1])
    text = tools.read_file(str(big), limit=limit)
    assert sum(map(len, read)) == limit + 1, "one byte past the limit says the file is longer"
    assert text == "é" * 500 + f"\n[cut: the first {limit} bytes of 100000 bytes]"
    monkeypatch.undo()
    exact = tmp_path / "exact.txt"
    exact.write_text("a" * limit)
    assert tools.read_file(str(exact), limit=limit) == "a" * limit
    missing = tools.run_tool(ToolCall("read_file", {"path": str(tmp_path / "none")}))
    assert missing.startswith("error: FileNotFoundError:") and "none" in missing


def test_list_directory_is_bounded(tmp_path):
    for i in range(25):
        (tmp_path / f"f{i:02d}").touch()
    (tmp_path / "a_dir").mkdir()
    listing = tools.list_directory(str(tmp_path), limit=10)
    assert listing.split("\n") == ["a_dir/"] + [f"f{i:02d}" for i in range(9)] + ["[16 more entries not shown]"]
    assert tools.list_directory(str(tmp_path), limit=26).split("\n")[-1] == "f24"


# ---- run_shell ----------------------------------------------------------------------------------


def test_run_shell_output_and_status():
    assert tools.run_shell("echo out; echo err >&2; exit 3") == "out\nerr\n\n(exit status 3)"
    result, took = within(10, tools.run_shell, "cat")  # stdin is not the chat's: cat ends at once
    assert result == "\n(exit status 0)" and took < 5


def test_run_shell_output_is_capped():
    result, _ = within(30, tools.run_shell, "yes | head -c 3000000", limit=1000)
    assert result == "y\n" * 500 + "\n[output cut: the first 1000 of 3000000 bytes]\n(exit status 0)"


def test_run_shell_endless_output_is_capped_and_killed():
    result, took = within(20, tools.run_shell, "yes", timeout=1, limit=1000)
    head, note = result.split("\n[output cut: the first 1000 of ")
    assert head == "y\n" * 500 and note.endswith("bytes]\n(killed after 1 s: the command and its children)")
    assert took < 5


def test_run_shell_does_not_wait_for_a_background_child():
    result, took = within(20, tools.run_shell, "sleep 30 & echo $!; echo hi")
    pid = int(result.split("\n")[0])
    try:
        assert result == f"{pid}\nhi\n\n(exit status 0)" and took < 2.5, (result, took)
    finally:
        os.kill(pid, 9)


def test_run_shell_does_not_read_a_background_writer_forever():
    result, took = within(20, tools.run_shell, "(yes &); echo done", limit=1000)  # how much of yes: a race
    assert result.endswith("\n(exit status 0)") and len(result) < 1100 and took < 3, (result[-80:], took)


def test_run_shell_timeout_kills_the_process_group():
    result, took = within(20, tools.run_shell, "sleep 30 & echo $!; wait", timeout=1)
    pid = int(result.split("\n")[0])
    assert result.endswith("(killed after 1 s: the command and its children)") and took < 5
    assert wait_gone(pid), f"background child {pid} survived the timeout"


def test_run_shell_that_closes_its_output_still_times_out():
    result, took = within(20, tools.run_shell, "echo bye; exec >&- 2>&-; sleep 30", timeout=1)
    assert result == "bye\n\n(killed after 1 s: the command and its children)" and took < 5


# ---- showing a call -----------------------------------------------------------------------------

HIDDEN = ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\x9b", "\u00a0", "\u061c", "\u2028", "\u3164", "\ue000",
          "\U000e0041"] + [chr(c) for c in (*range(0x200B, 0x2010), 0x2060, 0xFEFF, *range(0x202A, 0x202F),
                                            *range(0x2066, 0x206A))]


@pytest.mark.parametrize("char", HIDDEN, ids=[f"U+{ord(c):04X}" for c in HIDDEN])
def test_call_is_shown_escaped(char):
    call = ToolCall("run_shell", {"command": f"echo safe{char}; rm x", "note": {"k": [f"a{char}"]}})
    shown = tools.describe_call(call)
    code = f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}"
    assert char not in shown and shown.isprintable(), ascii(shown)
    assert shown.count(code) == 2 and shown.startswith('run_shell({"command": "echo safe'), shown


def test_escape_keeps_letters_and_is_unambiguous():
    call = ToolCall("write", {"text": "café 中文 Ελληνικά עברית", "literal": "\\u202e"})
    assert tools.describe_call(call) == 'write({"text": "café 中文 Ελληνικά עברית", "literal": "\\\\u202e"})'
    assert tools.describe_call(ToolCall("ru\u202en", {})) == "ru\\u202en({})"


def test_confirm_and_run_shows_the_escaped_call_and_result(tmp_path):
    prompts, out = [], io.StringIO()
    marker = tmp_path / "ran"
    call = ToolCall("run_shell", {"command": f": '\u202e'; touch {shlex.quote(str(marker))}; printf '\\033[2J'"})
    result = tools.confirm_and_run(call, lambda p: prompts.append(p) or "y", out)
    assert prompts == [f"[tool] {tools.describe_call(call)} — run it? [y/N] "] and "\\u202e" in prompts[0]
    assert marker.exists() and result == "\x1b[2J\n(exit status 0)", "the model gets the bytes"
    assert out.getvalue() == "\\u001b[2J\n(exit status 0)\n", "the screen gets them escaped"
    declined = tools.confirm_and_run(ToolCall("run_shell", {"command": "exit 1"}), lambda p: None, out)
    assert declined == "error: the user declined to run this tool" and out.getvalue().endswith("[declined]\n")
    bad = tools.confirm_and_run(ToolCallError("unknown function 'x\u202e'"), lambda p: pytest.fail("asked"), out)
    assert bad.startswith("error: malformed tool call") and out.getvalue().endswith("'x\\u202e']\n")


# ---- chat --no-tools ----------------------------------------------------------------------------


def test_chat_without_tools_runs_no_call(demo, monkeypatch, tmp_path):
    marker = tmp_path / "ran"
    call = (f"<tool_call>\n<function=run_shell>\n<parameter=command>\ntouch {marker}\n</parameter>\n"
            "</function>\n</tool_call>")
    eos = demo.tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = []

    def scripted(prompt, model, *, max_tokens=256, **kwargs):  # the model "writes" the call
        prompts.append(demo.tokenizer.decode(prompt.tolist()))
        vocab = model.config.vocab_size
        for token in demo.tokenizer.encode(f"Sure.\n{call}", add_special_tokens=False) + [eos]:
            yield token, mx.zeros((vocab,))

    monkeypatch.setattr(gen, "generate_step", scripted)
    monkeypatch.setattr(flash_moe, "load", lambda *a, **k: demo)
    monkeypatch.setattr(sys, "stdin", io.StringIO("make the file\ny\ny\n"))
    monkeypatch.setattr(sys, "stdout", screen := io.StringIO())
    chat_mod.chat("model", tools=False, out=screen, enable_thinking=False)
    shown = screen.getvalue()
    assert not marker.exists() and "run it?" not in shown and "[declined]" not in shown, shown
    assert f"Sure.\n{call}\n" in shown, "the markup is shown as text"
    assert len(prompts) == 3 and "run_shell" not in prompts[0], "no tools offered; each 'y' is a new user turn"
    assert f"Sure.\n{call}<|im_end|>" in prompts[1], "the reply goes back to the model as text"

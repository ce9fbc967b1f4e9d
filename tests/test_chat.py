"""The chat loop (issue 13 items 1-3): a prompt cache across turns, Ctrl-C, prompt_toolkit input, stats.

In-process runs read plain lines from a fake stdin (not a terminal); the pseudo-terminal test drives the
real command through pexpect, where input goes through prompt_toolkit and Ctrl-C is a real SIGINT.
"""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import pytest

import flash_moe
from flash_moe import chat as chat_mod

REPO = Path(__file__).resolve().parents[1]
STATS = re.compile(r"\[stats\] prompt (\d+) tokens \((\d+) cached\), prefill [\d.]+ tok/s \| generation (\d+) tokens")


def render(tok, messages, generation_prompt=False) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False,
                                   enable_thinking=False)
    return tok.encode(text, add_special_tokens=False)


class Recorder:
    """The demo model, recording the messages of each turn; ``stop_after``: Ctrl-C after that many steps."""

    def __init__(self, model, stop_after=None):
        self.model, self.turns, self.stop_after = model, [], stop_after

    def make_prompt_cache(self):
        return self.model.make_prompt_cache()

    def stream_generate(self, messages, **kwargs):
        self.turns.append([dict(m) for m in messages])
        for i, r in enumerate(self.model.stream_generate(messages, **kwargs)):
            if self.stop_after is not None and i == self.stop_after:
                self.stop_after = None
                raise KeyboardInterrupt
            yield r


def run_chat(monkeypatch, model, lines, **kwargs) -> str:
    monkeypatch.setattr(flash_moe, "load", lambda *a, **k: model)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    out = io.StringIO()
    chat_mod.chat("model", tools=False, enable_thinking=False, out=out, **kwargs)
    return out.getvalue()


def test_four_turns_process_only_the_new_tokens(demo, monkeypatch):
    """Each turn after the first processes the last reply (as the template re-renders it) and the new user
    turn: it restarts at the checkpoint where the previous turn's history ended."""
    recorder, tok = Recorder(demo), demo.tokenizer
    users = ["def add(a, b):", "now subtract", "and multiply, please", "thanks"]
    shown = run_chat(monkeypatch, recorder, users, system="You write Python.", verbose=True, max_tokens=24)
    stats = [tuple(map(int, m)) for m in STATS.findall(shown)]
    assert len(stats) == 4 and len(recorder.turns) == 4, shown
    assert stats[0][1] == 0
    # The template's own tokens around one reply and one user message, generation prompt included.
    exchange = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    markers = len(render(tok, exchange, True)) - len(render(tok, exchange[:1])) - 2
    for k in range(1, 4):
        prompt, cached, _ = stats[k]
        previous = recorder.turns[k - 1]  # the messages of turn k-1: its history ended before the generation prompt
        assert prompt == len(render(tok, recorder.turns[k], True)), k
        assert cached == len(render(tok, previous)), (k, stats)
        processed, reply = prompt - cached, stats[k - 1][2]
        user = len(tok.encode(users[k], add_special_tokens=False))
        assert processed <= reply + user + markers, (k, stats, markers)
    assert all(stats[k][0] > stats[k - 1][0] for k in range(1, 4)), "the history grows"


def test_ctrl_c_stops_the_reply_and_keeps_it(demo, monkeypatch):
    recorder = Recorder(demo, stop_after=3)
    shown = run_chat(monkeypatch, recorder, ["first question", "second question"], max_tokens=20)
    assert "[interrupted]" in shown and shown.endswith("bye\n")
    partial = recorder.turns[1][1]
    assert [m["role"] for m in recorder.turns[1]] == ["user", "assistant", "user"]
    assert partial["content"].endswith(chat_mod.INTERRUPTED) and recorder.turns[1][2]["content"] == "second question"


def scripted_reader(events):
    """A ``line_reader`` replacement: each event is a line, or an exception class to raise."""
    queue = list(events)

    def read(prompt):
        event = queue.pop(0)
        if isinstance(event, type):
            raise event
        return event

    return read


@pytest.mark.parametrize("events, turns", [
    ([KeyboardInterrupt, KeyboardInterrupt], 0),  # two Ctrl-C at the prompt exit
    ([KeyboardInterrupt, "hi", KeyboardInterrupt, "hi again", EOFError], 2),  # one asks; a line disarms it
    (["hi", EOFError], 1),  # Ctrl-D exits
])
def test_prompt_keys(demo, monkeypatch, events, turns):
    recorder = Recorder(demo)
    monkeypatch.setattr(chat_mod, "line_reader", lambda out: scripted_reader(events))
    shown = run_chat(monkeypatch, recorder, [], max_tokens=2)
    assert len(recorder.turns) == turns and shown.endswith("bye\n")
    assert shown.count("(Ctrl-C again, Ctrl-D or /exit quits)") == events.count(KeyboardInterrupt) - (turns == 0)


def test_stats_toggle(demo, monkeypatch):
    shown = run_chat(monkeypatch, Recorder(demo), ["hi", "/stats", "hello", "/stats", "hey"], max_tokens=2)
    assert len(STATS.findall(shown)) == 1 and "(stats on)" in shown and "(stats off)" in shown


def test_interrupted_tool_confirmation_closes_the_turn():
    history = [{"role": "user", "content": "x"},
               {"role": "assistant", "content": "", "tool_calls": ["a", "b"]}, {"role": "tool", "content": "1"}]
    chat_mod._close_tool_calls(history)
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "tool"] and "interrupted" in history[-1]["content"]


class Replies(Recorder):
    """The demo model, recording each turn's messages and the text it streamed."""

    def __init__(self, model):
        super().__init__(model)
        self.texts = []

    def stream_generate(self, messages, **kwargs):
        self.texts.append("")
        for r in super().stream_generate(messages, **kwargs):
            self.texts[-1] += r.text
            yield r


def test_the_demo_calls_a_builtin_tool_end_to_end(demo, monkeypatch, tmp_path):
    """Nothing scripted but the user: the demo model (trained on tool-call dialogues) answers a request with a
    call of a built-in tool, the user approves it, the tool lists a real folder, the listing goes back to
    the model, and the model answers in words, with no further call. Thinking on, as `flash-moe chat` runs."""
    (tmp_path / "src").mkdir()
    for name in ("main.py", "notes.md"):
        (tmp_path / "src" / name).write_text("x\n")
    monkeypatch.chdir(tmp_path)
    replies = Replies(demo)
    monkeypatch.setattr(flash_moe, "load", lambda *a, **k: replies)
    monkeypatch.setattr(sys, "stdin", io.StringIO("List the files in src.\ny\n"))  # the request, then "y" to run it
    out = io.StringIO()
    chat_mod.chat("model", out=out, temperature=0.0, max_tokens=96)
    shown = out.getvalue()
    assert "main.py\nnotes.md" in shown, shown  # the tool ran: the real listing is echoed to the user
    assert len(replies.turns) == 2, shown  # one call, then an answer that calls nothing
    call_turn, answer_turn = replies.turns
    assert answer_turn[-2]["tool_calls"][0].name == "list_directory"
    assert answer_turn[-2]["tool_calls"][0].arguments == {"path": "src"}
    assert answer_turn[-1] == {"role": "tool", "content": "main.py\nnotes.md"}
    answer = replies.texts[1]
    assert "<tool_call>" not in answer and answer.strip(), answer
    assert shown.endswith("bye\n")


def test_terminal_session(demo_folder, demo, tmp_path):
    """Through a pseudo-terminal: Ctrl-C mid-reply returns to the prompt with the history kept; the next
    turn's stats show cached tokens; Esc-Enter makes a new line and a paste stays one message; the input history is saved; Ctrl-D exits."""
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, FLASH_MOE_HOME=str(tmp_path), PYTHONPATH=str(REPO), PROMPT_TOOLKIT_NO_CPR="1",
               TERM="xterm", TQDM_DISABLE="1")
    env.pop("FLASH_MOE_DEBUG", None)
    child = pexpect.spawn(sys.executable, ["-m", "flash_moe", "chat", "--model", str(demo_folder), "--no-tools",
                                           "--no-think", "--verbose", "--max-tokens", "400"],
                          env=env, encoding="utf-8", timeout=60, dimensions=(50, 200))
    try:
        child.expect(">>>")
        question = "Write the class `Thread` of the Python module `threading`."  # a request the demo answers at length
        child.send(question + "\r")
        child.expect(r"\n[^\r\n\x1b]*[A-Za-z]")  # the reply is being written
        child.sendcontrol("c")
        child.expect(r"\[interrupted\]")
        first = child.before
        child.expect(">>>")
        # Esc Enter: a new line inside the message; a pasted block (bracketed paste) stays in it too
        child.send("line one\x1b\rline two\x1b[200~\npasted a\npasted b\x1b[201~\r")
        child.expect(STATS)
        prompt, cached = int(child.match.group(1)), int(child.match.group(2))
        child.expect(">>>")
        child.sendcontrol("d")
        child.expect("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    history = len(render(demo.tokenizer, [{"role": "user", "content": question}]))
    assert cached == history > 0, (prompt, cached, first)
    assert prompt > history + 10, "the second prompt holds the first turn and the partial reply"
    saved = (tmp_path / "chat_history").read_text()
    assert f"+{question}\n" in saved and "+line one\n+line two\n+pasted a\n+pasted b\n" in saved, saved

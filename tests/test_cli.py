"""The command line (issue 5 proof): demo, generate, chat, convert + verify, one-line errors, --help.

Commands run as ``python -m flash_moe ...`` in subprocesses with FLASH_MOE_HOME in a temporary folder, on
the shipped demo model; their text is checked against the same generation done in this process. Tool calls
in chat are driven in-process: the model's reply is scripted (``generate_step`` yields the token ids of a
call) and stdin answers the confirmation.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import shlex
import string
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from conftest import seed_note

import flash_moe
import flash_moe.generation as gen
from flash_moe import chat as chat_mod
from flash_moe import load
from flash_moe.cli import build_parser, main
from flash_moe.demo import build
from flash_moe.layout import ModelLayout

REPO = Path(__file__).resolve().parents[1]
SAMPLING = dict(max_tokens=8, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=None, seed=0)


def flash_moe_cli(*args, home: Path, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FLASH_MOE_DEBUG"}
    env.update(FLASH_MOE_HOME=str(home), PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "flash_moe", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)


def word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))


def docstring_prompt(rng: random.Random) -> str:
    return f'def {word(rng)}(self, {word(rng)}):\n    """'


def subcommands() -> list[str]:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(actions[0].choices)


# ---- demo, generate ------------------------------------------------------------------------------------


def test_demo(demo, tmp_path):
    home = tmp_path / "home"
    run = flash_moe_cli("demo", "--max-tokens", 12, home=home)
    assert run.returncode == 0, run.stderr
    expected = demo.generate("def main", max_tokens=12)
    assert f"prompt: 'def main'\n\ndef main{expected}\n" in run.stdout, run.stdout
    for line in ("ms/token", "GDN layers", "full-attn layers", "expert reads/token: 16.0 experts",
                 f"decode: {expected.response.generation_tokens} tokens", "expert usage: the top 20% of experts"):
        assert line in run.stdout, (line, run.stdout)
    assert "building the demo model" in run.stderr and "Traceback" not in run.stderr
    with pytest.MonkeyPatch.context() as mp:  # a second run reuses the converted folder
        mp.setenv("FLASH_MOE_HOME", str(home))
        quiet = io.StringIO()
        assert build(out=quiet) == home / "demo" / "converted" and quiet.getvalue() == ""


def test_generate_with_timing(demo, demo_folder, seed):
    prompt = docstring_prompt(random.Random(seed))
    run = flash_moe_cli("generate", "--model", demo_folder, "--prompt", prompt, "--timing", "--max-tokens", 8,
                        "--raw", home=demo_folder.parents[1])
    assert run.returncode == 0, run.stderr
    expected = demo.generate(prompt, max_tokens=8)
    n = expected.response.generation_tokens
    assert run.stdout == expected + "\n", (prompt, seed_note(seed))
    assert f"generation: {n} tokens" in run.stderr and "tok/s" in run.stderr, run.stderr
    header = run.stderr[run.stderr.index("ms/token"):].splitlines()[0].split()
    assert header == ["ms/token", "attention", "gdn", "routing", "expert_io", "expert_compute", "shared_expert",
                      "sampling", "other", "total"], run.stderr
    assert f"decode: {n} tokens" in run.stderr and "expert reads/token" in run.stderr


def test_generate_flags_map_to_arguments(demo, demo_folder, seed, monkeypatch, capsys):
    """In-process: stdin prompt, the chat template by default, sampling flags and --k."""
    rng = random.Random(seed)
    prompt = word(rng)
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt))
    main(["generate", "--model", str(demo_folder), "--prompt", "-", "--max-tokens", "6"])
    out = capsys.readouterr()
    # the text, then (when the demo starts a tool call, as it was trained to) one line about that call
    assert out.out.startswith(demo.generate(prompt, chat=True, max_tokens=6) + "\n"), seed_note(seed)

    temp, top_p, top_k = rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.0), rng.randint(2, 50)
    sampling_seed = rng.randrange(99)
    main(["generate", "--model", str(demo_folder), "--prompt", prompt, "--raw", "--max-tokens", "10",
          "--temp", str(temp), "--top-p", str(top_p), "--top-k", str(top_k), "--seed", str(sampling_seed)])
    want = demo.generate(prompt, max_tokens=10, temperature=temp, top_p=top_p, top_k=top_k, seed=sampling_seed)
    assert capsys.readouterr().out == want + "\n", seed_note(seed)

    main(["generate", "--model", str(demo_folder), "--prompt", prompt, "--raw", "--max-tokens", "10", "--k", "2"])
    two = load(demo_folder, experts_per_token=2)
    assert capsys.readouterr().out == two.generate(prompt, max_tokens=10) + "\n", seed_note(seed)
    two.close()


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_loading_flags_map_to_load(demo_folder, monkeypatch, command):
    """--cache-experts, --direct-io and --preload reach load(); the defaults are load()'s own."""
    seen = []

    def fake_load(path, **kwargs):
        seen.append(kwargs)
        raise SystemExit("stop here")

    monkeypatch.setattr(flash_moe, "load", fake_load)
    rest = ["--prompt", "x"] if command == "generate" else []
    for flags, want in (([], dict(cache_experts="auto", direct_io="auto", preload=False)),
                        (["--cache-experts", "0.25", "--direct-io", "on", "--preload"],
                         dict(cache_experts="0.25", direct_io=True, preload=True)),
                        (["--cache-experts", "0", "--direct-io", "off"], dict(cache_experts="0", direct_io=False))):
        with pytest.raises(SystemExit, match="stop here"):
            main([command, "--model", str(demo_folder), *rest, *flags])
        assert {k: seen[-1][k] for k in want} == want, (flags, seen[-1])
    assert load.__defaults__ is None and "direct_io" in load.__kwdefaults__
    assert {k: load.__kwdefaults__[k] for k in ("cache_experts", "direct_io", "preload")} == \
        dict(cache_experts="auto", direct_io="auto", preload=False)


def test_generate_with_device_cache_and_preload(demo_folder, capsys):
    """A forced device cache (on any backend) preloaded from the CLI generates text."""
    main(["generate", "--model", str(demo_folder), "--prompt", "def", "--raw", "--max-tokens", "5",
          "--cache-experts", "all", "--preload"])
    out = capsys.readouterr()
    assert out.out.strip() and "preload experts" in out.err


# ---- chat ----------------------------------------------------------------------------------------------


def expected_reply(model, history, **kwargs) -> str:
    out = io.StringIO()
    chat_mod._reply(model, history, None, False, out, dict(SAMPLING, **kwargs))
    return out.getvalue()


def test_chat_through_stdin(demo, demo_folder):
    run = flash_moe_cli("chat", "--model", demo_folder, "--no-tools", "--no-think", "--max-tokens", 8,
                        home=demo_folder.parents[1], stdin="hello\n/reset\nhi\n/exit\n")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    hello = expected_reply(demo, [{"role": "user", "content": "hello"}])
    hi = expected_reply(demo, [{"role": "user", "content": "hi"}])  # a fresh history after /reset
    transcript = [f"flash-moe chat: {demo}\n{chat_mod.HELP}\n", hello, "(history cleared)\n",
                  hi, "bye\n"]
    assert run.stdout == ">>> ".join(transcript), run.stdout


class Recorder:
    """The demo model, recording the messages of each turn."""

    def __init__(self, model):
        self.model, self.turns = model, []

    def stream_generate(self, messages, **kwargs):
        self.turns.append([dict(m) for m in messages])
        return self.model.stream_generate(messages, **kwargs)

    def make_prompt_cache(self):
        return self.model.make_prompt_cache()


def test_chat_history_and_reset(demo, monkeypatch, seed):
    rng = random.Random(seed)
    system, first, second = f"You are {word(rng)}.", word(rng), word(rng)
    recorder = Recorder(demo)
    monkeypatch.setattr(flash_moe, "load", lambda *a, **k: recorder)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{first}\n{second}\n/reset\n\n{first}\n"))  # then end of input
    out = io.StringIO()
    chat_mod.chat("model", system=system, tools=False, enable_thinking=False, out=out, max_tokens=3)
    sys_msg = {"role": "system", "content": system}
    assert [[m["role"] for m in t] for t in recorder.turns] == [
        ["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    assert recorder.turns[0] == recorder.turns[2] == [sys_msg, {"role": "user", "content": first}]
    assert recorder.turns[1][3] == {"role": "user", "content": second}
    assert out.getvalue().count("(history cleared)") == 1 and out.getvalue().endswith("bye\n")


def script(monkeypatch, tokenizer, *replies) -> list:
    """generate_step 'writes' each reply in turn (then <|im_end|>); returns the prompts it was given."""
    queue, prompts = list(replies), []
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def fake(prompt, model, *, max_tokens=256, **kwargs):
        prompts.append(tokenizer.decode(prompt.tolist()))
        vocab = model.config.vocab_size
        for token in (tokenizer.encode(queue.pop(0), add_special_tokens=False) + [eos])[:max_tokens]:
            yield token, mx.zeros((vocab,)) - mx.log(mx.array(vocab, mx.float32))

    monkeypatch.setattr(gen, "generate_step", fake)
    return prompts


def shell_call(command: str) -> str:
    return (f"<tool_call>\n<function=run_shell>\n<parameter=command>\n{command}\n</parameter>\n</function>\n"
            "</tool_call>")


@pytest.mark.parametrize("answer", ["n", "y"])
def test_chat_tool_call_needs_confirmation(demo, monkeypatch, tmp_path, seed, answer):
    marker = tmp_path / f"ran_{word(random.Random(seed))}"
    command = f"echo ran > {shlex.quote(str(marker))}"
    prompts = script(monkeypatch, demo.tokenizer, f"I will run it.\n{shell_call(command)}", "Done.")
    monkeypatch.setattr(flash_moe, "load", lambda *a, **k: demo)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"make the file\n{answer}\n/exit\n"))
    monkeypatch.setattr(sys, "stdout", screen := io.StringIO())  # input() writes its prompt there
    chat_mod.chat("model", out=screen, enable_thinking=False)
    shown = screen.getvalue()
    assert f"[tool] run_shell({{\"command\": \"{command}\"}}) — run it? [y/N]" in shown, shown
    assert len(prompts) == 2 and '"name": "run_shell"' in prompts[0], "the built-in tools are offered"
    response = prompts[1][prompts[1].rindex("<tool_response>"):]
    if answer == "y":
        assert marker.read_text() == "ran\n" and "(exit status 0)" in response
    else:
        assert not marker.exists() and "[declined]" in shown and "declined" in response
    assert shell_call(command) in prompts[1], "the assistant turn with its call goes back to the model"
    assert "Done." in shown and shown.endswith("bye\n")


def test_chat_malformed_call_is_reported_not_run(demo, monkeypatch):
    bad = "<tool_call>\n<function=run_shell>\n<parameter=cmd>\nls\n</parameter>\n</function>\n</tool_call>"
    prompts = script(monkeypatch, demo.tokenizer, bad, "Sorry.")
    monkeypatch.setattr(flash_moe, "load", lambda *a, **k: demo)
    monkeypatch.setattr(sys, "stdin", io.StringIO("list files\n"))
    monkeypatch.setattr(sys, "stdout", screen := io.StringIO())
    chat_mod.chat("model", out=screen, enable_thinking=False)
    shown = screen.getvalue()
    assert "[malformed tool call:" in shown and "run it?" not in shown and "Sorry." in shown
    assert "error: malformed tool call" in prompts[1] and "command" in prompts[1]


def test_chat_shows_thinking(demo, monkeypatch):
    script(monkeypatch, demo.tokenizer, "Let me see.\n</think>\n\nHello!")
    out = io.StringIO()
    chat_mod._reply(demo, [{"role": "user", "content": "hi"}], None, None, out, {})
    assert out.getvalue() == "[thinking] Let me see.\nHello!\n"


def test_generate_prints_tool_calls(demo_folder, demo, monkeypatch, capsys):
    call = '<tool_call>\n{"name": "current_time", "arguments": {}}\n</tool_call>'
    script(monkeypatch, demo.tokenizer, f"Let me look.\n{call}")  # the call completes before the last token
    main(["generate", "--model", str(demo_folder), "--prompt", "What time is it?", "--raw"])
    out = capsys.readouterr().out
    assert out.startswith(f"Let me look.\n{call}\n[tool call] ToolCall(name='current_time', arguments={{}}"), out


# ---- convert, verify -----------------------------------------------------------------------------------


def digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def test_convert_and_verify(demo_folder, tmp_path, seed):
    home, dst = demo_folder.parents[1], tmp_path / "converted"
    run = flash_moe_cli("convert", demo_folder.parent / "hf", dst, home=home)
    assert run.returncode == 0 and f"-> {dst}" in run.stdout, run.stderr
    layout = ModelLayout.read(dst)
    for layer in layout.moe_layers:  # the same bytes as the demo's own conversion
        name = layout.layer_file(layer)
        assert digest(dst / name) == digest(demo_folder / name), name
    ok = flash_moe_cli("verify", dst, home=home)
    assert ok.returncode == 0 and "every expert matches its checksum" in ok.stdout, ok.stderr

    rng = random.Random(seed)
    layer, expert = rng.choice(layout.moe_layers), rng.randrange(layout.num_experts)
    offset = expert * layout.expert.stride + rng.randrange(layout.expert.expert_bytes)
    with open(dst / layout.layer_file(layer), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))
    bad = flash_moe_cli("verify", dst, home=home)
    note = f"flipped byte {offset} of layer {layer} {seed_note(seed)}"
    assert bad.returncode != 0, note
    lines = bad.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"layer {layer} expert {expert}: checksum "), (bad.stdout, note)
    assert bad.stderr.strip().splitlines()[-1] == f"flash-moe verify: 1 expert(s) damaged in {dst}", bad.stderr


# ---- errors, help --------------------------------------------------------------------------------------


def test_errors_are_one_line(tmp_path):
    """Each error is one line that names the command and the path at fault; no traceback."""
    missing, empty = tmp_path / "no_such_model", tmp_path / "empty"
    empty.mkdir()
    cases = [(["generate", "--model", missing, "--prompt", "hi"], missing), (["chat", "--model", missing], missing),
             (["verify", empty], empty), (["convert", missing, tmp_path / "out"], missing)]
    for args, named in cases:
        run = flash_moe_cli(*args, home=tmp_path / "home")
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 1 and len(lines) == 1, (args, run.stderr)
        assert lines[0].startswith(f"flash-moe {args[0]}: error: ") and str(named) in lines[0], lines
        assert run.stdout == "", (args, run.stdout)


def test_every_command_has_help(tmp_path):
    commands = subcommands()
    assert set(commands) >= {"convert", "verify", "generate", "chat", "demo"}
    top = flash_moe_cli("--help", home=tmp_path)
    assert top.returncode == 0 and all(c in top.stdout for c in commands), top.stdout
    for command in commands:
        run = flash_moe_cli(command, "--help", home=tmp_path)
        assert run.returncode == 0 and run.stdout.startswith(f"usage: flash-moe {command}"), (command, run.stderr)
        assert run.stderr == ""
    script = Path(sys.executable).with_name("flash-moe")  # the console script of pyproject.toml
    if script.exists():
        run = subprocess.run([str(script), "demo", "--help"], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "--max-tokens" in run.stdout


# ---- input checks (issue 13 item 7), context length (item 5) -------------------------------------------


def demo_variant(demo_folder: Path, folder: Path, drop=(), config=None) -> Path:
    """The converted demo with files left out or config.json edited; the rest linked, not copied."""
    import json

    folder.mkdir()
    for f in demo_folder.iterdir():
        if f.name not in drop:
            (folder / f.name).symlink_to(f)
    if config:
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps({**json.loads((demo_folder / "config.json").read_text()), **config}))
    return folder


@pytest.mark.parametrize("flags,message", [
    (["--temp", "nan"], "argument --temp: must be a finite number >= 0, got nan"),
    (["--temp", "-1"], "argument --temp: must be a finite number >= 0, got -1"),
    (["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
    (["--top-p", "inf"], "argument --top-p: must be in (0, 1], got inf"),
    (["--min-p", "2"], "argument --min-p: must be in [0, 1], got 2"),
    (["--top-k", "-2"], "argument --top-k: must be >= 0, got -2"),
    (["--repetition-penalty", "0"], "argument --repetition-penalty: must be a finite number > 0, got 0"),
    (["--seed", "-3"], "argument --seed: must be in 0..2**64-1, got -3"),
    (["--seed", "x"], "argument --seed: expected an integer, got 'x'"),
    (["--max-tokens", "-1"], "argument --max-tokens: must be at least 1, got -1"),
    (["--max-tokens", "0", "--timing"], "argument --max-tokens: must be at least 1, got 0"),
    (["--k", "0"], "argument --k: must be at least 1, got 0"),
    (["--cache-experts", "2.5"], "argument --cache-experts: expected a count, a fraction in (0, 1), 'all' or 'auto', got '2.5'"),
    (["--cache-experts", "-1"], "argument --cache-experts: expected a count, a fraction in (0, 1), 'all' or 'auto', got '-1'"),
    (["--cache-experts", "lots"], "argument --cache-experts: expected a count, a fraction in (0, 1), 'all' or 'auto', got 'lots'"),
])
def test_bad_flag_values_name_the_flag(demo_folder, capsys, flags, message):
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--model", str(demo_folder), "--prompt", "x", *flags])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"flash-moe generate: error: {message}"


def test_library_errors_name_the_flag(demo_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:  # 17 experts is more than the demo has
        main(["generate", "--model", str(demo_folder), "--prompt", "x", "--k", "17"])
    assert exit.value.code == "flash-moe generate: error: --k must be in 1..16, got 17"
    # the demo's expert layout is not 4 KiB-aligned: direct reads are refused, and the way out is the flag
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--model", str(demo_folder), "--prompt", "x", "--direct-io", "on", "--max-tokens", "2"])
    message = str(exit.value.code)
    assert message.startswith("flash-moe generate: error: direct reads") and "\n" not in message, message
    assert "direct=" not in message and "direct_io" not in message, message
    assert "--direct-io off" in message or "neither" in message, message  # "neither": a platform without O_DIRECT
    no_tokenizer = demo_variant(demo_folder, tmp_path / "m", drop=("tokenizer.json",))
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--model", str(no_tokenizer), "--prompt", "hi"])
    assert exit.value.code == f"flash-moe generate: error: {no_tokenizer / 'tokenizer.json'}: missing; flash_moe needs the model's tokenizer.json"


def test_loading_flags_that_do_nothing_say_so(demo_folder, capsys):
    from flash_moe.kernels import BACKEND

    if BACKEND == "cuda":
        pytest.skip("CUDA has the device cache these flags act on")
    main(["generate", "--model", str(demo_folder), "--prompt", "x", "--max-tokens", "2", "--preload"])
    assert "flash-moe: note: --preload does nothing here: there is no device expert cache" in capsys.readouterr().err
    main(["generate", "--model", str(demo_folder), "--prompt", "x", "--max-tokens", "2", "--cache-experts", "5"])
    assert "flash-moe: note: there is no separate GPU memory" in capsys.readouterr().err
    main(["generate", "--model", str(demo_folder), "--prompt", "x", "--max-tokens", "2"])
    assert "note:" not in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"flash-moe {flash_moe.__version__}\n"


def test_prompt_past_the_context_warns_or_fails(demo_folder, tmp_path, capsys):
    short = demo_variant(demo_folder, tmp_path / "m", config={"max_position_embeddings": 8})
    prompt = "def main(argv):\n    return parse(argv)\n"
    n = len(load(demo_folder).tokenizer.encode(prompt))
    main(["generate", "--model", str(short), "--prompt", prompt, "--raw", "--max-tokens", "2"])
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"flash-moe: warning: the prompt has {n} tokens, more than the 8 this model was trained for "
                      "(max_position_embeddings in config.json); output past that is unreliable"), err
    assert not [line for line in err if "Token indices" in line or "transformers" in line], err
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--model", str(short), "--prompt", prompt, "--raw", "--strict-context"])
    assert str(exit.value.code).startswith(f"flash-moe generate: error: the prompt has {n} tokens, more than the 8")


def test_timing_table_without_tokens(demo):
    from flash_moe.timing import PhaseTimer

    timer = PhaseTimer(demo).install()
    try:
        assert "nan" not in timer.table() and "no tokens" in timer.table()
    finally:
        timer.uninstall()

"""The lm-eval adapter (issue 15): a local multiple-choice task runs offline through lm_eval and its
log-likelihoods equal those ``flash_moe.eval.token_nlls`` gives; rolling log-likelihoods and generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from flash_moe.eval import token_nlls  # noqa: E402
from flash_moe.lm_eval_adapter import FlashMoeLM  # noqa: E402

ITEMS = [
    {"question": "def add(a, b):\n    return a", "choices": [" + b", " * b", " import"], "answer": 0},
    {"question": "for i in range(", "choices": ["10):", "class", " = )"], "answer": 0},
    {"question": "import", "choices": [" os", " (", " ]]"], "answer": 0},
    {"question": "if x is None:\n", "choices": ["    return None", "    def )", " ))"], "answer": 0},
]
TASK = """task: flash_moe_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "flash_moe_mc.yaml").write_text(TASK.format(data=data))
    return tmp_path / "tasks"


class Request:  # what lm_eval hands a model: an object with .args
    def __init__(self, *args):
        self.args = args


def reference_loglikelihood(model, context: str, continuation: str) -> float:
    """Through evaluate's windows: the continuation's tokens' log-likelihood given the context. lm_eval moves the
    context's trailing whitespace (newlines too) to the continuation and splits the tokens of the whole text."""
    tok = model.tokenizer
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    ctx = tok.encode(context, add_special_tokens=False)
    cont = tok.encode(context + continuation, add_special_tokens=False)[len(ctx):]
    return -float(token_nlls(model, ctx + cont, 4096, 2048)[-len(cont):].sum())


def test_multiple_choice_task_agrees_with_evaluate(demo, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = FlashMoeLM(model=demo, k=2)
    try:
        out = simple_evaluate(model=lm, tasks=["flash_moe_mc"], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                              log_samples=True, verbosity="ERROR")
        samples = out["samples"]["flash_moe_mc"]
        assert len(samples) == len(ITEMS)
        for s in samples:
            item = ITEMS[s["doc_id"]]
            assert [tuple(a) for a in s["arguments"]] == [(item["question"], c) for c in item["choices"]]
            got = [r[0][0] for r in s["resps"]]
            want = [reference_loglikelihood(demo, item["question"], c) for c in item["choices"]]
            assert got == pytest.approx(want, rel=1e-4, abs=1e-3)
        assert 0 <= out["results"]["flash_moe_mc"]["acc,none"] <= 1
    finally:
        demo.set_experts_per_token(4)


def test_rolling_loglikelihood_and_generation(demo):
    lm = FlashMoeLM(model=demo, max_length=24)
    text = "def main():\n    for i in range(10):\n        print(i)\n    return None\n" * 2
    (rolled,) = lm.loglikelihood_rolling([Request(text)])
    ids = [demo.tokenizer.eos_token_id] + demo.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 24  # several windows
    assert rolled == pytest.approx(-float(token_nlls(demo, ids, 24, 12).sum()), rel=1e-6)
    assert rolled < 0
    (a, b) = lm.generate_until([Request("def ", {"until": ["\n"], "max_gen_toks": 12}),
                                Request("import", {"max_gen_toks": 5, "do_sample": False})])
    assert a == str(demo.generate("def ", max_tokens=12, stop="\n")) and "\n" not in a
    assert b == str(demo.generate("import", max_tokens=5))


def test_model_args_errors(demo):
    with pytest.raises(ValueError, match="path=MODEL is required"):
        FlashMoeLM()
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['kk'\]"):
        FlashMoeLM(model=demo, kk=3)
    FlashMoeLM(model=demo, batch_size=1, device="cpu")  # what lm_eval always passes is accepted


def test_command_line(demo_folder, task_dir, tmp_path):
    """``python -m flash_moe.lm_eval_adapter`` registers the model and runs lm_eval's own command line."""
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "c"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "flash_moe.lm_eval_adapter", "--model", "flash_moe", "--model_args",
                          f"path={demo_folder},k=2", "--tasks", "flash_moe_mc", "--include_path", str(task_dir),
                          "--limit", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "flash_moe_mc" in run.stdout and "acc" in run.stdout

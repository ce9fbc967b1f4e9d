"""The synthetic tool-call dialogues (examples/tool_dialogues.py) render through the demo's chat template into
exactly what inference parses: the assistant's call, cut from the rendered text, scores as an exact match."""

from __future__ import annotations

import sys
from pathlib import Path

from flash_moe.eval.tools import score_reply
from flash_moe.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import tool_dialogues  # noqa: E402


def test_rendered_calls_parse_as_the_expected_call():
    tok = Tokenizer.from_folder(REPO / "flash_moe" / "demo")
    items = tool_dialogues.dialogues(60, seed=3)
    assert len({d["expected"]["name"] for d in items}) >= 10  # built-in and suite tools both drawn
    for item, text in zip(items, tool_dialogues.render(items, tok)):
        assert text.startswith("<|im_start|>system\n# Tools") and text.count("<tool_response>") == 1
        call = text.split("</think>\n\n", 1)[1].split("<|im_end|>", 1)[0]
        score = score_reply(call, item["tools"], item["expected"])
        assert score["exact"], (call, score)


def test_held_out_requests_are_not_training_requests():
    seen = {d["messages"][0]["content"] for d in tool_dialogues.dialogues(500, 0)}
    items = tool_dialogues.held_out_suite(100, 1, seen)
    assert items and all(i["messages"][0]["content"] not in seen and len(i["messages"]) == 1 for i in items)

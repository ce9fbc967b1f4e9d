"""The synthetic tool-call dialogues (examples/tool_dialogues.py) render through the demo's chat template into
exactly what inference parses: the assistant's call, cut from the rendered text, scores as an exact match."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

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


def test_batches_share_one_tool_list_that_offers_each_call():
    drawn = tool_dialogues.batches(seed=5, rows=6)
    for _ in range(20):
        batch = next(drawn)
        assert len(batch) == 6 and all(d["tools"] == batch[0]["tools"] for d in batch)
        offered = {t["function"]["name"] for t in batch[0]["tools"]}
        assert all(d["expected"]["name"] in offered for d in batch)
    assert tool_dialogues.training_requests(5, 6, 20) >= {d["messages"][0]["content"] for d in batch}


def test_training_labels_are_the_assistant_turns_and_the_ids_the_whole_text():
    """The loss mask of examples/train_demo_model.py: encoding the dialogue in pieces gives the ids of the whole
    rendered text (thinking off), and the labelled tokens decode to exactly the assistant's two turns."""
    pytest.importorskip("torch")
    import train_demo_model
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(REPO / "flash_moe" / "demo")
    item = tool_dialogues.dialogues(1, seed=4)[0]
    text = tool_dialogues.render([item], Tokenizer.from_folder(REPO / "flash_moe" / "demo"))[0]
    ids, labels = train_demo_model.dialogue_tokens(hf, text, thinking=False)
    assert ids.tolist() == hf(text, add_special_tokens=False).input_ids
    said = hf.decode([i for i in labels.tolist() if i != -100])
    turns = [t.split("<|im_end|>")[0] + "<|im_end|>" for t in text.split("<|im_start|>assistant\n")[1:]]
    assert said == "".join(turns) and item["messages"][-1]["content"] in said
    # Thinking on: the same labels, the ids cut after "<think>\n" as a prompt with thinking on ends.
    ids_on, labels_on = train_demo_model.dialogue_tokens(hf, text, thinking=True)
    assert hf.decode([i for i in labels_on.tolist() if i != -100]) == said and len(ids_on) > len(ids)

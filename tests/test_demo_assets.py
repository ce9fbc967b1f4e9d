"""The shipped demo checkpoint (flash_moe/demo): tokenizer, chat template, and a model that writes Python.

The assets are built by examples/train_demo_model.py. The model tests need torch (a test extra)
and are skipped without it; the tokenizer tests need only transformers.
"""

from __future__ import annotations

import json
import keyword
import random
import sysconfig
import unicodedata
from pathlib import Path

import pytest

from conftest import derive_seed, seed_note

transformers = pytest.importorskip("transformers")

DEMO = Path(__file__).resolve().parents[1] / "flash_moe" / "demo"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]


def stdlib_sources(rng: random.Random, n: int, max_chars: int = 6000) -> list[tuple[Path, str]]:
    """n random top-level stdlib modules (NFC-stable, since the tokenizer NFC-normalizes like Qwen's)."""
    files = sorted(p for p in STDLIB.glob("*.py") if 4000 < p.stat().st_size < 200_000)
    picked = []
    for p in rng.sample(files, len(files)):
        text = p.read_text(encoding="utf-8", errors="replace")[:max_chars]
        if unicodedata.normalize("NFC", text) == text:
            picked.append((p, text))
        if len(picked) == n:
            break
    return picked


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(DEMO, local_files_only=True)


def test_tokenizer_loads_offline(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(DEMO, local_files_only=True)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    config = json.loads((DEMO / "config.json").read_text())
    assert len(tok) == config["vocab_size"]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tok.eos_token_id == config["eos_token_id"]
    assert tok.pad_token_id == config["pad_token_id"]


def test_special_tokens_are_single_ids(tokenizer):
    ids = {}
    for token in CHATML_TOKENS + TAG_TOKENS:
        encoded = tokenizer(f"x{token}y", add_special_tokens=False).input_ids
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_id in encoded and encoded.count(token_id) == 1, f"{token} is not one id: {encoded}"
        assert tokenizer.decode([token_id]) == token
        ids[token] = token_id
    assert len(set(ids.values())) == len(ids)
    # ChatML tokens are special (dropped by skip_special_tokens); think/tool tags stay visible for parsers.
    text = "<|im_start|>assistant\n<think>\nhm\n</think>\n\nok<|im_end|>"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == "assistant\n<think>\nhm\n</think>\n\nok"


def test_round_trips_python_source(tokenizer, seed):
    """AutoTokenizer rebuilds the tokenizer (Qwen3_5Tokenizer); it must equal the shipped tokenizer.json."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    n_bytes = n_tokens = 0
    for path, text in stdlib_sources(random.Random(seed), 4):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text, f"{path.name} does not round-trip {seed_note(seed)}"
        assert ids == raw.encode(text, add_special_tokens=False).ids, f"{path.name}: AutoTokenizer != tokenizer.json"
        n_bytes, n_tokens = n_bytes + len(text.encode()), n_tokens + len(ids)
    # Trained on Python: about 3.5 bytes a token (1.9 at worst for 4 table-heavy modules).
    assert n_bytes / n_tokens > 1.8, f"{n_bytes / n_tokens:.2f} bytes/token {seed_note(seed)}"
    for word in ["def", " return", " self", " import", "    ", "        ", " None", " isinstance"]:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, f"{word!r} is not one token"


def test_chat_template_renders_tools_and_tool_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": '{"temp": 21}'},
    ]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, enable_thinking=False, tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n")
    assert json.dumps(TOOLS[0]) in text
    assert "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>" in text
    assert "</IMPORTANT>\n\nBe brief.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n" in text
    assert text.endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
        '<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    with pytest.raises(Exception, match="must be a mapping"):
        messages[2]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris"}'
        tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False)


def test_chat_template_thinking_and_history(tokenizer):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nhello"},
        {"role": "user", "content": [{"type": "text", "text": "again"}]},
    ]
    thinking = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert thinking == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    quiet = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False, tokenize=False)
    assert quiet == thinking + "\n</think>\n\n"
    last = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]
    assert tokenizer.apply_chat_template(last, tokenize=False) == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\nr\n</think>\n\na<|im_end|>\n"
    )
    ids = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_checkpoint_layout_and_size():
    from safetensors import safe_open

    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe_text" and not config["tie_word_embeddings"]
    assert config["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert (DEMO / "model.safetensors").stat().st_size <= 20 * 2**20
    with safe_open(DEMO / "model.safetensors", "np") as f:
        keys = set(f.keys())
        assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
        for key in keys:
            shape = f.get_slice(key).get_shape()
            if key.endswith("_proj.weight") and len(shape) == 2 and "in_proj_" not in key:
                # Experts and dense projections quantize in groups of 64 along both dims.
                assert shape[0] % 64 == 0 and shape[1] % 64 == 0, f"{key} {shape}"
    n_experts = sum(1 for k in keys if k.startswith("model.layers.0.mlp.experts.") and k.endswith("gate_proj.weight"))
    fused = "model.layers.0.mlp.experts.gate_up_proj" in keys
    assert fused or n_experts == config["num_experts"]


# ---- the model (torch) ----


@pytest.fixture(scope="module")
def model():
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a shared CI box
    m = transformers.AutoModelForCausalLM.from_pretrained(
        DEMO, dtype=torch.float32, local_files_only=True, experts_implementation="eager"
    )
    yield m.eval()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def held_out_ids(tokenizer):
    """One 256-token window from each of 8 random stdlib modules (seen in training or held out)."""
    torch = pytest.importorskip("torch")

    rng = random.Random(derive_seed("demo stdlib windows"))
    windows = []
    for _, text in stdlib_sources(rng, 8, max_chars=50_000):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        start = rng.randrange(0, len(ids) - 256)
        windows.append(ids[start : start + 256])
    return torch.tensor(windows)


def python_score(text: str) -> int:
    """How Python-looking a continuation is: keywords, calls, blocks, indentation."""
    words = set(text.replace("(", " ").replace(":", " ").replace(".", " ").split())
    return (
        len(words & set(keyword.kwlist) | words & {"self", "None", "True", "False"})
        + ("(" in text and ")" in text)
        + (":\n" in text)
        + ("\n    " in text)
    )


# Greedy with the repetition penalty the notebook uses: since its tool-call fine-tune, the demo's plain greedy
# decoding loops ("import sys" lines, digits after a bare "def "); it still writes Python from a code context.
REPETITION_PENALTY = 1.15


@pytest.mark.parametrize("prompt", ["class ", "    def close(self):\n", "class Error(Exception):\n"])
def test_greedy_generation_looks_like_python(model, tokenizer, prompt):
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=48, do_sample=False, repetition_penalty=REPETITION_PENALTY)
    text = tokenizer.decode(out[0, ids.shape[1]:])
    assert python_score(text) >= 4, f"not Python-looking from {prompt!r}: {text!r}"


def test_chat_prompt_answers_with_code(model, tokenizer):
    import torch

    chat = [{"role": "user", "content": "Write the function `quote` of the Python module `shlex`."}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, enable_thinking=False, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, repetition_penalty=REPETITION_PENALTY)
    text = tokenizer.decode(out[0, ids.shape[1]:])
    assert text.lstrip().startswith(("def ", "class ", "@")) and python_score(text) >= 3, repr(text)


def test_knows_stdlib_text(model, held_out_ids):
    """Cross-entropy on stdlib text well below that of the text's own unigram distribution (the best
    a model that learned only token frequencies could do) and far below ln(vocab) = 8.3 nats."""
    import torch

    with torch.no_grad():
        loss = model(input_ids=held_out_ids, labels=held_out_ids).loss.item()
    counts = torch.bincount(held_out_ids.flatten()).float()
    p = counts[counts > 0] / counts.sum()
    unigram = -(p * p.log()).sum().item()
    note = seed_note(derive_seed("demo stdlib windows"))
    assert loss < unigram - 1.0, f"stdlib cross-entropy {loss:.2f} nats vs unigram entropy {unigram:.2f} {note}"


def test_survives_four_bit_experts(tokenizer, held_out_ids):
    """The demo converts experts to 4 bits (group 64): the model must stay as good as before."""
    import numpy as np
    import torch

    mx = pytest.importorskip("mlx.core")
    m = transformers.AutoModelForCausalLM.from_pretrained(
        DEMO, dtype=torch.float32, local_files_only=True, experts_implementation="eager"
    ).eval()
    with torch.no_grad():
        before = m(input_ids=held_out_ids, labels=held_out_ids).loss.item()
        for layer in m.model.layers:
            for param in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                w = mx.array(param.numpy()).astype(mx.bfloat16)
                w = mx.dequantize(*mx.quantize(w, group_size=64, bits=4), group_size=64, bits=4)
                param.copy_(torch.from_numpy(np.array(w.astype(mx.float32))))
        after = m(input_ids=held_out_ids, labels=held_out_ids).loss.item()
        ids = tokenizer("class ", return_tensors="pt").input_ids
        out = m.generate(ids, max_new_tokens=48, do_sample=False, repetition_penalty=REPETITION_PENALTY)
        text = tokenizer.decode(out[0, ids.shape[1]:])
    assert after - before < 0.1, f"4-bit experts raise the loss from {before:.3f} to {after:.3f}"
    assert python_score(text) >= 4, repr(text)


def test_router_popularity_is_skewed(model, held_out_ids):
    """The top 20% of experts take clearly more than their 20% of the activations in every layer
    (the shipped model measures 0.28-0.30 in layer 0 up to 0.67 in layer 3, uniform being 0.19),
    yet no layer has collapsed onto its top-k experts."""
    import torch

    cfg = model.config
    with torch.no_grad():
        router_logits = model(input_ids=held_out_ids, output_router_logits=True).router_logits
    top = max(1, cfg.num_experts // 5)
    uniform = top / cfg.num_experts
    shares = []
    for layer, logits in enumerate(router_logits):
        picks = logits.topk(cfg.num_experts_per_tok, dim=-1).indices.flatten()
        counts = torch.bincount(picks, minlength=cfg.num_experts).sort(descending=True).values
        shares.append(counts[:top].sum().item() / counts.sum().item())
        note = f"layer {layer}: counts {counts.tolist()} {seed_note(derive_seed('demo stdlib windows'))}"
        assert shares[-1] > uniform + 0.06, f"top-{top} share {shares[-1]:.2f} vs uniform {uniform:.2f}; {note}"
        assert (counts > 0).sum() > 2 * cfg.num_experts_per_tok, f"router collapsed; {note}"
    assert sum(shares) / len(shares) > 0.35, f"mean top-{top} share {shares}"

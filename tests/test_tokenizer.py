"""flash_moe.tokenizer (tokenizer.json + jinja2, no transformers at run time) against transformers' AutoTokenizer:
the same ids for plain text and for chat messages with tools, tool results and thinking on or off, the same
decoded text, on the shipped demo tokenizer and on tiny tokenizers built here (BOS/EOS post-processing from
tokenizer_config.json, clean-up of spaces, named templates, the template globals transformers provides).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import seed_note

from flash_moe.tokenizer import ChatTemplateError, Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

DEMO = Path(__file__).resolve().parents[1] / "flash_moe" / "demo"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city <b>&amp;</b> 'quoted' — ünïcode",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
CHATS = {
    "plain": [{"role": "user", "content": "Hello there!"}],
    "system": [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Hi\nwho are you?"}],
    "tool_turn": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}]},
        {"role": "tool", "content": '{"temp": 21, "sky": "<clear> & dry"}'},
        {"role": "tool", "content": "second result"},
    ],
    "history_with_thinking": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "add again"},
        {"role": "user", "content": "thanks <|im_end|> <think> literal tags"},
    ],
    "content_list": [{"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}]}],
}
TEXTS = ["", "hello world", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "Grüße, 東京, emoji 🙂 done",
         "special <|im_start|>user\nhi<|im_end|><|endoftext|>", "<think>\nreasoning\n</think>\n\nanswer",
         "x = [i ** 2 for i in range(10)]  # squares", "don't stop , it 's fine ."]


@pytest.fixture(scope="module")
def demo_pair():
    return Tokenizer.from_folder(DEMO), transformers.AutoTokenizer.from_pretrained(DEMO, local_files_only=True)


def reference_ids(ref, messages, **kwargs) -> list[int]:
    out = ref.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    return list(out)


def assert_same_text(ours, ref, texts):
    for text in texts:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (text, skip)


def test_demo_plain_text_and_decode(demo_pair, seed):
    ours, ref = demo_pair
    rng = random.Random(seed)
    source = Path(json.__file__).read_text()
    texts = TEXTS + [source[i : i + rng.randint(50, 2000)] for i in (rng.randrange(len(source)) for _ in range(5))]
    assert_same_text(ours, ref, texts)
    ids = [rng.randrange(len(ref)) for _ in range(300)]  # any id sequence, even a meaningless one
    assert ours.decode(ids) == ref.decode(ids), seed_note(seed)
    assert ours.convert_tokens_to_ids("<|im_end|>") == ref.convert_tokens_to_ids("<|im_end|>")
    assert (ours.eos_token, ours.eos_token_id, ours.pad_token_id) == (ref.eos_token, ref.eos_token_id, ref.pad_token_id)
    assert ours.eos_token_ids == {4087, 4089}  # tokenizer_config.json's eos and generation_config.json's
    assert len(ours) == len(ref)


@pytest.mark.parametrize("name", list(CHATS))
@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_demo_chat_template(demo_pair, name, thinking, tools):
    ours, ref = demo_pair
    kwargs = dict(tools=tools, add_generation_prompt=True)
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    text = ours.apply_chat_template(CHATS[name], tokenize=False, **kwargs)
    assert text == ref.apply_chat_template(CHATS[name], tokenize=False, **kwargs)
    assert ours.apply_chat_template(CHATS[name], **kwargs) == reference_ids(ref, CHATS[name], **kwargs)
    assert ours.apply_chat_template(CHATS[name], return_dict=True, **kwargs)["input_ids"] == reference_ids(ref, CHATS[name], **kwargs)


def test_demo_template_errors(demo_pair):
    ours, ref = demo_pair
    bad = [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]
    with pytest.raises(ChatTemplateError, match="System message must be at the beginning"):
        ours.apply_chat_template(bad)
    with pytest.raises(Exception, match="System message must be at the beginning"):
        ref.apply_chat_template(bad)
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        ours.apply_chat_template([])


# ---- tiny tokenizers built here --------------------------------------------------------------------------

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokenizer", "don't do that , it 's odd .",
          "numbers 12345 and symbols !?#", "Grüße aus München"] * 20

# A template that uses what transformers gives templates: bos/eos variables, strftime_now, namespace, loop
# controls, tojson with options, raise_exception, {% generation %}, a tools branch.
LLAMA_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(n=0) %}
{%- if tools %}[TOOLS]{{ tools | tojson(indent=2, sort_keys=true) }}[/TOOLS]{% endif %}
{%- for m in messages %}
{%- if m.role == 'system' and not loop.first %}{{ raise_exception('system must come first') }}{% endif %}
{%- set ns.n = ns.n + 1 %}
{%- if m.role == 'assistant' %}<|assistant|>{% generation %}{{ m.content }}{% if m.reasoning_content is defined %} (thought: {{ m.reasoning_content }}){% endif %}{% endgeneration %}{{ eos_token }}
{%- elif m.role == 'tool' %}<|tool|>{{ m.content | tojson }}
{%- else %}<|{{ m.role }}|>{{ m.content | trim }}
{%- endif %}
{%- if ns.n > 5 %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|assistant|>{% if strftime_now('%Y') | int > 2000 %}{% endif %}{% if enable_thinking is defined and not enable_thinking %}[no think]{% endif %}{% endif %}"""


def build_bpe(folder: Path, config: dict, template=None, post_processor=False) -> Path:
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, processors, trainers

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|tool|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False))
    if post_processor:  # BOS written by tokenizer.json itself, as Llama 3's does
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    if isinstance(template, str):
        (folder / "chat_template.jinja").write_text(template)
    elif template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def build_wordpiece(folder: Path) -> Path:
    from tokenizers import Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Backend(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"], show_progress=False))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]")))
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True, "unk_token": "[UNK]",
              "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
              "chat_template": "{% for m in messages %}{{ cls_token }} {{ m.role }}: {{ m.content }} {{ sep_token }}{% endfor %}"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


TINY = {
    "bpe_bos_eos": lambda f: build_bpe(f, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                           "add_bos_token": True, "add_eos_token": True}, LLAMA_TEMPLATE),
    "bpe_bos_post_processor": lambda f: build_bpe(f, {"bos_token": "<s>", "eos_token": "</s>"}, LLAMA_TEMPLATE,
                                                  post_processor=True),
    "bpe_named_templates_new_special": lambda f: build_bpe(
        f, {"bos_token": "<s>", "eos_token": "<|end|>",  # <|end|> is in no vocabulary: it is added
            "added_tokens_decoder": {"400": {"content": "<|extra|>", "special": False}}},
        [{"name": "default", "template": LLAMA_TEMPLATE}, {"name": "tool_use", "template": "TOOLS " + LLAMA_TEMPLATE}]),
    "wordpiece_cleanup": build_wordpiece,
}


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_tokenizers_match_transformers(name, tmp_path):
    folder = TINY[name](tmp_path / name)
    ours, ref = Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert_same_text(ours, ref, TEXTS + CORPUS[:5] + ["<|extra|> and <|end|> inside"])
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert len(ours) == len(ref)
    chats = [CHATS["plain"], CHATS["system"], CHATS["history_with_thinking"],
             [{"role": "user", "content": "weather?"}, {"role": "tool", "content": "<sunny> & 'warm'"}],
             [{"role": "user", "content": str(i)} for i in range(8)]]  # {% break %} after five
    for messages in chats:
        for kwargs in ({}, {"add_generation_prompt": True, "enable_thinking": False}, {"tools": TOOLS}):
            text = ours.apply_chat_template(messages, tokenize=False, **kwargs)
            assert text == ref.apply_chat_template(messages, tokenize=False, **kwargs), (name, messages, kwargs)
            assert ours.apply_chat_template(messages, **kwargs) == reference_ids(ref, messages, **kwargs)


def test_template_raise_exception_and_sandbox(tmp_path):
    ours = Tokenizer.from_folder(TINY["bpe_bos_eos"](tmp_path / "t"))
    with pytest.raises(ChatTemplateError, match="system must come first"):
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(ChatTemplateError):  # no way out of the sandbox
        ours.apply_chat_template(CHATS["plain"], chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError, match="underscore"):
        ours.apply_chat_template(CHATS["plain"], chat_template="{% set ns = namespace(_x=1) %}")


def test_missing_tokenizer_names_the_file(tmp_path):
    from flash_moe.files import CheckpointError

    with pytest.raises(CheckpointError, match="tokenizer.json: missing"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json: not a usable tokenizer"):
        Tokenizer.from_folder(tmp_path)


def test_loading_never_imports_transformers_or_torch(demo_folder):
    """The CLI path (load, tokenizer, chat template, generate) imports neither, and prints nothing of theirs."""
    code = ("import sys; from flash_moe import load; m = load(sys.argv[1]); "
            "m.generate([{'role': 'user', 'content': 'hi'}], max_tokens=2); "
            "print(sorted(k for k in ('transformers', 'torch') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(demo_folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]" and "transformers" not in out.stderr, (out.stdout, out.stderr)

"""The model's tokenizer without transformers: ``tokenizer.json`` through the ``tokenizers`` package, and the
chat template rendered with ``jinja2`` the way transformers renders it.

Importing transformers costs seconds and, with torch installed, imports torch; this loads in tens of ms.
What transformers adds on top of ``tokenizer.json`` and is reproduced here: named special tokens from
``tokenizer_config.json`` (added when missing), ``added_tokens_decoder`` entries,
``clean_up_tokenization_spaces``, and the template's
environment (``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML, ``{% generation %}``,
the special tokens as variables). BOS/EOS come from tokenizer.json's post-processor alone: transformers 5's
generic tokenizer ignores ``add_bos_token`` too (model-specific classes may not; Qwen's adds none). Not
reproduced: tokenizers without a ``tokenizer.json`` (SentencePiece or vocab/merges only), class defaults of
model-specific tokenizer classes (Qwen's ``unk_token``, unused by its template), tools given as Python
functions, ``continue_final_message``, control-token sanitizing.
tests/test_tokenizer.py proves the ids and text equal AutoTokenizer's.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from .files import CheckpointError, read_bytes, read_json

TOKENIZER_LIMIT = 64 << 20  # tokenizer.json of large-vocabulary models is tens of MiB
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # the first is what chat templates read


class ChatTemplateError(ValueError):
    """The chat template refused the messages (its ``raise_exception``) or failed to render."""


def _token_text(value) -> str | None:
    """A special token in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _optional_json(path: Path) -> dict:
    if not path.exists():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


class Tokenizer:
    """Encode, decode and chat-template like transformers' tokenizer, for the methods flash_moe and mlx-lm
    code use: ``encode``, ``decode``, ``apply_chat_template``, ``convert_tokens_to_ids``, ``eos_token_id(s)``."""

    def __init__(self, backend, config: dict | None = None, chat_template=None, generation_config: dict | None = None):
        from tokenizers import AddedToken

        self.backend = backend
        config = config or {}
        self.init_config = config
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.model_max_length = config.get("model_max_length")
        self.special_tokens_map = {k: t for k in NAMED_TOKENS if (t := _token_text(config.get(k)))}
        have = {t.content for t in backend.get_added_tokens_decoder().values()}
        extra = []
        for entry in (config.get("added_tokens_decoder") or {}).values():
            if isinstance(entry, dict) and _token_text(entry) and entry["content"] not in have:
                extra.append(AddedToken(entry["content"], special=bool(entry.get("special", True)),
                                        lstrip=bool(entry.get("lstrip")), rstrip=bool(entry.get("rstrip")),
                                        normalized=bool(entry.get("normalized", False)),
                                        single_word=bool(entry.get("single_word"))))
                have.add(entry["content"])
        # as transformers: a named special token that is not an added token yet becomes one (even when the
        # base vocabulary has it: it is then never split and skip_special_tokens drops it)
        extra += [AddedToken(t, special=True) for t in dict.fromkeys(self.special_tokens_map.values()) if t not in have]
        if extra:
            backend.add_tokens(extra)
        eos = (generation_config or {}).get("eos_token_id")
        self.eos_token_ids = {i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)}
        if self.eos_token_id is not None:
            self.eos_token_ids.add(self.eos_token_id)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """Read ``tokenizer.json``, ``tokenizer_config.json`` (or ``special_tokens_map.json``), the chat template
        (``chat_template.jinja``, else tokenizer_config.json's) and ``generation_config.json``'s eos ids."""
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        file = folder / "tokenizer.json"
        try:
            raw = read_bytes(file, TOKENIZER_LIMIT)
        except FileNotFoundError:
            raise CheckpointError(f"{file}: missing; flash_moe needs the model's tokenizer.json") from None
        try:
            backend = Backend.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exceptions for malformed files
            raise CheckpointError(f"{file}: not a usable tokenizer ({str(e).splitlines()[0] if str(e) else e})") from None
        config = _optional_json(folder / "tokenizer_config.json")
        for k, v in _optional_json(folder / "special_tokens_map.json").items():
            config.setdefault(k, v)
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").exists():
            template = read_bytes(folder / "chat_template.jinja", TOKENIZER_LIMIT).decode("utf-8")
        elif isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template if isinstance(t, dict) and "name" in t}
        elif template is not None and not isinstance(template, str):
            raise CheckpointError(f"{folder / 'tokenizer_config.json'}: chat_template is neither text nor a list")
        return cls(backend, config, template, _optional_json(folder / "generation_config.json"))

    # ---- tokens -------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_tokenization_spaces else text

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __getattr__(self, name: str):
        # bos_token, eos_token_id, pad_token, ... (None when the tokenizer has none)
        base = name[:-3] if name.endswith("_id") else name
        if base in NAMED_TOKENS:
            token = self.special_tokens_map.get(base)
            return token if base == name else (None if token is None else self.backend.token_to_id(token))
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    # ---- chat template ------------------------------------------------------------------------------------

    def apply_chat_template(self, conversation, tools=None, documents=None, add_generation_prompt: bool = False,
                            tokenize: bool = True, return_dict: bool = False, chat_template: str | None = None,
                            **kwargs):
        """Render ``conversation`` (a list of message dicts) with the model's chat template, as transformers does.

        Extra keyword arguments (``enable_thinking=False``, ...) become template variables. Returns the text
        (``tokenize=False``) or its token ids encoded without added special tokens, as a list (mlx-lm's
        expectation; ``return_dict=True`` gives ``{"input_ids": ids}`` as transformers 5 does by default)."""
        import jinja2

        template = self._template(chat_template, tools)
        if isinstance(conversation, (list, tuple)) and not conversation:
            raise ChatTemplateError("cannot apply the chat template to an empty conversation")
        messages = [_message(m) for m in conversation]
        for name, value in (("tools", tools), ("documents", documents)):
            if value is not None and not all(isinstance(t, dict) for t in value):
                raise TypeError(f"{name} must be a list of JSON-schema dicts")
        try:
            text = _compile(template).render(messages=messages, tools=tools, documents=documents,
                                             add_generation_prompt=add_generation_prompt,
                                             **{**self.special_tokens_map, **kwargs})
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from None
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": ids} if return_dict else ids

    def _template(self, name: str | None, tools) -> str:
        template = self.chat_template
        if name is not None and not isinstance(template, dict):
            return name  # transformers takes a template string in place of a name
        if isinstance(template, dict):
            name = name or ("tool_use" if tools and "tool_use" in template else "default")
            if name not in template:
                raise ChatTemplateError(f"no chat template named {name!r} (the model has {sorted(template)})")
            template = template[name]
        if not template:
            raise ChatTemplateError("the model has no chat template (chat_template.jinja or tokenizer_config.json)")
        return template

    def __repr__(self):
        return f"Tokenizer(vocabulary {len(self)}, eos {sorted(self.eos_token_ids)})"


def _message(m) -> dict:
    """As transformers prepares a message: keys with None values dropped (templates test for presence), and
    the reasoning under all the names templates read it by."""
    if not isinstance(m, dict):
        raise TypeError(f"chat messages must be dicts, got {type(m).__name__}")
    m = {k: v for k, v in m.items() if v is not None}
    reasoning = next((m[k] for k in REASONING_KEYS if k in m), None)
    if reasoning is not None:
        m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
    return m


def _clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


@lru_cache(maxsize=8)
def _compile(template: str):
    """A template in jinja2's immutable sandbox with the environment chat templates are written for."""
    from jinja2 import TemplateError, nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks: render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class SafeNamespace(Namespace):
        """``namespace()`` without underscore attributes, which could reach Python internals."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            _check_names(dict(*args, **kwargs))
            Namespace.__init__(self, *args, **kwargs)

        def __setitem__(self, name, value):
            _check_names({name: value})
            Namespace.__setitem__(self, name, value)

    def _check_names(attrs):
        bad = [n for n in attrs if isinstance(n, str) and n.startswith("_")]
        if bad:
            raise TemplateError(f"chat templates cannot set underscore attributes ({bad[0]!r}) on a namespace")

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja2's own tojson escapes <, >, & and ' for HTML, which would change the tool schemas the model sees
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=SafeNamespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt), dict=_TemplateDict())
    return env.from_string(template)


class _TemplateDict:
    """``dict(...)`` for templates: builds dicts, exposes no class to climb from."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)

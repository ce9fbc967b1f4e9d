"""Generation: prefill, then one token at a time; streaming text, stop strings, tool calls, I/O stats.

The engine sees token ids only; the tokenizer and chat template enter in ``stream_generate``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from .sample import make_logits_processors, make_sampler, step_keys
from .tool_calls import ToolCallError, ToolCallStreamParser, _partial_tag_len


def generate_step(prompt: mx.array, model, *, max_tokens: int = 256, sampler=None, logits_processors=(),
                  seed: int = 0, prefill_step_size: int = 512, timer=None) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) for up to ``max_tokens`` new tokens after ``prompt`` (1-D token ids).

    In an expert-parallel run (``model.parallel``) every rank runs it together; the others take rank 0's
    prompt and tokens (``flash_moe.distributed.lockstep``)."""
    steps = dict(max_tokens=max_tokens, sampler=sampler or make_sampler(), logits_processors=logits_processors,
                 seed=seed, prefill_step_size=prefill_step_size, timer=timer)
    parallel = getattr(model, "parallel", None)
    if parallel is not None:
        return parallel.lockstep(_steps, prompt, model, **steps)
    return _steps(prompt, model, **steps)


def _steps(prompt, model, *, max_tokens, sampler, logits_processors, seed, prefill_step_size, timer):
    cache = model.make_cache()
    tokens = prompt
    if timer:
        timer.start_prefill()
    # Prefill in chunks: each chunk reads its experts once per layer, not once per token.
    while prompt.size > 1:
        n = min(prefill_step_size, prompt.size - 1)
        model(prompt[:n][None], cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[n:]
    if timer:
        timer.start_decode()
    keys, y = step_keys(seed), prompt
    for _ in range(max_tokens):
        # float32: top-p's cumulative sum and the log-normaliser run over the whole vocabulary (bf16 loses both)
        logits = model(y[None], cache)[0, -1].astype(mx.float32)
        if timer:
            timer.mark_forward(logits)
        for process in logits_processors:
            logits = process(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        y = sampler(logprobs, next(keys)).reshape(1).astype(mx.int32)
        mx.eval(y, logprobs)
        if timer:
            timer.mark_token()
        tokens = mx.concatenate([tokens, y])
        yield y.item(), logprobs


@dataclass
class GenerationResponse:
    """One streamed step, shaped like mlx-lm's, plus parsed output and expert I/O."""

    text: str  # new raw text of this step
    token: int
    logprobs: mx.array
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop" | "length" | None
    content: str = ""  # new visible text (no thinking, no tool-call markup)
    reasoning: str = ""  # new text inside <think>...</think>
    tool_calls: list = field(default_factory=list)  # ToolCall / ToolCallError completed at this step
    io: dict = field(default_factory=dict)  # expert reads of this token: experts, bytes, seconds, hits, misses


class GeneratedText(str):
    """``generate``'s result: the text, with the parsed parts and stats as attributes."""

    content: str
    reasoning: str
    tool_calls: list
    finish_reason: str | None
    response: GenerationResponse | None


class StreamingDetokenizer:
    """Decode incrementally; hold back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.emitted = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[len(self.emitted):], text
        if new.endswith("\n"):  # restart the window so decoding stays cheap on long outputs
            self.tokens, self.emitted = [], ""
        return new

    def flush(self) -> str:
        """At the end: what is still held back (an unfinished character decodes as U+FFFD)."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=False) if self.tokens else ""
        self.tokens, self.emitted, new = [], "", text[len(self.emitted):]
        return new


def prompt_tokens(tokenizer, prompt, *, tools=None, enable_thinking=None, chat=None) -> list[int]:
    """A string is encoded as is (or chat-templated if ``chat``); a list of messages goes through the template."""
    if isinstance(prompt, str) and not chat:
        return tokenizer.encode(prompt, add_special_tokens=False)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [_message(m) for m in prompt]
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True, **kwargs)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _message(m: dict) -> dict:
    """Accept OpenAI-style tool calls (arguments as a JSON string) and our ToolCall objects."""
    m = dict(m)
    calls = []
    for c in m.get("tool_calls") or []:
        if isinstance(c, ToolCallError):  # a malformed call has no name or arguments to render
            continue
        if hasattr(c, "name"):
            c = {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        fn = dict(c.get("function", c))
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                pass
        calls.append({**c, "function": fn})
    if calls:
        m["tool_calls"] = calls
    elif m.get("tool_calls"):
        del m["tool_calls"]
    return m


def eos_token_ids(model, tokenizer) -> set[int]:
    """Tokens that end generation: the tokenizer's and config.json's, and generation_config.json's as
    transformers and mlx-lm use them (Qwen lists <|endoftext|> there beside <|im_end|>)."""
    extra = None
    path = getattr(model, "path", None)
    if path is not None and (Path(path) / "generation_config.json").exists():
        file = Path(path) / "generation_config.json"
        try:
            extra = json.loads(file.read_text()).get("eos_token_id")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{file}: not a JSON object ({e})") from None
    eos = set()
    for t in (getattr(tokenizer, "eos_token_ids", None), tokenizer.eos_token_id, model.config.eos_token_id, extra):
        eos.update(t if isinstance(t, (list, tuple, set)) else [t] if t is not None else [])
    return eos


def stream_generate(model, prompt, *, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                    top_k: int = 0, min_p: float = 0.0, repetition_penalty: float | None = None, stop=None,
                    seed: int = 0, tools=None, enable_thinking=None, chat=None, prefill_step_size: int = 512,
                    timer=None) -> Iterator[GenerationResponse]:
    """Stream a completion of ``prompt`` (text, token ids, or chat messages). See ``LoadedModel.generate``."""
    tok = model.tokenizer
    if isinstance(prompt, mx.array):
        ids = prompt.reshape(-1).tolist()
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        ids = list(prompt)
    else:
        ids = prompt_tokens(tok, prompt, tools=tools, enable_thinking=enable_thinking, chat=chat)
    if not ids:
        raise ValueError("the prompt is empty")
    stop = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
    eos = eos_token_ids(model, tok)
    sampler = make_sampler(temperature, top_p, top_k, min_p)
    processors = make_logits_processors(repetition_penalty)
    parser = ToolCallStreamParser(tools, in_reasoning=_starts_in_thinking(tok, ids))
    detok, store = StreamingDetokenizer(tok), getattr(model, "store", None)
    pending, n, tic = "", 0, time.perf_counter()  # pending: text that may be the start of a stop string
    io_before = store.stats.snapshot() if store else None
    prompt_tps = 0.0
    mx.reset_peak_memory()
    for n, (token, logprobs) in enumerate(generate_step(
            mx.array(ids, mx.int32), model, max_tokens=max_tokens, sampler=sampler, logits_processors=processors,
            seed=seed, prefill_step_size=prefill_step_size, timer=timer), start=1):
        if n == 1:
            prompt_tps, tic = len(ids) / (time.perf_counter() - tic), time.perf_counter()
        io = {}
        if store:
            now = store.stats.snapshot()
            io, io_before = now.delta(io_before).totals(), now
        finish = "stop" if token in eos else "length" if n == max_tokens else None
        pending += "" if token in eos else detok.add(token)
        if finish:
            pending += detok.flush()
        # A stop string may arrive split over several tokens: text that could begin one is held back.
        cut = min((i for s in stop if (i := pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            delta, pending, finish = pending[:cut], "", "stop"
        else:
            keep = _partial_tag_len(pending, stop) if stop and not finish else 0
            delta, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
        events = parser.feed(delta) + (parser.finish() if finish else [])
        yield GenerationResponse(
            text=delta, token=token, logprobs=logprobs, prompt_tokens=len(ids), prompt_tps=prompt_tps,
            generation_tokens=n, generation_tps=n / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish,
            content="".join(e[1] for e in events if e[0] == "text"),
            reasoning="".join(e[1] for e in events if e[0] == "reasoning"),
            tool_calls=[e[1] for e in events if e[0] == "tool_call"], io=io,
        )
        if finish:
            break


def _starts_in_thinking(tokenizer, ids: list[int]) -> bool:
    """A chat template may open ``<think>`` in the prompt itself; the output then starts as reasoning."""
    tail = tokenizer.decode(ids[-8:]) if ids else ""
    return tail.rstrip().endswith("<think>")


def generate(model, prompt, **kwargs) -> GeneratedText:
    """The whole completion as a string; ``.content``, ``.reasoning``, ``.tool_calls``, ``.finish_reason`` attached."""
    text, content, reasoning, calls, last = "", "", "", [], None
    for r in stream_generate(model, prompt, **kwargs):
        text, content, reasoning, last = text + r.text, content + r.content, reasoning + r.reasoning, r
        calls += r.tool_calls
    out = GeneratedText(text)
    out.content, out.reasoning, out.tool_calls = content, reasoning, calls
    out.finish_reason, out.response = (last.finish_reason if last else None), last
    return out

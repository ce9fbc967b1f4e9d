"""Generation: prefill, then one token at a time; streaming text, stop strings, tool calls, I/O stats.

The engine sees token ids only; the tokenizer and chat template enter in ``stream_generate``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from . import family_cache
from .files import CheckpointError
from .model import check_token_ids
from .prompt_cache import make_prompt_cache
from .sample import make_logits_processors, make_sampler, step_keys
from .tool_calls import ToolCallError, ToolCallStreamParser, partial_tag_len


def generate_step(prompt: mx.array, model, *, max_tokens: int = 256, sampler=None, logits_processors=(),
                  seed: int = 0, prefill_step_size: int = 512, timer=None, prompt_cache=None,
                  checkpoint_at=()) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) for up to ``max_tokens`` new tokens after ``prompt`` (1-D token ids).

    prompt_cache: a ``PromptCache`` (``make_prompt_cache``) kept between calls: the leading tokens of
        ``prompt`` it already holds are not processed again, and afterwards it holds the prompt and the
        generated tokens but the last. Without one, a fresh cache (no checkpoints) lives for this call only.
    checkpoint_at: prompt positions (besides the end of the prompt) where the cache snapshots its state,
        so a later prompt that diverges there restarts from it (``stream_generate`` passes the end of the
        chat history before the generation prompt).

    In an expert-parallel run (``model.parallel``) every rank runs it together; the others take rank 0's
    prompt, tokens and prompt-cache decisions (``flash_moe.distributed.lockstep``).
    """
    steps = dict(max_tokens=max_tokens, sampler=sampler or make_sampler(), logits_processors=logits_processors,
                 seed=seed, prefill_step_size=prefill_step_size, timer=timer, prompt_cache=prompt_cache,
                 checkpoint_at=checkpoint_at)
    parallel = getattr(model, "parallel", None)
    if parallel is not None:
        return parallel.lockstep(_steps, prompt, model, **steps)
    return _steps(prompt, model, **steps)


def _steps(prompt, model, *, max_tokens, sampler, logits_processors, seed, prefill_step_size, timer, prompt_cache,
           checkpoint_at):
    keys = step_keys(seed)  # checks the seed before any work
    ids = prompt.tolist()
    check_token_ids(ids, model.config.vocab_size)  # once: sampled ids are in range by construction
    forward = getattr(model, "forward", model)  # the model call without its per-call id check
    # Without a cache to keep, no checkpoints: they would hold a copy of the GDN state for nothing.
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model, max_checkpoints=0)
    tokens = prompt
    pos = cache.prepare(ids)
    if timer:
        timer.start_prefill()
    # Prefill in chunks: each chunk reads its experts once per layer, not once per token. The last prompt
    # token is left for the first decode step (its logits); the cache checkpoints just before it.
    for stop in sorted({p for p in checkpoint_at if pos < p < len(ids) - 1} | {len(ids) - 1}):
        while pos < stop:
            n = min(prefill_step_size, stop - pos)
            forward(prompt[pos : pos + n][None], cache.layers)
            cache.extend(ids[pos : pos + n])
            mx.eval([c.state for c in cache.layers])
            pos += n
        cache.checkpoint()
    if timer:
        timer.start_decode()

    def step(y, tokens):
        """The lazy graph of the token after ``y``: (token, logprobs, log-normaliser)."""
        # float32: top-p's cumulative sum and the log-normaliser run over the whole vocabulary (bf16 loses both)
        logits = forward(y[None], cache.layers)[0, -1].astype(mx.float32)
        if timer:
            timer.mark_forward(logits)
        for process in logits_processors:
            logits = process(tokens, logits[None])[0]  # [1, V] as mlx-lm's processors index it
        norm = mx.logsumexp(logits, keepdims=True)
        logprobs = logits - norm
        return sampler(logprobs, next(keys)).reshape(1).astype(mx.int32), logprobs, norm

    # Ahead: token t+1's graph is built (and queued, mx.async_eval) before token t is read, so the host's graph
    # building overlaps the device's work (mlx-lm's generate_step does the same). Only where a decode forward
    # never syncs (see decodes_ahead); a consumer that stops early closes this generator, which forgets the
    # token built ahead (the layer caches go back to their snapshot), so the prompt cache ends as without it.
    ahead = decodes_ahead(model, cache, timer)
    nxt = step(prompt[-1:], tokens) if max_tokens else None
    cache.extend(ids[-1:])
    for n in range(max_tokens):
        y, logprobs, norm = nxt
        mx.async_eval(y, logprobs, norm)
        tokens = mx.concatenate([tokens, y])
        saved, length = None, len(cache.tokens)
        if ahead and n + 1 < max_tokens:
            saved = [layer_snapshot(c) for c in cache.layers]
            nxt = step(y, tokens)
            mx.async_eval(nxt)
        try:
            if not math.isfinite(norm.item()):  # a NaN or +inf logit makes the normaliser non-finite
                raise CheckpointError(
                    f"token {n + 1}: the model's logits are not finite ({norm.item()}): damaged weights? Run "
                    f"`flash-moe verify {getattr(model, 'path', 'MODEL')}`, or load with verify='full'")
            if timer:
                timer.mark_token()
            token = y.item()
            if saved is not None:
                cache.extend((token,))
            yield token, logprobs
        except BaseException:  # GeneratorExit included: forget the token built ahead
            if saved is not None:
                for c, s in zip(cache.layers, saved):
                    layer_restore(c, s)
                del cache.tokens[length:]
            raise
        if saved is None and n + 1 < max_tokens:
            nxt = step(y, tokens)
            cache.extend((token,))


def decodes_ahead(model, cache, timer) -> bool:
    """Whether ``generate_step`` builds the next token before reading this one: only when a decode forward
    never syncs the host (no streamed experts, or a device tier holding them all so that its speculative tokens
    cannot be voided: a streamed layer reads its routing back, which would wait for the token anyway and read
    the next token's experts before this one is seen), no phase timer (it syncs by design), every layer cache
    can roll back, and FLASH_MOE_ASYNC_DECODE is not 0."""
    if os.environ.get("FLASH_MOE_ASYNC_DECODE", "1") == "0" or timer is not None:
        return False
    if getattr(model, "parallel", None) is not None:
        return False
    tier = getattr(model, "device_cache", None)
    certain = tier is not None and tier.speculate and tier.speculation.certain()  # speculation.py
    if getattr(model, "store", None) is not None and not certain:
        return False
    return all(own_rewind(c) or family_cache.rewindable(c) for c in cache.layers)


# A layer cache rolls back by its own snapshot/restore (flash_moe's caches) or, for the caches of the families
# mlx-lm runs, by family_cache.py's (without it such a model would decode read-first, its graph building never
# overlapped with the device's work).
def own_rewind(c) -> bool:
    return hasattr(c, "snapshot") and hasattr(c, "restore")


def layer_snapshot(c):
    return c.snapshot() if own_rewind(c) else family_cache.snapshot(c)


def layer_restore(c, saved) -> None:
    if own_rewind(c):
        c.restore(saved)
    else:
        family_cache.restore(c, saved)


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
    cached_tokens: int = 0  # prompt tokens reused from prompt_cache, not processed (OpenAI's cached_tokens)
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


class TextStream:
    """Generated token ids -> text deltas: incremental detokenizing, the end at eos or ``max_tokens``, and
    stop strings cut off (text that may be the start of one is held back until the next token decides)."""

    def __init__(self, tokenizer, eos: set, stop: list[str], max_tokens: int):
        self.detok, self.eos, self.stop, self.max_tokens = StreamingDetokenizer(tokenizer), eos, stop, max_tokens
        self.pending, self.n = "", 0

    def add(self, token: int) -> tuple[str, str | None]:
        """(new text, finish reason: "stop" | "length" | None)."""
        self.n += 1
        finish = "stop" if token in self.eos else "length" if self.n >= self.max_tokens else None
        self.pending += "" if token in self.eos else self.detok.add(token)
        if finish:
            self.pending += self.detok.flush()
        # A stop string may arrive split over several tokens: text that could begin one is held back.
        cut = min((i for s in self.stop if (i := self.pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            delta, self.pending = self.pending[:cut], ""
            return delta, "stop"
        keep = partial_tag_len(self.pending, self.stop) if self.stop and not finish else 0
        delta, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return delta, finish


def prompt_tokens(tokenizer, prompt, *, tools=None, enable_thinking=None, chat=None,
                  add_generation_prompt: bool = True) -> list[int]:
    """A string is encoded as is (or chat-templated if ``chat``); a list of messages goes through the template."""
    # A transformers tokenizer warns that a text longer than its model_max_length "will result in indexing
    # errors", which is not so here; stream_generate says what holds instead (check_context_length).
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    if isinstance(prompt, str) and not chat:
        return tokenizer.encode(prompt, add_special_tokens=False)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [_message(m) for m in prompt]
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                        tokenize=True, **kwargs)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def open_prompt_tokens(tokenizer, text: str, chat: bool) -> list[int]:
    """The tokens every prompt that continues ``text`` starts with: the text itself, or with ``chat`` the
    chat template's user turn cut where the text ends (left open, so a later prompt continues the message;
    ``flash-moe cache-prompt``)."""
    if not chat:
        return tokenizer.encode(text, add_special_tokens=False)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=False,
                                             tokenize=False)
    end = rendered.rfind(text.strip())
    if not text.strip() or end < 0:
        raise ValueError("the chat template does not show the prompt text as it is; use --raw")
    return tokenizer.encode(rendered[: end + len(text.strip())], add_special_tokens=False)


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


class ContextLengthWarning(UserWarning):
    """A prompt longer than the model's ``max_position_embeddings``."""


def check_context_length(model, n: int, strict: bool = False) -> None:
    """Warn (or with ``strict`` raise) when ``n`` prompt tokens exceed the context the model was trained for."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit or n <= limit:
        return
    message = (f"the prompt has {n} tokens, more than the {limit} this model was trained for "
               "(max_position_embeddings in config.json); output past that is unreliable")
    if strict:
        raise ValueError(message)
    warnings.warn(message, ContextLengthWarning, stacklevel=3)


def _call_form(model, args: tuple, prompt, tokenizer, name: str):
    """``(prompt)``, or mlx-lm's ``(tokenizer, prompt)``; either may come by keyword. Returns (tokenizer, prompt)."""
    if len(args) > 2 or (len(args) == 2 and (prompt is not None or tokenizer is not None)):
        raise TypeError(f"{name}() takes (model, prompt) or (model, tokenizer, prompt)")
    if len(args) == 2:
        tokenizer, prompt = args
    elif len(args) == 1 and prompt is None:
        prompt = args[0]
    elif len(args) == 1:
        if tokenizer is not None:
            raise TypeError(f"{name}() got the tokenizer twice")
        tokenizer = args[0]
    if prompt is None:
        raise TypeError(f"{name}() needs a prompt")
    tokenizer = model.tokenizer if tokenizer is None else tokenizer
    if not all(callable(getattr(tokenizer, m, None)) for m in ("encode", "decode")):
        raise TypeError(f"{name}(model, tokenizer, prompt): expected a tokenizer (model.tokenizer or one with "
                        f"transformers' encode/decode/apply_chat_template), got {type(tokenizer).__name__}")
    return tokenizer, prompt


def _with_key(sampler):
    """Our samplers take ``(logprobs, key)``; mlx-lm's take ``(logprobs)`` and draw from MLX's global state."""
    try:
        inspect.signature(sampler).bind(None, None)
    except TypeError:
        return lambda logprobs, key: sampler(logprobs)
    except ValueError:  # no signature to read: assume ours
        pass
    return sampler


def stream_generate(model, *args, prompt=None, tokenizer=None, max_tokens: int = 256, sampler=None,
                    logits_processors=None, temperature: float | None = None, top_p: float | None = None,
                    top_k: int | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
                    stop=None, seed: int = 0, tools=None, enable_thinking=None, chat=None,
                    prefill_step_size: int = 512, strict_context: bool = False, timer=None,
                    temp: float | None = None, prompt_cache=None,
                    parse_tools: bool = True) -> Iterator[GenerationResponse]:
    """Stream a completion: ``stream_generate(model, prompt, ...)`` or mlx-lm's
    ``stream_generate(model, tokenizer, prompt, ...)``. Arguments as ``generate``.

    ``prompt_cache``: a ``PromptCache`` reused across calls (see ``generate_step``); each response's
    ``cached_tokens`` says how many prompt tokens it supplied. ``parse_tools=False``: tool-call markup
    stays text (nothing is parsed into calls)."""
    tok, prompt = _call_form(model, args, prompt, tokenizer, "stream_generate")
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
    if temp is not None:
        if temperature is not None:
            raise TypeError("stream_generate() got both temp and temperature (they are the same)")
        temperature = temp
    filters = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    if sampler is not None and any(v is not None for v in filters.values()):
        raise ValueError("pass either sampler= or temperature/top_p/top_k/min_p, not both")
    note = ""
    if isinstance(prompt, mx.array):
        ids = prompt.reshape(-1).tolist()
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        ids = list(prompt)
    else:
        ids = prompt_tokens(tok, prompt, tools=tools, enable_thinking=enable_thinking, chat=chat)
        note = "; it came from the tokenizer, whose added tokens reach past the model's vocabulary"
    if not ids:
        raise ValueError("the prompt is empty")
    check_token_ids(ids, model.config.vocab_size, note=note)
    check_context_length(model, len(ids), strict_context)
    cached, marks = 0, ()
    if prompt_cache is not None:
        cached = prompt_cache.reusable(ids)
        marks = history_end(tok, prompt, ids, tools=tools, enable_thinking=enable_thinking, chat=chat)
    stop = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
    eos = eos_token_ids(model, tok)
    if sampler is None:
        sampler = make_sampler(**{k: v for k, v in filters.items() if v is not None})
    sampler = _with_key(sampler)
    processors = list(logits_processors or []) + make_logits_processors(repetition_penalty)
    parser = ToolCallStreamParser(tools, in_reasoning=_starts_in_thinking(tok, ids), parse_tools=parse_tools)
    text, store = TextStream(tok, eos, stop, max_tokens), getattr(model, "store", None)
    n, tic = 0, time.perf_counter()
    io_before = store.stats.snapshot() if store else None
    prompt_tps = 0.0
    mx.reset_peak_memory()
    # A caller that stops early drops ``steps`` (CPython closes it at once), which forgets a token built ahead.
    steps = generate_step(
        mx.array(ids, mx.int32), model, max_tokens=max_tokens, sampler=sampler, logits_processors=processors,
        seed=seed, prefill_step_size=prefill_step_size, timer=timer, prompt_cache=prompt_cache, checkpoint_at=marks)
    for n, (token, logprobs) in enumerate(steps, start=1):
        if n == 1:
            prompt_tps, tic = (len(ids) - cached) / (time.perf_counter() - tic), time.perf_counter()
        io = {}
        if store:
            now = store.stats.snapshot()
            io, io_before = now.delta(io_before).totals(), now
        delta, finish = text.add(token)
        if finish:  # before the caller sees the end, so the prompt cache is final then
            steps.close()
        events = parser.feed(delta) + (parser.finish() if finish else [])
        yield GenerationResponse(
            text=delta, token=token, logprobs=logprobs, prompt_tokens=len(ids), prompt_tps=prompt_tps,
            generation_tokens=n, generation_tps=n / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9, cached_tokens=cached, finish_reason=finish,
            content="".join(e[1] for e in events if e[0] == "text"),
            reasoning="".join(e[1] for e in events if e[0] == "reasoning"),
            tool_calls=[e[1] for e in events if e[0] == "tool_call"], io=io,
        )
        if finish:
            break


def history_end(tokenizer, prompt, ids: list[int], **template) -> tuple[int, ...]:
    """Where a templated prompt's history ends and its generation prompt begins: the next turn's template
    may render the reply differently from what was generated (Qwen drops the thinking and the empty
    ``<think></think>``), so a prompt cache checkpoint there is where the next turn picks up."""
    if isinstance(prompt, (mx.array, str)) and not (isinstance(prompt, str) and template.get("chat")):
        return ()
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return ()
    history = prompt_tokens(tokenizer, prompt, add_generation_prompt=False, **template)
    return (len(history),) if ids[: len(history)] == history else ()


def _starts_in_thinking(tokenizer, ids: list[int]) -> bool:
    """A chat template may open ``<think>`` in the prompt itself; the output then starts as reasoning."""
    tail = tokenizer.decode(ids[-8:]) if ids else ""
    return tail.rstrip().endswith("<think>")


def format_stats(r: GenerationResponse) -> str:
    """One line of prompt and generation speed and peak memory, as the CLI and ``verbose`` print it."""
    return (f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | generation: {r.generation_tokens} "
            f"tokens, {r.generation_tps:.2f} tok/s | peak memory {r.peak_memory:.2f} GB")


def generate(model, *args, verbose: bool = False, **kwargs) -> GeneratedText:
    """Complete a prompt and return the text: ``generate(model, prompt, ...)``, or as mlx-lm is called,
    ``generate(model, tokenizer, prompt, ...)``.

    Args:
        model: what ``flash_moe.load`` returns.
        tokenizer: optional; ``model.tokenizer`` when left out. One passed is used for encoding, the chat template
            and decoding: it must be the model's (mlx-lm's or transformers' tokenizer of the same folder works).
        prompt: a string (encoded as is; ``chat=True`` wraps it as a user message), token ids, or a list of chat
            messages (``{"role", "content"}``, tool results as ``{"role": "tool", ...}``), which go through the
            model's chat template.
        max_tokens: most new tokens.
        sampler: ``(logprobs, key) -> token`` (``flash_moe.make_sampler``; an mlx-lm sampler of one argument works
            too, drawing from MLX's global random state). Or, instead of a sampler: ``temperature`` (alias
            ``temp``; 0 = greedy, the default), ``top_p``, ``top_k``, ``min_p``.
        logits_processors: ``(tokens, logits[1, V]) -> logits`` functions, applied in order (mlx-lm's work);
            ``repetition_penalty`` (> 1 discourages repeats) adds one.
        stop: string(s) that end generation (not included). seed: sampling seed (same seed, same text).
        tools: OpenAI-style tool schemas, offered to the model and used to type the parsed calls' arguments.
        enable_thinking: passed to the chat template.
        strict_context: a prompt longer than the model's ``max_position_embeddings`` raises ValueError instead
            of warning (``ContextLengthWarning``).
        verbose: print the text as it is generated, then the speed and memory line.
    Returns:
        the text (a ``str``) with ``.content``, ``.reasoning``, ``.tool_calls``, ``.finish_reason`` and
        ``.response`` (the last ``GenerationResponse``, with the token counts and speeds).
    """
    text, content, reasoning, calls, last = "", "", "", [], None
    for r in stream_generate(model, *args, **kwargs):
        text, content, reasoning, last = text + r.text, content + r.content, reasoning + r.reasoning, r
        calls += r.tool_calls
        if verbose:
            print(r.text, end="", flush=True)
    if verbose:
        print()
        if last:
            print(format_stats(last))
    out = GeneratedText(text)
    out.content, out.reasoning, out.tool_calls = content, reasoning, calls
    out.finish_reason, out.response = (last.finish_reason if last else None), last
    return out

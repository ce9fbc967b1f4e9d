"""The HTTP side: FastAPI routes, authentication, errors, SSE. Never touches MLX: jobs go to the Worker.

Tokenizing (the chat template) runs in Starlette's thread pool so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from . import anthropic as anth
from . import openai as oai
from .schemas import ChatRequest, CompletionRequest, MessagesRequest
from .turn import BadRequest, Output, Turn, check_ids, check_length, prepare, tool_mode
from .worker import Channel, Done, GenerationError, Job, Metrics, QueueFull, Worker


MAX_BODY = 64 << 20  # a request body larger than this is refused (413) before it is read


@dataclass
class State:
    model: object  # the LoadedModel: only its tokenizer and config are used here
    worker: Worker
    metrics: Metrics
    model_id: str
    context: int
    eos: set
    api_key: str | None = None
    default_max_tokens: int = 4096
    started: float = 0.0

    @property
    def tokenizer(self):
        return self.model.tokenizer


def _error(request: Request, status: int, message: str, param: str | None = None, kind="invalid_request_error",
           headers=None) -> JSONResponse:
    if request.url.path.startswith("/v1/messages"):
        kinds = {401: "authentication_error", 429: "rate_limit_error", 500: "api_error"}
        body = {"type": "error", "error": {"type": kinds.get(status, kind), "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(state: State) -> FastAPI:
    """The ASGI app around a running (or to-be-started) ``state.worker``."""

    async def lifespan(app):
        if not state.worker.is_alive():
            state.worker.start()
        yield
        state.worker.stop()

    app = FastAPI(title="flash-moe", lifespan=lifespan)
    metrics = state.metrics

    @app.middleware("http")
    async def auth(request: Request, call_next):
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > MAX_BODY:
            metrics.add("flash_moe_requests_rejected_total", reason="bad_request")
            return _error(request, 413, f"body: {int(size)} bytes, at most {MAX_BODY} accepted", "body")
        if state.api_key and request.url.path != "/health":
            bearer = request.headers.get("authorization", "")
            given = bearer[7:] if bearer.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), state.api_key.encode()):
                metrics.add("flash_moe_requests_rejected_total", reason="unauthorized")
                return _error(request, 401, "invalid or missing API key (Authorization: Bearer KEY or x-api-key)",
                              kind="authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        metrics.add("flash_moe_requests_rejected_total", reason="bad_request")
        return _error(request, 400, f"{param or 'body'}: {err.get('msg', 'invalid request')}", param)

    @app.exception_handler(BadRequest)
    async def bad(request: Request, exc: BadRequest):
        metrics.add("flash_moe_requests_rejected_total", reason="bad_request")
        return _error(request, 400, str(exc), exc.param)

    @app.exception_handler(GenerationError)
    async def failed(request: Request, exc: GenerationError):
        return _error(request, 500, f"generation failed: {exc}", kind="server_error")

    @app.exception_handler(QueueFull)
    async def full(request: Request, exc: QueueFull):
        metrics.add("flash_moe_requests_rejected_total", reason="queue_full")
        return _error(request, 429, f"the server is busy ({exc}); retry later", kind="rate_limit_error",
                      headers={"Retry-After": "1"})

    @app.get("/health")
    async def health():
        return {"status": "ok" if state.worker.is_alive() else "starting", "model": state.model_id}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": int(state.started),
                                            "owned_by": "flash-moe", "context_length": state.context}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(render_metrics(state), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        metrics.add("flash_moe_requests_total", endpoint="chat")
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        kwargs = body.chat_template_kwargs or {}
        thinking = body.enable_thinking if body.enable_thinking is not None else kwargs.get("enable_thinking")
        messages = oai.to_messages(body.messages)
        want_json = body.response_format is not None and body.response_format.type == "json_object"
        if want_json and not any("json" in m["content"].lower() for m in messages):
            raise BadRequest("messages: response_format json_object needs the word 'json' in the messages "
                             "(the model must be told to answer in JSON)", "response_format")
        turn = await run_in_threadpool(
            prepare, state.tokenizer, messages, tools=tools, mode=tool_mode(body.tool_choice),
            enable_thinking=thinking, max_tokens=body.max_completion_tokens or body.max_tokens,
            default_max_tokens=state.default_max_tokens, context=state.context, sampling=_sampling(body),
            stop=body.stop, top_logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        fmt = oai.ChatFormatter(state.model_id, state.tokenizer, body.logprobs)
        run = _run(state, turn)
        if not body.stream:
            steps, updates = await _collect(run, request)
            warnings = oai.json_object_warning("".join(u.content for u in updates)) if want_json else []
            return fmt.completion(steps, updates, _usage(steps, turn), warnings)
        first = await run.__anext__()  # errors before the first token are still HTTP errors

        async def events():
            yield {"data": json.dumps(fmt.first_chunk())}
            steps = []
            async for step, up in _chain(first, run):
                steps.append(step)
                for chunk in fmt.chunks(step, up):
                    yield {"data": json.dumps(chunk)}
            if body.stream_options and body.stream_options.include_usage:
                yield {"data": json.dumps(fmt.usage_chunk(_usage(steps, turn)))}
            yield {"data": "[DONE]"}

        return EventSourceResponse(_sse(events()), ping=15)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        metrics.add("flash_moe_requests_total", endpoint="completions")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise BadRequest("prompt: one prompt per request (got a list of several)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = await run_in_threadpool(state.tokenizer.encode, prompt, add_special_tokens=False)
        else:
            ids = list(prompt)
            check_ids(ids, state.model.config.vocab_size, "prompt")
        if not ids:
            raise BadRequest("prompt: empty", "prompt")
        stop = [body.stop] if isinstance(body.stop, str) else [s for s in body.stop or [] if s]
        turn = Turn(ids=list(ids), max_tokens=check_length(ids, body.max_tokens, 16, state.context),
                    sampling=_sampling(body), stop=stop, top_logprobs=body.logprobs, parse_calls=False)
        fmt = oai.CompletionFormatter(state.model_id, state.tokenizer, body.logprobs)
        run = _run(state, turn, parse=False)
        if not body.stream:
            steps, _ = await _collect(run, request)
            return fmt.completion(steps, _usage(steps, turn))
        first = await run.__anext__()

        async def events():
            steps = []
            async for step, _ in _chain(first, run):
                steps.append(step)
                yield {"data": json.dumps(fmt.chunk(step))}
            if body.stream_options and body.stream_options.include_usage:
                yield {"data": json.dumps({"id": fmt.id, "object": "text_completion", "created": fmt.created,
                                           "model": fmt.model, "choices": [], "usage": _usage(steps, turn)})}
            yield {"data": "[DONE]"}

        return EventSourceResponse(_sse(events()), ping=15)

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request):
        metrics.add("flash_moe_requests_total", endpoint="messages")
        tools, mode = anth.to_tools(body)
        thinking = None if body.thinking is None else body.thinking.get("type") == "enabled"
        sampling = {"temperature": body.temperature or 0.0, "top_p": body.top_p or 1.0, "top_k": body.top_k or 0}
        turn = await run_in_threadpool(
            prepare, state.tokenizer, anth.to_messages(body), tools=tools, mode=mode, enable_thinking=thinking,
            max_tokens=body.max_tokens, default_max_tokens=state.default_max_tokens, context=state.context,
            sampling=sampling, stop=body.stop_sequences)
        fmt = anth.MessageFormatter(state.model_id)
        run = _run(state, turn)
        if not body.stream:
            steps, updates = await _collect(run, request)
            finish = updates[-1].finish_reason if updates else "stop"
            return fmt.message(updates, finish, _stop_sequence(state, turn, steps), _anth_usage(steps, turn))
        first = await run.__anext__()

        async def events():
            steps = []
            for name, data in fmt.start(anth.usage(len(turn.ids), 0, first[0].cached_tokens)):
                yield ServerSentEvent(data=json.dumps(data), event=name)
            finish = None
            async for step, up in _chain(first, run):
                steps.append(step)
                finish = up.finish_reason or finish
                for name, data in fmt.events(up):
                    yield ServerSentEvent(data=json.dumps(data), event=name)
            for name, data in fmt.end(finish, _stop_sequence(state, turn, steps), len(steps)):
                yield ServerSentEvent(data=json.dumps(data), event=name)

        return EventSourceResponse(_sse(events(), anthropic=True), ping=15)

    return app


def _sampling(body) -> dict:
    out = {"temperature": body.temperature or 0.0, "top_p": body.top_p or 1.0, "top_k": body.top_k or 0,
           "min_p": body.min_p or 0.0, "repetition_penalty": body.repetition_penalty}
    if body.seed is not None:
        out["seed"] = body.seed
    return out


async def _run(state: State, turn: Turn, parse: bool = True):
    """Submit ``turn`` and yield (Step, Update) as the worker produces them; leaving early cancels the job."""
    channel = Channel(asyncio.get_running_loop())
    state.worker.submit(Job(ids=turn.ids, channel=channel, max_tokens=turn.max_tokens, sampling=turn.sampling,
                            stop=turn.stop, top_logprobs=turn.top_logprobs, checkpoint_at=turn.checkpoint_at))
    output = Output(turn) if parse else None
    try:
        while True:
            item = await channel.get()
            if isinstance(item, Done):
                if item.error is not None:
                    raise item.error
                return
            yield item, output.feed(item.text, item.finish_reason) if output else None
    finally:
        channel.cancel()  # the client left (or we are done): the worker drops the job at its next step


async def _chain(first, rest):
    yield first
    async for x in rest:
        yield x


async def _sse(events, anthropic: bool = False):
    """SSE events, ending in an error event (OpenAI's or Anthropic's shape) if generation fails midway."""
    try:
        async for event in events:
            yield event
    except GenerationError as e:  # the status line is long gone: the error goes into the stream
        message = f"generation failed: {e}"
        if anthropic:
            yield ServerSentEvent(data=json.dumps({"type": "error", "error": {"type": "api_error", "message": message}}),
                                  event="error")
        else:
            yield {"data": json.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                                 "code": None}})}


async def _collect(run, request: Request):
    """All steps of a non-streamed answer; a client that disconnects meanwhile cancels its job."""
    task = asyncio.current_task()

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)
        task.cancel()

    watcher = asyncio.create_task(watch())
    steps, updates = [], []
    try:
        async for step, up in run:
            steps.append(step)
            updates.append(up)
    finally:
        watcher.cancel()
        await run.aclose()
    return steps, updates


def _usage(steps: list, turn: Turn) -> dict:
    cached = steps[0].cached_tokens if steps else 0
    return oai.usage(len(turn.ids), len(steps), cached)


def _anth_usage(steps: list, turn: Turn) -> dict:
    return anth.usage(len(turn.ids), len(steps), steps[0].cached_tokens if steps else 0)


def _stop_sequence(state: State, turn: Turn, steps: list) -> str | None:
    """Which stop string ended the answer (the worker cut it): the earliest one in the decoded tokens."""
    if not steps or steps[-1].finish_reason != "stop" or steps[-1].token in state.eos or not turn.stop:
        return None
    text = state.tokenizer.decode([s.token for s in steps])
    found = [(i, s) for s in turn.stop if (i := text.find(s)) >= 0]
    return min(found)[1] if found else None


def render_metrics(state: State) -> str:
    """Prometheus text format."""
    m = state.metrics
    lines = []

    def metric(name: str, kind: str, help_: str, samples):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for key, value in samples:
            lines.append(f"{key} {value:g}")

    with m.lock:
        counters, gauges = dict(m.counters), dict(m.gauges)

    def family(name):
        return [(k, v) for k, v in counters.items() if k == name or k.startswith(name + "{")] or [(name, 0)]

    for name, help_ in (
        ("flash_moe_requests_total", "requests received, by endpoint"),
        ("flash_moe_requests_rejected_total", "requests refused, by reason (bad_request, unauthorized, queue_full)"),
        ("flash_moe_requests_cancelled_total", "sequences stopped because their client went away"),
        ("flash_moe_engine_failures_total", "decode steps that failed (their sequences got an error)"),
        ("flash_moe_prompt_tokens_total", "prompt tokens of admitted requests"),
        ("flash_moe_generated_tokens_total", "tokens generated"),
        ("flash_moe_decode_steps_total", "batched decode steps (generated tokens / steps = mean batch size)"),
        ("flash_moe_expert_bytes_read_total", "bytes of routed experts read from the expert files"),
        ("flash_moe_expert_experts_total", "experts read from the expert files"),
        ("flash_moe_expert_hits_total", "expert reads found in the page cache"),
        ("flash_moe_expert_misses_total", "expert reads that went to the disk"),
        ("flash_moe_prompt_cache_hits_total", "requests that reused a cached prompt prefix"),
        ("flash_moe_prompt_cache_tokens_total", "prompt tokens reused from the prompt cache"),
    ):
        metric(name, "counter", help_, family(name))
    hits, misses = counters.get("flash_moe_expert_hits_total", 0), counters.get("flash_moe_expert_misses_total", 0)
    cache = getattr(state.model, "cache", None)
    device = cache.totals()["hit_rate"] if cache is not None else float("nan")
    admitted = counters.get('flash_moe_requests_total{endpoint="chat"}', 0) + \
        counters.get('flash_moe_requests_total{endpoint="messages"}', 0) + \
        counters.get('flash_moe_requests_total{endpoint="completions"}', 0)
    for name, help_, value in (
        ("flash_moe_queue_depth", "requests waiting for a slot", gauges.get("flash_moe_queue_depth", 0)),
        ("flash_moe_active_sequences", "sequences being generated", gauges.get("flash_moe_active_sequences", 0)),
        ("flash_moe_decode_batch_size", "sequences in the last decode step", gauges.get("flash_moe_decode_batch_size", 0)),
        ("flash_moe_generation_tokens_per_second", "tokens generated per second over the last 10 s",
         m.tokens_per_second()),
        ("flash_moe_page_cache_hit_rate", "share of expert reads found in the page cache",
         hits / (hits + misses) if hits + misses else float("nan")),
        ("flash_moe_device_cache_hit_rate", "share of expert lookups found in the GPU expert cache", device),
        ("flash_moe_prompt_cache_hit_rate", "share of requests that reused a cached prompt prefix",
         counters.get("flash_moe_prompt_cache_hits_total", 0) / admitted if admitted else float("nan")),
        ("flash_moe_prompt_cache_bytes", "bytes held by the prompt cache", gauges.get("flash_moe_prompt_cache_bytes", 0)),
    ):
        metric(name, "gauge", help_, [(name, value)])
    return "\n".join(lines) + "\n"

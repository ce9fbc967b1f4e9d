"""``flash-moe serve``: an OpenAI- and Anthropic-compatible HTTP server (needs the ``server`` extra).

``make_state`` loads nothing by itself: give it a loaded model. ``serve`` loads, checks the binding and runs
uvicorn until interrupted.
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

from ..files import parse_bytes, read_json
from .worker import Metrics, Worker

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def context_length(model) -> int:
    """The model's context from config.json (``max_position_embeddings``, top level or text_config)."""
    config = getattr(model, "raw_config", None)
    if config is None and getattr(model, "path", None) is not None:
        config = read_json(Path(model.path) / "config.json")
    config = config or {}
    for c in (config, config.get("text_config") or {}):
        if isinstance(c.get("max_position_embeddings"), int):
            return c["max_position_embeddings"]
    return 32768


def make_state(model, *, max_batch: int = 8, max_queue: int | None = None, api_key: str | None = None,
               prompt_cache_bytes: int | str = 8 << 30, model_id: str | None = None, default_max_tokens: int = 4096,
               engine=None):
    """The server's state around a loaded model (the worker is started by the app's lifespan); ``engine``
    replaces the worker's continuous-batching engine (tests script it)."""
    from ..generation import eos_token_ids
    from .app import State

    metrics = Metrics()
    worker = Worker(model, max_batch=max_batch, max_queue=max_queue if max_queue is not None else 4 * max_batch,
                    metrics=metrics, prompt_cache_bytes=parse_bytes(prompt_cache_bytes), engine=engine)
    return State(model=model, worker=worker, metrics=metrics,
                 model_id=model_id or Path(str(getattr(model, "path", "model"))).name,
                 context=context_length(model), eos=eos_token_ids(model, model.tokenizer), api_key=api_key,
                 default_max_tokens=default_max_tokens, started=time.time())


def check_binding(host: str, api_key: str | None) -> None:
    """Anything but loopback needs --api-key: the server runs a model anyone on the network could use."""
    if host in LOOPBACK:
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    if not api_key:
        raise ValueError(f"--host {host}: binding beyond this machine needs --api-key KEY")


def serve(model, *, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 8, max_queue: int | None = None,
          prompt_cache_bytes: int | str = 8 << 30, api_key: str | None = None, experts_per_token: int | None = None,
          default_max_tokens: int = 4096, log_level: str = "info", load_options: dict | None = None) -> None:
    """Serve ``model`` (a loaded model or a path) on http://host:port until interrupted. Under ``mlx.launch``
    (an expert-parallel model) only rank 0 serves; the other ranks follow its batch steps (mirror.py)."""
    import uvicorn

    from ..distributed import following
    from .app import create_app
    from .mirror import follow_batches

    check_binding(host, api_key)
    if isinstance(model, (str, Path)):
        from ..load import load

        model = load(model, experts_per_token=experts_per_token, **(load_options or {}))
    elif experts_per_token:
        model.set_experts_per_token(experts_per_token)
    if following(model):  # an expert-parallel rank other than 0: rank 0 serves HTTP, this rank mirrors its steps
        follow_batches(model, parse_bytes(prompt_cache_bytes))
        return
    state = make_state(model, max_batch=max_batch, max_queue=max_queue, api_key=api_key,
                       prompt_cache_bytes=prompt_cache_bytes, default_max_tokens=default_max_tokens)
    model.tokenizer  # load it now, not on the first request
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level))
    state.worker.on_fatal = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on (uvicorn.run swallows it too)
        pass
    finally:
        state.worker.stop()  # already stopped by the app; in a split run, it also ends the followers
    lead = state.worker.lead
    if lead is not None and lead.error is not None:
        raise lead.error

"""``flash-moe``: convert, verify, generate, chat, serve, demo. Each subcommand maps its flags onto a function."""

from __future__ import annotations

import argparse
import os
import sys


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens (default 256)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--k", type=int, default=None, help="experts per token (default: the model's num_experts_per_tok)")


def _add_loading(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-experts", default="auto",
                   help="experts kept in GPU memory (discrete GPUs): a count, a fraction of all experts, 'all', "
                        "or 'auto' (default: what fits on CUDA, none on Apple/CPU); 0 turns it off")
    p.add_argument("--direct-io", default="auto", choices=("auto", "on", "off"),
                   help="read experts around the page cache with O_DIRECT (default auto: when a GPU cache is in front)")
    p.add_argument("--preload", action="store_true",
                   help="fill the GPU expert cache before generating (progress bar; nothing to do without one)")


def _loading(args) -> dict:
    direct = {"auto": "auto", "on": True, "off": False}[args.direct_io]
    return dict(experts_per_token=args.k, cache_experts=args.cache_experts, direct_io=direct, preload=args.preload)


def _sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed)


def cmd_convert(args) -> None:
    from .convert import convert

    dst = convert(args.src, args.dst, bits=args.bits, group_size=args.group_size, dtype=args.dtype,
                  resident_bits=args.resident_bits, revision=args.revision, overwrite=args.overwrite)
    print(f"converted {args.src} -> {dst}")


def cmd_verify(args) -> None:
    from .store import verify

    bad = verify(args.model)
    if bad:
        for layer, expert, want, got in bad:
            print(f"layer {layer} expert {expert}: checksum {got} != {want} recorded in layout.json")
        raise SystemExit(f"flash-moe verify: {len(bad)} expert(s) damaged in {args.model}")
    print(f"{args.model}: every expert matches its checksum")


def cmd_generate(args) -> None:
    from . import load
    from .timing import PhaseTimer

    model = load(args.model, **_loading(args))
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    chat = None if args.raw else (model.tokenizer.chat_template is not None)
    cache = None
    if args.prompt_cache:
        prompt, chat, cache = _use_prompt_cache(args, model, prompt, chat)
    timer = PhaseTimer(model).install() if args.timing else None
    last, calls = None, []
    for r in model.stream_generate(prompt, chat=chat, timer=timer, prompt_cache=cache, **_sampling(args)):
        print(r.text, end="", flush=True)
        last, calls = r, calls + r.tool_calls  # each call comes with the step that completes it
    print()
    for call in calls:
        print(f"[tool call] {call}")
    if last:
        cached = f" ({last.cached_tokens} cached)" if cache is not None else ""
        print(f"prompt: {last.prompt_tokens} tokens{cached}, {last.prompt_tps:.1f} tok/s | generation: "
              f"{last.generation_tokens} tokens, {last.generation_tps:.2f} tok/s | peak memory {last.peak_memory:.2f} GB",
              file=sys.stderr)
    if timer:
        timer.uninstall()
        print(timer.table(), file=sys.stderr)


def _use_prompt_cache(args, model, prompt: str, chat):
    """``generate --prompt-cache FILE``: the prompt continues the text cached there, templated as it was."""
    from .prompt_cache import load_prompt_cache

    cache, info = load_prompt_cache(args.prompt_cache, model, return_metadata=True)
    cached_chat = info.get("chat") == "1"
    if "prompt" not in info:
        raise ValueError(f"--prompt-cache: {args.prompt_cache} has no prompt text (not made by flash-moe cache-prompt)")
    if args.raw and cached_chat:
        raise ValueError(f"--raw: {args.prompt_cache} was cached with the chat template; drop --raw")
    return info["prompt"] + prompt, cached_chat, cache


def cmd_cache_prompt(args) -> None:
    import mlx.core as mx

    from . import load
    from .generate import generate_step, open_prompt_tokens
    from .prompt_cache import save_prompt_cache

    model = load(args.model, **_loading(args))
    text = args.prompt if args.prompt != "-" else sys.stdin.read()
    chat = not args.raw and model.tokenizer.chat_template is not None
    ids = open_prompt_tokens(model.tokenizer, text, chat)
    if not ids:
        raise ValueError("--prompt: the prompt is empty")
    cache = model.make_prompt_cache()
    for _ in generate_step(mx.array(ids, mx.int32), model, max_tokens=1, prompt_cache=cache):
        pass  # processes every prompt token (the one sampled token is not kept)
    save_prompt_cache(args.out, cache, model, metadata={"prompt": text, "chat": str(int(chat))})
    print(f"{args.out}: {len(cache.tokens)} prompt tokens cached ({cache.nbytes / 2**20:.1f} MiB)")


def cmd_chat(args) -> None:
    from .chat import chat

    options = _loading(args)
    chat(args.model, system=args.system, experts_per_token=options.pop("experts_per_token"), tools=not args.no_tools,
         enable_thinking=args.think, load_options=options, verbose=args.verbose, **_sampling(args))


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(prompt=args.prompt, max_tokens=args.max_tokens, timing=not args.no_timing, rebuild=args.rebuild)


def cmd_serve(args) -> None:
    from .server import parse_bytes, serve

    for flag, value in (("--port", args.port), ("--max-batch", args.max_batch), ("--max-tokens", args.max_tokens)):
        if value is not None and value < (0 if flag == "--port" else 1):
            raise ValueError(f"{flag} {value}: must be {'>= 0' if flag == '--port' else '>= 1'}")
    try:
        cache_bytes = parse_bytes(args.prompt_cache_bytes)
    except ValueError as e:
        raise ValueError(f"--prompt-cache-bytes: {e}") from None
    options = _loading(args)
    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
          prompt_cache_bytes=cache_bytes, api_key=args.api_key or os.environ.get("FLASH_MOE_API_KEY"),
          experts_per_token=options.pop("experts_per_token"), default_max_tokens=args.max_tokens,
          load_options=options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flash-moe", description="Run MoE LLMs larger than memory by streaming experts from SSD.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="repack a checkpoint into resident weights + packed expert files")
    p.add_argument("src", help="local Hugging Face / mlx-community folder, or a hub id (owner/name)")
    p.add_argument("dst", help="output folder")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8, 16), help="expert bits (16 = unquantized)")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128), help="quantization group size")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of scales/biases and of unquantized weights")
    p.add_argument("--resident-bits", type=int, default=None, choices=(4, 8),
                   help="also quantize big non-expert matrices (router and shared gate stay >= 8 bits)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: remove what an earlier conversion left in DST (convert's own files only) "
                        "instead of resuming it; needed to convert another source or other settings into DST")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="re-check every expert of a converted model against layout.json")
    p.add_argument("model", help="converted model folder")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", required=True, help="converted folder, HF checkpoint folder, or hub id")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--timing", action="store_true", help="print a per-phase ms/token table (adds a sync per phase)")
    p.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="a file from flash-moe cache-prompt: the prompt continues the text cached there")
    _add_sampling(p)
    _add_loading(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("cache-prompt", help="process a prompt once and save the state, for generate --prompt-cache")
    p.add_argument("--model", required=True, help="converted folder, HF checkpoint folder, or hub id")
    p.add_argument("--prompt", required=True, help="the shared start of later prompts ('-' reads stdin)")
    p.add_argument("--out", required=True, help="the prompt cache file to write (safetensors)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--k", type=int, default=None, help="experts per token (default: the model's num_experts_per_tok)")
    _add_loading(p)
    p.set_defaults(func=cmd_cache_prompt)

    p = sub.add_parser("chat", help="interactive chat with history and tool calling (/reset, /stats, /exit)")
    p.add_argument("--model", required=True, help="converted folder, HF checkpoint folder, or hub id")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--no-tools", action="store_true",
                   help="offer no tools to the model and run none (tool-call text is shown as text)")
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                   help="turn thinking on or off (default: the chat template's default)")
    p.add_argument("--verbose", action="store_true",
                   help="after each reply: prompt tokens, cached tokens, prefill and generation tok/s (/stats toggles)")
    _add_sampling(p)
    _add_loading(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI- and Anthropic-compatible HTTP server (needs the server extra)")
    p.add_argument("--model", required=True, help="converted folder, HF checkpoint folder, or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --api-key)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests that may wait for a slot before the server answers 429 (default 4 x max-batch)")
    p.add_argument("--prompt-cache-bytes", default="8G",
                   help="memory for prompt caches kept across requests, e.g. 8G, 512M, 0 = off (default 8G)")
    p.add_argument("--api-key", default=None,
                   help="require this key (Authorization: Bearer KEY or x-api-key: KEY); also FLASH_MOE_API_KEY")
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="new tokens of a chat request that names no max_tokens (default 4096)")
    p.add_argument("--k", type=int, default=None, help="experts per token (default: the model's num_experts_per_tok)")
    _add_loading(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="build (once), convert and run the built-in demo model, offline")
    p.add_argument("--prompt", default="def main", help="prompt (default: 'def main')")
    p.add_argument("--max-tokens", type=int, default=80, help="tokens to generate (default 80)")
    p.add_argument("--no-timing", action="store_true", help="skip the timing table")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached demo checkpoint")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug or os.environ.get("FLASH_MOE_DEBUG"):
        args.func(args)
        return
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit("flash-moe: interrupted")
    except SystemExit:
        raise
    except Exception as e:  # one clear line, not a traceback (--debug shows it)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f"flash-moe {args.command}: error: {msg}")


if __name__ == "__main__":
    main()

"""``flash-moe``: convert, verify, generate, chat, serve, eval, bench, demo. Each subcommand maps its flags onto a function."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings

from . import __version__
from .layout import FLOAT_DTYPES


def _number(kind, lo=None, hi=None, lo_open=False, hi_open=False, what=None):
    """An argparse type: a finite ``kind`` in [lo, hi] (open ends where asked); argparse names the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        bad = not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) \
            or (hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


def _cache_spec(text: str) -> str:
    """--cache-experts: checked here so the message names the flag; load() reads the text itself."""
    try:
        value = float(text) if text not in ("auto", "all") else 0.0
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"expected a count, a fraction in (0, 1), 'all' or 'auto', got {text!r}")
    return text


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=_number(int, 1, what="at least 1"), default=256,
                   help="most new tokens (default 256)")
    p.add_argument("--temp", type=_number(float, 0, what="a finite number >= 0"), default=0.0,
                   help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=_number(float, 0, 1, lo_open=True, what="in (0, 1]"), default=1.0,
                   help="nucleus sampling mass (default 1: off)")
    p.add_argument("--top-k", type=_number(int, 0, what=">= 0"), default=0,
                   help="sample among the k most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=_number(float, 0, 1, what="in [0, 1]"), default=0.0,
                   help="drop tokens below min-p x the top probability")
    p.add_argument("--repetition-penalty", type=_number(float, 0, lo_open=True, what="a finite number > 0"),
                   default=None, help="> 1 discourages repeats")
    p.add_argument("--seed", type=_number(int, 0, 2**64 - 1, what="in 0..2**64-1"), default=0,
                   help="sampling seed (default 0)")
    p.add_argument("--k", type=_number(int, 1, what="at least 1"), default=None,
                   help="experts per token (default: the model's num_experts_per_tok)")
    p.add_argument("--strict-context", action="store_true",
                   help="refuse a prompt longer than the model's context (default: warn and go on)")


def _add_loading(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-experts", type=_cache_spec, default="auto",
                   help="experts kept in GPU memory (discrete GPUs): a count, a fraction of all experts, 'all', "
                        "or 'auto' (default: what fits on CUDA, none on Apple/CPU); 0 turns it off")
    p.add_argument("--direct-io", default="auto", choices=("auto", "on", "off"),
                   help="read experts around the page cache with O_DIRECT (default auto: when a GPU cache is in front)")
    p.add_argument("--preload", action="store_true",
                   help="fill the GPU (and host) expert caches before generating, most used first (progress bar)")
    p.add_argument("--host-cache", default="auto",
                   help="experts kept in host RAM behind the GPU cache (pinned on CUDA): a fraction of all experts, "
                        "bytes like 24GB, 'all', or 'auto' (default: free RAM less a reserve on CUDA, none on Apple/CPU "
                        "where the page cache is that tier); 0 turns it off")
    p.add_argument("--prefetch", default="auto", choices=("auto", "on", "off"),
                   help="read the next layer's likely experts into the host cache while a layer computes "
                        "(default auto: on CUDA with a host cache)")


def _loading_notes(args, model) -> None:
    """Say when a loading flag has nothing to act on with this model on this machine."""
    from .kernels import BACKEND

    asked = [f for f, on in (("--cache-experts", args.cache_experts != "auto"), ("--preload", args.preload),
                             ("--direct-io", args.direct_io != "auto")) if on]
    if model.store is None and asked:
        print(f"flash-moe: note: {', '.join(asked)} do nothing here: this folder is not converted, its experts "
              "are all in memory", file=sys.stderr)
    where = {"cuda": "on this CUDA GPU", "metal": "with Apple's unified memory"}.get(BACKEND, "with MLX on the CPU")
    if model.store is not None and model.device_cache is None and args.preload:
        print(f"flash-moe: note: --preload does nothing here: there is no device expert cache (--cache-experts "
              f"{args.cache_experts} keeps none {where})", file=sys.stderr)
    elif model.device_cache is not None and BACKEND != "cuda" and args.cache_experts not in ("auto", "0"):
        print(f"flash-moe: note: there is no separate GPU memory {where}: --cache-experts keeps "
              f"{model.device_cache.capacity} experts in RAM beside the page cache, which already holds them once read",
              file=sys.stderr)


def _loading(args) -> dict:
    direct = {"auto": "auto", "on": True, "off": False}[args.direct_io]
    return dict(experts_per_token=args.k, cache_experts=args.cache_experts, direct_io=direct, preload=args.preload,
                **_tier_options(args))


def _tier_options(args) -> dict:
    """--host-cache and --prefetch as load() takes them (left out at their defaults)."""
    out = {}
    if args.host_cache != "auto":
        out["host_cache"] = args.host_cache
    if args.prefetch != "auto":
        out["prefetch"] = args.prefetch == "on"
    return out


def _sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                strict_context=args.strict_context)


def cmd_convert(args) -> None:
    from .convert import convert

    dst = convert(args.src, args.dst, bits=args.bits, group_size=args.group_size, dtype=args.dtype,
                  resident_bits=args.resident_bits, revision=args.revision, overwrite=args.overwrite)
    print(f"converted {args.src} -> {dst}")


def cmd_verify(args) -> None:
    from .layer_files import verify

    bad = verify(args.model)
    if bad:
        for layer, expert, want, got in bad:
            print(f"layer {layer} expert {expert}: checksum {got} != {want} recorded in layout.json")
        raise SystemExit(f"flash-moe verify: {len(bad)} expert(s) damaged in {args.model}")
    print(f"{args.model}: every expert matches its checksum")


def cmd_generate(args) -> None:
    from . import load
    from .distributed import finish, follow, following
    from .generation import format_stats
    from .timing import PhaseTimer

    model = load(args.model, **_loading(args))
    _loading_notes(args, model)
    timer = PhaseTimer(model).install() if args.timing else None  # on every rank: it evaluates per layer
    if following(model):  # an expert-parallel rank other than 0: rank 0 has the text
        # --prompt-cache: every rank loads the file; a follower's copy mirrors rank 0's
        follow(model, timer=timer, prompt_cache=args.prompt_cache and _load_prompt_cache(args, model)[0])
        return
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    chat = None if args.raw else (model.tokenizer.chat_template is not None)
    cache = None
    if args.prompt_cache:
        prompt, chat, cache = _use_prompt_cache(args, model, prompt, chat)
    last, calls = None, []
    for r in model.stream_generate(prompt, chat=chat, timer=timer, prompt_cache=cache, **_sampling(args)):
        print(r.text, end="", flush=True)
        last, calls = r, calls + r.tool_calls  # each call comes with the step that completes it
    print()
    for call in calls:
        print(f"[tool call] {call}")
    if last:
        cached = f" ({last.cached_tokens} cached)" if cache is not None else ""
        print(format_stats(last).replace(" tokens,", f" tokens{cached},", 1), file=sys.stderr)
    if timer:
        timer.uninstall()
        print(timer.table(), file=sys.stderr)
    finish(model)  # a split run: the other ranks stop following


def _use_prompt_cache(args, model, prompt: str, chat):
    """``generate --prompt-cache FILE``: the prompt continues the text cached there, templated as it was."""
    cache, info = _load_prompt_cache(args, model)
    cached_chat = info.get("chat") == "1"
    if "prompt" not in info:
        raise ValueError(f"--prompt-cache: {args.prompt_cache} has no prompt text (not made by flash-moe cache-prompt)")
    if args.raw and cached_chat:
        raise ValueError(f"--raw: {args.prompt_cache} was cached with the chat template; drop --raw")
    return info["prompt"] + prompt, cached_chat, cache


def _load_prompt_cache(args, model):
    from .prompt_cache import load_prompt_cache

    try:
        return load_prompt_cache(args.prompt_cache, model, return_metadata=True)
    except FileNotFoundError:
        raise ValueError(f"--prompt-cache: {args.prompt_cache}: no such file") from None
    except ValueError as e:
        raise ValueError(f"--prompt-cache: {e}") from None


def cmd_cache_prompt(args) -> None:
    import mlx.core as mx

    from . import load
    from .distributed import finish, follow, following
    from .generation import generate_step, open_prompt_tokens
    from .prompt_cache import save_prompt_cache

    model = load(args.model, **_loading(args))
    if following(model):  # an expert-parallel rank other than 0: rank 0 has the text and writes the file
        follow(model)
        return
    text = args.prompt if args.prompt != "-" else sys.stdin.read()
    chat = not args.raw and model.tokenizer.chat_template is not None
    ids = open_prompt_tokens(model.tokenizer, text, chat)
    if not ids:
        raise ValueError("--prompt: the prompt is empty")
    cache = model.make_prompt_cache()
    for _ in generate_step(mx.array(ids, mx.int32), model, max_tokens=1, prompt_cache=cache):
        pass  # processes every prompt token (the one sampled token is not kept)
    try:
        save_prompt_cache(args.out, cache, model, metadata={"prompt": text, "chat": str(int(chat))})
    except OSError as e:
        raise ValueError(f"--out: cannot write {args.out} ({e.strerror or e})") from None
    print(f"{args.out}: {len(cache.tokens)} prompt tokens cached ({cache.nbytes / 2**20:.1f} MiB)")
    finish(model)  # a split run: the other ranks stop following


def cmd_chat(args) -> None:
    from .chat import chat

    options = _loading(args)
    chat(args.model, system=args.system, experts_per_token=options.pop("experts_per_token"), tools=not args.no_tools,
         enable_thinking=args.think, load_options=options, verbose=args.verbose, **_sampling(args))


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(prompt=args.prompt, max_tokens=args.max_tokens, timing=not args.no_timing, rebuild=args.rebuild)


def cmd_serve(args) -> None:
    from .files import parse_bytes
    from .server import serve

    for flag, value in (("--port", args.port), ("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--max-tokens", args.max_tokens)):
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

def _k_list(text: str) -> list[int]:
    """``1,2,4,10`` or ``1-16`` (or a mix) -> sorted distinct ints."""
    out = set()
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            out.update(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K values like 1,2,4,10 or 1-16, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"K values must be positive, got {text!r}")
    return sorted(out)


def _load_options(args) -> dict:
    return dict(cache_experts=args.cache_experts, direct_io={"auto": "auto", "on": True, "off": False}[args.direct_io],
                preload=args.preload, **_tier_options(args))


def cmd_eval(args) -> None:
    from .distributed import launched_rank
    from .eval import evaluate
    from .eval.report import plot, table, write_json

    models = args.model
    # Under mlx.launch every rank runs the same evaluation (the same forward passes, in step); rank 0 reports.
    lead = launched_rank() == 0
    if args.tool_calls:
        from .eval.tools import evaluate_tool_calls, tool_table

        rows = evaluate_tool_calls(models, suite=args.suite, k=args.k, max_tokens=args.gen_tokens,
                                   load_options=_load_options(args), progress=lead)
        if not lead:
            return
        print(tool_table(rows))
        if args.json:
            write_json(rows, args.json)
        return
    rows = evaluate(models, args.data, k=args.k, reference=args.reference, context=args.context, stride=args.stride,
                    max_tokens=args.max_tokens, decode_tokens=args.decode_tokens, load_options=_load_options(args),
                    progress=lead)
    if not lead:
        return
    print(table(rows))
    if args.json:
        write_json(rows, args.json)
    if args.plot:
        plot(rows, args.plot)


def cmd_bench(args) -> None:
    import json

    from . import load
    from .eval.bench import bench, format_row

    from .distributed import following

    model = load(args.model, **_load_options(args))
    # Under mlx.launch every rank runs the same trials (generation in lockstep); rank 0 reports its own reads.
    follower = following(model)
    quiet = args.json == "-" or follower
    show = (lambda i, row: None) if quiet else (lambda i, row: print(f"Trial {i + 1}:  {format_row(row)}", flush=True))
    try:
        result = bench(model, args.prompt_tokens, args.generation_tokens, args.num_trials, k=args.k, seed=args.seed,
                       on_trial=show)
    finally:
        model.close()
    if follower:
        return
    if not quiet:
        print(f"Averages: {format_row(result['average'])}")
        if getattr(model, "parallel", None) is not None:
            print(f"(expert-parallel: {model.parallel.size} ranks; the expert reads above are rank 0's share)")
    if args.json:
        from .eval.report import finite

        text = json.dumps(finite(result), indent=1)
        if quiet:
            print(text)
        else:
            from .files import atomic_write

            atomic_write(args.json, text.encode())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flash-moe", description="Run MoE LLMs larger than memory by streaming experts from SSD.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"flash-moe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="repack a checkpoint into resident weights + packed expert files")
    p.add_argument("src", help="local Hugging Face / mlx-community folder, or a hub id (owner/name)")
    p.add_argument("dst", help="output folder")
    p.add_argument("--bits", type=int, default=None, choices=(2, 3, 4, 8, 16),
                   help="expert bits (16 = unquantized; default 4, or an MLX-quantized source's own)")
    p.add_argument("--group-size", type=int, default=None, choices=(32, 64, 128),
                   help="quantization group size (default 64, or an MLX-quantized source's own)")
    p.add_argument("--dtype", default=None, choices=FLOAT_DTYPES,
                   help="dtype of scales/biases and of unquantized weights (default bfloat16, or an MLX-quantized "
                        "source's scales' dtype)")
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

    p = sub.add_parser("eval", help="perplexity, KL and top-1 vs a reference, and cost, for models x K (or --tool-calls)",
                       description="Score models (e.g. conversions at several bits) and experts-per-token values on a "
                                   "text: perplexity, KL(reference || model) per token, top-1 agreement with the "
                                   "reference, expert bytes read per decoded token, decoded tok/s.")
    p.add_argument("--model", action="append", required=True,
                   help="model folder or hub id; repeat to compare several (e.g. one source at 2, 3, 4, 8 bits)")
    p.add_argument("--data", default=None,
                   help="text or JSONL ({\"text\": ...} rows) file, or hub:NAME[:CONFIG][@SPLIT] through the datasets "
                        "package (hub:wikitext2 = WikiText-2 test); default: the bundled sample (offline)")
    p.add_argument("--k", type=_k_list, default=None, help="experts per token to try: 1,2,4,10 or 1-16 (default: the model's)")
    p.add_argument("--reference", default=None, help="MODEL@K for KL and top-1 (default: the first --model at its config's K)")
    p.add_argument("--context", type=int, default=2048, help="window length in tokens (default 2048)")
    p.add_argument("--stride", type=int, default=1024, help="step between windows (default 1024)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the data")
    p.add_argument("--decode-tokens", type=int, default=16,
                   help="tokens decoded one by one per run to measure bytes/token and tok/s (default 16; 0 skips)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--plot", default=None, help="plot perplexity against bytes per token into this PNG (matplotlib)")
    p.add_argument("--tool-calls", action="store_true", help="score tool-call validity on the bundled suite instead")
    p.add_argument("--suite", default=None, help="tool-call suite JSONL (default: the bundled one)")
    p.add_argument("--gen-tokens", type=int, default=256, help="most tokens per tool-call reply (default 256)")
    _add_loading(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="prompt and generation tok/s, peak memory and expert I/O on random prompts",
                       description="Benchmark a model like mlx_lm.benchmark: per trial and averaged prompt_tps, "
                                   "generation_tps, peak_memory (GB), plus experts and bytes read per generated "
                                   "token and the page-cache and device-cache hit rates.")
    p.add_argument("--model", required=True, help="converted folder, HF checkpoint folder, or hub id")
    p.add_argument("-p", "--prompt-tokens", type=int, default=512, help="random prompt length (default 512)")
    p.add_argument("-g", "--generation-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("-n", "--num-trials", type=int, default=3, help="trials (default 3)")
    p.add_argument("--k", type=int, default=None, help="experts per token (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    p.add_argument("--json", nargs="?", const="-", default=None,
                   help="print the results as JSON instead (or write them to the given file)")
    _add_loading(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="build (once), convert and run the built-in demo model, offline")
    p.add_argument("--prompt", default="def main", help="prompt (default: 'def main')")
    p.add_argument("--max-tokens", type=_number(int, 1, what="at least 1"), default=80,
                   help="tokens to generate (default 80)")
    p.add_argument("--no-timing", action="store_true", help="skip the timing table")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached demo checkpoint")
    p.set_defaults(func=cmd_demo)
    return parser


# load()'s Python arguments as the CLI spells them, for error messages that come from the library
FLAG_NAMES = [(re.compile(r"\bdirect_io=False\b"), "--direct-io off"), (re.compile(r"\bdirect_io=True\b"), "--direct-io on"),
              (re.compile(r"\bexperts_per_token\b"), "--k"), (re.compile(r"\bcache_experts\b"), "--cache-experts")]


def _as_flags(message: str) -> str:
    for pattern, flag in FLAG_NAMES:
        message = pattern.sub(flag, message)
    return message


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"flash-moe: warning: {message}", file=sys.stderr)


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line, not a source location
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
            sys.exit(f"flash-moe {args.command}: error: {_as_flags(msg)}")


if __name__ == "__main__":
    main()

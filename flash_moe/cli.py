"""``flash-moe``: convert, verify, generate, chat, demo. Each subcommand maps its flags onto a function."""

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
                  resident_bits=args.resident_bits, revision=args.revision)
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
    from .distributed import finish, follow, following
    from .timing import PhaseTimer

    model = load(args.model, **_loading(args))
    timer = PhaseTimer(model).install() if args.timing else None  # on every rank: it evaluates per layer
    if following(model):  # an expert-parallel rank other than 0: rank 0 has the text
        follow(model, timer=timer)
        return
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    chat = None if args.raw else (model.tokenizer.chat_template is not None)
    last, calls = None, []
    for r in model.stream_generate(prompt, chat=chat, timer=timer, **_sampling(args)):
        print(r.text, end="", flush=True)
        last, calls = r, calls + r.tool_calls  # each call comes with the step that completes it
    print()
    for call in calls:
        print(f"[tool call] {call}")
    if last:
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | generation: "
              f"{last.generation_tokens} tokens, {last.generation_tps:.2f} tok/s | peak memory {last.peak_memory:.2f} GB",
              file=sys.stderr)
    if timer:
        timer.uninstall()
        print(timer.table(), file=sys.stderr)
    finish(model)  # a split run: the other ranks stop following


def cmd_chat(args) -> None:
    from .chat import chat

    options = _loading(args)
    chat(args.model, system=args.system, experts_per_token=options.pop("experts_per_token"), tools=not args.no_tools,
         enable_thinking=args.think, load_options=options, **_sampling(args))


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(prompt=args.prompt, max_tokens=args.max_tokens, timing=not args.no_timing, rebuild=args.rebuild)


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
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="re-check every expert of a converted model against layout.json")
    p.add_argument("model", help="converted model folder")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", required=True, help="converted folder, HF checkpoint folder, or hub id")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--timing", action="store_true", help="print a per-phase ms/token table (adds a sync per phase)")
    _add_sampling(p)
    _add_loading(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with history and tool calling (/reset, /exit)")
    p.add_argument("--model", required=True, help="converted folder, HF checkpoint folder, or hub id")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--no-tools", action="store_true", help="offer no tools to the model")
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                   help="turn thinking on or off (default: the chat template's default)")
    _add_sampling(p)
    _add_loading(p)
    p.set_defaults(func=cmd_chat)

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

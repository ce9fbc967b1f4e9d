"""``flash-moe``: convert, verify, generate, chat, eval, bench, demo. Each subcommand maps its flags onto a function."""

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
    from .timing import PhaseTimer

    model = load(args.model, **_loading(args))
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    chat = None if args.raw else (model.tokenizer.chat_template is not None)
    timer = PhaseTimer(model).install() if args.timing else None
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


def cmd_chat(args) -> None:
    from .chat import chat

    options = _loading(args)
    chat(args.model, system=args.system, experts_per_token=options.pop("experts_per_token"), tools=not args.no_tools,
         enable_thinking=args.think, load_options=options, **_sampling(args))


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(prompt=args.prompt, max_tokens=args.max_tokens, timing=not args.no_timing, rebuild=args.rebuild)


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
                preload=args.preload)


def cmd_eval(args) -> None:
    from .eval import evaluate
    from .eval.report import plot, table, write_json

    models = args.model
    if args.tool_calls:
        from .eval.tools import evaluate_tool_calls, tool_table

        rows = evaluate_tool_calls(models, suite=args.suite, k=args.k, max_tokens=args.gen_tokens,
                                   load_options=_load_options(args))
        print(tool_table(rows))
        if args.json:
            write_json(rows, args.json)
        return
    rows = evaluate(models, args.data, k=args.k, reference=args.reference, context=args.context, stride=args.stride,
                    max_tokens=args.max_tokens, decode_tokens=args.decode_tokens, load_options=_load_options(args))
    print(table(rows))
    if args.json:
        write_json(rows, args.json)
    if args.plot:
        plot(rows, args.plot)


def cmd_bench(args) -> None:
    import json

    from . import load
    from .eval.bench import bench, format_row

    model = load(args.model, **_load_options(args))
    quiet = args.json == "-"
    show = (lambda i, row: None) if quiet else (lambda i, row: print(f"Trial {i + 1}:  {format_row(row)}", flush=True))
    try:
        result = bench(model, args.prompt_tokens, args.generation_tokens, args.num_trials, k=args.k, seed=args.seed,
                       on_trial=show)
    finally:
        model.close()
    if not quiet:
        print(f"Averages: {format_row(result['average'])}")
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

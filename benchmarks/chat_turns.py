"""Four chat turns on the demo model, with and without a prompt cache: prompt tokens, tokens processed,
time to the first token (docs/benchmarks.md, "Chat turns").

    python benchmarks/chat_turns.py [--max-tokens 256] [--repeats 3]
"""

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flash_moe  # noqa: E402
from flash_moe.demo import build  # noqa: E402

USERS = ["Write a function that reads a file.", "Now make it skip empty lines.",
         "Add a docstring.", "And a test for it."]


def conversation(model, cache, max_tokens: int):
    """Per turn: (prompt tokens, cached, seconds to the first token); and the replies."""
    history, rows, replies = [], [], []
    for user in USERS:
        history.append({"role": "user", "content": user})
        tic, first, content = time.perf_counter(), None, ""
        for r in model.stream_generate(history, max_tokens=max_tokens, prompt_cache=cache, enable_thinking=False):
            first = first or (r, time.perf_counter() - tic)
            content += r.content
        history.append({"role": "assistant", "content": content})
        rows.append((first[0].prompt_tokens, first[0].cached_tokens, first[1]))
        replies.append(content)
    return rows, replies


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model = flash_moe.load(build(progress=False, out=io.StringIO()))
    model.generate("def main", max_tokens=8)  # warm-up
    best = {}
    for _ in range(args.repeats):
        for name in ("no cache", "prompt cache"):
            rows, replies = conversation(model, model.make_prompt_cache() if name == "prompt cache" else None,
                                         args.max_tokens)
            best.setdefault(name, (rows, replies))
            assert replies == best[name][1], "greedy replies differ between runs"
            best[name] = ([(a, b, min(t, old[2])) for (a, b, t), old in zip(rows, best[name][0])], replies)
    assert best["no cache"][1] == best["prompt cache"][1], "the cache changed the replies"
    for name, (rows, _) in best.items():
        cells = " | ".join(f"{n} tok ({c} cached) {t * 1000:.0f} ms" for n, c, t in rows)
        print(f"{name:12s} | {cells}")


if __name__ == "__main__":
    main()

"""flash-moe serve under concurrent clients: aggregate tok/s, time to first token, expert bytes read per
generated token, for several batch sizes; and stream_generate alone, the server's B=1 reference.

    python benchmarks/serve.py [--model M] [--batches 1,2,4,8] [--tokens 64] [--rounds 2] [--dtype float32]

N = B clients each stream M tokens from a server with --max-batch B, all starting together; each
configuration runs ``--rounds`` times and the best is kept. Default model: the built demo (CPU).
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import openai  # noqa: E402

import flash_moe  # noqa: E402
from flash_moe.server import make_state  # noqa: E402
from serving import LiveServer  # noqa: E402

PROMPTS = ["def main", "class Parser", "import os\n", "def _read(self", "for line in", "if __name__",
           "from typing import", "async def fetch"]


def run_clients(url: str, n: int, tokens: int) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    start, results = threading.Barrier(n + 1), []

    def one(i):
        start.wait()
        tic = time.perf_counter()
        first, count = None, 0
        for chunk in client.completions.create(model="m", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=tokens,
                                               stream=True, stream_options={"include_usage": True}):
            if chunk.choices and first is None:
                first = time.perf_counter() - tic
            if chunk.usage:
                count = chunk.usage.completion_tokens
        results.append((first, count))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    tic = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    total = sum(c for _, c in results)
    return {"tok_s": total / wall, "ttft": sorted(f for f, _ in results)[len(results) // 2], "tokens": total}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the built demo)")
    p.add_argument("--batches", default="1,2,4,8", help="batch sizes B (default 1,2,4,8)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per client (default 64)")
    p.add_argument("--rounds", type=int, default=2, help="runs per configuration, best kept (default 2)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the stored one)")
    args = p.parse_args()
    if args.model is None:
        from flash_moe.demo import build

        args.model = build(progress=False, out=io.StringIO())
    model = flash_moe.load(args.model, dtype=args.dtype)
    model.generate(PROMPTS[0], max_tokens=8)  # warm-up: kernels, page cache
    best = 0.0
    for _ in range(args.rounds):
        for r in model.stream_generate(PROMPTS[0], max_tokens=args.tokens):
            last = r
        best = max(best, last.generation_tps)
    print(f"stream_generate alone: {best:.1f} tok/s ({last.generation_tokens} tokens)")
    print("| B | clients x tokens | aggregate tok/s | median TTFT (ms) | expert MB read / token | vs B=1 |")
    print("|---|---|---|---|---|---|")
    base = None
    for b in (int(x) for x in args.batches.split(",")):
        with LiveServer(make_state(model, max_batch=b, max_queue=4 * b)) as server:
            run_clients(server.url, b, 4)  # warm-up
            rows = []
            for _ in range(args.rounds):
                m = server.state.metrics
                read0, gen0 = m.get("flash_moe_expert_bytes_read_total"), m.get("flash_moe_generated_tokens_total")
                row = run_clients(server.url, b, args.tokens)
                row["mb_per_token"] = (m.get("flash_moe_expert_bytes_read_total") - read0) / 2**20 / max(
                    m.get("flash_moe_generated_tokens_total") - gen0, 1)
                rows.append(row)
        row = max(rows, key=lambda r: r["tok_s"])
        base = base or row["tok_s"]
        print(f"| {b} | {b} x {args.tokens} | {row['tok_s']:.1f} | {row['ttft'] * 1000:.0f} | "
              f"{row['mb_per_token']:.3f} | {row['tok_s'] / base:.2f}x |")
    model.close()


if __name__ == "__main__":
    main()

"""docs/quality.md's table: the demo model converted at several expert bits, scored at K = 1..16.

Converts the shipped bf16 demo checkpoint (flash_moe/demo) at each of --bits (16 = unquantized bf16 experts,
the reference at the trained K=4), then runs ``flash_moe.evaluate`` once per bits against that reference and
writes rows.json (all rows so far, after each bits), quality.png and a markdown table under --out.

    python benchmarks/eval_demo.py --out /tmp/quality --data /path/to/python3.11/functools.py

With --tool-calls SUITE it scores tool-call validity instead (``flash_moe.eval.tools``, greedy, thinking off) per
bits and K, and writes tool_rows.json and tool_table.md (a table per measure: rows K, columns bits):

    python benchmarks/eval_demo.py --out /tmp/quality --bits 8,4,3,2 --k 1,2,4,8,16 --tool-calls suite.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flash_moe import evaluate  # noqa: E402
from flash_moe.convert import convert  # noqa: E402
from flash_moe.demo import ASSETS  # noqa: E402
from flash_moe.eval.report import plot, table, write_json  # noqa: E402


def markdown(rows) -> str:
    lines = ["| bits | K | perplexity | KL | top-1 | expert KB/token | tok/s |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r.bits, r.k)):
        lines.append(f"| {r.bits} | {r.k} | {r.perplexity:.2f} | {r.kl:.4f} | {r.top1:.3f} | "
                     f"{r.bytes_per_token / 1e3:.1f} | {r.tok_per_s:.0f} |")
    return "\n".join(lines)


def tool_markdown(rows) -> str:
    bits = sorted({r.bits for r in rows}, reverse=True)
    by = {(r.bits, r.k): r for r in rows}
    out = []
    for measure in ("parsed", "valid", "exact"):
        out += [f"{measure}:", "", "| K | " + " | ".join(f"{b}-bit" for b in bits) + " |",
                "|---:|" + "---:|" * len(bits)]
        for k in sorted({r.k for r in rows}):
            out.append(f"| {k} | " + " | ".join(f"{getattr(by[b, k], measure):.3f}" if (b, k) in by else "-"
                                                 for b in bits) + " |")
        out.append("")
    return "\n".join(out)


def tool_calls(folders: dict, ks: list[int], suite: str, out: Path) -> None:
    from flash_moe.eval.tools import evaluate_tool_calls, tool_table

    rows = []
    for b, folder in folders.items():
        rows += evaluate_tool_calls([str(folder)], suite=suite, k=ks, max_tokens=96, progress=False,
                                    load_options={"cache_experts": 0})
        write_json(rows, out / "tool_rows.json")
        print(tool_table(rows), flush=True)
    (out / "tool_table.md").write_text(tool_markdown(rows))
    print(tool_markdown(rows))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--src", type=Path, default=ASSETS, help="the bf16 checkpoint to convert (default: the shipped demo)")
    p.add_argument("--bits", default="16,8,4,3,2")
    p.add_argument("--k", default="1,2,3,4,5,6,8,10,12,14,16")
    p.add_argument("--data", default=None, help="default: the bundled sample")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int, default=384)
    p.add_argument("--tool-calls", metavar="SUITE", help="score this tool-call suite (JSONL) instead of perplexity")
    a = p.parse_args()
    bits = [int(b) for b in a.bits.split(",")]
    ks = [int(k) for k in a.k.split(",")]
    folders = {}
    for b in bits:
        folders[b] = a.out / f"demo-{b}bit"
        if not (folders[b] / "layout.json").exists():
            convert(a.src, folders[b], bits=b, progress=False)
    if a.tool_calls:
        return tool_calls(folders, ks, a.tool_calls, a.out)
    reference = (str(folders[bits[0]]), 4)
    rows, seen = [], set()
    for b in bits:
        for r in evaluate([str(folders[b])], a.data, k=ks, reference=reference, context=a.context, stride=a.stride,
                          max_tokens=a.max_tokens, decode_tokens=32, load_options={"cache_experts": 0}):
            if (r.bits, r.k) not in seen:
                seen.add((r.bits, r.k))
                rows.append(r)
        write_json(rows, a.out / "rows.json")
        print(table(rows), flush=True)
    plot(rows, a.out / "quality.png", title="demo model: perplexity against expert bytes per token")
    (a.out / "table.md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    print(json.dumps({"data": a.data, "max_tokens": a.max_tokens, "context": a.context, "stride": a.stride}))


if __name__ == "__main__":
    main()

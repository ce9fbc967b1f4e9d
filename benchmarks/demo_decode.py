"""Decode speed of the demo model from a given source tree, to compare two commits on the same machine.

    python benchmarks/demo_decode.py [TREE]     # TREE: a checkout of flash_moe (default: this one)
"""

import io
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[1]))

import flash_moe  # noqa: E402
from flash_moe.demo import build  # noqa: E402

model = flash_moe.load(build(progress=False, out=io.StringIO()))
model.generate("def main", max_tokens=8)  # warm-up
for _ in range(3):
    for r in model.stream_generate("def main", max_tokens=128):
        last = r
    print(f"{flash_moe.__file__}: {last.generation_tokens} tokens, generation_tps={last.generation_tps:.1f}")

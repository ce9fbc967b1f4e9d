"""benchmarks/op_count.py (issue 20's launch counts) runs against the current model and expert tiers, so the
script cannot rot between GPU leases; its counts are facts about the graph, checked for their structure."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_op_count_counts_a_decode_token():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "op_count.py"), "--k", "4"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line[:40].strip(): int(line[40:].split()[0]) for line in run.stdout.splitlines()
            if line[:40].strip().endswith(("layer", "mixer", "block (router, experts, shared)"))
            or line.startswith("token")}
    gdn, attn = rows["GatedDeltaNet decoder layer"], rows["full-attention decoder layer"]
    token = next(v for k, v in rows.items() if k.startswith("token"))
    # a decoder layer is its mixer plus the MoE block (plus norms); a 4-layer token is at least its layers
    assert gdn > rows["GatedDeltaNet mixer"] and attn > rows["full-attention mixer"]
    assert token >= 3 * gdn + attn

#!/usr/bin/env bash
# The GPU benchmark run of docs/benchmarks.md, in one call on the lent machine (after
# `source .device/install.sh`): a Qwen3.5-397B-shaped synthetic model, then decode runs warm and
# under a page-cache cap, with and without the device expert cache, beside mlx-lm.
# Usage: LAYERS=6 bash benchmarks/gpu_suite.sh   (writes JSON and one log under $OUT)
set -u
OUT=${OUT:-/tmp/out}; M=${M:-/root/syn397}; LAYERS=${LAYERS:-6}; G=${G:-48}; TH=${TH:-16}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader; nproc; free -g | head -2; df -h /root | tail -1
step() { local name=$1; shift; echo "=== $name: $*" | tee -a "$OUT/suite.log"; timeout "${T:-200}" "$@" 2>&1 | grep -v "^\[transformers\]" | tee -a "$OUT/suite.log"; }
[ -f "$M/layout.json" ] || step synthetic python3 benchmarks/make_synthetic.py --out "$M" --layers "$LAYERS" --vocab 32000 --skew --resident-bits 4
E=$(python3 -c "import json;d=json.load(open('$M/layout.json'));print(d['num_experts']*len(d['layers']))")
step probe python3 benchmarks/gpu_probe.py "$M"
step warm_k4 python3 benchmarks/decode.py --model "$M" --k 4 -g "$G" -n 3 --threads "$TH" --warm-prompt 256 --json "$OUT/warm_k4.json"
step warm_k4_cache python3 benchmarks/decode.py --model "$M" --k 4 -g "$G" --threads "$TH" --cache-experts "$E" --warm-prompt 256 --json "$OUT/warm_k4_cache.json"
step warm_k10_peer python3 benchmarks/decode.py --model "$M" --k 10 -g "$G" --threads "$TH" --warm-prompt 256 --peer --json "$OUT/warm_k10_peer.json"
step cap_k4 python3 benchmarks/decode.py --model "$M" --k 4 -g "$G" --threads "$TH" --cold --cap-fraction 0.16 --json "$OUT/cap_k4.json"

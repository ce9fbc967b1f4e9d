#!/usr/bin/env bash
# The GPU benchmark run of docs/benchmarks.md, in one call on the lent machine (after
# `source .device/install.sh`): a Qwen3.5-397B-shaped synthetic model, then decode runs warm and
# under a page-cache cap, beside mlx-lm on the same weights.
# Usage: LAYERS=6 bash benchmarks/gpu_suite.sh   (writes JSON and one log under $OUT)
set -u
OUT=${OUT:-/tmp/out}; M=${M:-/root/syn397}; LAYERS=${LAYERS:-6}; G=${G:-32}; TH=${TH:-16}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; free -g | head -2; df -h /root | tail -1
step() { local name=$1; shift; echo "=== $name: $*" | tee -a "$OUT/suite.log"; timeout "${T:-200}" "$@" 2>&1 | grep -v "^\[transformers\]\|it/s\]\|expert/s\]" | tee -a "$OUT/suite.log"; }
[ -f "$M/layout.json" ] || step synthetic python3 benchmarks/make_synthetic.py --out "$M" --layers "$LAYERS" --vocab 32000 --skew --resident-bits 4
step warm_k10_peer python3 benchmarks/decode.py --model "$M" --k 10 -g "$G" --threads "$TH" --warm-prompt 128 --peer --json "$OUT/warm_k10_peer.json"
step warm_k4 python3 benchmarks/decode.py --model "$M" --k 4 -g "$G" --threads "$TH" --warm-prompt 128 --json "$OUT/warm_k4.json"
step cap_k4 python3 benchmarks/decode.py --model "$M" --k 4 -g "$G" --threads "$TH" --cold --cap-fraction 0.16 --json "$OUT/cap_k4.json"

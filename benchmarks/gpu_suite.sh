#!/usr/bin/env bash
# The GPU benchmark runs of docs/benchmarks.md, on the lent machine (after `source .device/install.sh`):
# a Qwen3.5-397B-shaped synthetic model, then the decode runs named in STEPS, each writing JSON (and a
# profile where it takes one) under $OUT and appending its output to $OUT/suite.log.
# Usage: STEPS="tests resident_k4 cache_k4" LAYERS=6 bash benchmarks/gpu_suite.sh
set -u
OUT=${OUT:-/tmp/out}; M=${M:-/root/syn397}; LAYERS=${LAYERS:-6}; G=${G:-32}; TH=${TH:-16}
STEPS=${STEPS:-"tests resident_k4 cache_k4 cache_k10 page_k4 cap_k4 cap_cache_k4"}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import mlx_lm" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; free -g | head -2; df -h /root | tail -1
step() { local name=$1; shift; echo "=== $name: $*" | tee -a "$OUT/suite.log"; timeout "${T:-240}" "$@" 2>&1 | grep -v "^\[transformers\]\|it/s\]\|expert/s\]" | tee -a "$OUT/suite.log"; }
[ -f "$M/layout.json" ] || step synthetic python3 benchmarks/make_synthetic.py --out "$M" --layers "$LAYERS" --vocab 32000 --skew --resident-bits 4
D="python3 benchmarks/decode.py --model $M -g $G --threads $TH"
for s in $STEPS; do
  case $s in
    tests) step tests env FLASH_MOE_BACKEND=cuda python3 -m pytest -q -rf --tb=line tests/test_expert_cache.py tests/test_store.py tests/test_kernels.py -k "${TESTS_K:-not test_fetch_is_byte}" ;;
    auto) step $s python3 -c "from flash_moe.load import cache_capacity; from flash_moe.layout import ModelLayout; print('auto cache capacity', cache_capacity('auto', ModelLayout.read('$M')))" ;;
    tests_ops) step $s env FLASH_MOE_BACKEND=ops python3 -m pytest -q tests/test_expert_cache.py ;;
    preload_k4) step $s $D --k 4 --cache-experts all --preload --json "$OUT/$s.json" ;;
    preload_k4_nospec) step $s $D --k 4 --cache-experts all --preload --no-speculate --json "$OUT/$s.json" ;;
    preload_k10) step $s $D --k 10 --cache-experts all --preload --json "$OUT/$s.json" ;;
    peers) step $s python3 -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; from benchmarks.decode import peer_mlx_lm
for k in (4, 10): print('mlx-lm K=%d' % k, peer_mlx_lm(Path('$M'), k, 64, $G, 3), flush=True)" ;;
    resident_k4) step $s $D --k 4 --resident --peer --profile "$OUT/$s.prof.txt" --json "$OUT/$s.json" ;;
    resident_k10) step $s $D --k 10 --resident --peer --json "$OUT/$s.json" ;;
    probe) step $s python3 benchmarks/layer_probe.py --model $M --k 4 ;;
    cache_k4_peer) step $s $D --k 4 --cache-experts all --warm-prompt 512 --peer --profile "$OUT/$s.prof.txt" --json "$OUT/$s.json" ;;
    cache_k4_nocompile) step $s env MLX_DISABLE_COMPILE=1 $D --k 4 --cache-experts all --warm-prompt 512 --json "$OUT/$s.json" ;;
    cache_k4) step $s $D --k 4 --cache-experts all --warm-prompt 512 --profile "$OUT/$s.prof.txt" --json "$OUT/$s.json" ;;
    cache_k4_nospec) step $s $D --no-speculate --k 4 --cache-experts all --warm-prompt 512 --json "$OUT/$s.json" ;;
    cache_k10) step $s $D --k 10 --cache-experts all --warm-prompt 512 --peer --json "$OUT/$s.json" ;;
    page_k4) step $s $D --k 4 --warm-prompt 128 --json "$OUT/$s.json" ;;
    cap_k4) step $s $D --k 4 --cold --cap-fraction 0.16 --json "$OUT/$s.json" ;;
    cap_cache_k4) step $s $D --k 4 --cold --cap-fraction 0.16 --cache-experts 0.33 --json "$OUT/$s.json" ;;
    cap_k4_direct) step $s $D --k 4 --cold --cap-fraction 0.16 --direct --json "$OUT/$s.json" ;;
    cap_cache_k4_direct) step $s $D --k 4 --cold --cap-fraction 0.16 --cache-experts 0.33 --direct --json "$OUT/$s.json" ;;
    cap_cache_k4_direct_small) step $s $D --k 4 --cold --cap-fraction 0.16 --cache-experts 0.33 --direct --read-chunk-kib 512 --json "$OUT/$s.json" ;;
    cap_cache_k4_small) step $s $D --k 4 --cold --cap-fraction 0.16 --cache-experts 0.33 --read-chunk-kib 512 --json "$OUT/$s.json" ;;
    # Memory tiers (issue 19): device tier -> pinned host tier -> disk. The 24 GB GPU + 64 GB RAM box: device
    # 11% of the experts, host 26%, the page cache capped near zero after load (so it is no third tier);
    # its baseline (page cache as the RAM tier) is tier24_page. The H200 box: device 55%, the rest in RAM.
    tests_tiers) step $s env FLASH_MOE_BACKEND=cuda python3 -m pytest -q -rf --tb=line tests/test_expert_source.py tests/test_expert_cache.py ;;
    tiers_probe) step $s python3 -c "from flash_moe.load import host_capacity, cache_capacity; from flash_moe.layout import ModelLayout; l = ModelLayout.read('$M'); d = cache_capacity('auto', l); print('auto device', d, 'auto host', host_capacity('auto', l))" ;;
    tier24_page) step $s $D --k 4 --cold --cap-fraction 0.26 --cache-experts 0.11 --no-direct --warm-prompt 512 --json "$OUT/$s.json" ;;
    tier24_direct) step $s $D --k 4 --cold --cap-fraction 0.02 --cache-experts 0.11 --host-cache 0.26 --direct --prefetch off --warm-prompt 512 --json "$OUT/$s.json" ;;
    tier24_direct_prefetch) step $s $D --k 4 --cold --cap-fraction 0.02 --cache-experts 0.11 --host-cache 0.26 --direct --prefetch on --warm-prompt 512 --json "$OUT/$s.json" ;;
    tier24_buffered) step $s $D --k 4 --cold --cap-fraction 0.02 --cache-experts 0.11 --host-cache 0.26 --no-direct --prefetch off --warm-prompt 512 --json "$OUT/$s.json" ;;
    tier24_buffered_prefetch) step $s $D --k 4 --cold --cap-fraction 0.02 --cache-experts 0.11 --host-cache 0.26 --no-direct --prefetch on --warm-prompt 512 --json "$OUT/$s.json" ;;
    h200_page) step $s $D --k 4 --cache-experts 0.55 --no-direct --warm-prompt 512 --json "$OUT/$s.json" ;;
    h200_tiers) step $s $D --k 4 --cache-experts 0.55 --host-cache all --direct --prefetch off --warm-prompt 512 --json "$OUT/$s.json" ;;
    h200_tiers_prefetch) step $s $D --k 4 --cache-experts 0.55 --host-cache all --direct --prefetch on --warm-prompt 512 --json "$OUT/$s.json" ;;
    h200_tiers_preload) step $s $D --k 4 --cache-experts 0.55 --host-cache all --direct --preload --warm-prompt 512 --profile "$OUT/$s.prof.txt" --json "$OUT/$s.json" ;;
    *) echo "unknown step $s" ;;
  esac
done

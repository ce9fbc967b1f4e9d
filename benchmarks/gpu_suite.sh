#!/usr/bin/env bash
# The GPU benchmark runs of docs/benchmarks.md, on the lent machine (after `source .device/install.sh`):
# a Qwen3.5-397B-shaped synthetic model, then the decode runs named in STEPS, each writing JSON (and a
# profile where it takes one) under $OUT and appending its output to $OUT/suite.log.
# Usage: STEPS="tests resident_k4 cache_k4" LAYERS=6 bash benchmarks/gpu_suite.sh
#        STEPS="dist_cap_k4 dist_k4" bash benchmarks/gpu_suite.sh   (expert-parallel ranks on the CPUs, ~4 min)
#        STEPS="dist_nccl_k4" bash benchmarks/gpu_suite.sh   (2 GPUs, nvidia-h200-x2: a rank per GPU over NCCL)
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
echo " $STEPS " | tr ' ' '\n' | grep -qv '^dist_k4$\|^dist_cap_k4$\|^$' && [ ! -f "$M/layout.json" ] && step synthetic python3 benchmarks/make_synthetic.py --out "$M" --layers "$LAYERS" --vocab 32000 --skew --resident-bits 4
D="python3 benchmarks/decode.py --model $M -g $G --threads $TH"
# Expert-parallel on this machine's CPUs and disk (issue 17): 1, 2, 4 ring ranks on a float32 copy of the
# synthetic model (MLX's CPU quantized matmul is ~14x slower with bfloat16 scales), 3 layers (12 GB of experts)
DM=${DM:-/root/syn397_f32}
DB="python3 benchmarks/distributed.py --model $DM --cpu --ranks 1 2 4 --k 4 --tokens 16 --prompt 16 --warm-prompt 64 --timeout 200"
dist_model() { [ -f "$DM/layout.json" ] || step dist_synthetic python3 benchmarks/make_synthetic.py --out "$DM" --layers "${DLAYERS:-3}" --vocab 32000 --skew --resident-bits 4 --dtype float32; }
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
    dist_k4) dist_model; step $s $DB --json "$OUT/$s.json" ;;
    dist_cap_k4) dist_model; step $s $DB --cold --cap-fraction 0.16 --json "$OUT/$s.json" ;;
    # two GPUs (nvidia-h200-x2): a rank per GPU over NCCL, each with its own device cache of its own experts
    dist_nccl_k4) step $s env NCCL_NVLS_ENABLE=0 python3 benchmarks/distributed.py --model $M --backend nccl --ranks 1 2 --k 4 --tokens 32 --prompt 16 --warm-prompt 64 --timeout 200 --json "$OUT/$s.json" ;;
    *) echo "unknown step $s" ;;
  esac
done

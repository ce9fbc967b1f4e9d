#!/usr/bin/env bash
# The GPU benchmark runs of docs/benchmarks.md, on the lent machine (after `source .device/install.sh`):
# a Qwen3.5-397B-shaped synthetic model, then the decode runs named in STEPS, each writing JSON (and a
# profile where it takes one) under $OUT and appending its output to $OUT/suite.log.
# Usage: STEPS="tests resident_k4 cache_k4" LAYERS=6 bash benchmarks/gpu_suite.sh
#
# PLAN for the next lease (30 min of device time a session; calls of <= 590 s). A fresh machine starts in ~30 s,
# but compiles MLX's CUDA kernels again (the first decode step ~100 s more than a warm one): keep ONE machine warm
# (calls back to back; idle release is 30 s; session 6 ran park + 5 calls of 137-398 s on one instance). The
# 6-layer 397B-shaped model is written in 28 s. Call A: `bash .device/install.sh park` (carry install.sh and part
# aa); every later call: `source .device/install.sh && ...` carrying install.sh, part ab, the mlx wheel and .whl
# (mlx-lm and the server wheels: `pip download -d .whl --only-binary=:all: --python-version 3.12 --implementation
# cp --platform manylinux_2_17_x86_64 fastapi uvicorn sse-starlette openai`). Ran in session 6 (docs/benchmarks.md,
# "GPU runs of session 6"): bench_vs_decode, serve_b_server, ahead_preload_k4, preload_k4_peer, preload_k10_peer,
# families_qwen3, families_dsv3 (capped run killed: fixed since), dist_cap_k4, h200_tiers(_prefetch).
# Still to run, in order of what they decide:
#  1 (~450 s) STEPS="tests_ops20" (the padding on CUDA), then G=128 T=150 STEPS="pool_probe pool_k4 pool_k10"
#             issue 20: is K=4's slowness MLX's managed 8-byte pool (docs/benchmarks.md, "Why K=4 decodes slower")?
#             If padded K=4 >= K=10, make FLASH_MOE_PAD_SMALL_OUTPUTS=1 the default and run pool_k4_peer (goal 2.0x).
#  2 (~450 s) STEPS=families_ab_qwen3, then STEPS=families_ab_dsv3   issue 16: warm, decode ahead (default) with
#             mlx-lm, then FLASH_MOE_FAMILY_EXPERTS=gather, then FLASH_MOE_ASYNC_DECODE=0 (docs/benchmarks.md "Family decode
#             vs mlx-lm"; goal >= 1.0x). Then families_dsv3 for its capped run (ratio to the I/O bound, goal >= 0.9).
#  3 (~550 s) LAYERS=6 T=150 STEPS="tier24_page tier24_direct tier24_direct_prefetch"   issue 19: the 24 GB + 64 GB
#             box: RAM-tier hits >= 2x tier24_page's page-cache hits, tiered-bound ratio >= 0.8, 60-layer projection.
#  4 (~500 s) G=128 STEPS="graphs_k4 kernels_shapes preload_k4_peer_nofuse opcount", SPLIT/DGROUPS preload_*_shapes
#  5 (~300 s) STEPS="ceiling pcc cap_k4"   issue 19 items 4-5 on the H200's disk.
#  6 (~300 s) STEPS="tests_cuda cuda_diag" TESTS_CUDA=tests/test_streaming.py, then the other TESTS_CUDA files.
# Disk (64 GB): $M at 6 layers is 22.3 GB; the float32 dist copy 12 GB; families delete their folders (--cleanup).
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
# Steps that do not read $M: a call running only these neither builds it nor spends its disk.
NO_MODEL=" tests_cuda cuda_diag families families_dsv3 families_qwen3 families_ab_qwen3 families_ab_dsv3 dist_k4 dist_cap_k4 pool_probe "
needs_m() { local s; for s in $STEPS; do case "$NO_MODEL" in *" $s "*) ;; *) return 0 ;; esac; done; return 1; }
needs_m && { [ -f "$M/layout.json" ] || step synthetic python3 benchmarks/make_synthetic.py --out "$M" --layers "$LAYERS" --vocab 32000 --skew --resident-bits 4; }
TESTS_CUDA=${TESTS_CUDA:-"tests/test_model.py tests/test_streaming.py tests/test_expert_cache.py tests/test_expert_source.py tests/test_store.py tests/test_kernels.py tests/test_load.py tests/test_prompt_cache.py"}
FAM=${FAM:-/root/fam}; FAM_ARGS=${FAM_ARGS:-}
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
    # issue 20: op counts, the fused GDN decode kernel on/off, expert launch shapes old vs new
    tests_ops20) step $s env FLASH_MOE_BACKEND=cuda python3 -m pytest -q -rf --tb=short tests/test_gdn_decode.py tests/test_route_topk.py tests/test_add_rms_norm.py tests/test_fused_decode_model.py tests/test_stacked.py tests/test_kernels.py tests/test_expert_cache.py ;;
    opcount) step $s python3 benchmarks/op_count.py --k 4 --json "$OUT/$s.json" ;;
    opcount_nofuse) step $s env FLASH_MOE_FUSED_GDN=0 FLASH_MOE_FUSED_ROUTE=0 FLASH_MOE_FUSED_ADD_NORM=0 python3 benchmarks/op_count.py --k 4 --json "$OUT/$s.json" ;;
    kernels_shapes) step $s python3 benchmarks/kernels.py --shapes ;;
    probe_preload) step $s python3 benchmarks/layer_probe.py --model $M --k 4 --preload ;;
    preload_k4_peer) step $s $D --k 4 --cache-experts all --preload --peer --json "$OUT/$s.json" ;;
    preload_k4_peer_nofuse) step $s env FLASH_MOE_FUSED_GDN=0 FLASH_MOE_FUSED_ROUTE=0 FLASH_MOE_FUSED_ADD_NORM=0 $D --k 4 --cache-experts all --preload --peer --json "$OUT/$s.json" ;;
    preload_k10_peer) step $s $D --k 10 --cache-experts all --preload --peer --json "$OUT/$s.json" ;;
    preload_k10_peer_nofuse) step $s env FLASH_MOE_FUSED_GDN=0 FLASH_MOE_FUSED_ROUTE=0 FLASH_MOE_FUSED_ADD_NORM=0 $D --k 10 --cache-experts all --preload --peer --json "$OUT/$s.json" ;;
    preload_k4_shapes) step $s env FLASH_MOE_GATE_UP_SPLIT=${SPLIT:-4} FLASH_MOE_DOWN_GROUPS=${DGROUPS:-2} $D --k 4 --cache-experts all --preload --json "$OUT/$s.json" ;;
    preload_k10_shapes) step $s env FLASH_MOE_GATE_UP_SPLIT=${SPLIT:-4} FLASH_MOE_DOWN_GROUPS=${DGROUPS:-5} $D --k 10 --cache-experts all --preload --json "$OUT/$s.json" ;;
    # issue 20: decoding ahead (generate_step builds token t+1 before reading t) on the resident model, on / off
    ahead_k4) step $s $D --k 4 --resident -g 128 -n 3 --json "$OUT/$s.json"
      step ${s}_off env FLASH_MOE_ASYNC_DECODE=0 $D --k 4 --resident -g 128 -n 3 --json "$OUT/${s}_off.json" ;;
    ahead_preload_k4) step $s $D --k 4 --cache-experts all --preload -g 128 -n 3 --json "$OUT/$s.json"
      step ${s}_off env FLASH_MOE_ASYNC_DECODE=0 $D --k 4 --cache-experts all --preload -g 128 -n 3 --json "$OUT/${s}_off.json" ;;
    # Why K=4 decodes slower than K=10 (docs/benchmarks.md, session 6). pool_*: the router's scores padded out of MLX's
    # managed 8-byte pool (FLASH_MOE_PAD_SMALL_OUTPUTS=1) against FLASH_MOE_PAD_SMALL_OUTPUTS=0 (the default, exact sizes), alternating REPS times
    # (one process to the next varied by ~15% at K=4); K=10 is the control (20-byte scores: the flag changes nothing).
    # graphs_*: MLX's CUDA graph commits (MLX_MAX_MB_PER_BUFFER counts the whole device-cache arrays: a commit after
    # every expert kernel) and no CUDA graphs at all. Run with G=128 as the numbers it answers. pool_probe: the same A/B
    # without a model, on and off alternating in one process (no model needed, ~1 min).
    pool_k4) for r in $(seq ${REPS:-2}); do
        step ${s}_on$r env FLASH_MOE_PAD_SMALL_OUTPUTS=1 $D --k 4 --cache-experts all --preload --ceiling-seconds 0.5 --json "$OUT/${s}_on$r.json"
        step ${s}_off$r env FLASH_MOE_PAD_SMALL_OUTPUTS=0 $D --k 4 --cache-experts all --preload --ceiling-seconds 0.5 --json "$OUT/${s}_off$r.json"
      done ;;
    pool_probe) step $s python3 benchmarks/pool_probe.py --layers 6 --tokens 300 --rounds 4 ;;
    pool_k10) step $s env FLASH_MOE_PAD_SMALL_OUTPUTS=1 $D --k 10 --cache-experts all --preload --ceiling-seconds 0.5 --json "$OUT/$s.json" ;;
    pool_k4_peer) step $s env FLASH_MOE_PAD_SMALL_OUTPUTS=1 $D --k 4 --cache-experts all --preload --peer --ceiling-seconds 0.5 --json "$OUT/$s.json" ;;
    graphs_k4) for k in 4 10; do
        step ${s}_mb_k$k env MLX_MAX_MB_PER_BUFFER=1000000 $D --k $k --cache-experts all --preload --ceiling-seconds 0.5 --json "$OUT/${s}_mb_k$k.json"
        step ${s}_off_k$k env MLX_USE_CUDA_GRAPHS=0 $D --k $k --cache-experts all --preload --ceiling-seconds 0.5 --json "$OUT/${s}_off_k$k.json"
      done ;;
    ceiling) step $s python3 benchmarks/disk_ceiling.py $M ;;
    pcc) step $s python3 benchmarks/page_cache_cap.py --model $M --rounds 3 --variants base readahead direct whole threads4 threads32 ;;
    tests_cuda) T=${T_TESTS:-540} step $s env FLASH_MOE_BACKEND=cuda python3 -m pytest -q -rf --tb=short $TESTS_CUDA ${TESTS_MORE:-} ${TESTS_K:+-k "$TESTS_K"} ;;
    cuda_diag) T=200 step $s python3 benchmarks/cuda_diag.py
      T=120 step ${s}_gdn_ops env FLASH_MOE_GDN=ops FLASH_MOE_BACKEND=cuda python3 -m pytest -q -rf --tb=line tests/test_model.py -k interval2_e16_top4 ;;
    families|families_dsv3|families_qwen3)  # one family at a time: each removes its folders (disk) when done
      [ $s = families_qwen3 ] || T=${T_FAM:-540} step families_dsv3 python3 benchmarks/families_decode.py --family deepseek_v3 \
        --layers ${DS_LAYERS:-3} --work "$FAM" --cleanup --json "$OUT/families_dsv3.json" $FAM_ARGS
      [ $s = families_dsv3 ] || T=${T_FAM:-400} step families_qwen3 python3 benchmarks/families_decode.py --family qwen3_moe \
        --layers ${QW_LAYERS:-4} --work "$FAM" --cleanup --json "$OUT/families_qwen3.json" $FAM_ARGS ;;
    families_ab_qwen3|families_ab_dsv3)  # issue 16, session 6: warm only; decode ahead (default) vs read-first, fused vs gather
      if [ $s = families_ab_qwen3 ]; then fam=qwen3_moe; n=${QW_LAYERS:-4}; else fam=deepseek_v3; n=${DS_LAYERS:-2}; fi
      W="python3 benchmarks/families_decode.py --family $fam --layers $n --work $FAM --cap-fraction -1 $FAM_ARGS"
      T=${T_FAM:-400} step ${s}_on $W --json "$OUT/${s}_on.json"
      T=${T_AB:-200} step ${s}_gather env FLASH_MOE_FAMILY_EXPERTS=gather $W --no-peer --json "$OUT/${s}_gather.json"
      T=${T_AB:-200} step ${s}_readfirst env FLASH_MOE_ASYNC_DECODE=0 $W --no-peer --json "$OUT/${s}_readfirst.json"
      rm -rf "$FAM/$fam" "$FAM/$fam-src" ;;
    serve_b) T=${T_SERVE:-420} step $s python3 benchmarks/serve.py --engine --model $M --k 4 --tokens 24 --cap-fraction 0.16 --cache-experts 0
      if python3 -c "import fastapi, uvicorn, openai" 2>/dev/null; then  # the server and its clients
        T=150 step ${s}_server python3 benchmarks/serve.py --model $M --k 4 --tokens 64 --batches 1 --cache-experts 0
      else echo "=== ${s}_server skipped: fastapi, uvicorn or openai missing (put their wheels in .whl/)" | tee -a "$OUT/suite.log"; fi ;;
    serve_b_server) T=${T_SERVE:-200} step $s python3 benchmarks/serve.py --model $M --k 4 --tokens 64 --batches 1 --cache-experts 0 ;;
    bench_vs_decode) step ${s}_decode python3 benchmarks/decode.py --model $M --k 4 -p 64 -g 64 -n 3 --cache-experts ${BV_CACHE:-0} --json "$OUT/$s.json"
      step ${s}_bench python3 -m flash_moe bench --model $M -p 64 -g 64 -n 3 --k 4 --cache-experts ${BV_CACHE:-0} ;;
    dist_k4) dist_model; step $s $DB --json "$OUT/$s.json" ;;
    dist_cap_k4) dist_model; step $s $DB --cold --cap-fraction 0.16 --json "$OUT/$s.json" ;;
    # two GPUs (nvidia-h200-x2): a rank per GPU over NCCL, each with its own device cache of its own experts
    dist_nccl_k4) step $s env NCCL_NVLS_ENABLE=0 python3 benchmarks/distributed.py --model $M --backend nccl --ranks 1 2 --k 4 --tokens 32 --prompt 16 --warm-prompt 64 --timeout 200 --json "$OUT/$s.json" ;;
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

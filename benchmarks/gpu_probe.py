"""Two questions for the GPU run (docs/benchmarks.md): does slice_update donate on this backend,
and how much of a prefill is first-time compilation of new shapes?"""

import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

a = mx.zeros((1024, 1024, 256), mx.uint32)  # 1 GiB
mx.eval(a)
u = mx.ones((1, 1024, 256), mx.uint32)
for i in range(4):
    t = time.perf_counter()
    a = mx.slice_update(a, u, mx.array([i]), axes=(0,))
    mx.eval(a)
    print(f"slice_update of 1 MiB into 1 GiB: {1e3 * (time.perf_counter() - t):.2f} ms")
del a

if len(sys.argv) > 1:
    from flash_moe import load
    from benchmarks.decode import decode_trial

    model = load(sys.argv[1], experts_per_token=4, threads=16)
    for n in (64, 64, 48, 64):
        r = decode_trial(model, n, 2, seed=n)
        print(f"prefill {n} tokens: {r['prompt_tps']:.1f} tok/s ({r['io']['experts']} experts read)")

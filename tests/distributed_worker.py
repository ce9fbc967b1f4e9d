"""One rank of tests/test_distributed.py (started with MLX_RANK / MLX_HOSTFILE, or by ``mlx.launch``).

    python tests/distributed_worker.py FOLDER OUT.npz SPEC_JSON

SPEC: {"tokens": [...] (prompt ids), "decode": [...] (ids fed one at a time after the prompt), "new": n (greedy
tokens), "stop_after": m (a second generation whose consumer stops after m tokens), "load": {load kwargs}};
or {"tokens": [...], "forever": true}: generate until a rank dies, rank 0 printing each token.
Every rank computes the same things and saves what it saw, with its store's read counters, to OUT.npz
(``{rank}`` in OUT is replaced by the rank).
"""

import json
import sys

import mlx.core as mx
import numpy as np

from flash_moe import load
from flash_moe.generate import generate_step


def main(folder, out, spec):
    spec = json.loads(spec)
    model = load(folder, **spec.get("load", {}))
    p = model.parallel
    if spec.get("forever"):  # until a rank dies: a line per token on rank 0
        for t, _ in generate_step(mx.array(spec["tokens"], mx.int32), model, max_tokens=10**9):
            if p.rank == 0:
                print(t, flush=True)
        return
    tokens = mx.array(spec["tokens"], mx.int32)[None]
    cache = model.make_cache()
    prefill = model(tokens, cache).astype(mx.float32)
    decode = [model(mx.array([[t]], mx.int32), cache).astype(mx.float32) for t in spec["decode"]]
    mx.eval(prefill, decode)  # every rank evaluates the same collectives
    greedy = [t for t, _ in generate_step(mx.array(spec["tokens"], mx.int32), model, max_tokens=spec["new"])]
    stopped = []
    for t, _ in generate_step(mx.array(spec["tokens"][:3], mx.int32), model, max_tokens=1000):
        stopped.append(t)
        if len(stopped) == spec["stop_after"]:
            break  # the consumer stops: rank 0 tells the others
    again = [t for t, _ in generate_step(mx.array(spec["tokens"][::-1], mx.int32), model, max_tokens=3)]
    s = model.store.stats
    np.savez(out.replace("{rank}", str(p.rank if p else 0)), prefill=np.array(prefill), decode=np.array(mx.stack(decode)),
             greedy=np.array(greedy), stopped=np.array(stopped), again=np.array(again), usage=s.usage, bytes=s.bytes,
             owners=np.stack([p.owners[l] for l in sorted(p.owners)]) if p else np.zeros(0),
             size=p.size if p else 1)
    model.close()


if __name__ == "__main__":
    main(*sys.argv[1:])

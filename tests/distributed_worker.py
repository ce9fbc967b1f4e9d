"""One rank of tests/test_distributed.py (started with MLX_RANK / MLX_HOSTFILE, or by ``mlx.launch``).

    python tests/distributed_worker.py FOLDER OUT.npz SPEC_JSON

SPEC: {"tokens": [...] (prompt ids), "decode": [...] (ids fed one at a time after the prompt), "new": n (greedy
tokens), "stop_after": m (a second generation whose consumer stops after m tokens), "load": {load kwargs}};
or {"tokens": [...], "forever": true}: generate until a rank dies, rank 0 printing each token;
or {"tokens": [...], "extra": [...], "turns": true}: chat-like turns on one prompt cache (see ``turns``).
Every rank computes the same things and saves what it saw, with its store's read counters, to OUT.npz
(``{rank}`` in OUT is replaced by the rank).
"""

import json
import signal
import sys

import mlx.core as mx
import numpy as np

from flash_moe import load
from flash_moe.distributed import ParallelError
from flash_moe.generation import generate_step
from flash_moe.prompt_cache import load_prompt_cache, save_prompt_cache


def turns(model, spec, out):
    """Turns on one prompt cache, each prompt continuing the last (turn 3 diverges inside the cache, back to a
    checkpoint); turn 4 is stopped by a Ctrl-C on rank 0 at its second token; then a cache loaded on rank 0
    alone (the followers cannot mirror it: a ParallelError on every rank), and a turn after that."""
    lead = model.parallel.rank == 0
    ids, extra = list(spec["tokens"]), list(spec["extra"])
    cache = model.make_prompt_cache()
    calls = []

    def interrupt(tokens, logits):  # rank 0's Ctrl-C, inside the second step's forward pass
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return logits

    def turn(prompt, n, processors=(), use=cache, marks=()):
        reused = use.reusable(prompt)
        got, first = [], None
        try:
            for t, lp in generate_step(mx.array(prompt, mx.int32), model, max_tokens=n, prompt_cache=use,
                                       logits_processors=processors, checkpoint_at=marks):
                got.append(t)
                first = lp if first is None else first
            stop = "done"
        except KeyboardInterrupt:
            stop = "interrupted"
        except ParallelError as e:
            stop = str(e)
        return dict(prompt=prompt, tokens=got, reused=reused, stop=stop,
                    first=None if first is None else np.array(first).tolist())

    runs = [turn(ids, 4, marks=(len(ids) - 3,))]
    runs.append(turn(ids + runs[-1]["tokens"] + extra, 4))
    runs.append(turn(ids[:-2] + extra, 3))  # diverges inside the cache: back to the checkpoint
    runs.append(turn(runs[-1]["prompt"] + runs[-1]["tokens"] + extra, 50, [interrupt] if lead else ()))
    runs.append(turn(runs[-1]["prompt"] + runs[-1]["tokens"] + extra, 3))
    if lead:
        save_prompt_cache(out + ".cache.safetensors", cache, model)
    loaded = load_prompt_cache(out + ".cache.safetensors", model) if lead else model.make_prompt_cache()
    runs.append(turn(runs[-1]["prompt"] + runs[-1]["tokens"] + extra, 3, use=loaded))
    runs.append(turn(runs[-2]["prompt"] + runs[-2]["tokens"] + extra, 3))
    with open(out, "w") as f:
        json.dump(runs, f)


def main(folder, out, spec):
    spec = json.loads(spec)
    model = load(folder, **spec.get("load", {}))
    p = model.parallel
    if spec.get("turns"):
        turns(model, spec, out.replace("{rank}", str(p.rank)))
        model.close()
        return
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

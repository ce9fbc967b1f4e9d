"""Expert-parallel streaming (issue 17 proof): ranks on localhost with MLX's ring backend (CPU).

A tiny random model is written in the converted format (``flash_moe.synthetic``; float32, so the split and
the single process agree to float rounding) with the demo's tokenizer beside it. Ranks run as separate
processes started the way ``mlx.launch`` starts them (``MLX_RANK`` + a ring hostfile on free ports), or by
``mlx.launch`` itself for the command line. Every subprocess runs under a timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import derive_seed, seed_note

import flash_moe.demo
from flash_moe import load
from flash_moe.checkpoint import CheckpointError
from flash_moe.distributed import USAGE_FILE, assign_experts, read_usage, record_usage
from flash_moe.expert_cache import ExpertCache
from flash_moe.generation import generate_step
from flash_moe.streaming import StreamingExperts

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
TOL = 1e-5  # float32, same bytes: only the order of the sums differs
TIMEOUT = 90  # per launched run (seconds); a hang fails the test instead of the suite
WATCHDOG = 4  # FLASH_MOE_PARALLEL_TIMEOUT of the ranks: MLX's ring can hang when a peer dies


def write_model(dst: Path, bits: int, seed: int) -> Path:
    """The demo's shapes (hidden 128, 16 experts, top-4, 4 layers, vocab 4096), random float32 weights."""
    from flash_moe.synthetic import write_synthetic

    config = json.loads((flash_moe.demo.ASSETS / "config.json").read_text())
    write_synthetic(dst, config, bits=bits, dtype="float32", skew=0.5, seed=seed, progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copyfile(flash_moe.demo.ASSETS / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made = {}

    def get(bits: int) -> Path:
        if bits not in made:
            made[bits] = write_model(tmp_path_factory.mktemp(f"model{bits}"), bits, derive_seed(f"distributed{bits}"))
        return made[bits]

    return get


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_ranks(n: int, argv: list[str], tmp: Path, to_files: bool = False,
                watchdog: float = WATCHDOG) -> list[subprocess.Popen]:
    """``n`` processes on a localhost ring, as ``mlx.launch --backend ring`` starts them. ``to_files``: each
    rank's stdout and stderr go to ``tmp/rank{r}.out`` / ``.err`` (a long run would fill a pipe and block)."""
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    procs = []
    for rank in range(n):
        env = dict(os.environ, MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile), PYTHONPATH=str(REPO),
                   TQDM_DISABLE="1", FLASH_MOE_PARALLEL_TIMEOUT=str(watchdog))
        env.pop("FLASH_MOE_DEBUG", None)
        if to_files:
            out, err = open(tmp / f"rank{rank}.out", "w"), open(tmp / f"rank{rank}.err", "w")
        else:
            out = err = subprocess.PIPE
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=REPO, stdout=out, stderr=err, text=True))
        if to_files:
            out.close(), err.close()
    return procs


def finish(procs, timeout=TIMEOUT) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + timeout
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- assignment and usage statistics -------------------------------------------------------------------


def test_round_robin_assignment():
    owners = assign_experts([0, 1, 3], 16, 3)
    for i, layer in enumerate([0, 1, 3]):
        counts = np.bincount(owners[layer], minlength=3)
        assert counts.sum() == 16 and counts.max() - counts.min() <= 1
        assert owners[layer][0] == i % 3  # rotated per layer: the extra expert does not always land on rank 0
    assert np.array_equal(assign_experts([0], 8, 1)[0], np.zeros(8))


def test_balanced_assignment(seed):
    rng = np.random.default_rng(seed)
    counts = (1000 * rng.pareto(1.5, size=64)).astype(np.int64)  # a few very popular experts
    for size in (2, 3, 4):
        owner = assign_experts([0], 64, size, {0: counts})[0]
        load = np.bincount(owner, weights=counts, minlength=size)
        # greedy, most popular first: the spread is at most one expert's count
        assert load.max() - load.min() <= counts.max(), seed_note(seed)
        rr = np.bincount(assign_experts([0], 64, size)[0], weights=counts, minlength=size)
        assert load.max() <= rr.max(), seed_note(seed)
    flat = assign_experts([0], 8, 2, {0: np.zeros(8, np.int64)})[0]  # no traffic recorded: equal counts
    assert np.bincount(flat).tolist() == [4, 4]


@pytest.mark.parametrize("bad, why", [
    ({"format": "other", "version": 1, "layers": {}}, "not a usage file"),
    ({"format": "flash_moe-usage", "version": 9, "layers": {}}, "version 9"),
    ({"format": "flash_moe-usage", "version": 1, "layers": {"0": [1] * 16, "1": [1] * 16, "2": [1] * 16}},
     "layer 3 needs 16"),
    ({"format": "flash_moe-usage", "version": 1, "layers": {str(l): [1] * 15 + [-1] for l in range(4)}},
     "layer 0 needs 16 non-negative"),
    ({"format": "flash_moe-usage", "version": 1, "layers": {str(l): [1] * 16 for l in range(5)}},
     "layers 4 are not MoE layers"),
])
def test_usage_file_errors_name_the_file(tmp_path, bad, why):
    (tmp_path / USAGE_FILE).write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=why) as e:
        read_usage(tmp_path, [0, 1, 2, 3], 16)
    assert str(tmp_path / USAGE_FILE) in str(e.value)


def test_no_usage_file_means_round_robin(tmp_path):
    assert read_usage(tmp_path, [0], 16) is None


def test_record_usage_counts_every_routing_choice(models, tmp_path, seed):
    """Counts = routing choices: with one token per chunk each fetch reads a token's K distinct experts once,
    so the store's own usage counters are an independent tally of the same thing."""
    folder = models(16)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 4096, size=40).tolist()
    model = load(folder, experts_per_token=3)
    try:
        path = record_usage(model, ids, path=tmp_path / USAGE_FILE, prefill_step_size=1)
        usage = read_usage(tmp_path, [0, 1, 2, 3], 16)
        for layer in range(4):
            assert usage[layer].sum() == len(ids) * 3
            assert np.array_equal(usage[layer], model.stats.usage[layer]), seed_note(seed)
        data = json.loads(path.read_text())
        assert data["tokens"] == 40 and data["experts_per_token"] == 3
        # the experts providers are restored: the model still generates
        assert len([t for t, _ in generate_step(mx.array(ids[:4], mx.int32), model, max_tokens=2)]) == 2
    finally:
        model.close()


# ---- the split arithmetic in one process ---------------------------------------------------------------


@pytest.mark.parametrize("tokens, slots, cached", [(1, None, 0), (12, 4, 0), (12, None, 0), (5, None, 12)])
def test_rank_shares_add_up(models, seed, tokens, slots, cached):
    """Each rank's StreamingExperts (owned experts only) summed over ranks = the whole layer's output, and a
    rank reads only what it owns: decode (one token), a chunk read in slot groups, one group, the device cache."""
    folder = models(4)
    rng = np.random.default_rng(seed)
    full = load(folder, group=None, slots=slots, cache_experts=0)
    x = mx.array(rng.standard_normal((tokens, 128)).astype(np.float32))
    inds = mx.array(np.stack([rng.choice(16, 4, replace=False) for _ in range(tokens)]).astype(np.int32))
    scores = mx.softmax(mx.array(rng.standard_normal((tokens, 4)).astype(np.float32)), axis=-1)
    want = np.array(StreamingExperts(full.store, 0)(x, inds, scores))
    owners = assign_experts([0], 16, 3)[0]
    total = np.zeros_like(want)
    for rank in range(3):
        part = load(folder, group=None, slots=slots, cache_experts=0)
        cache = ExpertCache(part.store, cached, owned={0: owners == rank}) if cached else None
        experts = StreamingExperts(part.store, 0, cache, owned=owners == rank)
        total += np.array(experts(x, inds, scores))
        read = part.stats.usage[0]  # exactly the routed experts this rank owns (none, at times, for one token)
        routed = np.zeros(16, bool)
        routed[np.array(inds).ravel()] = True
        assert np.array_equal(read > 0, routed & (owners == rank)), seed_note(seed)
        part.close()
    full.close()
    assert rel_err(total, want) <= TOL, seed_note(seed)


def test_cache_preloads_owned_experts_only(models):
    model = load(models(4), group=None, cache_experts=0)
    owned = {l: assign_experts([0, 1, 2, 3], 16, 2)[l] == 1 for l in range(4)}
    cache = ExpertCache(model.store, 64, owned=owned)
    assert cache.preload() == 32 and not cache.speculate
    for l in range(4):
        assert model.stats.usage[l][~owned[l]].sum() == 0 and (model.stats.usage[l][owned[l]] == 1).all()
    model.close()


def test_resident_checkpoint_refuses_a_group(tmp_path):
    class Two:
        def size(self):
            return 2

    with pytest.raises(ValueError, match="needs a converted folder"):
        load(flash_moe.demo.ASSETS, group=Two())  # a Hugging Face checkpoint: resident experts


class FakeGroup:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_watchdog_ends_a_stuck_rank(tmp_path):
    """A rank that stays inside a generation without progress is ended, with one line naming it; beats and
    leaving the generation keep it alive."""
    script = textwrap.dedent("""
        import time
        from flash_moe.distributed import Parallel
        p = Parallel(G(1, 3), {}, timeout=1.0)  # G: a stand-in group, rank 1 of 3
        p.busy(True)
        for _ in range(8):  # 1.6 s of beats, more than the timeout
            time.sleep(0.2)
            p.beat()
        p.busy(False)
        time.sleep(1.5)  # idle: not watched
        print("alive", flush=True)
        p.busy(True)
        time.sleep(30)  # stuck: the watchdog ends us
        print("not ended")
    """)
    fake = "class G:\n    def __init__(self, r, n): self.r, self.n = r, n\n" \
           "    def rank(self): return self.r\n    def size(self): return self.n\n"
    run = subprocess.run([sys.executable, "-c", fake + script], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    assert run.stdout == "alive\n" and run.returncode != 0, (run.stdout, run.stderr)
    assert "flash-moe: rank 1 of 3: no progress in an expert-parallel generation for 1 s" in run.stderr


def test_watchdog_timeout_must_be_a_number(models, monkeypatch):
    from flash_moe.distributed import plan
    from flash_moe.layout import ModelLayout

    folder = models(16)
    monkeypatch.setenv("FLASH_MOE_PARALLEL_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="FLASH_MOE_PARALLEL_TIMEOUT='soon'"):
        plan(FakeGroup(0, 2), folder, ModelLayout.read(folder))


# ---- ranks on a localhost ring --------------------------------------------------------------------------


@pytest.mark.parametrize("ranks, bits, options", [
    (2, 16, {"slots": 4, "cache_experts": 0}),
    (3, 4, {"cache_experts": 6, "experts_per_token": 6}),
])
def test_ranks_match_single_process(models, tmp_path, seed, ranks, bits, options):
    """Logits of a prefill and of cached decode steps, greedy continuations (one whole, one stopped by the
    caller, one after it), equal on every rank and to one process; each rank reads only its own experts."""
    folder = models(bits)
    rng = np.random.default_rng(seed)
    spec = {"tokens": rng.integers(0, 4096, 9).tolist(), "decode": rng.integers(0, 4096, 3).tolist(), "new": 6,
            "stop_after": 2, "load": options}
    out = str(tmp_path / "rank{rank}.npz")
    runs = finish(start_ranks(ranks, [str(WORKER), str(folder), out, json.dumps(spec)], tmp_path))
    for rank, (code, _, err) in enumerate(runs):
        assert code == 0, f"rank {rank}: {err}"
        assert f"expert-parallel rank {rank} of {ranks}: owns" in err
    got = [np.load(out.format(rank=r)) for r in range(ranks)]

    model = load(folder, group=None, **options)
    cache = model.make_cache()
    prefill = np.array(model(mx.array(spec["tokens"], mx.int32)[None], cache))
    decode = np.stack([np.array(model(mx.array([[t]], mx.int32), cache)) for t in spec["decode"]])
    prompt = mx.array(spec["tokens"], mx.int32)
    greedy = [t for t, _ in generate_step(prompt, model, max_tokens=spec["new"])]
    stopped = [t for t, _ in generate_step(prompt[:3], model, max_tokens=spec["stop_after"])]
    again = [t for t, _ in generate_step(prompt[::-1], model, max_tokens=3)]
    single_usage = model.stats.usage.copy()
    model.close()

    for r, g in enumerate(got):
        for key in ("prefill", "decode", "greedy", "stopped", "again"):
            assert np.array_equal(g[key], got[0][key]), (r, key)  # every rank holds the same results
        mine = g["owners"] == r
        assert g["usage"][~mine].sum() == 0 and g["usage"][mine].sum() > 0, r
    assert rel_err(got[0]["prefill"], prefill) <= TOL, seed_note(seed)
    assert rel_err(got[0]["decode"], decode) <= TOL, seed_note(seed)
    assert got[0]["greedy"].tolist() == greedy, seed_note(seed)
    assert got[0]["stopped"].tolist() == stopped and got[0]["again"].tolist() == again, seed_note(seed)
    if not options.get("cache_experts"):  # same routing, same chunks: the ranks' reads add up to one process's
        assert np.array_equal(sum(g["usage"] for g in got), single_usage), seed_note(seed)


def test_prompt_cache_turns_match_single_process(models, tmp_path, seed):
    """Chat-like turns on one prompt cache under 2 ranks: every rank reuses the same prefix (a continuation,
    a divergence back to a checkpoint), and each turn's tokens and first logprobs equal one process's run
    of the whole prompt without a cache. A Ctrl-C on rank 0 mid-reply stops every rank after that step, and
    the next turn goes on; a cache loaded on rank 0 alone is a ParallelError on every rank, not a hang."""
    folder = models(16)
    rng = np.random.default_rng(seed)
    spec = {"tokens": rng.integers(0, 4096, 9).tolist(), "extra": rng.integers(0, 4096, 3).tolist(), "turns": True,
            "load": {"slots": 4, "cache_experts": 0}}
    out = str(tmp_path / "rank{rank}.json")
    runs = finish(start_ranks(2, [str(WORKER), str(folder), out, json.dumps(spec)], tmp_path))
    for rank, (code, _, err) in enumerate(runs):
        assert code == 0, f"rank {rank}: {err}"
    lead, follower = (json.loads(Path(out.format(rank=r)).read_text()) for r in range(2))
    n = len(spec["tokens"])
    same = [i for i in range(len(lead)) if i != 5]  # 5: the cache loaded on rank 0 alone
    assert [lead[i]["reused"] for i in same] == [follower[i]["reused"] for i in same]  # the mirror decides alike
    assert lead[5]["reused"] > 0 and follower[5]["reused"] == 0
    assert [r["reused"] for r in lead[:3]] == [0, n + 3, n - 3], seed_note(seed)
    assert lead[3]["stop"] == "interrupted" and len(lead[3]["tokens"]) == 2  # Ctrl-C in the 2nd step
    assert follower[3]["stop"] == "done" and follower[3]["tokens"] == lead[3]["tokens"]
    for r in (lead[5], follower[5]):
        assert "prompt cache holds other tokens than rank 0's" in r["stop"] and not r["tokens"], r
    assert lead[4]["reused"] > 0 and lead[6]["reused"] > 0
    model = load(folder, group=None, slots=4, cache_experts=0)
    for i, (a, b) in enumerate(zip(lead, follower)):
        if i == 5:
            continue
        assert a["stop"] in ("done", "interrupted") and a["tokens"] == b["tokens"], i
        alone = [(t, np.array(lp)) for t, lp in generate_step(mx.array(a["prompt"], mx.int32), model,
                                                               max_tokens=len(a["tokens"]))]
        assert a["tokens"] == [t for t, _ in alone], (i, seed_note(seed))
        assert rel_err(a["first"], alone[0][1]) <= TOL, (i, seed_note(seed))
    model.close()


def mlx_launch(n: int, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).with_name("mlx.launch")
    assert launcher.exists(), f"{launcher}: missing (mlx installs mlx.launch beside its python)"
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    env.pop("FLASH_MOE_DEBUG", None)
    return subprocess.run([str(launcher), "-n", str(n), "--backend", "ring", "--starting-port", str(free_ports(1)[0]),
                           sys.executable, "-m", "flash_moe", *args], input=stdin, capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=TIMEOUT)


def test_cli_generate_under_mlx_launch(models):
    """``mlx.launch -n 2 --backend ring -- python -m flash_moe generate ...``: rank 0 prints the text, once,
    the same as one process; the other rank prints nothing on stdout."""
    folder = models(16)
    run = mlx_launch(2, ["generate", "--model", str(folder), "--prompt", "def main", "--max-tokens", "8", "--raw",
                         "--timing"])
    model = load(folder, group=None)
    want = model.generate("def main", max_tokens=8)
    model.close()
    assert run.stdout == want + "\n", run.stderr
    assert run.stderr.count("generation: 8 tokens") == 1 and " comm " in run.stderr, run.stderr


def test_cli_chat_under_mlx_launch(models):
    """Chat: rank 0 reads the turns (mlx.launch hands stdin to every rank; the others ignore it) and prints
    the same conversation as one process."""
    folder = models(16)
    args = ["chat", "--model", str(folder), "--no-tools", "--max-tokens", "4", "--no-think"]
    stdin = "hello\nand then?\n/exit\n"
    split = mlx_launch(2, args, stdin)
    alone = subprocess.run([sys.executable, "-m", "flash_moe", *args], input=stdin, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, timeout=TIMEOUT)
    assert alone.returncode == 0 and alone.stdout.count(">>> ") == 3, alone.stderr
    assert split.stdout == alone.stdout, split.stderr


def test_cli_prompt_cache_under_mlx_launch(models, tmp_path):
    """``cache-prompt`` split (rank 0 writes the file), then ``generate --prompt-cache`` split (every rank loads
    it, the followers' copies mirror rank 0's): the text equals one process's, with the cached tokens reused."""
    folder, cached = models(16), tmp_path / "doc.safetensors"
    run = mlx_launch(2, ["cache-prompt", "--model", str(folder), "--prompt", "def main(args):", "--raw",
                         "--out", str(cached)])
    assert run.returncode == 0 and "prompt tokens cached" in run.stdout, run.stderr
    args = ["generate", "--model", str(folder), "--prompt-cache", str(cached), "--prompt", " return", "--raw",
            "--max-tokens", "6"]
    split = mlx_launch(2, args)
    alone = subprocess.run([sys.executable, "-m", "flash_moe", *args], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, timeout=TIMEOUT)
    reused = re.search(r"tokens \((\d+) cached\)", alone.stderr)
    assert alone.returncode == 0 and reused and int(reused[1]) > 0, alone.stderr
    assert split.returncode == 0 and split.stdout == alone.stdout, split.stderr
    assert re.findall(r"tokens \((\d+) cached\)", split.stderr) == [reused[1]], split.stderr


@pytest.mark.parametrize("ranks, victim", [(2, 1), (3, 0)])
def test_killed_rank_fails_the_others(models, tmp_path, ranks, victim):
    """A rank killed mid-generation: the others end within the timeout (never with success) with a clear line
    naming their rank."""
    spec = {"tokens": [1, 2, 3], "forever": True, "load": {}}
    procs = start_ranks(ranks, [str(WORKER), str(models(16)), "-", json.dumps(spec)], tmp_path, to_files=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (tmp_path / "rank0.out").stat().st_size:  # rank 0 prints tokens: generation is under way
            assert procs[0].poll() is None and time.monotonic() < deadline, (tmp_path / "rank0.err").read_text()
            time.sleep(0.05)
        procs[victim].send_signal(signal.SIGKILL)
        start = time.monotonic()
        for rank, p in enumerate(procs):
            if rank == victim:
                continue
            p.wait(timeout=WATCHDOG + 20)
            err = (tmp_path / f"rank{rank}.err").read_text()
            assert p.returncode not in (0, None), err
            # the backend's error, a protocol word the dead rank never sent (the ring may return zeros
            # instead of failing), or the watchdog's line when the ring hangs
            assert (f"ParallelError: rank {rank} of {ranks}: " in err
                    or f"flash-moe: rank {rank} of {ranks}: no progress" in err), err
            assert "another rank stopped" in err, err
        assert time.monotonic() - start < WATCHDOG + 20
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()

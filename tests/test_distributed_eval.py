"""``flash-moe eval`` and ``flash-moe bench`` under ``mlx.launch -n 2 --backend ring`` (issue 17): every rank runs
the same command in step, rank 0 alone reports; the numbers that do not depend on time equal one process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import derive_seed
from test_distributed import REPO, TIMEOUT, mlx_launch, write_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("eval_model"), 4, derive_seed("distributed_eval"))


def alone(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flash_moe", *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1"), timeout=TIMEOUT)


def test_eval_under_mlx_launch(folder, tmp_path):
    """Perplexity, KL and top-1 of two K values against K=4: rank 0 prints one table and writes the JSON; the
    split's numbers equal one process's (float32 model, sums in another order only)."""
    args = ["eval", "--model", str(folder), "--k", "2,4", "--max-tokens", "160", "--context", "64", "--stride", "32",
            "--decode-tokens", "2"]
    split = mlx_launch(2, args + ["--json", str(tmp_path / "split.json")])
    single = alone(args + ["--json", str(tmp_path / "alone.json")])
    assert single.returncode == 0, single.stderr
    assert split.returncode == 0, split.stderr
    assert split.stdout.count("perplexity") == single.stdout.count("perplexity") == 1, split.stdout  # one table, from rank 0
    got, want = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("split", "alone"))
    got, want = (r if isinstance(r, list) else r["rows"] for r in (got, want))
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g["k"] == w["k"] and g["tokens"] == w["tokens"]
        for key in ("perplexity", "top1"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), (key, g, w)
        assert g["kl"] == pytest.approx(w["kl"], rel=1e-3, abs=1e-6), (g, w)
        assert 0 < g["bytes_per_token"] < w["bytes_per_token"]  # rank 0 reads only its own experts


def test_bench_under_mlx_launch(folder):
    """Rank 0 prints the trials once and says whose reads they are; the other rank prints nothing."""
    split = mlx_launch(2, ["bench", "--model", str(folder), "-p", "8", "-g", "4", "-n", "2", "--k", "3"])
    assert split.returncode == 0, split.stderr
    assert split.stdout.count("Trial 1:") == 1 and split.stdout.count("Averages:") == 1, split.stdout
    assert "expert-parallel: 2 ranks; the expert reads above are rank 0's share" in split.stdout

"""``flash-moe bench`` (issue 15) on the demo model, CI-sized: mlx_lm.benchmark's keys per trial and averaged,
expert reads per token that match K x MoE layers, page-cache and device-cache hit rates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flash_moe import load
from flash_moe.cli import main
from flash_moe.eval.bench import KEYS, bench
from flash_moe.layout import ModelLayout


def test_bench_reads_k_experts_per_moe_layer(demo_folder):
    layout = ModelLayout.read(demo_folder)
    model = load(demo_folder, cache_experts=0)
    seen = []
    result = bench(model, prompt_tokens=8, generation_tokens=4, trials=2, k=2, on_trial=lambda i, r: seen.append(i))
    assert seen == [0, 1] and len(result["trials"]) == 2 and result["k"] == 2
    assert model.experts_per_token == 4  # restored
    for row in result["trials"]:
        assert set(row) == set(KEYS)
        assert row["prompt_tps"] > 0 and row["generation_tps"] > 0 and row["peak_memory"] > 0
        assert row["experts_per_token"] == 2 * len(layout.moe_layers)
        assert row["bytes_per_token"] == row["experts_per_token"] * layout.expert.expert_bytes
        assert 0 <= row["page_cache_hit_rate"] <= 1 and np.isnan(row["device_cache_hit_rate"])
    for key in KEYS:
        if key != "device_cache_hit_rate":
            assert result["average"][key] == pytest.approx(np.mean([r[key] for r in result["trials"]]))
    model.close()


def test_bench_device_cache_holding_every_expert(demo_folder):
    """With every expert in the device cache (preloaded), generated tokens read nothing from the store."""
    model = load(demo_folder, cache_experts="all", preload=True)
    row = bench(model, prompt_tokens=8, generation_tokens=3, trials=1)["trials"][0]
    assert row["device_cache_hit_rate"] == 1.0
    assert row["experts_per_token"] == 0 and row["bytes_per_token"] == 0
    model.close()


def test_cli_bench_prints_trials_and_json(demo_folder, tmp_path, capsys):
    main(["bench", "--model", str(demo_folder), "-p", "6", "-g", "3", "-n", "2", "--k", "1"])
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["Trial 1", "Trial 2", "Averages"]
    assert all("prompt_tps=" in line and "generation_tps=" in line and "peak_memory=" in line for line in out)
    main(["bench", "--model", str(demo_folder), "-p", "6", "-g", "3", "-n", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["k"] == 4 and result["average"]["device_cache_hit_rate"] is None
    main(["bench", "--model", str(demo_folder), "-p", "6", "-g", "3", "-n", "1", "--json", str(tmp_path / "b.json")])
    assert json.loads((tmp_path / "b.json").read_text())["trials"][0]["experts_per_token"] == 16


@pytest.mark.parametrize("flag,value,message", [("-g", "1", "-g must be at least 2"), ("-n", "0", "-n must be at least 1"),
                                                ("-p", "0", "-p must be at least 1")])
def test_cli_bench_rejects_bad_sizes(demo_folder, flag, value, message):
    with pytest.raises(SystemExit, match=message):
        main(["bench", "--model", str(demo_folder), flag, value])

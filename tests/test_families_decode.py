"""The issue-16 GPU benchmark at test size: synthetic family checkpoints (benchmarks/family_synthetic.py) are
mlx-lm's and ours on the same weights, and benchmarks/families_decode.py runs end to end.

The benchmark itself runs on the GPU machine (benchmarks/gpu_suite.sh, step ``families``) with the real
per-layer shapes; here the same code runs with tiny dims, so it cannot rot between GPU runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

pytest.importorskip("mlx_lm")

from conftest import derive_seed, seed_note

import flash_moe
from benchmarks.family_synthetic import build
from flash_moe.families import switches
from flash_moe.layout import PROJECTIONS, ModelLayout
from flash_moe.load import read_packed_experts

FAMILIES = ["deepseek_v3", "qwen3_moe"]


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("family", FAMILIES)
def test_synthetic_family_is_mlx_lm_and_ours(family, tmp_path):
    """The source loads in mlx-lm's own loader; the conversion holds its expert bytes as they are; the
    streamed model's logits are mlx-lm's (float32 both sides); and the experts matter to them."""
    from mlx_lm.utils import load_model

    seed = derive_seed("synthetic family " + family)
    src, dst = tmp_path / "src", tmp_path / "dst"
    done = build(family, 2, src, dst, vocab=256, tiny=True, dtype="float32", seed=seed)
    assert done["source_s"] >= 0 and done["convert_s"] >= 0
    reference, _ = load_model(src)
    model = flash_moe.load(dst)
    try:
        layout = ModelLayout.read(dst)
        found = switches(reference)
        assert len(found) == len(layout.moe_layers) == 2 and layout.expert.bits == 4
        params = dict(tree_flatten(reference.parameters()))
        for path in found:
            layer = int(path.split(".")[2])
            packed = read_packed_experts(dst, layout, layer)
            for proj in PROJECTIONS:
                for kind in ("weight", "scales", "biases"):
                    ours = np.array(packed[f"model.layers.{layer}.mlp.experts.{proj}.{kind}"])
                    theirs = np.array(params[f"{path}.{proj}.{kind}"])
                    np.testing.assert_array_equal(ours, theirs, err_msg=f"{path}.{proj}.{kind} " + seed_note(seed))
        tokens = mx.array(np.random.default_rng(seed).integers(0, 256, (1, 12)).astype(np.int32))
        expected = np.array(reference(tokens))
        err = rel_err(np.array(model(tokens)), expected)
        assert err <= 1e-4, f"{family}: relative error {err:.2e} vs mlx-lm " + seed_note(seed)
        for switch in found.values():  # the routed experts' output zeroed: the logits move
            switch.down_proj.scales = mx.zeros_like(switch.down_proj.scales)
            switch.down_proj.biases = mx.zeros_like(switch.down_proj.biases)
        assert rel_err(np.array(reference(tokens)), expected) > 1e-2, seed_note(seed)
    finally:
        model.close()


def test_families_decode_runs(tmp_path):
    """build, warm (device cache all, preloaded) vs mlx-lm, then decode.py in its own process (no cap here:
    --cap-fraction 0 keeps the page cache and needs no root)."""
    from benchmarks.families_decode import main

    out = tmp_path / "out.json"
    result = main(["--family", "deepseek_v3", "--layers", "2", "--tiny", "--vocab", "256", "--work", str(tmp_path),
                   "-p", "6", "-g", "4", "-n", "1", "--threads", "2", "--cap-fraction", "0",
                   "--cap-prompt-tokens", "4", "--cap-generation-tokens", "3", "--json", str(out)])
    assert out.exists()
    warm, peer, capped = result["warm"], result["peer"], result["capped"]
    assert warm["preloaded"] == 2 * 16 and warm["device_cache"]["misses"] == 0, warm["device_cache"]
    # warm decode tokens run as speculative tokens (no per-layer sync), and every bet stands
    assert warm["device_cache"]["speculated"] > 0 and warm["device_cache"]["voided"] == 0, warm["device_cache"]
    assert warm["generation_tps"] > 0 and peer["generation_tps"] > 0
    assert result["warm_vs_mlx_lm"] == warm["generation_tps"] / peer["generation_tps"]
    assert capped["args"]["k"] == 4 and capped["average"]["generation_tps"] > 0
    assert np.isfinite(capped["bound"]["ratio"]) and capped["bound"]["ratio"] > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gather_experts_decode_as_mlx_lm(family, dtype, tmp_path, monkeypatch):
    """FLASH_MOE_FAMILY_EXPERTS=gather: a decode token's experts by mlx-lm's own ops over the device tier's slot
    arrays; prompt and decode logits (a synchronous first token, then certain speculative ones) are mlx-lm's
    resident model's (bit for bit in bfloat16: the same ops in the same order)."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    from flash_moe import families

    monkeypatch.setattr(families, "FAMILY_EXPERTS", "gather")
    seed = derive_seed(f"gather family {family} {dtype}")
    build(family, 2, tmp_path / "src", tmp_path / "dst", vocab=256, tiny=True, dtype=dtype, seed=seed)
    reference, _ = load_model(tmp_path / "src")
    model = flash_moe.load(tmp_path / "dst", cache_experts="all")
    try:
        assert all(s._gather is not None for s in switches_of(model)), "gather mode not taken"
        model.device_cache.preload()
        rng = np.random.default_rng(seed)
        ours, theirs = model.make_cache(), make_prompt_cache(reference)
        tokens = mx.array(rng.integers(0, 256, (1, 7)).astype(np.int32))
        for step in range(6):
            got = np.array(model.forward(tokens, ours).astype(mx.float32))
            want = np.array(reference(tokens, theirs).astype(mx.float32))
            note = f"{family} {dtype} step {step} " + seed_note(seed)
            if dtype == "bfloat16":
                np.testing.assert_array_equal(got, want, err_msg=note)
            else:
                assert rel_err(got, want) <= 1e-5, note
            tokens = mx.array(rng.integers(0, 256, (1, 1)).astype(np.int32))
        totals = model.device_cache.totals()
        assert totals["speculated"] >= 4 and totals["misses"] == 0, totals
    finally:
        model.close()


def switches_of(model):
    from flash_moe.families import StreamedSwitch

    return [m for _, m in model.model.named_modules() if isinstance(m, StreamedSwitch)]


def test_family_op_count_runs(tmp_path):
    """benchmarks/family_op_count.py (launch counts against mlx-lm's resident model) runs against the current code
    (in its own process: its GPU stand-ins replace MLX functions); its counts are checked for their structure."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "counts.json"
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "family_op_count.py"), "--family", "deepseek_v3",
                          "--reps", "2", "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())
    for side in ("flash_moe", "mlx-lm"):
        r = {name: v["launches"] for name, v in rows[side].items()}
        assert r["decoder layer"] > r["attention mixer"] and r["decoder layer"] > r["MoE block (router, experts, shared)"]
        assert r["token (embed, layers, norm, lm_head)"] >= 2 * r["decoder layer"]
    ours, theirs = rows["flash_moe"]["MoE block (router, experts, shared)"], rows["mlx-lm"]["MoE block (router, experts, shared)"]
    assert ours["by_kind"].get("custom kernel") == 2 and theirs["by_kind"].get("GatherQMM") == 3

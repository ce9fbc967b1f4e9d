"""The disk ceiling of benchmarks/disk_ceiling.py (its accounting, not its speed) and decode.py's I/O bound."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.decode import io_bound
from benchmarks.disk_ceiling import ALIGN, disk_ceiling, read_targets
from flash_moe.layout import ExpertLayout, ModelLayout, expert_checksum


@pytest.mark.parametrize("direct", [True, False])
def test_ceiling_on_a_file_counts_what_it_read(tmp_path, direct):
    path = tmp_path / "big.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes())
    c = disk_ceiling(path, seconds=0.05, block=64 << 10, inflight=[1, 3], direct=direct)
    assert [r["inflight"] for r in c["sweep"]] == [1, 3]
    for r in c["sweep"]:
        assert r["reads"] > 0 and r["bytes"] == r["reads"] * (64 << 10)
        assert r["seconds"] >= 0.05
        assert r["gbps"] == pytest.approx(r["bytes"] / r["seconds"] / 1e9)
        assert r["iops"] == pytest.approx(r["reads"] / r["seconds"])
    assert c["gbps"] == max(r["gbps"] for r in c["sweep"]) and c["block"] == 64 << 10
    assert c["direct"] in ((True, False) if direct else (False,))  # the filesystem may refuse O_DIRECT
    assert c["direct"] or c["note"]  # a fallback says why


def test_model_targets_are_the_experts_real_offsets(tmp_path):
    expert = ExpertLayout(512, 128, bits=4)  # 110,592 bytes (27 x 4 KiB) at a stride of 114,688
    layout = ModelLayout(expert, 8, [1, 3])
    (tmp_path / "experts").mkdir()
    for layer in layout.moe_layers:
        (tmp_path / layout.layer_file(layer)).write_bytes(bytes(layout.layer_bytes()))
        layout.checksums[layer] = [expert_checksum(bytes(expert.expert_bytes))] * layout.num_experts
    (tmp_path / "layout.json").write_text(json.dumps(layout.to_json()))
    files, targets, block = read_targets(tmp_path)
    assert block == expert.expert_bytes and [f.name for f in files] == [layout.layer_file(l).split("/")[-1] for l in (1, 3)]
    assert len(targets) == 2 * 8 and set(targets[:, 1].tolist()) == {e * expert.stride for e in range(8)}
    assert expert.stride % ALIGN == 0 and expert.expert_bytes % ALIGN == 0  # aligned O_DIRECT reads
    c = disk_ceiling(tmp_path, seconds=0.02, inflight=2)
    assert c["reads"] > 0 and c["bytes"] == c["reads"] * expert.expert_bytes


def test_io_bound_arithmetic():
    # 100 MB missed per token at 2 GB/s = 50 ms, plus 30 ms of the 100 ms token not spent reading (70 ms read)
    b = io_bound(100e6, 0.070, 0.100, 2.0)
    assert b["compute_ms"] == pytest.approx(30.0) and b["bound_ms"] == pytest.approx(80.0)
    assert b["ratio"] == pytest.approx(0.8) and b["actual_ms"] == pytest.approx(100.0)
    # a store reading at the ceiling sits exactly at the bound
    assert io_bound(140e6, 0.070, 0.100, 2.0)["ratio"] == pytest.approx(1.0)
    # reads longer than the token (overlapped): nothing counted as compute
    assert io_bound(0.0, 0.2, 0.1, 2.0)["compute_ms"] == 0.0

"""benchmarks/serve.py at test size: the numbers issue 14's GPU run reads are printed, and a synthetic model (no
tokenizer of its own) gets one the server can use. The GPU run itself is benchmarks/gpu_suite.sh's ``serve_b``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import seed_note

from benchmarks.serve import word_tokenizer
from flash_moe.synthetic import qwen35_397b_config, write_synthetic
from flash_moe.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def tiny_synthetic(folder: Path, seed: int) -> Path:
    config = qwen35_397b_config(4, 512)
    config.update(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
                  linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32, num_experts=16,
                  num_experts_per_tok=4, moe_intermediate_size=64, shared_expert_intermediate_size=64)
    return write_synthetic(folder, config, seed=seed, progress=False)


def test_word_tokenizer(tmp_path):
    assert word_tokenizer(tmp_path, 300)
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.encode("t5 t299 t7") == [5, 299, 7]
    assert tok.encode("def main") == [0, 0]  # every other word is the unknown token
    assert tok.decode([5, 7]).split() == ["t5", "t7"]
    assert not word_tokenizer(tmp_path, 300)  # a folder's own tokenizer is kept


def test_engine_mode_prints_the_goals(tmp_path, seed):
    folder = tiny_synthetic(tmp_path / "m", seed)
    run = subprocess.run([sys.executable, str(REPO / "benchmarks/serve.py"), "--engine", "--model", str(folder),
                          "--tokens", "4", "--rounds", "1", "--batches", "1,2", "--cache-experts", "0"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "generate_step alone (B=1 reference)" in out, out
    assert "| 2 | 2 x 4 |" in out and "engine cost at B=1 over generate_step" in out, out
    assert "aggregate tok/s at B=2" in out, out + seed_note(seed)

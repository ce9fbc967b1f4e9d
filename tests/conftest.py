"""Shared test fixtures: one random base seed per run, reproducible with FLASH_MOE_TEST_SEED."""

from __future__ import annotations

import os
import zlib

import pytest

# Float32 references must be float32 on CUDA too: MLX runs float32 matmuls as TF32 there by default
# (rel. error 2.9e-4 per product on the H200, 2.2e-7 with this off), enough to flip a random router.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

BASE_SEED = int(os.environ.get("FLASH_MOE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


def pytest_report_header(config):
    return f"flash_moe random seed: FLASH_MOE_TEST_SEED={BASE_SEED}"


@pytest.fixture
def seed(request) -> int:
    """A seed per test (different tests draw different weights), derived from the run's base seed.

    Put ``seed_note(seed)`` in assertion messages so a failure can be replayed.
    """
    return (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31


def seed_note(seed: int) -> str:
    return f"(test seed {seed}; replay the run with FLASH_MOE_TEST_SEED={BASE_SEED})"


def derive_seed(label: str) -> int:
    """A seed for module-scoped fixtures, which cannot use the per-test ``seed`` fixture."""
    return (BASE_SEED + zlib.crc32(label.encode())) % 2**31


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory):
    """The shipped demo model, built and converted once per test session in a temporary FLASH_MOE_HOME."""
    import io

    from flash_moe.demo import build

    home = tmp_path_factory.mktemp("flash_moe_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASH_MOE_HOME", str(home))
        return build(progress=False, out=io.StringIO())


@pytest.fixture(scope="session")
def demo(demo_folder):
    """The demo model loaded with streamed experts, tokenizer loaded."""
    from flash_moe import load

    model = load(demo_folder)
    model.tokenizer
    yield model
    model.close()


def random_qwen35(seed: int, hidden: int = 64, head_dim: int = 16, experts: int = 8, k: int = 2,
                  intermediate: int = 32, vocab: int = 97):
    """A tiny in-memory Qwen3.5-MoE model (3 GatedDeltaNet layers + 1 attention), every weight drawn from
    ``seed``, GatedDeltaNet's A_log and dt_bias too (the initialiser sets them to constants)."""
    import mlx.core as mx

    from flash_moe.model import Model, ModelArgs

    args = ModelArgs(model_type="qwen3_5_moe_text", hidden_size=hidden, num_hidden_layers=4, vocab_size=vocab,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, num_experts=experts,
                     num_experts_per_tok=k, moe_intermediate_size=intermediate,
                     shared_expert_intermediate_size=intermediate, linear_num_key_heads=2, linear_num_value_heads=4,
                     linear_key_head_dim=head_dim, linear_value_head_dim=head_dim)
    mx.random.seed(seed)
    model = Model(args)
    model.update({"model": {"layers": [{"linear_attn": {"A_log": mx.random.normal((4,)),
                                                        "dt_bias": mx.random.normal((4,))}} if l.is_linear else {}
                                       for l in model.layers]}})
    return model

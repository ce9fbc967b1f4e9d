"""Streamed experts (issue 4 proof): same logits as the resident model, as transformers, bounded memory, clear errors.

A tiny random transformers model (tests/hf_models.py, dims multiples of 64) is converted at 2, 4, 8 and
16 bits. The streamed model (ExpertStore + StreamingExperts) must match the resident model built from
the same packed bytes (``load(stream=False)``) and, at 4 bits, transformers holding the dequantized
experts. The memory test streams a synthetic model whose experts are many times the RSS budget.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

import hf_models
from conftest import derive_seed, seed_note

import flash_moe
from flash_moe.checkpoint import CheckpointError
from flash_moe.convert import convert
from flash_moe.layout import ModelLayout
from flash_moe.load import read_packed_experts
from flash_moe.layer_files import ExpertReadError, verify

# Streamed vs resident, same bytes, float32 compute. On the CPU both run the same MLX ops in the same order:
# equal to float32 rounding. On a GPU the fused expert kernels (and MLX CUDA's float32 matmuls, per shape) sum
# in other orders: 6e-4 measured for the fused kernel against gather_qmm (tests/test_expert_cache.py, H100);
# a wrong or missing expert moves logits by O(1).
EXACT_TOL = 1e-5 if mx.default_device() == mx.cpu else 2e-3
# These tests are about the ExpertStore (reads, slots, read errors): no device cache in front. On CUDA the
# default ("auto") caches every expert on the GPU, so repeated inputs would never reach the store again
# (test_expert_cache.py tests that tier).
NO_CACHE = dict(cache_experts=0)
REF_TOL = 1e-4  # vs transformers, float32 on both sides
# hidden and expert intermediate are multiples of 64 so every group size divides them
CONFIG = dict(
    hf_models.QWEN3_5_CONFIGS["interval4_e8_top2"],
    hidden_size=128, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
    shared_expert_intermediate_size=64,
)
VOCAB = CONFIG["vocab_size"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(folder, float32 torch model, seed) of a composite qwen3_5_moe checkpoint with fused experts."""
    seed = derive_seed("test_streaming.source")
    folder, model = hf_models.qwen3_5_moe(tmp_path_factory.mktemp("hf"), CONFIG, seed=seed, layout="fused")
    return folder, model, seed


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """Converted folders by (bits, group size), made on first use; float32 scales so compute is float32."""
    made = {}

    def get(bits: int, group_size: int) -> Path:
        if (bits, group_size) not in made:
            dst = tmp_path_factory.mktemp(f"conv{bits}_{group_size}")
            made[bits, group_size] = convert(source[0], dst, bits=bits, group_size=group_size, dtype="float32",
                                             progress=False)
        return made[bits, group_size]

    return get


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def logits(model, tokens: np.ndarray, cache=None) -> np.ndarray:
    return np.array(model(mx.array(tokens.astype(np.int32)), cache=cache).astype(mx.float32))


def moe_calls(model) -> int:
    return sum(1 for layer in model.model.layers if hasattr(layer.mlp, "experts"))


# ---------------------------------------------------------------- 1. streamed == resident


@pytest.mark.parametrize("bits,group_size", [(2, 32), (4, 64), (8, 32), (16, 64)])
def test_streamed_equals_resident(converted, seed, bits, group_size):
    """Prefill, a chunk and single-token decode through one cache; slots below and above what a chunk needs."""
    folder = converted(bits, group_size)
    resident = flash_moe.load(folder, dtype="float32", stream=False)
    gen = np.random.default_rng(seed)
    prefill, chunk, steps = int(gen.integers(10, 17)), int(gen.integers(2, 5)), 5
    tokens = hf_models.random_tokens(gen, VOCAB, (2, prefill + chunk + steps))
    bounds = [0, prefill, prefill + chunk] + list(range(prefill + chunk + 1, tokens.shape[1] + 1))
    ref_cache = resident.make_cache()
    ref = [logits(resident, tokens[:, a:b], ref_cache) for a, b in zip(bounds, bounds[1:])]
    # 3 slots: fewer than one token's 4 experts, so every call reads its experts in groups
    for slots in (3, CONFIG["num_experts"]):
        streamed = flash_moe.load(folder, dtype="float32", slots=slots, **NO_CACHE)
        cache = streamed.make_cache()
        for (a, b), expected in zip(zip(bounds, bounds[1:]), ref):
            err = rel_err(logits(streamed, tokens[:, a:b], cache), expected)
            assert err <= EXACT_TOL, (f"bits {bits} gs {group_size} slots {slots} positions {a}..{b - 1}: "
                                      f"relative error {err:.2e} " + seed_note(seed))
        stats = streamed.store.stats.totals()
        calls = moe_calls(streamed) * (len(bounds) - 1)
        if slots < CONFIG["num_experts_per_tok"]:
            assert stats["fetches"] > calls, "small slots must read in groups " + seed_note(seed)
        else:
            assert stats["fetches"] == calls, "one read per layer call when the slots suffice " + seed_note(seed)


def test_bfloat16_compute_matches_resident(converted, seed, monkeypatch):
    """bfloat16 compute from float32 scales: streamed logits are the resident model's bit for bit, with
    grouped reads (slots < experts needed) or not, and stay bfloat16.

    Bit for bit holds where both sides run the same MLX ops in the same order: the CPU with the "ops"
    backend. A GPU picks kernels per shape (and its fused expert kernels sum in another order; test_kernels.py
    holds them to the ops), so there this test runs on the CPU device too: what it checks (dtypes, grouped
    reads) is the store's and the model's, not a kernel's."""
    from flash_moe import kernels

    monkeypatch.setattr(kernels, "BACKEND", "ops")  # read at load (slot buffers) and per call
    device = mx.default_device()
    if device != mx.cpu:
        # mx.compile's cache does not key on the device: a function traced on the GPU would replay there
        mx.disable_compile()
        mx.set_default_device(mx.cpu)
    try:
        check_bfloat16_compute(converted(4, 64), seed)
    finally:
        if device != mx.cpu:
            mx.set_default_device(device)
            mx.enable_compile()


def check_bfloat16_compute(folder, seed):
    gen = np.random.default_rng(seed)
    tokens = mx.array(hf_models.random_tokens(gen, VOCAB, (2, 24)).astype(np.int32))
    expected = flash_moe.load(folder, dtype="bfloat16", stream=False)(tokens)
    assert expected.dtype == mx.bfloat16
    for slots in (5, CONFIG["num_experts"]):
        out = flash_moe.load(folder, dtype="bfloat16", slots=slots, **NO_CACHE)(tokens)
        assert out.dtype == mx.bfloat16, f"slots {slots}: {out.dtype}"
        np.testing.assert_array_equal(np.array(out.astype(mx.float32)), np.array(expected.astype(mx.float32)),
                                      err_msg=f"slots {slots} " + seed_note(seed))


# ---------------------------------------------------------------- 2. 4-bit streamed vs transformers


@torch.no_grad()
def set_torch_experts(model: torch.nn.Module, folder: Path) -> None:
    """Replace the torch model's routed experts by the dequantized packed experts of ``folder``."""
    layout = ModelLayout.read(folder)
    e = layout.expert
    params = dict(model.named_parameters())
    for layer in layout.moe_layers:
        packed = read_packed_experts(folder, layout, layer)
        prefix = f"model.layers.{layer}.mlp.experts."
        w = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            q = packed[prefix + proj + ".weight"]
            if e.quantized:
                q = mx.dequantize(q, packed[prefix + proj + ".scales"], packed[prefix + proj + ".biases"],
                                  group_size=e.group_size, bits=e.bits)
            w[proj] = torch.from_numpy(np.array(q.astype(mx.float32)))
        base = next(n for n in params if re.search(rf"layers\.{layer}\.mlp\.experts\.", n)).split(".experts.")[0]
        if f"{base}.experts.gate_up_proj" in params:  # fused, as transformers 5.x holds them
            params[f"{base}.experts.gate_up_proj"].copy_(torch.cat([w["gate_proj"], w["up_proj"]], dim=1))
            params[f"{base}.experts.down_proj"].copy_(w["down_proj"])
        else:
            for i in range(layout.num_experts):
                for proj in w:
                    params[f"{base}.experts.{i}.{proj}.weight"].copy_(w[proj][i])


def test_4bit_streamed_matches_transformers(source, converted, seed):
    """Convert float32 at 4 bits, give transformers the dequantized experts: logits agree to float32 noise."""
    folder = converted(4, 64)
    reference = copy.deepcopy(source[1])
    set_torch_experts(reference, folder)
    gen = np.random.default_rng(seed)
    for _ in range(20):
        tokens = hf_models.random_tokens(gen, VOCAB, (2, 16))
        if hf_models.router_margin(reference, torch.from_numpy(tokens)) > 1e-4:
            break
    else:
        raise AssertionError("no input with a decisive router in 20 draws " + seed_note(seed))
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(tokens)).logits.numpy()
    model = flash_moe.load(folder, dtype="float32", slots=6)
    err = rel_err(logits(model, tokens), expected)
    assert err <= REF_TOL, f"relative error {err:.2e} " + seed_note(seed)
    # the quantized experts really differ from the float ones: the comparison is not vacuous
    with torch.no_grad():
        float_logits = source[1](input_ids=torch.from_numpy(tokens)).logits.numpy()
    assert rel_err(float_logits, expected) > 100 * REF_TOL, seed_note(seed)


# ---------------------------------------------------------------- 3. bounded memory

RSS_BUDGET = 80 << 20  # bytes over baseline + resident weights + slot buffers
# Peak RSS is the kernel's per-process high-water mark (VmHWM), reset after the imports. ru_maxrss
# would do in a fresh interpreter, but after fork + exec Linux folds the parent's (pytest's) RSS into it.
# On MLX's CUDA backend the first use of the GPU maps the CUDA context and libraries (cuBLAS) into the
# process and the first call at each shape compiles kernels (NVRTC): hundreds of MB of host RSS that are
# the runtime's, once per process, not the model's. There the same model is first run once (same prompt
# and decode shapes) and dropped, so the baseline holds the runtime; the CPU path is measured as it was.
RSS_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    import mlx.core as mx, numpy as np
    import flash_moe

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    folder, slots, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if mx.cuda.is_available() and mx.default_device() == mx.gpu:
        warm = flash_moe.load(folder, slots=slots, cache_experts=0)
        warm_cache = warm.make_cache()
        mx.eval(warm(mx.zeros((1, 12), mx.int32), warm_cache))
        for _ in range(2):
            mx.eval(warm(mx.zeros((1, 1), mx.int32), warm_cache))
        warm.close()
        del warm, warm_cache
        gc.collect()
        mx.clear_cache()
    try:
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    except OSError:
        pass  # then the peak also counts the imports' transients: stricter, not looser
    base = status("VmRSS")
    model = flash_moe.load(folder, slots=slots, cache_experts=0)  # the store's slots bound the experts in memory
    loaded = status("VmRSS")
    gen = np.random.default_rng(seed)
    vocab, layers = model.config.vocab_size, model.store.layout.moe_layers
    cache = model.make_cache()
    mx.eval(model(mx.array(gen.integers(0, vocab, (1, 12), dtype=np.int32)), cache))
    steps = 0
    while (model.store.stats.usage[layers] == 0).any() and steps < 200:  # until every expert was read
        out = model(mx.array(gen.integers(0, vocab, (1, 1), dtype=np.int32)), cache)
        mx.eval(out)
        steps += 1
    print(json.dumps(dict(base=base, loaded=loaded, peak=status("VmHWM"), slot_bytes=model.store.resident_bytes(),
                          read=int(model.store.stats.bytes.sum()), unread=int((model.store.stats.usage[layers] == 0).sum()),
                          steps=steps, finite=bool(np.isfinite(np.array(out)).all()))))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS/VmHWM from /proc (Linux)")
def test_peak_rss_while_streaming(tmp_path, seed):
    """Stream a model whose experts are >= 6x the budget, until every expert was read: RSS stays bounded."""
    from flash_moe.synthetic import synthetic_bytes, write_synthetic

    # Unquantized float32 experts: the most bytes per multiply, so the CPU computes little while the
    # store reads 500 MB.
    config = dict(
        model_type="qwen3_5_moe_text", hidden_size=512, num_hidden_layers=5, vocab_size=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64, num_experts=32,
        num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=256,
        full_attention_interval=4,
    )
    fmt = dict(bits=16, dtype="float32")
    expert_bytes = synthetic_bytes(config, **fmt)
    assert expert_bytes >= 6 * RSS_BUDGET
    folder = write_synthetic(tmp_path / "synthetic", config, **fmt, seed=seed, progress=False)
    try:
        resident = (folder / "resident.safetensors").stat().st_size
        repo = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
        run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(folder), "8", str(seed)],
                             capture_output=True, text=True, timeout=300, env=env, cwd=repo)
        assert run.returncode == 0, run.stderr[-3000:]
        r = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder)
    note = f"{r} resident {resident:,} experts {expert_bytes:,} " + seed_note(seed)
    assert r["unread"] == 0 and r["read"] >= expert_bytes, "not every expert was read " + note
    assert r["finite"], note
    grown = r["peak"] - r["base"]
    allowed = resident + r["slot_bytes"] + RSS_BUDGET
    assert grown <= allowed, f"peak RSS grew {grown / 2**20:.0f} MiB, allowed {allowed / 2**20:.0f} MiB " + note
    streaming = r["peak"] - r["loaded"]  # what reading every expert (several times over) added after the load
    assert streaming <= RSS_BUDGET, f"streaming added {streaming / 2**20:.0f} MiB to the loaded model's RSS " + note


# ---------------------------------------------------------------- 4. bad input


@pytest.fixture
def folder(converted, tmp_path):
    """A private copy of a converted 4-bit folder, to damage."""
    return Path(shutil.copytree(converted(4, 64), tmp_path / "model"))


def test_missing_layer_file(folder):
    (folder / "experts/layer_002.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"layer_002\.bin: file of layer 2 is missing"):
        flash_moe.load(folder)


@pytest.mark.parametrize("change,word", [(-100, "truncated"), (4096, "oversized")])
def test_wrongly_sized_layer_file(folder, change, word):
    path = folder / "experts/layer_001.bin"
    size = path.stat().st_size
    os.truncate(path, size + change)
    with pytest.raises(ValueError, match=rf"layer_001\.bin: layer 1 file has {size + change:,} bytes, "
                                         rf"expected {size:,}.*{word}"):
        flash_moe.load(folder)


def test_checksum_mismatch(folder, seed):
    layout = ModelLayout.read(folder)
    gen = np.random.default_rng(seed)
    layer, expert = int(gen.choice(layout.moe_layers)), int(gen.integers(layout.num_experts))
    offset = expert * layout.expert.stride + int(gen.integers(layout.expert.expert_bytes))
    path = folder / layout.layer_file(layer)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x5A]))
    bad = verify(folder, progress=False)
    assert [(b[0], b[1], b[2]) for b in bad] == [(layer, expert, layout.checksums[layer][expert])], seed_note(seed)
    assert bad[0][3] != bad[0][2]
    assert flash_moe.load(folder).store.verify() == bad


def test_layout_of_another_version(folder):
    data = json.loads((folder / "layout.json").read_text())
    data["version"] = 99
    (folder / "layout.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"layout\.json: format version 99 is not supported"):
        flash_moe.load(folder)


@pytest.mark.parametrize("field,value,word", [("hidden_size", 192, "hidden 128 vs 192"),
                                              ("num_experts", 12, "num_experts 16 vs 12"),
                                              ("moe_intermediate_size", 128, "intermediate 64 vs 128")])
def test_layout_disagrees_with_config(folder, field, value, word):
    hf_models.edit_config(folder, lambda c: c.__setitem__(field, value))
    with pytest.raises(CheckpointError, match=rf"layout\.json disagrees with config\.json: .*{word}"):
        flash_moe.load(folder)


def test_missing_resident_weights(folder):
    (folder / "resident.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"resident\.safetensors: missing"):
        flash_moe.load(folder)


def run_with_timeout(fn, seconds=60):
    """fn() on a thread: returns its result or raises its exception; fails if it does not finish (a hang)."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the test thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"no answer in {seconds} s: hung"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.parametrize("failure", ["eio", "short"])
def test_disk_error_during_forward(folder, monkeypatch, seed, failure):
    """A failing read names file, layer, expert and offset; the model works again once the disk does."""
    from flash_moe import store as store_mod

    layout = ModelLayout.read(folder)
    layer = layout.moe_layers[-1]
    path = folder / layout.layer_file(layer)
    inode = os.stat(path).st_ino
    real_preadv = os.preadv
    model = flash_moe.load(folder, dtype="float32", slots=int(np.random.default_rng(seed).integers(3, 17)), **NO_CACHE)
    gen = np.random.default_rng(seed)
    tokens = hf_models.random_tokens(gen, VOCAB, (1, 12))
    expected = logits(model, tokens)

    def failing_preadv(fd, buffers, offset, *flags):
        if os.fstat(fd).st_ino == inode:
            if failure == "eio":
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real_preadv(fd, buffers, offset, *flags) // 2
        return real_preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(store_mod.os, "preadv", failing_preadv)
    with pytest.raises(ExpertReadError) as info:
        run_with_timeout(lambda: logits(model, tokens))
    msg = str(info.value)
    m = re.search(r"layer (\d+) expert (\d+): .*byte offset ([\d,]+)", msg)
    assert m and str(path) in msg, msg
    assert int(m[1]) == layer and int(m[3].replace(",", "")) == int(m[2]) * layout.expert.stride, msg
    assert ("Input/output error" in msg) if failure == "eio" else ("short read" in msg), msg
    monkeypatch.setattr(store_mod.os, "preadv", real_preadv)
    again = run_with_timeout(lambda: logits(model, tokens))
    assert rel_err(again, expected) <= EXACT_TOL, seed_note(seed)

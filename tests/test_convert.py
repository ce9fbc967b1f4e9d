"""The converter (issue 4 proof): every source layout, exact repacking, interrupted runs, hub ids.

Sources are tiny random transformers checkpoints (tests/hf_models.py) and an mlx-community-style
checkpoint built here from one of them. Unquantized float32 conversions must hold the source's expert
weights bit for bit and give transformers' logits; an MLX-quantized source must be repacked byte for
byte, never requantized.
"""

from __future__ import annotations

import filecmp
import fnmatch
import json
import sys
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
from flash_moe.model import ModelArgs, sanitize
from flash_moe.safetensors_io import SafetensorsIndex
from flash_moe.layer_files import verify

convert_mod = sys.modules["flash_moe.convert"]  # the module; flash_moe.convert is the function, as in mlx-lm

REF_TOL = 1e-4
SIZES = dict(hidden_size=128, moe_intermediate_size=64)  # multiples of 64: every group size divides them
TEXT = dict(hf_models.QWEN3_5_CONFIGS["explicit_types_e12_top3"], **SIZES)
COMPOSITE = dict(hf_models.QWEN3_5_CONFIGS["interval4_e8_top2"], **SIZES, num_experts=16, num_experts_per_tok=4)
NEXT = dict(hf_models.QWEN3_NEXT_CONFIGS["next_interval3_e16_top4"], **SIZES)


def add_mtp_keys(folder: Path, config: dict, gen: np.random.Generator) -> list[str]:
    """Give a composite checkpoint the released MTP head (per-expert experts included): to be ignored."""
    tensors = hf_models.read_checkpoint(folder)
    file = next(iter(tensors.values()))[0]
    D, I = config["hidden_size"], config["moe_intermediate_size"]
    shapes = {"mtp.fc.weight": (D, 2 * D), "mtp.norm.weight": (D,), "mtp.layers.0.mlp.gate.weight": (config["num_experts"], D)}
    for e in range(config["num_experts"]):
        for proj, shape in (("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I))):
            shapes[f"mtp.layers.0.mlp.experts.{e}.{proj}.weight"] = shape
    for name, shape in shapes.items():
        tensors[name] = (file, torch.from_numpy(gen.standard_normal(shape, dtype=np.float32)))
    hf_models.write_checkpoint(folder, tensors)
    return list(shapes)


SOURCES = {  # name -> (builder, text config, expert layout, shard size)
    "text_fused": ("qwen3_5_moe_text", TEXT, "fused", None),
    "composite_per_expert_mtp": ("qwen3_5_moe", COMPOSITE, "per_expert", "120KB"),
    "qwen3_next": ("qwen3_next", NEXT, "per_expert", None),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> (folder, torch model, seed), each built on first use."""
    made = {}

    def get(name):
        if name not in made:
            builder, config, layout, shard = SOURCES[name]
            seed = derive_seed(f"test_convert.{name}")
            folder, model = hf_models.BUILDERS[builder](tmp_path_factory.mktemp(name), config, seed=seed,
                                                        layout=layout, shard_size=shard)
            if "mtp" in name:
                add_mtp_keys(folder, config, np.random.default_rng(seed))
            made[name] = (folder, model, seed)
        return made[name]

    return get


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def logits(model, tokens: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(tokens.astype(np.int32))).astype(mx.float32))


def torch_experts(model: torch.nn.Module, layer: int) -> dict[str, np.ndarray]:
    """gate/up/down (E, out, in) float32 of one layer, whether transformers holds them fused or per expert."""
    params = {n: p.detach().numpy() for n, p in model.named_parameters() if f"layers.{layer}.mlp.experts." in n
              and not n.startswith("mtp")}
    fused = [n for n in params if n.endswith("experts.gate_up_proj")]
    if fused:
        gu = params[fused[0]]
        I = gu.shape[1] // 2
        return {"gate_proj": gu[:, :I], "up_proj": gu[:, I:], "down_proj": params[fused[0].replace("gate_up", "down")]}
    return {p: np.stack([params[n] for n in sorted((n for n in params if n.endswith(f"{p}.weight")),
                                                   key=lambda n: int(n.split(".experts.")[1].split(".")[0]))])
            for p in ("gate_proj", "up_proj", "down_proj")}


def decisive_tokens(torch_model, vocab: int, gen, shape) -> np.ndarray:
    for _ in range(20):
        tokens = hf_models.random_tokens(gen, vocab, shape)
        if hf_models.router_margin(torch_model, torch.from_numpy(tokens)) > 1e-4:
            return tokens
    raise AssertionError("no input with a decisive router in 20 draws")


# ---------------------------------------------------------------- Hugging Face sources


@pytest.mark.parametrize("name", list(SOURCES))
def test_hf_source_converts_exactly(sources, name, tmp_path, seed):
    """Unquantized float32: experts bit for bit, streamed logits == transformers', vision/MTP left out."""
    folder, reference, _ = sources(name)
    dst = convert(folder, tmp_path / "out", bits=16, dtype="float32", progress=False)
    layout = ModelLayout.read(dst)
    args = ModelArgs.from_config(json.loads((dst / "config.json").read_text()))
    assert layout.moe_layers == list(range(args.num_hidden_layers))
    for layer in layout.moe_layers:
        packed = read_packed_experts(dst, layout, layer)
        for proj, expected in torch_experts(reference, layer).items():
            got = np.array(packed[f"model.layers.{layer}.mlp.experts.{proj}.weight"])
            np.testing.assert_array_equal(got, expected, err_msg=f"{name} layer {layer} {proj}")
    resident = mx.load(str(dst / "resident.safetensors"))
    assert not [k for k in resident if "visual" in k or "mtp" in k or ".experts." in k], sorted(resident)[:5]
    assert verify(dst, progress=False) == []

    gen = np.random.default_rng(seed)
    tokens = decisive_tokens(reference, args.vocab_size, gen, (2, 14))
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(tokens)).logits.numpy()
    err = rel_err(logits(flash_moe.load(dst, dtype="float32", slots=5), tokens), expected)
    assert err <= REF_TOL, f"{name}: relative error {err:.2e} " + seed_note(seed)


# ---------------------------------------------------------------- mlx-community source


def mlx_community(folder: Path, torch_model, hf_config: dict, bits: int | None = 4, group_size: int = 64,
                  dtype=mx.bfloat16) -> Path:
    """An mlx-lm style checkpoint of ``torch_model``: language_model.* names, switch_mlp experts, norms
    stored as 1 + w, conv1d (C, k, 1), ``dtype``; with ``bits`` every matrix quantized (router and shared
    gate at 8 bits; scales and biases in ``dtype``)."""
    args = ModelArgs.from_config(hf_config)
    hf = {k: mx.array(v.detach().numpy()) for k, v in torch_model.state_dict().items()}
    ours, _ = sanitize(hf, args)
    quant = {"group_size": group_size, "bits": bits, "mode": "affine"}
    out = {}
    for name, w in ours.items():
        mlx_name = ("language_model." + name).replace(".mlp.experts.", ".mlp.switch_mlp.")
        if name.endswith("A_log"):
            out[mlx_name] = w
            continue
        w = w.astype(dtype)
        if bits and w.ndim >= 2 and "conv1d" not in name and w.shape[-1] % group_size == 0:
            base = mlx_name[: -len(".weight")]
            b = 8 if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) else bits
            if b != bits:
                quant[base] = {"group_size": group_size, "bits": b}
            out[mlx_name], out[base + ".scales"], out[base + ".biases"] = mx.quantize(w, group_size=group_size, bits=b)
        else:
            out[mlx_name] = w
    out["vision_tower.blocks.0.attn.qkv.weight"] = mx.random.normal((96, 32)).astype(mx.bfloat16)
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), out, metadata={"format": "mlx"})
    config = dict(hf_config, quantization=quant, quantization_config=quant) if bits else hf_config
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


@pytest.fixture(scope="module")
def mlx_source(sources, tmp_path_factory):
    folder, model, seed = sources("composite_per_expert_mtp")
    hf_config = json.loads((folder / "config.json").read_text())
    return mlx_community(tmp_path_factory.mktemp("mlx") / "model", model, hf_config), seed


def test_mlx_source_repacked_byte_for_byte(mlx_source, tmp_path, seed):
    src, _ = mlx_source
    dst = convert(src, tmp_path / "out", bits=4, group_size=64, progress=False)
    layout = ModelLayout.read(dst)
    index = SafetensorsIndex([src / "model.safetensors"])
    for layer in layout.moe_layers:
        data = np.fromfile(dst / layout.layer_file(layer), np.uint8)
        for e in range(layout.num_experts):
            for t in layout.expert.tensors:
                start = e * layout.expert.stride + t.offset
                got = data[start : start + t.nbytes].tobytes()
                key = f"language_model.model.layers.{layer}.mlp.switch_mlp.{t.name}"
                assert got == index.read_bytes(key, e, 1), f"layer {layer} expert {e} {t.name}"
    index.close()
    assert verify(dst, progress=False) == []
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization"]["model.layers.0.mlp.gate"]["bits"] == 8, config["quantization"]

    # it runs, and computes what the MLX checkpoint loaded directly (same quantized weights) computes
    gen = np.random.default_rng(seed)
    tokens = hf_models.random_tokens(gen, COMPOSITE["vocab_size"], (2, 12))
    expected = logits(flash_moe.load(src, dtype="float32"), tokens)
    for slots in (3, 16):
        err = rel_err(logits(flash_moe.load(dst, dtype="float32", slots=slots), tokens), expected)
        assert err <= 1e-5, f"slots {slots}: relative error {err:.2e} " + seed_note(seed)
    bf16 = flash_moe.load(dst)(mx.array(tokens.astype(np.int32)))
    assert bf16.dtype == mx.bfloat16 and np.isfinite(np.array(bf16.astype(mx.float32))).all()


def test_mlx_unquantized_source(sources, tmp_path, seed):
    """An unquantized mlx-lm checkpoint (stacked switch_mlp weights): bfloat16 experts copied exactly."""
    folder, model, _ = sources("composite_per_expert_mtp")
    src = mlx_community(tmp_path / "mlx", model, json.loads((folder / "config.json").read_text()), bits=None)
    dst = convert(src, tmp_path / "out", bits=16, dtype="bfloat16", progress=False)
    layout = ModelLayout.read(dst)
    source = mx.load(str(src / "model.safetensors"))
    for layer in layout.moe_layers:
        packed = read_packed_experts(dst, layout, layer)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            got = packed[f"model.layers.{layer}.mlp.experts.{proj}.weight"]
            want = source[f"language_model.model.layers.{layer}.mlp.switch_mlp.{proj}.weight"]
            assert mx.array_equal(got, want).item(), f"layer {layer} {proj}"
    gen = np.random.default_rng(seed)
    tokens = hf_models.random_tokens(gen, COMPOSITE["vocab_size"], (2, 12))
    err = rel_err(logits(flash_moe.load(dst, dtype="float32", slots=4), tokens),
                  logits(flash_moe.load(src, dtype="float32"), tokens))
    assert err <= 1e-5, f"relative error {err:.2e} " + seed_note(seed)


def test_mlx_float32_source_needs_no_options(sources, tmp_path, seed):
    """convert(src, dst) of an MLX checkpoint with float32 scales at 8 bits, group 32 takes the source's
    settings (it used to refuse and ask for --dtype float32) and repacks the experts byte for byte."""
    folder, model, _ = sources("composite_per_expert_mtp")
    src = mlx_community(tmp_path / "mlx", model, json.loads((folder / "config.json").read_text()), bits=8,
                        group_size=32, dtype=mx.float32)
    dst = convert(src, tmp_path / "out", progress=False)
    layout = ModelLayout.read(dst)
    assert (layout.expert.bits, layout.expert.group_size, layout.expert.dtype) == (8, 32, "float32")
    index = SafetensorsIndex([src / "model.safetensors"])
    data = np.fromfile(dst / layout.layer_file(layout.moe_layers[0]), np.uint8)
    for t in layout.expert.tensors:
        key = f"language_model.model.layers.{layout.moe_layers[0]}.mlp.switch_mlp.{t.name}"
        assert data[t.offset : t.offset + t.nbytes].tobytes() == index.read_bytes(key, 0, 1), t.name
    index.close()
    tokens = hf_models.random_tokens(np.random.default_rng(seed), COMPOSITE["vocab_size"], (1, 10))
    err = rel_err(logits(flash_moe.load(dst, slots=4), tokens), logits(flash_moe.load(src), tokens))
    assert err <= 1e-5, f"relative error {err:.2e} " + seed_note(seed)


@pytest.mark.parametrize("settings,message", [
    (dict(bits=8), r"MLX-quantized at bits=4 group_size=64; convert with --bits 4 --group-size 64"),
    (dict(group_size=32), r"MLX-quantized at bits=4 group_size=64"),
    (dict(dtype="float32"), r"MLX-quantized with bfloat16 scales; convert with --dtype bfloat16"),
])
def test_mlx_source_never_requantized(mlx_source, tmp_path, settings, message):
    with pytest.raises(CheckpointError, match=message):
        convert(mlx_source[0], tmp_path / "out", progress=False, **settings)
    assert not (tmp_path / "out" / "layout.json").exists()


# ---------------------------------------------------------------- hub ids


def test_hub_id_fetches_only_what_conversion_needs(sources, tmp_path, monkeypatch):
    import huggingface_hub

    folder = sources("text_fused")[0]
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    dst = convert("Qwen/Qwen3.5-397B-A17B", tmp_path / "out", revision="abc123", progress=False)
    assert (dst / "layout.json").exists()
    [(repo, kwargs)] = calls
    assert repo == "Qwen/Qwen3.5-397B-A17B" and kwargs.get("revision") == "abc123"
    patterns = kwargs["allow_patterns"]
    wanted = lambda f: any(fnmatch.fnmatch(f, p) for p in patterns)
    needed = ["config.json", "model.safetensors.index.json", "model-00001-of-00094.safetensors", "tokenizer.json",
              "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json"]
    unneeded = ["pytorch_model-00001-of-00002.bin", "model.gguf", "original/consolidated.00.pth", "README.md",
                "figures/benchmark.png", "onnx/model.onnx", ".gitattributes"]
    assert [f for f in needed if not wanted(f)] == [], patterns
    assert [f for f in unneeded if wanted(f)] == [], patterns


def test_missing_local_source(tmp_path):
    with pytest.raises(CheckpointError, match="no such (model )?folder"):
        convert(tmp_path / "nope", tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="no such (model )?folder"):
        convert("./not/a/hub/id", tmp_path / "out", progress=False)


# ---------------------------------------------------------------- interrupted and repeated runs


def folder_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_same_folder(a: Path, b: Path) -> None:
    assert folder_files(a) == folder_files(b)
    for name in folder_files(a):
        assert filecmp.cmp(a / name, b / name, shallow=False), f"{name} differs"


@pytest.fixture
def count_writes(monkeypatch):
    """Layers the converter (re)writes, in order."""
    written = []
    real = convert_mod._write_layer

    def counting(source, layout, num_experts, path, desc, progress):
        written.append(int(path.name.split("_")[1].split(".")[0]))
        return real(source, layout, num_experts, path, desc, progress)

    monkeypatch.setattr(convert_mod, "_write_layer", counting)
    return written


class Crash(Exception):
    pass


def interrupted(src: Path, dst: Path, layer: int, monkeypatch) -> None:
    """Run a conversion that dies while packing ``layer``, after its first batch of experts."""
    real = convert_mod.ExpertSource.read_float

    def crashing(self, first, count):
        if f"layers.{layer}." in self.prefix and first > 0:
            raise Crash(f"simulated crash in layer {layer}")
        return real(self, first, count)

    with monkeypatch.context() as m:
        m.setattr(convert_mod.ExpertSource, "read_float", crashing)
        with pytest.raises(Crash):
            convert(src, dst, progress=False)


def test_interrupted_conversion_resumes(sources, tmp_path, monkeypatch, count_writes, seed):
    src = sources("text_fused")[0]
    reference = convert(src, tmp_path / "reference", progress=False)
    layers = ModelLayout.read(reference).moe_layers
    assert convert_mod.BATCH < TEXT["num_experts"], "the crash must fall inside a layer"
    crash = int(np.random.default_rng(seed).integers(1, len(layers) - 1))
    count_writes.clear()
    dst = tmp_path / "dst"
    interrupted(src, dst, crash, monkeypatch)
    assert count_writes == layers[: crash + 1], seed_note(seed)
    assert not (dst / "layout.json").exists(), "an unfinished folder must not look converted"
    partial = dst / f"experts/layer_{crash:03d}.bin.partial"
    assert partial.exists() and not (dst / f"experts/layer_{crash:03d}.bin").exists()
    assert partial.stat().st_size == (reference / f"experts/layer_{crash:03d}.bin").stat().st_size
    with pytest.raises(CheckpointError):
        flash_moe.load(dst)

    count_writes.clear()
    convert(src, dst, progress=False)
    assert count_writes == layers[crash:], f"finished layers must be skipped, the .partial one redone {seed_note(seed)}"
    assert_same_folder(dst, reference)
    assert verify(dst, progress=False) == []


def test_corrupted_finished_layer_is_redone(sources, tmp_path, monkeypatch, count_writes, seed):
    src = sources("text_fused")[0]
    reference = convert(src, tmp_path / "reference", progress=False)
    layers = ModelLayout.read(reference).moe_layers
    gen = np.random.default_rng(seed)
    crash = int(gen.integers(2, len(layers)))
    dst = tmp_path / "dst"
    interrupted(src, dst, crash, monkeypatch)
    bad = int(gen.integers(0, crash))
    path = dst / f"experts/layer_{bad:03d}.bin"
    expert = ModelLayout.read(reference).expert  # checksums cover an expert's bytes, not the stride padding
    with open(path, "r+b") as f:
        offset = int(gen.integers(TEXT["num_experts"])) * expert.stride + int(gen.integers(expert.expert_bytes))
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))
    count_writes.clear()
    convert(src, dst, progress=False)
    assert count_writes == [bad] + layers[crash:], f"corrupted layer {bad} (byte {offset}) " + seed_note(seed)
    assert_same_folder(dst, reference)


def test_rerun_on_complete_folder(sources, tmp_path, count_writes):
    src = sources("text_fused")[0]
    dst = convert(src, tmp_path / "out", progress=False)
    before = {name: (dst / name).read_bytes() for name in folder_files(dst)}
    count_writes.clear()
    convert(src, dst, progress=False)
    assert count_writes == [], "same settings: nothing to repack"
    assert {name: (dst / name).read_bytes() for name in folder_files(dst)} == before
    for other in (dict(bits=8), dict(group_size=32), dict(dtype="float16")):
        with pytest.raises(CheckpointError, match="already holds a model converted with other settings"):
            convert(src, dst, progress=False, **other)
        assert folder_files(dst) == sorted(before), "a refused run must leave the folder as it was"
    assert verify(dst, progress=False) == []
    flash_moe.load(dst)


def test_unfinished_folder_with_other_settings(sources, tmp_path, monkeypatch):
    src = sources("text_fused")[0]
    dst = tmp_path / "dst"
    interrupted(src, dst, 1, monkeypatch)
    with pytest.raises(CheckpointError, match="unfinished conversion with other settings"):
        convert(src, dst, bits=8, progress=False)

"""Hostile model folders, ids and options on the load / run side (issue 12).

Each test builds its hostile input in a copy of a tiny converted model and asserts the exact outcome: the
error type and the name (file, key, layer, expert, option) the message must contain. Cases that would hang
without their fix (a FIFO) run under a few-second alarm.
"""

import json
import os
import shutil
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import flash_moe
import flash_moe.generation as gen
import importlib
from flash_moe import cli
from flash_moe.files import CheckpointError
from flash_moe.generation import generate_step
from flash_moe.layout import ExpertLayout, ModelLayout, expert_checksum
from flash_moe.safetensors_io import read_header
from flash_moe.sample import make_logits_processors, make_sampler
from flash_moe.layer_files import verify
from flash_moe.synthetic import qwen35_397b_config, write_synthetic

VOCAB = 150


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    config = qwen35_397b_config(num_layers=4, vocab_size=VOCAB)
    config.update(hidden_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=8,
                  num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32)
    return write_synthetic(tmp_path_factory.mktemp("hostile") / "m", config, bits=4, seed=3, progress=False)


@pytest.fixture
def folder(tiny, tmp_path) -> Path:
    """A fresh copy of the tiny converted model to damage."""
    return Path(shutil.copytree(tiny, tmp_path / "m"))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: SIGALRM interrupts a blocking open or read in the main thread."""
    def expire(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---- 1. token ids -------------------------------------------------------------------------------

@pytest.mark.parametrize("ids,bad", [([10**6, 5], "1000000"), ([[3, -1]], "-1"), ([VOCAB], str(VOCAB))])
def test_model_call_refuses_ids_out_of_range(tiny, ids, bad):
    model = flash_moe.load(tiny)
    with pytest.raises(ValueError, match=rf"token id {bad} is out of range .*vocab_size {VOCAB}"):
        model(mx.array(ids))
    with pytest.raises(ValueError, match="token ids must be integers"):
        model(mx.array([1.0, 2.0]))
    assert model(mx.array([0, VOCAB - 1])).shape == (1, 2, VOCAB)


def test_generate_refuses_ids_out_of_range(demo):
    """Before the fix this killed the process with SIGSEGV (an embedding read far outside the table)."""
    with pytest.raises(ValueError, match=r"token id 1000000 is out of range .*vocab_size 4096"):
        demo.generate([10**6, 5], max_tokens=2)
    with pytest.raises(ValueError, match=r"token id -3 is out of range"):
        list(generate_step(mx.array([5, -3]), demo, max_tokens=2))


def test_tokenizer_tokens_past_the_vocabulary(demo_folder, tmp_path):
    from tokenizers import Tokenizer as RawTokenizer

    folder = tmp_path / "model"
    shutil.copytree(demo_folder, folder)
    raw = RawTokenizer.from_file(str(folder / "tokenizer.json"))
    raw.add_tokens(["<hostile_token>"])  # a tokenizer.json whose added tokens reach past vocab_size
    raw.save(str(folder / "tokenizer.json"))
    model = flash_moe.load(folder)
    with pytest.raises(ValueError, match=r"token id 4096 is out of range .*vocab_size 4096.*tokenizer"):
        model.generate("a <hostile_token>", max_tokens=2)


def test_generation_checks_ids_once_not_per_token(demo, monkeypatch):
    calls = {"call": 0, "gen": 0}
    real = gen.check_token_ids

    def counting(key):
        def check(*a, **k):
            calls[key] += 1
            return real(*a, **k)
        return check

    load_module = importlib.import_module("flash_moe.load")  # LoadedModel.__call__'s check lives there
    monkeypatch.setattr(load_module, "check_token_ids", counting("call"))
    monkeypatch.setattr(gen, "check_token_ids", counting("gen"))
    out = list(demo.stream_generate([5, 6, 7], max_tokens=8))
    assert len(out) == 8
    assert calls == {"call": 0, "gen": 2}  # the ids once in stream_generate, the prompt once in generate_step


# ---- 5/6. non-regular files ---------------------------------------------------------------------

FILES = ["experts/layer_001.bin", "layout.json", "config.json", "resident.safetensors"]


@pytest.mark.parametrize("name", FILES)
def test_fifo_is_refused_by_load_generate_verify(folder, name):
    os.unlink(folder / name)
    os.mkfifo(folder / name)
    with deadline(10):
        with pytest.raises(CheckpointError, match=rf"{name}: not a regular file \(a FIFO\)"):
            flash_moe.load(folder)
        with pytest.raises(SystemExit, match=rf"flash-moe generate: error: .*{name}: not a regular file"):
            cli.main(["generate", "--model", str(folder), "--prompt", "hi", "--max-tokens", "1"])
        if name in ("experts/layer_001.bin", "layout.json"):  # what verify reads
            with pytest.raises(SystemExit, match=rf"flash-moe verify: error: .*{name}: not a regular file"):
                cli.main(["verify", str(folder)])


@pytest.mark.parametrize("name", ["layout.json", "config.json", "tokenizer.json"])
def test_link_to_dev_zero_is_refused(folder, name):
    (folder / name).unlink(missing_ok=True)
    os.symlink("/dev/zero", folder / name)
    with deadline(10):
        with pytest.raises(CheckpointError, match=rf"{name}: not a regular file \(a character device\)"):
            model = flash_moe.load(folder)
            model.tokenizer  # the tokenizer files are opened on first use


def test_fifo_layer_file_refused_by_expert_store(folder):
    os.unlink(folder / "experts/layer_002.bin")
    os.mkfifo(folder / "experts/layer_002.bin")
    with deadline(10), pytest.raises(CheckpointError, match=r"layer_002\.bin: not a regular file"):
        verify(folder, progress=False)


# ---- 10. values that disagree -------------------------------------------------------------------

def relayout(folder: Path, config_too: bool, **change) -> ModelLayout:
    """Rewrite layout.json self-consistently with other expert settings (and config.json's record of them)."""
    old = ModelLayout.read(folder)
    e = old.expert
    new = ExpertLayout(**{**dict(hidden=e.hidden, intermediate=e.intermediate, bits=e.bits,
                                 group_size=e.group_size, dtype=e.dtype), **change})
    layout = ModelLayout(new, old.num_experts, old.moe_layers, old.checksums)
    (folder / "layout.json").write_text(json.dumps(layout.to_json()))
    if config_too:
        keys = {"bits": "expert_bits", "group_size": "expert_group_size", "dtype": "dtype"}
        edit_json(folder / "config.json", lambda c: c["flash_moe"].update({keys[k]: v for k, v in change.items()}))
    return layout


@pytest.mark.parametrize("change,word", [(dict(bits=8), "flash_moe.expert_bits 8 vs 4"),
                                         (dict(group_size=32), "flash_moe.expert_group_size 32 vs 64"),
                                         (dict(dtype="float16"), "flash_moe.dtype 'float16' vs 'bfloat16'")])
def test_layout_disagrees_with_config_record(folder, change, word):
    relayout(folder, config_too=False, **change)
    with pytest.raises(CheckpointError, match=rf"layout\.json disagrees with config\.json: {word}"):
        flash_moe.load(folder)


def test_layout_disagrees_with_layer_file_size(folder):
    layout = relayout(folder, config_too=True, bits=8)  # 8 bits: a larger stride than the 4-bit files have
    assert layout.layer_bytes() != (folder / "experts/layer_000.bin").stat().st_size
    with pytest.raises(CheckpointError, match=rf"layer_000\.bin: layer 0 file has 131,072 bytes, expected "
                                              rf"{layout.layer_bytes():,}"):
        flash_moe.load(folder)
    with pytest.raises(CheckpointError, match=r"layer_000\.bin: layer 0 file has"):
        flash_moe.load(folder, stream=False)


@pytest.mark.parametrize("change", [dict(bits=2), dict(group_size=32)])
def test_layout_with_same_file_size_is_caught_by_checksums(folder, change):
    """Other bits or group size with the same stride: the file sizes agree, but each expert's byte count
    (what the checksum covers) does not, so verify and load(verify=...) catch it."""
    layout = relayout(folder, config_too=True, **change)
    assert layout.layer_bytes() == (folder / "experts/layer_000.bin").stat().st_size
    model = flash_moe.load(folder, verify="full")
    with pytest.raises(CheckpointError, match=r"layer \d+ expert \d+: checksum .*flash-moe verify"):
        model(mx.array([1, 2, 3, 4, 5, 6]))
    assert len(verify(folder, progress=False)) == 4 * 8


def test_float16_layout_over_bfloat16_data(folder):
    relayout(folder, config_too=True, dtype="float16")
    with pytest.raises(CheckpointError, match=r"layout\.json: experts are float16, but resident\.safetensors "
                                              r"stores '.*' as bfloat16"):
        flash_moe.load(folder)


@pytest.mark.parametrize("value", [0, -1, 9, "2", 2.5, True, None])
def test_config_num_experts_per_tok(folder, value):
    edit_json(folder / "config.json", lambda c: c.update(num_experts_per_tok=value))
    with pytest.raises(CheckpointError, match=r"config\.json: num_experts_per_tok must be"):
        flash_moe.load(folder)


@pytest.mark.parametrize("key,value", [("hidden_size", "128"), ("vocab_size", 150.0), ("rms_norm_eps", "1e-6"),
                                       ("num_key_value_heads", 3), ("tie_word_embeddings", "no"),
                                       ("layer_types", ["full_attention", "mamba"] * 2), ("mlp_only_layers", [7])])
def test_config_types_and_ranges(folder, key, value):
    edit_json(folder / "config.json", lambda c: c.update({key: value}))
    with pytest.raises(CheckpointError, match=rf"config\.json: {key} must be"):
        flash_moe.load(folder)


@pytest.mark.parametrize("k", [2.5, True, "4", 2.0])
def test_experts_per_token_type(tiny, k):
    with pytest.raises(ValueError, match=r"^experts_per_token must be an integer, got "):
        flash_moe.load(tiny, experts_per_token=k)


# ---- 11. safetensors offsets, damaged experts, non-finite values ---------------------------------

def rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def first_two(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def test_overlapping_resident_tensors(folder):
    path = folder / "resident.safetensors"

    def overlap(h):  # the second tensor starts inside the first, the same size: the end would leave a gap
        a, b = first_two(h)
        shift = 2
        h[b]["data_offsets"] = [o - shift for o in h[b]["data_offsets"]]
    rewrite_header(path, overlap)
    a, b = first_two(json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]]))
    with pytest.raises(CheckpointError, match=rf"resident\.safetensors: tensors '{a}' and '{b}' overlap"):
        flash_moe.load(folder)


def test_shifted_resident_tensor(folder):
    path = folder / "resident.safetensors"
    rewrite_header(path, lambda h: h[first_two(h)[0]].update(
        data_offsets=[o + 4 for o in h[first_two(h)[0]]["data_offsets"]]))
    with pytest.raises(CheckpointError, match=r"resident\.safetensors: tensors '.*' and '.*' overlap"):
        flash_moe.load(folder)


def test_source_header_offsets(tmp_path):
    """The converter's reader (SafetensorsIndex) parses source files with the same read_header."""
    path = tmp_path / "model.safetensors"
    mx.save_safetensors(str(path), {"x.weight": mx.zeros((4, 4)), "y.weight": mx.zeros((4, 4))})
    assert set(read_header(path)) == {"x.weight", "y.weight"}
    header = read_header(path)
    a, b = sorted(header, key=lambda k: header[k].start)
    rewrite_header(path, lambda h: h[b].update(data_offsets=h[a]["data_offsets"]))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensors '(x|y)\.weight' and '(x|y)\.weight' "
                                              r"overlap \(bytes 0\.\.64 of the data belong to both\)") as err:
        read_header(path)
    assert "'x.weight'" in str(err.value) and "'y.weight'" in str(err.value)
    rewrite_header(path, lambda h: h[b].pop("dtype"))  # was KeyError: 'dtype'
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{b}': no dtype"):
        read_header(path)
    rewrite_header(path, lambda h: h[b].update(dtype="F32", data_offsets=[-64, 0]))  # was [Errno 22] on read
    with pytest.raises(CheckpointError, match=rf"tensor '{b}': data_offsets point outside the file's data "
                                              r"\(bytes -64\.\.0 of 128\)"):
        read_header(path)
    rewrite_header(path, lambda h: h[b].update(shape=[4, 5], data_offsets=[64, 128]))
    with pytest.raises(CheckpointError, match=rf"tensor '{b}' is F32 \[4, 5\] \(80 bytes\), but its data_offsets "
                                              r"span 64 bytes"):
        read_header(path)


def nan_scales(folder: Path, layer: int, experts, fix_checksums: bool) -> None:
    """NaN scales (bfloat16 0x7FC0) in the gate projection of ``experts`` of ``layer``."""
    layout = ModelLayout.read(folder)
    t, path = layout.expert.tensor("gate_proj.scales"), folder / layout.layer_file(layer)
    raw = bytearray(path.read_bytes())
    for e in experts:
        start = e * layout.expert.stride + t.offset
        raw[start : start + t.nbytes] = np.full(t.nbytes // 2, 0x7FC0, np.uint16).tobytes()
        if fix_checksums:
            layout.checksums[layer][e] = expert_checksum(raw[e * layout.expert.stride :][: layout.expert.expert_bytes])
    path.write_bytes(raw)
    (folder / "layout.json").write_text(json.dumps(layout.to_json()))


@pytest.mark.parametrize("mode", ["full", "sample"])
def test_damaged_expert_is_caught_on_first_read(folder, mode):
    nan_scales(folder, 0, range(8), fix_checksums=False)
    model = flash_moe.load(folder, verify=mode)
    message = (r"layer_000\.bin: layer 0 expert {}: checksum [0-9a-f]{{32}} does not match [0-9a-f]{{32}} in "
               r"layout\.json.*run `flash-moe verify")
    if mode == "full":
        with pytest.raises(CheckpointError, match=message.format(r"\d")):
            model(mx.array([1, 2, 3]))
    else:  # the sample of layer 0 (8 experts) is expert 0: another damaged expert passes unseen
        model.store.fetch(0, [1, 2])
        with pytest.raises(CheckpointError, match=message.format(0)):
            model.store.fetch(0, [1, 0])
    with pytest.raises(CheckpointError, match=r"layer_000\.bin: layer 0 expert 0: checksum does not match"):
        flash_moe.load(folder, stream=False, verify=mode)


def test_verify_full_passes_a_sound_model_and_checks_each_expert_once(folder):
    model = flash_moe.load(folder, verify="full")
    tokens = mx.array(np.arange(40) % VOCAB)
    model(tokens)
    store = model.store
    read = store.stats.usage > 0
    assert read.any() and not (store._unchecked & read).any()  # every expert read so far was checked
    assert flash_moe.load(folder, stream=False, verify="full") is not None
    with pytest.raises(ValueError, match=r"verify must be one of \('off', 'sample', 'full'\), got 'yes'"):
        flash_moe.load(folder, verify="yes")


def test_non_finite_logits_raise(folder):
    """NaN scales whose checksums were recomputed (damage at conversion time): only the logits show it."""
    nan_scales(folder, 0, range(8), fix_checksums=True)
    model = flash_moe.load(folder, verify="full")  # the checksums match: nothing to see there
    with pytest.raises(CheckpointError, match=r"token 1: the model's logits are not finite \(nan\).*flash-moe verify"):
        list(generate_step(mx.array([1, 2, 3]), model, max_tokens=3))


@pytest.mark.parametrize("name,value", [("temperature", float("nan")), ("temperature", float("inf")),
                                        ("temperature", -1.0), ("top_p", float("nan")), ("top_p", float("inf")),
                                        ("min_p", float("nan")), ("top_k", 2.5)])
def test_sampler_refuses_non_finite(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        make_sampler(**{name: value})


@pytest.mark.parametrize("name,value", [("repetition_penalty", float("nan")), ("repetition_penalty", float("inf")),
                                        ("presence_penalty", float("nan")), ("frequency_penalty", float("-inf")),
                                        ("repetition_context_size", -1)])
def test_logits_processors_refuse_non_finite(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        make_logits_processors(**{name: value})


@pytest.mark.parametrize("seed", [-1, 2**70, 1.5, "3", True])
def test_bad_seed_is_refused_before_prefill(tiny, seed, monkeypatch):
    model = flash_moe.load(tiny)
    monkeypatch.setattr(model, "forward", lambda *a: pytest.fail("prefill ran before the seed was checked"))
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        list(generate_step(mx.array([1, 2, 3]), model, max_tokens=2, seed=seed))


# ---- 12. messages that name the file and the field ------------------------------------------------

@pytest.mark.parametrize("edit,words", [
    (lambda j: j.pop("expert"), r"layout\.json: expert must be an object with exactly \['bits', 'dtype'"),
    (lambda j: j["expert"].pop("dtype"), r"layout\.json: expert must be an object with exactly .* got \['bits', "
                                         r"'group_size', 'hidden', 'intermediate'\]"),
    (lambda j: j["expert"].update(group_size=0), r"layout\.json: expert: group_size must be a positive integer, got 0"),
    (lambda j: j.update(version="1"), r"layout\.json: format version '1' is not supported .*the integer"),
    (lambda j: j["expert"].update(hidden="128"), r"layout\.json: expert: hidden must be a positive integer, got '128'"),
    (lambda j: j.update(num_experts="8"), r"layout\.json: num_experts must be a positive integer, got '8'"),
    (lambda j: j["layers"]["1"].update(file="../../etc/passwd"), r"layout\.json: layer 1: file '\.\./\.\./etc/passwd'"),
    (lambda j: j["layers"]["2"]["checksums"].__setitem__(3, "zz"), r"layout\.json: layer 2 expert 3: checksum 'zz'"),
    (lambda j: j["tensors"][0].update(offset=64), r"layout\.json: tensors disagree with the layout computed"),
    (lambda j: j.update(layers=[0, 1]), r"layout\.json: layers must be an object, got list"),
])
def test_layout_messages_name_file_and_field(folder, edit, words):
    edit_json(folder / "layout.json", edit)
    with pytest.raises(CheckpointError, match=words):
        flash_moe.load(folder)


def test_config_string_where_int_belongs(folder):
    """Was 'layout.json disagrees with config.json: hidden 128 vs 128' (a string against an int)."""
    edit_json(folder / "config.json", lambda c: c.update(hidden_size="128"))
    with pytest.raises(CheckpointError, match=r"config\.json: hidden_size must be a positive integer, got '128'"):
        flash_moe.load(folder)


@pytest.mark.parametrize("size", [100_000, 131_072 + 10])
def test_resident_load_of_wrongly_sized_layer_file(folder, size):
    """Was numpy's 'cannot reshape array of size 100000 into shape (8,16384)'."""
    os.truncate(folder / "experts/layer_001.bin", size)
    with pytest.raises(CheckpointError, match=rf"layer_001\.bin: layer 1 file has {size:,} bytes, expected 131,072"):
        flash_moe.load(folder, stream=False)

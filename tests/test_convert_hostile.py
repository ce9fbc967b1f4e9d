"""convert against hostile input and interrupted or concurrent work (issue 12, convert side).

Each case builds its hostile input in a temp folder from two tiny random checkpoints: A (sharded, with an
index) and B (one file, other weights). What must hold: nothing outside DST is ever written (a victim file
stays byte for byte), DST never mixes two models, a second convert into DST is refused at once naming the
process that holds it, a FIFO never blocks, and a broken source fails naming its tensor and file before any
expert layer is packed.
"""

from __future__ import annotations

import filecmp
import importlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import hf_models
from conftest import derive_seed

import flash_moe
convert_mod = importlib.import_module("flash_moe.convert")  # the module: flash_moe.convert is the function, as in mlx-lm
from flash_moe.checkpoint import CheckpointError
from flash_moe.cli import main
from flash_moe.convert import convert
from flash_moe.files import LOCK_NAME, locked
from flash_moe.layout import ModelLayout
from flash_moe.layer_files import verify

CONFIG = dict(hf_models.QWEN3_5_CONFIGS["interval4_e8_top2"], num_experts=12, moe_intermediate_size=128)
E, D, I = CONFIG["num_experts"], CONFIG["hidden_size"], CONFIG["moe_intermediate_size"]
VICTIM = b"outside DST: must never change\n" * 4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """name -> a pristine source folder: "A" (sharded + index, tokenizer files) or "B" (one file)."""
    made = {}
    for name, shard in (("A", "150KB"), ("B", None)):
        folder, _ = hf_models.qwen3_5_moe_text(tmp_path_factory.mktemp(name), CONFIG, seed=derive_seed(f"hostile.{name}"),
                                               layout="fused", shard_size=shard)
        (folder / "tokenizer.json").write_text(json.dumps({"model": f"tokenizer of {name}"}))
        (folder / "chat_template.jinja").write_text(f"{{{{ messages }}}} ({name})")
        made[name] = folder
    (made["A"] / "merges.txt").write_text("a b\n")  # B has none: a clean conversion of B has none either
    assert (made["A"] / "model.safetensors.index.json").exists() and len(list(made["A"].glob("*.safetensors"))) > 1
    return made


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    """name -> a clean conversion of that source into a fresh folder."""
    return {name: convert(folder, tmp_path_factory.mktemp(f"ref{name}") / "out", progress=False)
            for name, folder in src.items()}


def copy_source(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "src"))


def folder_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in folder_files(folder)}


def assert_same_folder(a: Path, b: Path, ignore=()) -> None:
    names = [n for n in folder_files(a) if n not in ignore]
    assert names == folder_files(b)
    for name in names:
        assert not (a / name).is_symlink(), f"{name} is a link"
        assert filecmp.cmp(a / name, b / name, shallow=False), f"{name} differs"


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block blocks longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Crash(Exception):
    pass


def interrupted(src: Path, dst: Path, layer: int, monkeypatch) -> None:
    """A conversion that dies while packing ``layer``, after its first batch of experts (a simulated kill)."""
    real = convert_mod.ExpertSource.read_float

    def crashing(self, first, count):
        if self.layer == layer and first > 0:
            raise Crash(f"simulated crash in layer {layer}")
        return real(self, first, count)

    with monkeypatch.context() as m:
        m.setattr(convert_mod.ExpertSource, "read_float", crashing)
        with pytest.raises(Crash):
            convert(src, dst, progress=False)


def edit_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header with ``edit(header)``; the data bytes stay as they are."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def file_of(folder: Path, key: str) -> Path:
    for f in sorted(folder.glob("*.safetensors")):
        (n,) = struct.unpack("<Q", f.read_bytes()[:8])
        if key in json.loads(f.read_bytes()[8 : 8 + n]):
            return f
    raise KeyError(key)


# ---------------------------------------------------------------- no writes outside DST (item 2)


LINKED = ["tokenizer.json", "chat_template.jinja", "merges.txt", "config.json", "layout.json", "progress.json",
          "resident.safetensors", "resident.partial.safetensors", "experts/layer_000.bin.partial",
          "experts/layer_002.bin", "config.json.tmp", "layout.json.tmp", "progress.json.tmp", "tokenizer.json.tmp",
          "merges.txt.tmp", LOCK_NAME]


@pytest.mark.parametrize("name", LINKED)
def test_link_in_dst_is_replaced_not_followed(src, reference, tmp_path, name):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(VICTIM)
    dst = tmp_path / "dst"
    (dst / "experts").mkdir(parents=True)
    (dst / name).symlink_to(victim)
    convert(src["A"], dst, progress=False)
    assert victim.read_bytes() == VICTIM, f"convert wrote through DST/{name}"
    assert_same_folder(dst, reference["A"])


def test_linked_experts_folder_is_replaced(src, reference, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("layer_000.bin", "layer_000.bin.partial", "layer_001.bin"):
        (outside / name).write_bytes(VICTIM)
    before = snapshot(outside)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "experts").symlink_to(outside, target_is_directory=True)
    convert(src["A"], dst, progress=False)
    assert snapshot(outside) == before, "convert wrote into the folder DST/experts linked to"
    assert (dst / "experts").is_dir() and not (dst / "experts").is_symlink()
    assert_same_folder(dst, reference["A"])


@pytest.mark.parametrize("name", ["progress.json", "layout.json", "config.json", "experts/layer_001.bin"])
def test_fifo_in_dst_is_replaced(src, reference, tmp_path, name):
    dst = tmp_path / "dst"
    (dst / "experts").mkdir(parents=True)
    os.mkfifo(dst / name)
    with deadline(60):
        convert(src["A"], dst, progress=False)
    assert_same_folder(dst, reference["A"])


# ---------------------------------------------------------------- one source per folder (item 3)


def test_other_source_refused_and_overwrite_starts_clean(src, reference, tmp_path):
    dst = tmp_path / "dst"
    convert(src["A"], dst, progress=False)
    record = json.loads((dst / "layout.json").read_text())["conversion"]
    assert record["source"]["path"] == str(src["A"].resolve()) and record["source"]["fingerprint"].startswith("sha256:")
    assert record["settings"]["bits"] == 4
    (dst / "notes.txt").write_text("mine")  # not convert's: must survive --overwrite
    (dst / "experts" / "keep.txt").write_text("mine too")
    before = snapshot(dst)

    with pytest.raises(CheckpointError) as e:
        convert(src["B"], dst, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(src["A"].resolve()) in msg and str(src["B"].resolve()) in msg and "--overwrite" in msg
    assert snapshot(dst) == before, "a refused run must leave the folder as it was"

    convert(src["B"], dst, progress=False, overwrite=True)
    assert (dst / "notes.txt").read_text() == "mine" and (dst / "experts" / "keep.txt").read_text() == "mine too"
    assert_same_folder(dst, reference["B"], ignore=("notes.txt", "experts/keep.txt"))  # merges.txt of A is gone
    assert verify(dst, progress=False) == []


def test_killed_conversion_resumed_from_other_source_refused(src, reference, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    interrupted(src["A"], dst, 2, monkeypatch)
    assert sorted(json.loads((dst / "progress.json").read_text())["layers"]) == ["0", "1"]
    before = snapshot(dst)
    with pytest.raises(CheckpointError, match="unfinished conversion of .* not of "):
        convert(src["B"], dst, progress=False)
    assert snapshot(dst) == before
    convert(src["A"], dst, progress=False)  # the same source still resumes
    assert_same_folder(dst, reference["A"])


def test_changed_source_refused(src, tmp_path):
    source = copy_source(src["A"], tmp_path)
    dst = convert(source, tmp_path / "dst", progress=False)
    hf_models.edit_config(source, lambda c: c.update(rms_norm_eps=1e-5))
    with pytest.raises(CheckpointError, match=r"as it was \(sha256:.*have changed since \(sha256:"):
        convert(source, dst, progress=False)
    convert(source, dst, progress=False, overwrite=True)
    assert json.loads((dst / "config.json").read_text())["rms_norm_eps"] == 1e-5


def test_unrecorded_source_refused(src, tmp_path):
    """A folder whose layout.json does not say where it came from (an older flash_moe) is not added to."""
    dst = convert(src["A"], tmp_path / "dst", progress=False)
    data = json.loads((dst / "layout.json").read_text())
    del data["conversion"]
    (dst / "layout.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="source is not recorded"):
        convert(src["A"], dst, progress=False)


def test_other_settings_refused_on_finished_folder(src, tmp_path):
    dst = convert(src["A"], tmp_path / "dst", progress=False)
    with pytest.raises(CheckpointError, match="other settings"):
        convert(src["A"], dst, resident_bits=8, progress=False)  # not part of the expert layout


def test_hub_revisions_are_different_sources(src, tmp_path, monkeypatch):
    import huggingface_hub

    folders = {"r1": src["A"], "r2": src["B"]}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, revision=None, **kw: str(folders[revision]))
    dst = convert("org/model", tmp_path / "dst", revision="r1", progress=False)
    assert json.loads((dst / "layout.json").read_text())["conversion"]["source"]["revision"] == "r1"
    with pytest.raises(CheckpointError, match="org/model@r1 .* not of org/model@r2"):
        convert("org/model", dst, revision="r2", progress=False)


def test_cli_overwrite(src, reference, tmp_path, capsys):
    dst = tmp_path / "dst"
    main(["convert", str(src["A"]), str(dst)])
    with pytest.raises(SystemExit) as e:
        main(["convert", str(src["B"]), str(dst)])
    assert str(e.value).startswith("flash-moe convert: error: ") and "--overwrite" in str(e.value)
    main(["convert", str(src["B"]), str(dst), "--overwrite"])
    assert_same_folder(dst, reference["B"])


# ---------------------------------------------------------------- one convert at a time (item 4)


HOLDER = """
import importlib, sys
c = importlib.import_module("flash_moe.convert")
real = c._write_layer
def waiting(*args):
    print("packing", flush=True)
    sys.stdin.readline()  # until the test lets it go
    return real(*args)
c._write_layer = waiting
c.convert(sys.argv[1], sys.argv[2], progress=False)
"""


def test_second_convert_refused_naming_the_holder(src, reference, tmp_path):
    dst = tmp_path / "dst"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(src["A"]), str(dst)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "packing"
        assert (dst / LOCK_NAME).read_text().strip() == str(holder.pid)
        start = time.monotonic()
        with pytest.raises(CheckpointError, match=rf"in use by another flash-moe convert \(pid {holder.pid}\b"):
            convert(src["A"], dst, progress=False)
        with pytest.raises(CheckpointError, match=rf"pid {holder.pid}\b"):
            convert(src["B"], dst, progress=False, overwrite=True)  # not even --overwrite gets in
        assert time.monotonic() - start < 10
        holder.stdin.close()  # let it finish
        assert holder.wait(timeout=120) == 0
    finally:
        holder.kill()
    assert not (dst / LOCK_NAME).exists()
    assert_same_folder(dst, reference["A"])
    convert(src["A"], dst, progress=False)  # free again


def test_lock_is_released_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with locked(tmp_path):
            assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()
    with locked(tmp_path):
        pass


# ---------------------------------------------------------------- inputs that would block or escape (items 5, 6)


@pytest.mark.parametrize("which,name", [("A", "config.json"), ("A", "model.safetensors.index.json"),
                                        ("A", "model-00001-of-0000N.safetensors"), ("B", "model.safetensors"),
                                        ("A", "tokenizer.json")])
def test_fifo_in_source(src, tmp_path, which, name):
    source = copy_source(src[which], tmp_path)
    if "0000N" in name:
        name = sorted(p.name for p in source.glob("model-*.safetensors"))[0]
    (source / name).unlink()
    os.mkfifo(source / name)
    with deadline(30), pytest.raises(CheckpointError, match=rf"{name}: not a regular file \(a FIFO\)"):
        convert(source, tmp_path / "dst", progress=False)


@pytest.mark.parametrize("outside", ["../elsewhere.safetensors", "ABSOLUTE"])
def test_index_naming_files_outside_refused(src, tmp_path, outside):
    source = copy_source(src["A"], tmp_path)
    stray = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(sorted(source.glob("model-*.safetensors"))[0], stray)
    outside = str(stray) if outside == "ABSOLUTE" else outside
    index = source / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = sorted(data["weight_map"])[0]
    data["weight_map"][key] = outside
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json: names '{outside}', outside the model folder"):
        convert(source, tmp_path / "dst", progress=False)


# ---------------------------------------------------------------- broken sources: found first, named (item 12)


def shape_edit(key: str, shape: list[int]):
    return lambda h: h[key].update(shape=shape)


def offsets_edit(key: str, shift_start: int, shift_end: int):
    def edit(h):
        a, b = h[key]["data_offsets"]
        h[key]["data_offsets"] = [a + shift_start, b + shift_end]
    return edit


NORM = "model.layers.0.input_layernorm.weight"
SHARED_DOWN = "model.layers.0.mlp.shared_expert.down_proj.weight"  # (D, shared I) = (64, 48)
GATE_UP, DOWN = "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"


@pytest.mark.parametrize("key,edit,message", [
    (NORM, shape_edit(NORM, [D + 1]), rf"is F32 \[{D + 1}\] \({4 * (D + 1)} bytes\), but its data_offsets span {4 * D} bytes"),
    (DOWN, shape_edit(DOWN, [E, D, I - 1]), r"but its data_offsets span"),
    (DOWN, shape_edit(DOWN, [E, I, D]), rf"expected a float tensor of shape \[{E}, {D}, {I}\]"),  # same bytes
    (SHARED_DOWN, shape_edit(SHARED_DOWN, [48, D]), rf"has shape \(48, {D}\), expected \({D}, 48\)"),  # same bytes
    (GATE_UP, offsets_edit(GATE_UP, -(16 << 30), 0), r"data_offsets span"),  # would ask for a 16 GiB buffer
    (NORM, offsets_edit(NORM, -(1 << 20), -(1 << 20)), r"data_offsets point outside the file's data"),
    (NORM, offsets_edit(NORM, 4, 4), r"overlap|outside the file's data"),  # shifted: a neighbour's bytes
    (NORM, lambda h: h[NORM].update(dtype="I32"), r"is int32, not a floating-point weight"),  # same bytes
])
def test_broken_source_tensor_named_before_any_layer(src, tmp_path, key, edit, message):
    source = copy_source(src["A"], tmp_path)
    shard = file_of(source, key)
    edit_header(shard, edit)
    dst = tmp_path / "dst"
    with pytest.raises(CheckpointError, match=message) as e:
        convert(source, dst, progress=False)
    assert str(e.value).startswith(str(shard)) and repr(key) in str(e.value), e.value
    assert not list(dst.glob("experts/layer_*")), "the source must be checked before any expert layer is packed"


MUTATIONS = st.sampled_from(["shape", "offsets", "dtype"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_header_mutation_refused_before_any_layer(src, tmp_path_factory, data):
    """Property: change one thing in one source tensor's header entry (a dimension, an offset, the dtype) and
    convert refuses, naming the file, before it packs a single expert layer. (Every mutation is refused:
    the bytes of a well-formed shard are contiguous, so any other span overlaps, overruns or mismatches.)"""
    source = copy_source(src["A"], tmp_path_factory.mktemp("mut"))
    shard = data.draw(st.sampled_from(sorted(source.glob("model-*.safetensors"))), label="shard")
    (n,) = struct.unpack("<Q", shard.read_bytes()[:8])
    header = json.loads(shard.read_bytes()[8 : 8 + n])
    key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")), label="tensor")
    meta = dict(header[key])
    kind = data.draw(MUTATIONS, label="mutation")
    if kind == "shape":
        shape = list(meta["shape"])
        if shape and data.draw(st.booleans(), label="change a dimension"):
            i = data.draw(st.integers(0, len(shape) - 1), label="dimension")
            shape[i] = data.draw(st.integers(-2, 2 * shape[i] + 2).filter(lambda d: d != shape[i]), label="size")
        else:  # reshape keeping the element count: a dimension of 1 added or [n] <-> [n, 1]
            shape = [1, *shape] if data.draw(st.booleans(), label="prepend") else [*shape, 1]
        meta["shape"] = shape
    elif kind == "offsets":
        a, b = meta["data_offsets"]
        shifts = st.sampled_from([-(16 << 30), -(1 << 20), -8, -4, -1, 1, 4, 8, 1 << 20, 16 << 30])
        da, db = data.draw(st.tuples(shifts | st.just(0), shifts | st.just(0)).filter(lambda t: t != (0, 0)), label="shift")
        meta["data_offsets"] = [a + da, b + db]
    else:
        meta["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "I32", "U32", "F64", "I64", "U8"]), label="dtype")
    edit_header(shard, lambda h: h.update({key: meta}))
    dst = source.parent / "dst"
    with pytest.raises(ValueError) as e:
        convert(source, dst, progress=False)
    assert str(e.value).startswith(str(shard)) or str(e.value).startswith("layer "), e.value
    assert "\n" not in str(e.value)
    assert not list(dst.glob("experts/layer_*")), "refused only after packing experts"


def test_missing_expert_tensor_named(src, tmp_path):
    source = copy_source(src["A"], tmp_path)
    shard = file_of(source, DOWN)
    edit_header(shard, lambda h: h.update({"model.layers.1.mlp.experts.down_proj_": h.pop(DOWN)}))
    with pytest.raises(CheckpointError, match="layer 1: "):
        convert(source, tmp_path / "dst", progress=False)


def test_killed_in_first_layer_says_unfinished(src, tmp_path, monkeypatch):
    """Killed before any layer finished: loading DST says the conversion did not finish (not "config.json:
    missing"), and the resident weights are already written."""
    dst = tmp_path / "dst"
    interrupted(src["A"], dst, 0, monkeypatch)
    assert (dst / "resident.safetensors").exists() and not list(dst.glob("experts/*.bin"))
    with pytest.raises(CheckpointError, match="did not finish"):
        flash_moe.load(dst)


def test_resumed_run_keeps_finished_resident(src, reference, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    interrupted(src["A"], dst, 1, monkeypatch)
    calls = []
    real = convert_mod._write_resident
    monkeypatch.setattr(convert_mod, "_write_resident", lambda *a: calls.append(1) or real(*a))
    convert(src["A"], dst, progress=False)
    assert calls == [], "the resident weights were finished: not written again"
    assert_same_folder(dst, reference["A"])
    layout = ModelLayout.read(dst)
    assert layout.moe_layers == list(range(CONFIG["num_hidden_layers"]))

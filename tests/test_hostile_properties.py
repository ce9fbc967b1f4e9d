"""Property tests of the file parsers a hostile model folder reaches first (issue 12).

Random bytes and random mutations of valid inputs must never crash, hang or raise anything but the
library's own error: ``read_header`` of a safetensors file and ``ModelLayout.from_json`` / ``read`` of
layout.json either parse or raise ``CheckpointError``. What does parse must hold the invariants the readers
rely on. Examples are few (a few seconds in all) and each has a deadline.
"""

import json
import math
import struct
from datetime import timedelta

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flash_moe.files import CheckpointError
from flash_moe.layout import ExpertLayout, ModelLayout, expert_checksum
from flash_moe.safetensors_io import ITEMSIZE, read_header

SETTINGS = settings(max_examples=200, deadline=timedelta(seconds=2), database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def valid_st(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "valid.safetensors"
    mx.save_safetensors(str(path), {"a": mx.zeros((3, 4)), "b": mx.ones((5,), mx.bfloat16),
                                    "c": mx.zeros((2, 2), mx.uint32)}, metadata={"format": "mlx"})
    return path.read_bytes()


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def parse_or_refuse(path, raw: bytes):
    path.write_bytes(raw)
    try:
        tensors = read_header(path)
    except CheckpointError as e:
        assert str(path) in str(e)
        return None
    # What parses is safe to read: tensors tile the data section exactly, each the size its shape says.
    (n,) = struct.unpack("<Q", raw[:8])
    pos = 8 + n
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.nbytes)):
        assert t.start == pos and t.nbytes == math.prod(t.shape) * ITEMSIZE[t.dtype]
        pos += t.nbytes
    assert pos == len(raw)
    return tensors


@SETTINGS
@given(raw=st.binary(max_size=600))
def test_read_header_random_bytes(tmp_path, raw):
    parse_or_refuse(tmp_path / "x.safetensors", raw)


@SETTINGS
@given(raw=st.binary(min_size=0, max_size=200).map(lambda b: b"{" + b))
def test_read_header_random_header_text(tmp_path, raw):
    parse_or_refuse(tmp_path / "x.safetensors", struct.pack("<Q", len(raw)) + raw + bytes(64))


@SETTINGS
@given(data=st.data())
def test_read_header_byte_flips(tmp_path, valid_st, data):
    raw = bytearray(valid_st)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    parse_or_refuse(tmp_path / "x.safetensors", bytes(raw))


@SETTINGS
@given(data=st.data())
def test_read_header_field_mutations(tmp_path, valid_st, data):
    header, body = split(valid_st)
    key = data.draw(st.sampled_from(sorted(header)))
    if data.draw(st.booleans()) and isinstance(header[key], dict):
        field = data.draw(st.sampled_from(sorted(header[key]) + ["extra"]))
        choice = data.draw(st.sampled_from(["value", "offset", "drop"]))
        if choice == "drop":
            header[key].pop(field, None)
        elif choice == "offset" and key != "__metadata__":
            a, b = header[key]["data_offsets"]
            d = data.draw(st.integers(-64, 64))
            header[key]["data_offsets"] = data.draw(st.sampled_from([[a + d, b + d], [a, b + d], [a + d, b]]))
        else:
            header[key][field] = data.draw(json_values)
    else:
        header[key] = data.draw(json_values)
    parse_or_refuse(tmp_path / "x.safetensors", join(header, body))


def valid_layout() -> dict:
    e = ExpertLayout(128, 64, bits=4, group_size=64, dtype="bfloat16")
    sums = [expert_checksum(bytes([i])) for i in range(4)]
    return ModelLayout(e, 4, [0, 2], {0: sums, 2: sums}).to_json()


def paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


def layout_or_refuse(data, source="layout.json"):
    try:
        layout = ModelLayout.from_json(data, source)
    except CheckpointError as e:
        assert source in str(e)
        return None
    # What parses agrees with itself: writing it back gives the same layout.
    assert ModelLayout.from_json(layout.to_json()).to_json() == layout.to_json()
    assert all(len(layout.checksums[k]) == layout.num_experts for k in layout.moe_layers)
    return layout


def test_valid_layout_parses():
    assert layout_or_refuse(valid_layout()) is not None


@SETTINGS
@given(value=json_values)
def test_layout_random_json(value):
    layout_or_refuse(value)


@SETTINGS
@given(data=st.data())
def test_layout_mutations(data):
    doc = valid_layout()
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(list(paths(doc))[1:]))
        parent = doc
        for k in where[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            old = parent[where[-1]]
            new = data.draw(st.one_of(json_values, st.just(str(old)), st.just(-1), st.just(0), st.just(True),
                                      st.integers(-8, 8).map(lambda d, o=old: o + d if type(o) is int else d)))
            parent[where[-1]] = new
        if not isinstance(doc, dict) or not list(paths(doc))[1:]:
            break
    layout_or_refuse(doc)


@SETTINGS
@given(raw=st.binary(max_size=300) | st.builds(lambda v: json.dumps(v).encode(), json_values))
def test_layout_read_random_files(tmp_path, raw):
    (tmp_path / "layout.json").write_bytes(raw)
    try:
        ModelLayout.read(tmp_path)
    except CheckpointError as e:
        assert "layout.json" in str(e)

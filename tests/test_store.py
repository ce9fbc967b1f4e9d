"""ExpertStore against tiny packed files written here: byte-exact reads, the slot-set protocol, errors, stats."""

import errno
import json
import os
import random
import threading

import mlx.core as mx
import numpy as np
import pytest

from flash_moe import layer_files
from flash_moe import store as store_mod
from flash_moe.layout import ExpertLayout, ModelLayout, expert_checksum
from flash_moe.layer_files import ExpertReadError, verify
from flash_moe.store import ExpertStore, HostSlotBuffers

HIDDEN, INTERMEDIATE, NUM_EXPERTS, MOE_LAYERS = 128, 64, 8, (0, 1, 3)


@pytest.fixture
def rng():
    seed = random.SystemRandom().randrange(2**32)
    print(f"seed={seed}")  # shown by pytest when a test fails
    return np.random.default_rng(seed)


def random_tensor(rng, dtype: str, shape) -> np.ndarray:
    """Random, finite values of one tensor as raw bytes (uint8)."""
    n = int(np.prod(shape))
    if dtype == "uint32":
        a = rng.integers(0, 2**32, n, dtype=np.uint32)
    elif dtype == "float32":
        a = rng.standard_normal(n, dtype=np.float32)
    elif dtype == "float16":
        a = rng.standard_normal(n).astype(np.float16)
    else:  # bfloat16: the top half of a float32
        a = (rng.standard_normal(n, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return a.view(np.uint8)


def make_model(folder, rng, expert: ExpertLayout, num_experts=NUM_EXPERTS, moe_layers=MOE_LAYERS) -> ModelLayout:
    """Write a packed model folder: random expert bytes, zero padding, real checksums, layout.json."""
    layout = ModelLayout(expert, num_experts, list(moe_layers))
    (folder / "experts").mkdir(parents=True)
    for layer in moe_layers:
        data = np.zeros(layout.layer_bytes(), np.uint8)
        for e in range(num_experts):
            for t in expert.tensors:
                start = e * expert.stride + t.offset
                data[start : start + t.nbytes] = random_tensor(rng, t.dtype, t.shape)
        with open(folder / layout.layer_file(layer), "wb") as f:
            data.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        starts = [e * expert.stride for e in range(num_experts)]
        layout.checksums[layer] = [expert_checksum(data[s : s + expert.expert_bytes]) for s in starts]
    (folder / "layout.json").write_text(json.dumps(layout.to_json(), indent=1))
    return layout


def file_tensor(folder, layout: ModelLayout, layer: int, expert: int, name: str) -> np.ndarray:
    """Independent read of one tensor's bytes (uint8)."""
    t = layout.expert.tensor(name)
    return np.fromfile(
        folder / layout.layer_file(layer), np.uint8, count=t.nbytes, offset=expert * layout.expert.stride + t.offset
    )


def mx_bytes(a: mx.array) -> np.ndarray:
    """The bytes MLX holds for ``a`` (bf16 viewed as uint16, since numpy has no bf16)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a).view(np.uint8).reshape(-1)


def unpack_lsb_first(words: np.ndarray, bits: int) -> np.ndarray:
    """The mx.quantize packing as a bitstream: value j of the stream in bits [bits*j, bits*(j+1))."""
    stream = np.unpackbits(words.astype("<u4").view(np.uint8), bitorder="little")
    return stream.reshape(-1, bits).astype(np.int64) @ (1 << np.arange(bits))


def as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.view({"float32": np.float32, "float16": np.float16}[dtype]).astype(np.float32)


def check_slots(folder, layout, layer, slot_set, ids):
    assert slot_set.count == len(ids) and slot_set.expert_ids == list(ids)
    for i, e in enumerate(ids):
        for t in layout.expert.tensors:
            arr = slot_set.arrays[t.name]
            assert arr.shape == (slot_set.arrays[t.name].shape[0], *t.shape)
            got = mx_bytes(arr[i])
            assert np.array_equal(got, file_tensor(folder, layout, layer, e, t.name)), (layer, e, t.name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_fetch_is_byte_exact_and_mlx_computes_on_it(tmp_path, rng, bits, dtype):
    expert = ExpertLayout(HIDDEN, INTERMEDIATE, bits=bits, group_size=64, dtype=dtype)
    layout = make_model(tmp_path, rng, expert)
    with ExpertStore(tmp_path, capacity=4, threads=3) as store:
        for layer in MOE_LAYERS:
            ids = [3, 0, 7]
            got = store.fetch(layer, np.array(ids) if layer == 1 else ids)
            check_slots(tmp_path, layout, layer, got, ids)
            # What an MLX computation sees equals an independent decode of the file bytes.
            for i, e in enumerate(ids):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    w_raw = file_tensor(tmp_path, layout, layer, e, f"{proj}.weight")
                    if bits == 16:
                        ours = got.arrays[f"{proj}.weight"][i].astype(mx.float32)
                        assert np.array_equal(np.array(ours).reshape(-1), as_float32(w_raw, dtype))
                        continue
                    groups = expert.tensor(f"{proj}.scales").shape
                    scales, biases = (
                        as_float32(file_tensor(tmp_path, layout, layer, e, f"{proj}.{kind}"), dtype).reshape(groups)
                        for kind in ("scales", "biases")
                    )
                    q = unpack_lsb_first(w_raw.view(np.uint32), bits).reshape(groups[0], -1)
                    ref = q * np.repeat(scales, 64, axis=1) + np.repeat(biases, 64, axis=1)
                    ours = mx.dequantize(  # in float32, so the comparison is not blurred by bf16 rounding
                        got.arrays[f"{proj}.weight"][i],
                        got.arrays[f"{proj}.scales"][i].astype(mx.float32),
                        got.arrays[f"{proj}.biases"][i].astype(mx.float32),
                        group_size=64,
                        bits=bits,
                    )
                    np.testing.assert_allclose(np.array(ours), ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_alignment_padding_between_tensors_is_skipped(tmp_path, rng, dtype):
    # Quantized tensors always end on 64-byte boundaries; odd unquantized shapes leave gaps to skip.
    expert = ExpertLayout(36, 18, bits=16, dtype=dtype)
    assert any(b.offset > a.offset + a.nbytes for a, b in zip(expert.tensors, expert.tensors[1:]))
    layout = make_model(tmp_path, rng, expert)
    with ExpertStore(tmp_path, capacity=3, threads=2) as store:
        check_slots(tmp_path, layout, 3, store.fetch(3, [3, 0, 7]), [3, 0, 7])


def test_round_robin_sets_are_separate_buffers(tmp_path, rng):
    layout = make_model(tmp_path, rng, ExpertLayout(HIDDEN, INTERMEDIATE, bits=4))
    with ExpertStore(tmp_path, capacity=3, num_sets=3, threads=2) as store:
        picks = [(0, [1, 2, 3]), (1, [7]), (3, [0, 5]), (0, [6, 4])]
        sets = [store.fetch(layer, ids) for layer, ids in picks]
        assert [s.index for s in sets] == [0, 1, 2, 0]
        for s, (layer, ids) in zip(sets[1:], picks[1:]):  # sets 1 and 2 still hold their own experts
            check_slots(tmp_path, layout, layer, s, ids)
        views = [v for i in range(3) for v in store.buffers.host_views(i).values()]  # all tensors of all sets
        assert not any(np.may_share_memory(a, b) for i, a in enumerate(views) for b in views[i + 1 :])
        per_set = sum(t.nbytes for t in layout.expert.tensors) * 3
        slack = HostSlotBuffers.SET_ALIGN + len(layout.expert.tensors) * HostSlotBuffers.TENSOR_ALIGN
        assert 3 * per_set <= store.resident_bytes() <= 3 * (per_set + slack)
        for view in store.buffers.host_views(1).values():  # fast kernel copies need aligned destinations
            assert view.ctypes.data % HostSlotBuffers.TENSOR_ALIGN == 0


def test_consumed_by_protects_lazy_computation(tmp_path, rng):
    layout = make_model(tmp_path, rng, ExpertLayout(HIDDEN, INTERMEDIATE, bits=16, dtype="float32"))
    down = {e: file_tensor(tmp_path, layout, 0, e, "down_proj.weight").view(np.float32) for e in (2, 5)}
    ref = {e: w.sum(dtype=np.float64) for e, w in down.items()}
    # float32 summation error scales with sum |w|, not with the (cancelling) sum itself
    tol = {e: 1e-6 * np.abs(w).sum(dtype=np.float64) for e, w in down.items()}
    assert abs(ref[2] - ref[5]) > 100 * max(tol.values()), "experts 2 and 5 must be told apart"
    with ExpertStore(tmp_path, capacity=1, num_sets=1, threads=1) as store:
        first = store.fetch(0, [2])
        guarded = first.arrays["down_proj.weight"][0].sum()  # lazy: not evaluated yet
        first.consumed_by(guarded)
        store.fetch(0, [5])  # same set: the store must evaluate `guarded` first
        assert guarded.item() == pytest.approx(ref[2], abs=tol[2])
        unguarded = store.fetch(0, [2]).arrays["down_proj.weight"][0].sum()
        store.fetch(0, [5])  # without consumed_by the lazy sum sees the new expert: why the guard exists
        assert unguarded.item() == pytest.approx(ref[5], abs=tol[5])


def test_many_fetches_and_concurrent_callers(tmp_path, rng):
    layout = make_model(tmp_path, rng, ExpertLayout(HIDDEN, INTERMEDIATE, bits=2, dtype="float32"))
    with ExpertStore(tmp_path, capacity=6, threads=4) as store:
        for _ in range(40):
            layer = int(rng.choice(MOE_LAYERS))
            ids = rng.choice(NUM_EXPERTS, size=int(rng.integers(1, 7)), replace=False)
            check_slots(tmp_path, layout, layer, store.fetch(layer, ids), ids.tolist())
        assert store.stats.fetches.sum() == 40
    callers = 5
    with ExpertStore(tmp_path, capacity=6, num_sets=callers, threads=4) as store:
        jobs = [
            (int(rng.choice(MOE_LAYERS)), rng.choice(NUM_EXPERTS, 6, replace=False).tolist()) for _ in range(callers)
        ]
        results = [None] * callers
        start = threading.Barrier(callers)

        def call(i):
            start.wait()
            results[i] = store.fetch(*jobs[i])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(r.index for r in results) == list(range(callers))
        for r, (layer, ids) in zip(results, jobs):
            check_slots(tmp_path, layout, layer, r, ids)


def test_layer_file_errors(tmp_path, rng):
    layout = make_model(tmp_path, rng, ExpertLayout(HIDDEN, INTERMEDIATE, bits=4))
    path = tmp_path / layout.layer_file(1)
    expected = layout.layer_bytes()
    os.truncate(path, expected - 100)
    short = rf"layer_001\.bin: layer 1 .*{expected - 100:,} bytes, expected {expected:,}.*truncated"
    with pytest.raises(ValueError, match=short):
        ExpertStore(tmp_path, capacity=2)
    os.truncate(path, expected + 1)
    with pytest.raises(ValueError, match=rf"layer 1 .*{expected + 1:,} bytes, expected {expected:,}.*oversized"):
        ExpertStore(tmp_path, capacity=2)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"layer_001\.bin: file of layer 1 is missing \(expected {expected:,}"):
        ExpertStore(tmp_path, capacity=2)


def test_layout_of_another_version(tmp_path, rng):
    make_model(tmp_path, rng, ExpertLayout(HIDDEN, INTERMEDIATE, bits=4))
    data = json.loads((tmp_path / "layout.json").read_text())
    data["version"] = 99
    (tmp_path / "layout.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 99 is not supported"):
        ExpertStore(tmp_path, capacity=2)


def test_bad_fetch_arguments(tmp_path, rng):
    make_model(tmp_path, rng, ExpertLayout(HIDDEN, INTERMEDIATE, bits=4))
    with ExpertStore(tmp_path, capacity=3) as store:
        with pytest.raises(ValueError, match=r"layer 2 has no expert file .*MoE layers are 0-1, 3"):
            store.fetch(2, [0])
        with pytest.raises(ValueError, match=r"layer 1: expert 8 out of range \(0\.\.7\)"):
            store.fetch(1, [0, 8])
        with pytest.raises(ValueError, match=r"layer 1: expert -1 out of range"):
            store.fetch(1, np.array([-1]))
        with pytest.raises(ValueError, match=r"layer 3: expert ids must be distinct, got \[4\]"):
            store.fetch(3, [4, 1, 4])
        with pytest.raises(ValueError, match=r"layer 0: 4 experts requested, capacity is 3"):
            store.fetch(0, [0, 1, 2, 3])
        with pytest.raises(TypeError, match=r"layer 0: expert ids must be integers"):
            store.fetch(0, np.array([1.0, 2.0]))
        assert store.fetch(0, []).count == 0
        assert store.stats.experts.sum() == 0
    with pytest.raises(ValueError, match="closed"):
        store.fetch(0, [1])


@pytest.mark.parametrize("failure", ["eio", "short"])
def test_read_errors_name_file_layer_expert_offset(tmp_path, rng, monkeypatch, failure):
    layout = make_model(tmp_path, rng, ExpertLayout(HIDDEN, INTERMEDIATE, bits=4))
    stride, nbytes = layout.expert.stride, layout.expert.expert_bytes
    real_preadv = os.preadv
    with ExpertStore(tmp_path, capacity=3, threads=2) as store:

        def failing_preadv(fd, buffers, offset, *flags):
            if offset != 6 * stride:
                return real_preadv(fd, buffers, offset, *flags)
            if failure == "eio":
                raise OSError(errno.EIO, "Input/output error")
            return nbytes - 10

        monkeypatch.setattr(os, "preadv", failing_preadv)
        message = (
            rf"layer_003\.bin: layer 3 expert 6: read of {nbytes:,} bytes at byte offset {6 * stride:,} failed"
            if failure == "eio"
            else rf"layer_003\.bin: layer 3 expert 6: short read at byte offset {6 * stride:,}: "
            rf"got {nbytes - 10:,} of {nbytes:,}"
        )
        for ids in ([1, 6, 2], [6]):  # expert 6 read by a pool thread, then by the fetching thread
            with pytest.raises(ExpertReadError, match=message) as info:
                store.fetch(3, ids)
            assert info.value.errno == errno.EIO
        monkeypatch.setattr(os, "preadv", real_preadv)
        check_slots(tmp_path, layout, 3, store.fetch(3, [6, 1]), [6, 1])  # the store still works


def test_file_truncated_after_open_is_a_short_read(tmp_path, rng):
    layout = make_model(tmp_path, rng, ExpertLayout(HIDDEN, INTERMEDIATE, bits=8))
    stride = layout.expert.stride
    with ExpertStore(tmp_path, capacity=2) as store:
        os.truncate(tmp_path / layout.layer_file(0), 7 * stride + 1000)
        message = rf"layer 0 expert 7: short read at byte offset {7 * stride:,}: got 1,000 of"
        with pytest.raises(ExpertReadError, match=message):
            store.fetch(0, [7, 2])


def test_verify_finds_corrupted_expert(tmp_path, rng):
    layout = make_model(tmp_path, rng, ExpertLayout(HIDDEN, INTERMEDIATE, bits=4))
    assert verify(tmp_path, progress=False) == []
    stride = layout.expert.stride
    corrupt_at = 5 * stride + int(rng.integers(layout.expert.expert_bytes))
    with open(tmp_path / layout.layer_file(1), "r+b") as f:
        f.seek(corrupt_at)
        byte = f.read(1)[0]
        f.seek(corrupt_at)
        f.write(bytes([byte ^ 0x40]))
    bad = verify(tmp_path, progress=False)
    assert [(layer, e, expected) for layer, e, expected, _ in bad] == [(1, 5, layout.checksums[1][5])]
    assert bad[0][3] != bad[0][2] and len(bad[0][3]) == 32
    assert verify(tmp_path, layers=[0, 3], progress=False) == []
    with ExpertStore(tmp_path, capacity=1) as store:
        assert store.verify() == bad
    data = json.loads((tmp_path / "layout.json").read_text())
    data["layers"]["3"]["checksums"] = []
    (tmp_path / "layout.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="layer 3 has 0 checksums, expected 8"):
        verify(tmp_path, progress=False)


def _drop_from_page_cache(path) -> bool:
    """Evict a file from the page cache; False where the OS does not let us (then misses can't be provoked)."""
    if not hasattr(os, "posix_fadvise") or not hasattr(os, "RWF_NOWAIT"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        except BlockingIOError:
            return True
        return False
    finally:
        os.close(fd)


def test_stats_counts_bytes_experts_usage_and_cache_hits(tmp_path, rng):
    layout = make_model(tmp_path, rng, ExpertLayout(HIDDEN, INTERMEDIATE, bits=4))
    nbytes = layout.expert.expert_bytes
    with ExpertStore(tmp_path, capacity=4, threads=2) as store:
        store.fetch(1, [2, 5, 7])
        before = store.stats.snapshot()
        store.fetch(1, [5, 0])
        store.fetch(3, [4])
        step = store.stats.delta(before)
        assert step.experts.tolist() == [0, 2, 0, 1] and step.fetches.tolist() == [0, 1, 0, 1]
        assert step.bytes.tolist() == [0, 2 * nbytes, 0, nbytes]
        assert store.stats.usage[1].tolist() == [1, 0, 1, 0, 0, 2, 0, 1] and step.usage[1, 5] == 1
        assert (store.stats.seconds[[1, 3]] > 0).all() and store.stats.seconds[[0, 2]].sum() == 0
        assert store.stats.totals()["experts"] == 6
        if store.probe == "nowait":  # the files were just written: all in the page cache
            assert store.stats.hits.sum() == 6 and store.stats.misses.sum() == 0
        assert store.stats.hits.sum() + store.stats.misses.sum() == 6
        store.stats.reset()
        assert store.stats.experts.sum() == 0 and store.stats.usage.sum() == 0 and before.experts.sum() == 3
        if store.probe == "nowait" and _drop_from_page_cache(tmp_path / layout.layer_file(0)):
            check_slots(tmp_path, layout, 0, store.fetch(0, [1, 6]), [1, 6])
            assert store.stats.misses[0] == 2 and store.stats.hits[0] == 0
            store.fetch(0, [1, 6])  # now cached
            assert store.stats.hits[0] == 2
        store._probe = "timing"  # the macOS path: hit when faster than HIT_BYTES_PER_S
        store.stats.reset()
        store.fetch(3, [0, 1, 2])
        assert store.stats.hits[3] + store.stats.misses[3] == 3
    with ExpertStore(tmp_path, capacity=4, probe_cache=False) as store:
        store.fetch(0, [1, 2])
        assert store.probe is None and store.stats.hits.sum() == store.stats.misses.sum() == 0


def test_swappable_buffers_and_close(tmp_path, rng):
    layout = make_model(tmp_path, rng, ExpertLayout(HIDDEN, INTERMEDIATE, bits=8))
    calls = []

    class CountingBuffers(HostSlotBuffers):
        def compute_arrays(self, index, count=None):
            calls.append((index, count))
            return super().compute_arrays(index, count)

        def close(self):  # like freeing pinned memory: pending computation would read garbage
            for views in self._host:
                for v in views.values():
                    v[...] = 0
            super().close()

    store = ExpertStore(tmp_path, capacity=2, buffers=CountingBuffers)
    check_slots(tmp_path, layout, 3, store.fetch(3, [4, 1]), [4, 1])
    last = store.fetch(0, [2])
    assert calls == [(0, 2), (1, 1)]
    pending = last.arrays["gate_proj.scales"][0].astype(mx.float32).sum()
    last.consumed_by(pending)
    fds = list(store._files.fds.values())
    store.close()  # evaluates what is still pending on a set before releasing the buffers
    store.close()  # idempotent
    expected = as_float32(file_tensor(tmp_path, layout, 0, 2, "gate_proj.scales"), "bfloat16").sum(dtype=np.float64)
    assert pending.item() == pytest.approx(expected, rel=1e-4)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert store_mod.HIT_BYTES_PER_S > 0

    class WrongShapeBuffers(HostSlotBuffers):
        def host_views(self, index):
            views = dict(super().host_views(index))
            views["up_proj.scales"] = views["up_proj.scales"][:, :-1]
            return views

    with pytest.raises(ValueError, match=r"slot buffer up_proj\.scales: host view"):
        ExpertStore(tmp_path, capacity=2, buffers=WrongShapeBuffers)


@pytest.mark.parametrize("read_chunk", [4096, 6000 * 4, 1 << 30])
def test_chunked_reads_are_byte_exact_and_count_hits_per_expert(tmp_path, rng, read_chunk):
    """Experts read as several chunks (cut inside tensors and across alignment gaps) land exactly;
    an expert counts as a hit only when all its chunks were."""
    layout = make_model(tmp_path, rng, ExpertLayout(256, 128, bits=8, dtype="float32"))
    with ExpertStore(tmp_path, capacity=4, threads=3, read_chunk=read_chunk) as store:
        plan = store._iovecs[0][0]
        assert sum(size for _, _, size in plan) == layout.expert.expert_bytes
        assert [d for d, _, _ in plan] == list(np.cumsum([0] + [s for _, _, s in plan])[:-1])
        assert len(plan) == -(-layout.expert.expert_bytes // read_chunk)
        for ids in ([3, 0, 7], [6], [1, 2, 4, 5]):
            check_slots(tmp_path, layout, 1, store.fetch(1, ids), ids)
        if store.probe == "nowait" and _drop_from_page_cache(tmp_path / layout.layer_file(3)):
            store.stats.reset()
            store.fetch(3, [2, 5])
            # kernel readahead for one expert may bring in the other: at least one must miss
            assert store.stats.misses[3] >= 1 and store.stats.hits[3] + store.stats.misses[3] == 2
            store.stats.reset()
            store.fetch(3, [2, 5])
            assert store.stats.hits[3] == 2


def test_read_chunk_too_small(tmp_path, rng):
    make_model(tmp_path, rng, ExpertLayout(HIDDEN, INTERMEDIATE, bits=4))
    with pytest.raises(ValueError, match="read_chunk"):
        ExpertStore(tmp_path, capacity=2, read_chunk=100)


@pytest.mark.parametrize("read_chunk", [4096 * 3, 2 << 20])
def test_direct_reads_are_byte_exact_and_count_as_misses(tmp_path, rng, read_chunk):
    """O_DIRECT reads (4 KiB-aligned tensors: 512 x 256 at 4 bits) land exactly, in whole or in chunks, and
    every expert counts as a miss: the page cache is never asked. Where the platform or filesystem has no
    direct I/O, asking for it fails at open and says so."""
    layout = make_model(tmp_path, rng, ExpertLayout(512, 256, bits=4, dtype="bfloat16"))
    assert all(t.offset % 4096 == 0 and t.nbytes % 4096 == 0 for t in layout.expert.tensors)
    if not layer_files.direct_supported():
        with pytest.raises(ValueError, match="direct reads need O_DIRECT"):
            ExpertStore(tmp_path, capacity=4, read_chunk=read_chunk, direct=True)
        return
    if not layer_files.direct_readable(tmp_path, layout, read_chunk):  # the filesystem refuses O_DIRECT
        with pytest.raises(OSError, match="refuses O_DIRECT"):
            ExpertStore(tmp_path, capacity=4, read_chunk=read_chunk, direct=True)
        return
    with ExpertStore(tmp_path, capacity=4, threads=3, read_chunk=read_chunk, direct=True) as store:
        assert store.direct and store.probe == "direct"
        for layer, ids in ((1, [3, 0, 7]), (3, [6]), (0, [1, 2, 4, 5]), (1, [3, 6])):
            check_slots(tmp_path, layout, layer, store.fetch(layer, ids), ids)
        assert int(store.stats.hits.sum()) == 0 and int(store.stats.misses.sum()) == 10
        assert int(store.stats.missed_bytes.sum()) == 10 * layout.expert.expert_bytes
        assert store.verify() == []  # verification keeps the buffered descriptors


def test_direct_reads_name_the_misaligned_tensor(tmp_path, rng):
    make_model(tmp_path, rng, ExpertLayout(HIDDEN, INTERMEDIATE, bits=4))  # scales of 128 x 2 bf16: 512 bytes
    if not layer_files.direct_supported():
        with pytest.raises(ValueError, match="direct reads need O_DIRECT"):
            ExpertStore(tmp_path, capacity=2, direct=True)
        return
    with pytest.raises(ValueError, match=r"direct reads need 4096-byte alignment: tensor \S+scales"):
        ExpertStore(tmp_path, capacity=2, direct=True)
    with pytest.raises(ValueError, match="read_chunk 6,000 is not a multiple of 4096"):
        ExpertStore(tmp_path, capacity=2, direct=True, read_chunk=6000)


def _device_read_bytes() -> int | None:
    try:
        rows = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    except OSError:
        return None
    return int(rows["read_bytes"])


@pytest.mark.skipif(not hasattr(os, "POSIX_FADV_RANDOM"), reason="readahead advice is Linux's")
@pytest.mark.parametrize("readahead", [False, True])
def test_chunked_cold_reads_fetch_only_the_expert_without_readahead(tmp_path, rng, readahead):
    """Cold chunked reads of one expert: without readahead (the default) the device reads that expert's pages
    and no more; the bytes are right either way. (The kernel's readahead reads past the expert, into its
    neighbour, when a chunk follows a cached one: what the default avoids.)"""
    layout = make_model(tmp_path, rng, ExpertLayout(512, 256, bits=4, dtype="bfloat16"), num_experts=16)
    with ExpertStore(tmp_path, capacity=1, threads=4, read_chunk=4096 * 3, readahead=readahead) as store:
        fd = os.open(tmp_path / layout.layer_file(1), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written and fsynced: clean pages, evicted here
        os.close(fd)
        before = _device_read_bytes()
        check_slots(tmp_path, layout, 1, store.fetch(1, [5]), [5])
        read = _device_read_bytes()
    if before is None or read == before:
        pytest.skip("this filesystem does not count device reads (tmpfs) or kept the pages cached")
    if not readahead:
        assert read - before <= layout.expert.expert_bytes  # 4 KiB-aligned: the expert's pages exactly


def test_missed_bytes_count_the_chunks_not_cached(tmp_path, rng):
    """A partly cached expert is one miss, but only its uncached chunks count as missed bytes (what the disk
    read); a cached one adds nothing, a direct read counts every byte."""
    layout = make_model(tmp_path, rng, ExpertLayout(512, 256, bits=4, dtype="bfloat16"))
    e, chunk = layout.expert, 4096 * 3
    with ExpertStore(tmp_path, capacity=2, threads=2, read_chunk=chunk) as store:
        store.fetch(1, [2])  # just written: cached
        if store.probe != "nowait" or not _drop_from_page_cache(tmp_path / layout.layer_file(1)):
            pytest.skip("needs RWF_NOWAIT and an evictable page cache")
        fd = os.open(tmp_path / layout.layer_file(1), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.preadv(fd, [bytearray(chunk)], 5 * e.stride)  # the first chunk of expert 5 cached, nothing else
        os.close(fd)
        store.stats.reset()
        check_slots(tmp_path, layout, 1, store.fetch(1, [5, 2]), [5, 2])
        assert store.stats.misses[1] == 2 and store.stats.missed_bytes[1] == 2 * e.expert_bytes - chunk
        store.fetch(1, [5, 2])
        assert store.stats.hits[1] == 2 and store.stats.missed_bytes[1] == 2 * e.expert_bytes - chunk
        assert store.stats.totals()["missed_bytes"] == 2 * e.expert_bytes - chunk

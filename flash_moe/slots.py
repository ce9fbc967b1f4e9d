"""Slot buffers: where the ExpertStore's reads land, and the arrays the expert computation reads.

A ``SlotBuffers`` holds ``num_sets`` sets of ``capacity`` expert slots, used round robin by the store, so
the caller can compute on one set while the next fills. ``HostSlotBuffers`` keeps them as MLX arrays in
host memory (unified memory on Apple); ``cuda_host.PinnedSlotBuffers`` keeps them page-locked for CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import numpy as np

from .layout import SLOT_SET_ALIGN, SLOT_TENSOR_ALIGN, ExpertLayout, mlx_dtype


class SlotBuffers(Protocol):
    """Where fetched experts land. The store needs only these members.

    ``host_views(index)``: per tensor name, a writable, C-contiguous numpy array of shape
    ``(capacity, *tensor.shape)`` whose bytes are those the computation will see (the reader
    ``preadv``s into ``view[slot]``). Called once per set at construction; must stay valid until ``close``.
    ``compute_arrays(index, count)``: per tensor name, the ``mx.array`` of shape ``(capacity, *shape)``
    and the tensor's dtype that the experts computation consumes; called after each fetch, once the
    first ``count`` slots hold their experts (a device variant may upload those slots here).
    ``nbytes``: memory held by all sets. ``close()``: release it.
    """

    capacity: int
    num_sets: int

    def host_views(self, index: int) -> dict[str, np.ndarray]: ...

    def compute_arrays(self, index: int, count: int) -> dict[str, mx.array]: ...

    @property
    def nbytes(self) -> int: ...

    def close(self) -> None: ...


MAX_ARRAY_BYTES = 2**31 - 1  # MLX shapes are int32: a uint8 array holds at most this many bytes


class HostSlotBuffers:
    """Slot sets as MLX arrays in host memory (unified memory on Apple), filled through numpy views.

    ``np.array(mx_arr, copy=False)`` shares the MLX buffer, so a read lands where MLX computes from;
    a bf16 tensor is uint16 storage plus an evaluated ``.view(mx.bfloat16)``, which shares the buffer too.
    Each set is one MLX allocation; every tensor array starts on a ``TENSOR_ALIGN`` boundary inside it,
    because MLX's own allocations start 24 bytes past 32-byte alignment and the kernel's copy into such
    a destination ran 3-4x slower (measured: 2.6 vs 8-13 GB/s, EPYC, warm page cache).
    """

    SET_ALIGN, TENSOR_ALIGN = SLOT_SET_ALIGN, SLOT_TENSOR_ALIGN  # see layout.py

    def __init__(self, layout: ExpertLayout, capacity: int, num_sets: int):
        self.capacity, self.num_sets = capacity, num_sets
        self._compute, self._host, self._nbytes = [], [], 0
        offsets, size = {}, 0
        for t in layout.tensors:
            offsets[t.name] = size
            size += -(-capacity * t.nbytes // self.TENSOR_ALIGN) * self.TENSOR_ALIGN
        if size + self.SET_ALIGN > MAX_ARRAY_BYTES:  # one MLX array's dimension is an int32
            most = capacity * (MAX_ARRAY_BYTES - self.SET_ALIGN - len(layout.tensors) * self.TENSOR_ALIGN) // size
            raise ValueError(f"host slot buffers of {capacity:,} experts need {size:,} bytes in one MLX array, over "
                             f"its {MAX_ARRAY_BYTES:,}-byte limit: hold at most {most:,} experts (on CUDA the host "
                             "tier is page-locked memory without this limit)")
        for _ in range(num_sets):
            flat = mx.zeros((size + self.SET_ALIGN,), dtype=mx.uint8)
            mx.eval(flat)
            addr = np.array(flat, copy=False).ctypes.data
            base = -addr % self.SET_ALIGN
            storage, compute = {}, {}
            for t in layout.tensors:
                start = base + offsets[t.name]
                a = flat[start : start + capacity * t.nbytes].view(mlx_dtype(t.dtype, storage=True)).reshape(capacity, *t.shape)
                storage[t.name] = a
                compute[t.name] = a.view(mlx_dtype(t.dtype)) if t.dtype == "bfloat16" else a
            # MLX shares the buffer for contiguous slices, views and reshapes; check it did, never write elsewhere.
            shown = {n: c.view(mx.uint16) if c.dtype == mx.bfloat16 else c for n, c in compute.items()}
            mx.eval(list(storage.values()), list(compute.values()), list(shown.values()))
            host = {name: np.array(a, copy=False) for name, a in storage.items()}
            for name, view in host.items():
                at = addr + base + offsets[name]
                if not (
                    view.flags.writeable and view.flags.c_contiguous and view.ctypes.data == at
                    and np.array(shown[name], copy=False).ctypes.data == at
                ):
                    raise RuntimeError(f"slot buffer {name}: MLX did not share the buffer with its numpy view")
            self._compute.append(compute)
            self._host.append(host)
            self._nbytes += flat.nbytes

    def host_views(self, index: int) -> dict[str, np.ndarray]:
        return self._host[index]

    def compute_arrays(self, index: int, count: int | None = None) -> dict[str, mx.array]:
        return self._compute[index]

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def close(self) -> None:
        self._compute, self._host = [], []


@dataclass
class SlotSet:
    """One fetch's result. ``arrays[name]`` has shape ``(capacity, *shape)``; slot i holds
    ``expert_ids[i]`` for i < ``count``, later slots hold stale data."""

    arrays: dict[str, mx.array]
    count: int
    expert_ids: list[int]
    index: int  # which slot set
    _pending: list  # the store's list of arrays to evaluate before it overwrites this set

    def consumed_by(self, *arrays: mx.array) -> None:
        """Declare arrays computed from this set: the store evaluates them before overwriting it."""
        self._pending.extend(arrays)

"""Page-locked slot buffers for MLX's CUDA backend (a ``SlotBuffers``, see flash_moe/slots.py).

MLX's CUDA backend keeps host-made arrays in managed memory, which reaches the GPU at about
2 GB/s. Here the store reads experts into page-locked (pinned) host memory instead, and
``compute_arrays`` returns MLX arrays that one kernel (kernels/slot_pull.body) fills from it:

- ``upload="mapped"``: the kernel pulls the slots straight from the pinned memory over PCIe,
  inside MLX's stream, so the fetching thread does not wait for the transfer;
- ``upload="copy"``: ``cudaMemcpyAsync`` moves them into a device staging buffer (~50 GB/s,
  the fetching thread waits), then the kernel copies device to device.

``scatter`` is the DeviceExpertCache's fill: another kernel (kernels/slot_scatter.body) copies slots into
chosen positions of the cache's own MLX arrays, in place (MLX's CUDA SliceUpdate copies the array).

The CUDA runtime is the libcudart that MLX itself loaded, called through ctypes.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import sysconfig

import mlx.core as mx
import numpy as np

from . import kernels
from .layout import DIRECT_ALIGN, ExpertLayout, mlx_dtype, numpy_dtype

_HOST_ALLOC_PORTABLE, _HOST_ALLOC_MAPPED = 1, 2
_MEMCPY_HOST_TO_DEVICE = 1
_STREAM_NON_BLOCKING = 1
_ALIGN = 256
_PULL_THREADS = 65536


def _find_cudart() -> str:
    """Path of libcudart: the copy MLX already loaded, else one from the nvidia-* wheels."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libcudart.so" in path:
                    return path
    except OSError:
        pass
    roots = {sysconfig.get_paths()["purelib"], *(p for p in sys.path if os.path.isdir(os.path.join(p, "nvidia")))}
    for root in roots:
        found = sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcudart.so*")))
        if found:
            return found[-1]
    raise OSError("libcudart not found: is MLX's CUDA build installed (mlx[cuda13], nvidia-cuda-runtime)?")


class CudaRuntime:
    """The few CUDA runtime calls the pinned path needs; every call's error is raised with its name."""

    def __init__(self, path: str | None = None):
        self.path = path or _find_cudart()
        lib = ctypes.CDLL(self.path)
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        signatures = {
            "cudaHostAlloc": (ctypes.POINTER(vp), sz, ctypes.c_uint),
            "cudaFreeHost": (vp,),
            "cudaHostGetDevicePointer": (ctypes.POINTER(vp), vp, ctypes.c_uint),
            "cudaMalloc": (ctypes.POINTER(vp), sz),
            "cudaFree": (vp,),
            "cudaMemcpyAsync": (vp, vp, sz, ctypes.c_int, vp),
            "cudaStreamCreateWithFlags": (ctypes.POINTER(vp), ctypes.c_uint),
            "cudaStreamSynchronize": (vp,),
            "cudaStreamDestroy": (vp,),
            "cudaMemGetInfo": (ctypes.POINTER(sz), ctypes.POINTER(sz)),
        }
        for name, args in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        lib.cudaGetErrorString.argtypes, lib.cudaGetErrorString.restype = (ctypes.c_int,), ctypes.c_char_p
        self._lib = lib

    def __call__(self, name: str, *args, what: str = "") -> None:
        err = getattr(self._lib, name)(*args)
        if err:
            message = self._lib.cudaGetErrorString(err).decode()
            raise RuntimeError(f"{name} failed ({err}: {message}){' ' + what if what else ''} [{self.path}]")

    def host_alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        flags = _HOST_ALLOC_PORTABLE | _HOST_ALLOC_MAPPED
        self("cudaHostAlloc", ctypes.byref(ptr), nbytes, flags, what=f"for {nbytes} bytes of pinned memory")
        return ptr.value

    def device_pointer(self, host_ptr: int) -> int:
        ptr = ctypes.c_void_p()
        self("cudaHostGetDevicePointer", ctypes.byref(ptr), ctypes.c_void_p(host_ptr), 0)
        return ptr.value

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self("cudaMalloc", ctypes.byref(ptr), nbytes, what=f"for {nbytes} bytes")
        return ptr.value

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes of the current GPU."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self("cudaMemGetInfo", ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def stream(self) -> int:
        ptr = ctypes.c_void_p()
        self("cudaStreamCreateWithFlags", ctypes.byref(ptr), _STREAM_NON_BLOCKING)
        return ptr.value


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class PinnedSlotBuffers:
    """Slot sets in pinned host memory, handed to MLX by one pull kernel per fetch.

    Same contract as ``slots.HostSlotBuffers``; quantized layouts only (9 tensors per expert).
    ``compute_arrays`` returns fresh MLX arrays (capacity, *shape) whose first ``count`` slots
    are filled when they are evaluated; the store's ``consumed_by`` keeps the host memory of
    a set unchanged until then.
    """

    def __init__(self, layout: ExpertLayout, capacity: int, num_sets: int, *, upload: str = "mapped"):
        if not layout.quantized or len(layout.tensors) != 9:
            raise NotImplementedError("PinnedSlotBuffers: quantized layouts only; use HostSlotBuffers for bits 16")
        if upload not in ("mapped", "copy"):
            raise ValueError(f"upload must be 'mapped' or 'copy', got {upload!r}")
        for t in layout.tensors:
            if t.nbytes % 16:
                raise ValueError(f"PinnedSlotBuffers: {t.name} has {t.nbytes} bytes per expert, not a multiple of 16")
        self.layout, self.capacity, self.num_sets, self.upload = layout, capacity, num_sets, upload
        self.cuda = CudaRuntime()
        self._offsets, pos = [], 0
        for t in layout.tensors:
            self._offsets.append(pos)
            pos = _align(pos + capacity * t.nbytes)
        self.set_bytes = pos
        self._allocs, self._host_ptrs, self._device_ptrs, self._views, self._meta = [], [], [], [], []
        self._stream = self.cuda.stream() if upload == "copy" else None
        try:
            for _ in range(num_sets):
                # cudaHostAlloc suballocates small requests (seen: ...6200); O_DIRECT reads want page-aligned
                # destinations (ExpertStore(direct=True)), so each set starts on the next page.
                raw = self.cuda.host_alloc(self.set_bytes + DIRECT_ALIGN)
                self._allocs.append(raw)
                host = raw + (-raw % DIRECT_ALIGN)
                self._host_ptrs.append(host)
                if upload == "mapped":
                    source = self.cuda.device_pointer(raw) + host - raw
                else:
                    source = self.cuda.malloc(self.set_bytes)
                if upload == "copy":
                    self._device_ptrs.append(source)
                self._views.append(self._host_views(host))
                meta = [source] + [v for t, off in zip(layout.tensors, self._offsets) for v in (off, t.nbytes)]
                self._meta.append(mx.array(np.array(meta, dtype=np.int64)))
            mx.eval(self._meta)
        except BaseException:
            self.close()
            raise

    def _host_views(self, host_ptr: int) -> dict[str, np.ndarray]:
        views = {}
        for t, off in zip(self.layout.tensors, self._offsets):
            raw = (ctypes.c_char * (self.capacity * t.nbytes)).from_address(host_ptr + off)
            views[t.name] = np.frombuffer(raw, dtype=numpy_dtype(t.dtype)).reshape(self.capacity, *t.shape)
        return views

    def host_views(self, index: int) -> dict[str, np.ndarray]:
        return self._views[index]

    def _stage(self, index: int, count: int) -> None:
        """upload="copy": move the first ``count`` slots of set ``index`` into its device buffer (waits)."""
        if self.upload != "copy":
            return
        dst, src = self._device_ptrs[index], self._host_ptrs[index]
        for t, off in zip(self.layout.tensors, self._offsets):
            self.cuda(
                "cudaMemcpyAsync", ctypes.c_void_p(dst + off), ctypes.c_void_p(src + off),
                count * t.nbytes, _MEMCPY_HOST_TO_DEVICE, ctypes.c_void_p(self._stream), what=t.name,
            )
        self.cuda("cudaStreamSynchronize", ctypes.c_void_p(self._stream))

    def compute_arrays(self, index: int, count: int | None = None) -> dict[str, mx.array]:
        count = self.capacity if count is None else count
        tensors = self.layout.tensors
        self._stage(index, count)
        outputs = kernels.launch(
            "slot_pull",
            "cuda",
            {"meta": self._meta[index]},
            {f"t{i}": ((self.capacity, *t.shape), mlx_dtype(t.dtype)) for i, t in enumerate(tensors)},
            {"COUNT": count, "WARPS": 8, "NTHREADS": _PULL_THREADS},
            grid=(_PULL_THREADS, 1, 1),
        )
        return {t.name: a for t, a in zip(tensors, outputs)}

    def scatter(self, index: int, count: int, targets: list[mx.array], positions) -> mx.array:
        """Copy slots 0..count-1 of set ``index`` into ``targets[i][positions[slot]]``, in place, on the GPU.

        ``targets``: one evaluated, row-contiguous MLX array per layout tensor, in layout order, of shape
        (N, *tensor.shape) (the DeviceExpertCache's arrays). Returns a 1-element array holding 0. Evaluate it
        before anything reads the targets: MLX does not know they changed, so it orders no reader after the
        kernel (its CUDA graphs link kernels by the buffers they read), and a lazy output no one evaluates
        never runs.
        """
        if len(targets) != len(self.layout.tensors):
            raise ValueError(f"scatter: {len(targets)} target arrays for {len(self.layout.tensors)} tensors")
        for t, a in zip(self.layout.tensors, targets):
            if a.shape[1:] != tuple(t.shape) or a.dtype != mlx_dtype(t.dtype):
                raise ValueError(f"scatter: target for {t.name} is {a.shape} {a.dtype}, want (N, {t.shape}) {t.dtype}")
        positions = np.asarray(positions, np.int64)
        if len(positions) != count or count > self.capacity:
            raise ValueError(f"scatter: {len(positions)} positions for {count} slots (capacity {self.capacity})")
        if count and (positions.min() < 0 or positions.max() >= targets[0].shape[0]):
            raise ValueError(f"scatter: positions {positions.tolist()} outside 0..{targets[0].shape[0] - 1}")
        self._stage(index, count)
        pos = np.full(self.capacity, -1, np.int32)
        pos[:count] = positions
        (done,) = kernels.launch(
            "slot_scatter",
            "cuda",
            {"meta": self._meta[index], "pos": mx.array(pos), **{f"c{i}": a for i, a in enumerate(targets)}},
            {"done": ((1,), mx.int32)},
            {"COUNT": self.capacity, "WARPS": 8, "NTHREADS": _PULL_THREADS},
            grid=(_PULL_THREADS, 1, 1),
        )
        return done

    def scatter_rows(self, rows, targets: list[mx.array], positions) -> mx.array:
        """Copy slot ``rows[i]`` of set 0 into ``targets[j][positions[i]]``, in place, on the GPU: the host
        tier's way to serve a device miss (one launch per expert; ``scatter``'s contract otherwise)."""
        if self.upload != "mapped":
            raise ValueError("scatter_rows reads the pinned memory in place: upload='mapped' only")
        rows, positions = np.asarray(rows, np.int64), np.asarray(positions, np.int64)
        if len(rows) != len(positions) or (len(rows) and (rows.min() < 0 or rows.max() >= self.capacity)):
            raise ValueError(f"scatter_rows: rows {rows.tolist()} for positions {positions.tolist()}")
        if not hasattr(self, "_mapped0"):
            self._mapped0 = self.cuda.device_pointer(self._allocs[0]) + self._host_ptrs[0] - self._allocs[0]
        source, done = self._mapped0, []
        for row, at in zip(rows.tolist(), positions.tolist()):
            # One slot seen as a set of its own: each tensor's offset moves to that slot's bytes.
            meta = [source] + [v for t, off in zip(self.layout.tensors, self._offsets) for v in (off + row * t.nbytes, t.nbytes)]
            (d,) = kernels.launch(
                "slot_scatter",
                "cuda",
                {"meta": mx.array(np.array(meta, np.int64)), "pos": mx.array(np.array([at], np.int32)),
                 **{f"c{i}": a for i, a in enumerate(targets)}},
                {"done": ((1,), mx.int32)},
                {"COUNT": 1, "WARPS": 8, "NTHREADS": _PULL_THREADS},
                grid=(_PULL_THREADS, 1, 1),
            )
            done.append(d)
        return mx.concatenate(done) if done else mx.zeros((1,), mx.int32)

    @property
    def nbytes(self) -> int:
        return self.set_bytes * len(self._host_ptrs)

    def close(self) -> None:
        """Free the memory: only once nothing computed from these sets is still pending."""
        for ptr in self._allocs:
            self.cuda("cudaFreeHost", ctypes.c_void_p(ptr))
        for ptr in self._device_ptrs:
            self.cuda("cudaFree", ctypes.c_void_p(ptr))
        if self._stream:
            self.cuda("cudaStreamDestroy", ctypes.c_void_p(self._stream))
        self._allocs, self._host_ptrs, self._device_ptrs, self._views, self._stream = [], [], [], [], None

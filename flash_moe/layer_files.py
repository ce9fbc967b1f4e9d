"""The packed layer files of a converted model: opened once and checked for size, read around the page cache
where the filesystem allows it (O_DIRECT, or F_NOCACHE on macOS), and verified against the checksums in
layout.json. The ExpertStore reads experts through these descriptors; ``verify`` re-reads every expert."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import numpy as np

from .files import CheckpointError, open_regular
from .layout import DIRECT_ALIGN, ModelLayout, expert_checksum


class ExpertReadError(OSError):
    """A read of one expert failed or came back short; the message names file, layer, expert and offset."""


class LayerFiles:
    """The layer files, each opened once and checked to hold exactly num_experts * stride bytes."""

    def __init__(self, folder: Path, layout: ModelLayout, layers=None, direct: bool = False, readahead: bool = True):
        self.fds: dict[int, int] = {}
        self.paths: dict[int, Path] = {}
        expected = layout.layer_bytes()
        try:
            for layer in layout.moe_layers if layers is None else layers:
                if layer not in layout.moe_layers:
                    raise ValueError(f"layer {layer} is not a MoE layer listed in {folder / 'layout.json'}")
                path = folder / layout.layer_file(layer)
                try:
                    fd = open_regular(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"{path}: file of layer {layer} is missing (expected {expected:,} bytes); "
                        "was the conversion interrupted?"
                    ) from None
                if direct:
                    fd = reopen_direct(path, fd)
                elif not readahead:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self.fds[layer], self.paths[layer] = fd, path
                size = os.fstat(fd).st_size
                if size != expected:
                    raise CheckpointError(
                        f"{path}: layer {layer} file has {size:,} bytes, expected {expected:,} "
                        f"({layout.num_experts} experts x stride {layout.expert.stride:,}); "
                        f"{'truncated' if size < expected else 'oversized'}, or from another conversion"
                    )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def reopen_direct(path: Path, fd: int) -> int:
    """A second descriptor of the regular file open at ``fd``, reading around the page cache; closes ``fd``.
    Opened non-blocking (a FIFO swapped in meanwhile cannot hang us) and checked to be the same file."""
    try:
        try:
            direct = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            raise OSError(e.errno, f"{path}: this filesystem refuses O_DIRECT; load with direct_io=False") from None
        a, b = os.fstat(fd), os.fstat(direct)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            os.close(direct)
            raise CheckpointError(f"{path}: replaced while it was being opened")
        os.set_blocking(direct, True)
        if not O_DIRECT:  # macOS: no O_DIRECT, but the same bypass per descriptor
            fcntl.fcntl(direct, fcntl.F_NOCACHE, 1)
        return direct
    finally:
        os.close(fd)


O_DIRECT = getattr(os, "O_DIRECT", 0)


def direct_supported() -> bool:
    return bool(O_DIRECT) or hasattr(fcntl, "F_NOCACHE")


def direct_aligned(t) -> bool:
    return t.offset % DIRECT_ALIGN == 0 and t.nbytes % DIRECT_ALIGN == 0


def direct_readable(folder: str | Path, layout: ModelLayout, read_chunk: int) -> bool:
    """Whether ``ExpertStore(folder, direct=True, read_chunk=...)`` can read this layout: direct I/O here, every
    tensor 4 KiB-aligned in the file (both slot buffer kinds then align its slots too), and a filesystem that
    accepts O_DIRECT (tmpfs and some overlays refuse it at open)."""
    aligned = all(direct_aligned(t) for t in layout.expert.tensors) and read_chunk % DIRECT_ALIGN == 0
    if not (direct_supported() and aligned and layout.moe_layers):
        return False
    if not O_DIRECT:
        return True  # F_NOCACHE is per descriptor and always accepted
    try:
        os.close(open_regular(Path(folder) / layout.layer_file(layout.moe_layers[0]), os.O_RDONLY | O_DIRECT))
        return True
    except (OSError, CheckpointError):  # refused, missing or not a regular file: the store's open says which
        return False


VERIFY_MODES = ("off", "sample", "full")
SAMPLE_EVERY = 16  # verify="sample" checks experts e of a layer with (e + layer) % SAMPLE_EVERY == 0


def experts_to_check(layout: ModelLayout, verify: str) -> np.ndarray | None:
    """[layers, experts] mask of the experts ``verify`` hashes on first read (None for "off")."""
    if verify == "off" or not layout.moe_layers:
        return None
    out = np.zeros((max(layout.moe_layers) + 1, layout.num_experts), bool)
    for layer in layout.moe_layers:
        step = 1 if verify == "full" else min(SAMPLE_EVERY, layout.num_experts)  # at least one per layer
        out[layer] = (np.arange(layout.num_experts) + layer) % step == 0
    return out


def verify(folder: str | Path, layers=None, progress: bool = True) -> list[tuple[int, int, str, str]]:
    """Re-check every expert checksum recorded in ``folder/layout.json``, one expert at a time.

    Returns:
        The bad experts as ``(layer, expert, expected_hex, got_hex)``; empty when all match.
    Raises ValueError when a layer has no (or a wrong number of) checksums, and the layer-file errors
    of ``ExpertStore`` for missing or wrongly sized files.
    """
    folder = Path(folder)
    layout = ModelLayout.read(folder)
    files = LayerFiles(folder, layout, layers)
    try:
        return verify_files(files, layout, layers, progress)
    finally:
        files.close()


def verify_files(files: LayerFiles, layout: ModelLayout, layers, progress: bool) -> list[tuple[int, int, str, str]]:
    if layout.checksum != "blake2b-128":
        raise ValueError(f"layout.json: unknown checksum {layout.checksum!r} (this flash_moe knows blake2b-128)")
    layers = list(layout.moe_layers if layers is None else layers)
    for layer in layers:
        got = len(layout.checksums.get(layer, []))
        if layer not in files.fds:
            raise ValueError(f"layer {layer} has no expert file (MoE layers: {ranges(layout.moe_layers)})")
        if got != layout.num_experts:
            raise ValueError(f"layout.json: layer {layer} has {got} checksums, expected {layout.num_experts}")
    nbytes, stride = layout.expert.expert_bytes, layout.expert.stride
    buf = bytearray(nbytes)
    bad = []
    todo = [(layer, e) for layer in layers for e in range(layout.num_experts)]
    if progress:
        from tqdm import tqdm

        todo = tqdm(todo, desc="verify", unit="expert")
    for layer, e in todo:
        got = os.preadv(files.fds[layer], [buf], e * stride)
        if got != nbytes:
            raise ExpertReadError(
                errno.EIO, f"{files.paths[layer]}: layer {layer} expert {e}: short read at byte offset "
                f"{e * stride:,}: got {got:,} of {nbytes:,} bytes",
            )
        expected, digest = layout.checksums[layer][e], expert_checksum(buf)
        if digest != expected:
            bad.append((layer, e, expected, digest))
    return bad


def ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' for error messages."""
    out, run = [], []
    for v in sorted(values):
        if run and v != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(v)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out) or "none"

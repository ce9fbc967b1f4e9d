"""The disk's ceiling for random expert reads: O_DIRECT, aligned buffers, many reads in flight.

    python benchmarks/disk_ceiling.py MODEL_DIR_OR_FILE [--seconds 2] [--inflight 1 4 16 32 64] [--block BYTES]

Each of ``inflight`` threads loops over one ``os.preadv`` of a whole expert (``block`` bytes, at a real
expert's offset in the converted model's layer files, or at a random 4 KiB-aligned offset of a given file)
into its own page-aligned buffer, for ``seconds``; preadv releases the GIL, so the threads are the queue
depth. The answer is the best rate over the swept depths: what no reader of these files can beat, which
makes ``benchmarks/decode.py``'s I/O bound a bound. Threads, not io_uring: the GPU machine is offline and
has no io_uring package, and a thread per request reaches the same depth for reads this large (MBs).

O_DIRECT is refused by some filesystems (EINVAL at open: tmpfs on older kernels, some overlays). Then the
reads go through the page cache, with the files evicted (``POSIX_FADV_DONTNEED``) before each depth, and
the result says ``direct: False``: a rate that page-cache hits may inflate.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flash_moe.layout import ModelLayout  # noqa: E402

ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffer addresses on the logical block; 4 KiB covers all
DEPTHS = (1, 4, 16, 32, 64)


def read_targets(path: str | Path, block: int | None = None, layout: ModelLayout | None = None) -> tuple[list[Path], np.ndarray, int]:
    """(files, [n, 2] array of (file index, byte offset) to read from, block bytes) for a model folder or a file.

    A converted model gives every expert of every MoE layer at its real offset; a plain file gives every
    ``block``-sized, 4 KiB-aligned window (block defaults to 4 MiB there). Blocks are whole 4 KiB pages.
    ``layout`` stands in for the folder's layout.json (layer files of random bytes have no checksums)."""
    path = Path(path)
    if layout is not None or (path / "layout.json").exists():
        layout = layout or ModelLayout.read(path)
        e = layout.expert
        block = block or -(-e.expert_bytes // ALIGN) * ALIGN  # the stride (16 KiB steps) leaves room to round up
        files = [path / layout.layer_file(l) for l in layout.moe_layers]
        offsets = np.arange(layout.num_experts, dtype=np.int64) * e.stride
        offsets = offsets[offsets + block <= layout.layer_bytes()]
        targets = np.stack(np.broadcast_arrays(np.arange(len(files))[:, None], offsets[None, :]), -1).reshape(-1, 2)
    else:
        block = block or (4 << 20)
        files = [path]
        offsets = np.arange(0, path.stat().st_size - block + 1, ALIGN, dtype=np.int64)
        targets = np.stack([np.zeros_like(offsets), offsets], -1)
    if not len(targets):
        raise ValueError(f"{path}: nothing of {block:,} bytes to read")
    return files, targets, block


def open_files(files: list[Path], direct: bool) -> tuple[list[int], bool, str]:
    """Descriptors for ``files``, with O_DIRECT when asked and accepted; (fds, direct, why not direct)."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return [os.open(f, os.O_RDONLY | os.O_DIRECT) for f in files], True, ""
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            why = f"{files[0]}: the filesystem refuses O_DIRECT (EINVAL); buffered reads, files evicted first"
    else:
        why = "buffered reads (asked for, or no O_DIRECT on this platform); files evicted first"
    return [os.open(f, os.O_RDONLY) for f in files], False, why


def evict(fds: list[int]) -> None:
    for fd in fds:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def read_for(fds: list[int], targets: np.ndarray, block: int, inflight: int, seconds: float, seed: int) -> dict:
    """``inflight`` threads reading random targets, each into its own aligned buffer, for ``seconds``."""
    counts = [0] * inflight  # whole blocks read per thread
    errors: list[BaseException] = []
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT wants
        picks = rng.integers(0, len(targets), 1 << 16)
        try:
            n = 0
            while time.perf_counter() < stop:
                f, off = targets[picks[n % len(picks)]]
                got = os.preadv(fds[f], [buf], int(off))
                if got != block:
                    raise OSError(errno.EIO, f"short read: {got:,} of {block:,} bytes at {int(off):,}")
                n += 1
            counts[i] = n
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(e)
        finally:
            buf.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(inflight)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start  # includes the last reads that ran past `stop`
    if errors:
        raise errors[0]
    reads = sum(counts)
    return {"inflight": inflight, "reads": reads, "bytes": reads * block, "seconds": elapsed,
            "gbps": reads * block / elapsed / 1e9, "iops": reads / elapsed}


def disk_ceiling(path_or_model_dir, *, seconds: float = 2.0, block: int | None = None, inflight=DEPTHS,
                 direct: bool = True, seed: int = 0, layout: ModelLayout | None = None) -> dict:
    """The best random-read rate over the queue depths ``inflight`` (an int or a sequence), ``seconds`` each.

    Returns ``{gbps, iops, inflight, bytes, reads, seconds, block, direct, note, sweep}``: the best depth's
    numbers (bytes = reads x block, read in ``seconds`` of wall time) and every depth's in ``sweep``."""
    files, targets, block = read_targets(path_or_model_dir, block, layout)
    if block % ALIGN:
        raise ValueError(f"block {block:,} is not a multiple of {ALIGN} bytes (O_DIRECT needs it)")
    depths = [inflight] if isinstance(inflight, int) else list(inflight)
    fds, direct, note = open_files(files, direct)
    try:
        sweep = []
        for i, depth in enumerate(depths):
            if not direct:
                evict(fds)
            sweep.append(read_for(fds, targets, block, depth, seconds, seed=seed + i))
    finally:
        for fd in fds:
            os.close(fd)
    best = max(sweep, key=lambda r: r["gbps"])
    return {**best, "block": block, "direct": direct, "note": note, "sweep": sweep}


def describe(c: dict) -> str:
    sweep = ", ".join(f"{r['inflight']}: {r['gbps']:.2f}" for r in c["sweep"])
    how = "O_DIRECT" if c["direct"] else "buffered"
    return (f"{c['gbps']:.2f} GB/s ({c['iops']:.0f} reads/s of {c['block'] / 1e6:.2f} MB, {how}, {c['inflight']} in flight; "
            f"GB/s by depth: {sweep})" + (f" [{c['note']}]" if c["note"] else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a converted model folder (reads its experts) or any big file")
    p.add_argument("--seconds", type=float, default=2.0, help="reading time per queue depth")
    p.add_argument("--inflight", type=int, nargs="+", default=list(DEPTHS), help="queue depths (threads) to sweep")
    p.add_argument("--block", type=int, default=None, help="bytes per read (default: one expert; 4 MiB for a file)")
    p.add_argument("--buffered", action="store_true", help="read through the page cache (evicted first)")
    args = p.parse_args(argv)
    c = disk_ceiling(args.path, seconds=args.seconds, block=args.block, inflight=args.inflight, direct=not args.buffered)
    print("disk ceiling:", describe(c))
    return c


if __name__ == "__main__":
    main()

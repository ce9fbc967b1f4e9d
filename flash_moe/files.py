"""Opening model files safely: the one place that decides how flash_moe reads and writes its files.

Reading: a model file must be a regular file (a FIFO would block ``open`` and ``read`` forever, a link to
``/dev/zero`` would read until memory runs out), and JSON is read with a size bound. Symbolic links are
followed on read: the Hugging Face cache is made of them.

Writing into a destination folder (``convert``): a planted symbolic link must never make us write outside
it. Files are created with ``O_EXCL | O_NOFOLLOW`` after removing whatever non-directory entry had the
name (the entry, never its target), and finished files are renamed into place inside the folder.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

JSON_LIMIT = 16 << 20  # config/layout/index/progress files are KiB; a tokenizer.json is a few MiB


class CheckpointError(ValueError):
    """A model file or folder that is missing, malformed or unsafe; the message names the file."""


def open_regular(path: str | Path, flags: int = os.O_RDONLY) -> int:
    """``os.open`` a file for reading that must be a regular file; returns the descriptor.

    Opened non-blocking so a FIFO cannot hang the open, then checked with ``fstat``; the non-blocking flag
    is cleared again for ordinary reads."""
    path = Path(path)
    try:
        fd = os.open(path, flags | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file ({_kind(st.st_mode)})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a plain file"


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CheckpointError(f"{path}: {size} bytes, more than the {limit} this file may have")
        chunks, n = [], 0
        while n <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - n))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
        if n > limit:  # grew while we read
            raise CheckpointError(f"{path}: more than the {limit} bytes this file may have")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_json(path: str | Path, limit: int = JSON_LIMIT):
    """Parse a JSON file (bounded, regular files only); errors name the file. FileNotFoundError passes."""
    raw = read_bytes(path, limit)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply") from None


def remove_entry(path: str | Path) -> None:
    """Remove a non-directory entry (a file or a link itself, never what a link points to), if present."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path}: is a folder where a file should be written")
    os.unlink(path)


def create_new(path: str | Path, mode: int = 0o644):
    """Open ``path`` for writing as a new file (binary): any entry of that name is removed first, and the
    create refuses to follow a link (``O_EXCL | O_NOFOLLOW``), so a link planted between the two fails."""
    remove_entry(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise CheckpointError(f"{path}: appeared while being written (another process in this folder?)") from None
    return os.fdopen(fd, "wb")


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing: a new temporary file beside it, then a rename inside the
    same folder (``os.replace`` replaces a link at ``path`` itself, never its target)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with create_new(tmp) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=1).encode())


def inside(folder: str | Path, name: str) -> Path:
    """``folder / name`` for a relative name that stays inside ``folder`` (shard indexes name files: a
    ``../x`` or absolute name is refused)."""
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or p.drive:
        raise CheckpointError(f"{folder}: refers to {name!r}, outside the model folder")
    return Path(folder) / p

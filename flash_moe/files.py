"""Opening model files safely: the one place that decides how flash_moe reads and writes its files.

Reading: a model file must be a regular file (a FIFO would block ``open`` and ``read`` forever, a link to
``/dev/zero`` would read until memory runs out), and JSON is read with a size bound. Symbolic links are
followed on read: the Hugging Face cache is made of them.

Writing into a destination folder (``convert``): a planted symbolic link must never make us write outside
it. Files are created with ``O_EXCL | O_NOFOLLOW`` after removing whatever non-directory entry had the
name (the entry, never its target), and finished files are renamed into place inside the folder.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here; the folder is not locked
    fcntl = None

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


def copy_file(src: str | Path, dst: str | Path, limit: int = 1 << 30) -> None:
    """Copy the regular file ``src`` (at most ``limit`` bytes) to ``dst`` the way ``atomic_write`` writes."""
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    fd = open_regular(src)
    try:
        with create_new(tmp) as out:
            n = 0
            while chunk := os.read(fd, 1 << 20):
                n += len(chunk)
                if n > limit:
                    raise CheckpointError(f"{src}: more than the {limit} bytes this file may have")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    os.replace(tmp, dst)


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=1).encode())


def inside(folder: str | Path, name: str) -> Path:
    """``folder / name`` for a relative name that stays inside ``folder`` (shard indexes name files: a
    ``../x`` or absolute name is refused)."""
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or p.drive:
        raise CheckpointError(f"{folder}: refers to {name!r}, outside the model folder")
    return Path(folder) / p


LOCK_NAME = ".flash_moe.lock"


@contextmanager
def locked(folder: str | Path, what: str = "flash-moe convert"):
    """Hold an exclusive lock on ``folder`` (``flock`` on ``folder/.flash_moe.lock``, which holds our pid)
    for the ``with`` block; a second holder is refused at once with the pid of the first."""
    if fcntl is None:
        yield
        return
    path = Path(folder) / LOCK_NAME
    for _ in range(20):
        fd = _open_lock(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(f"{path}: cannot lock ({e.strerror})") from None
            raise CheckpointError(f"{folder}: in use by another {what} (pid {holder}, lock file {path})") from None
        # The previous holder removes the file as it finishes: our lock counts only if the name still
        # refers to the file we locked; otherwise try again on the new one.
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            now = None
        mine = os.fstat(fd)
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)
    else:
        raise CheckpointError(f"{path}: could not take the lock (the file keeps being replaced)")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)  # still holding it: a waiter that opened this file finds the name gone and retries
        except FileNotFoundError:
            pass
        os.close(fd)


def _open_lock(path: Path) -> int:
    """The lock file, opened read-write without following a link; a link or non-file there is removed."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(3):
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
            remove_entry(path)  # a planted link: remove it, never touch its target
            continue
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
        remove_entry(path)
    raise CheckpointError(f"{path}: cannot create the lock file (something keeps replacing it)")


def parse_bytes(text: str | int) -> int:
    """'8G', '512M', '1.5G', '24GB', '24GiB', '0' or a number of bytes -> bytes. The units are binary (K, M, G, T
    = 2**10 ... 2**40) with or without a trailing 'B' / 'iB': one reading for every option that takes a size."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    scale = units.get(s[-1:], 1)
    try:
        value = float(s[:-1] if s[-1:] in units else s)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 8G, 512M, 0)") from None
    if value < 0:
        raise ValueError(f"not a size: {text!r} (negative)")
    return int(value * scale)

"""Writing files so that a crash or Ctrl-C never leaves half of one behind, and a full disk
is a one-line error that names the path and the space needed."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lowres_ssl.errors import UserError


def write_atomic(
    path: str | Path,
    write: Callable[[Path], object],
    *,
    what: str | None = None,
    needed: int | None = None,
    fix: str = "free some space and run it again",
) -> Path:
    """``write(tmp)`` then rename ``tmp`` to ``path``: readers see the old file or the new one,
    never a partial one. On any failure the temporary file is removed; a full disk is a
    one-line :class:`~lowres_ssl.errors.UserError` (``what`` was being written, ``needed``
    bytes, ``fix``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with disk_full_is_a_user_error(path, what or path.name, needed=needed, fix=fix):
            write(tmp)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (:func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


#: The errors a full disk (or a full quota) raises, by errno and by the words of libraries
#: that turn it into their own exception (safetensors, torch.save).
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "os error 28")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) says the disk or the quota is full."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        if any(words in str(seen) for words in _FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def free_bytes(path: str | Path) -> int | None:
    """The free bytes of the disk holding ``path`` (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def format_bytes(n: float) -> str:
    """``"812 KB"``, ``"45.1 MB"``, ``"2.30 GB"`` (powers of 1,000, as disks are sold)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            digits = 2 if unit == "GB" and n < 10 * size else 1 if unit != "KB" else 0
            return f"{n / size:.{digits}f} {unit}"
    return f"{int(n)} bytes"


def disk_full_message(
    path: str | Path, what: str, needed: int | None, fix: str, free: int | None = None
) -> str:
    """One line: what could not be written where, the space it needs and has (``free``, else
    measured now), the fix."""
    free = free if free is not None else free_bytes(path)
    need = f"about {format_bytes(needed)} needed, " if needed else ""
    have = f"{format_bytes(free)} free" if free is not None else "free space unknown"
    return f"the disk is full: could not write {what} to {path} ({need}{have}); {fix}"


@contextlib.contextmanager
def disk_full_is_a_user_error(
    path: str | Path, what: str, *, needed: int | None = None, fix: str = "free some space"
) -> Iterator[None]:
    """Turn a full disk while writing ``what`` to ``path`` into a one-line
    :class:`~lowres_ssl.errors.UserError`; other errors pass unchanged."""
    try:
        yield
    except Exception as e:
        if is_disk_full(e):
            raise UserError(disk_full_message(path, what, needed, fix)) from None
        raise


@contextlib.contextmanager
def held(lock: str | Path, busy: Callable[[str], str]) -> Iterator[bool]:
    """Hold the advisory lock ``lock`` (``flock``: the system releases it when the process
    dies, so a killed holder blocks nothing) while the block runs; the lock file records who
    holds it. Taken already: a one-line :class:`UserError` of ``busy(holder)``. Yields whether
    a lock is held (False where the system has no ``flock``)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield False
        return
    path = Path(lock)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 — held until the block ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(busy(holder)) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}, started {time.ctime()}\n")
        handle.flush()
        yield True
    finally:
        handle.close()  # releases the lock


def tree_bytes(path: str | Path) -> int:
    """The bytes of the files under ``path`` (0 where there is none)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


__all__ = [
    "disk_full_is_a_user_error",
    "disk_full_message",
    "format_bytes",
    "free_bytes",
    "held",
    "is_disk_full",
    "tree_bytes",
    "write_atomic",
    "write_text_atomic",
]

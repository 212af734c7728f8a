"""Write-then-rename: a file is either its old content or its complete new content, never a half-written one.

``with atomic_path(path) as tmp:`` write ``tmp`` with any writer (``open``, ``np.save``, ``torch.save``, ``savefig``,
a library that takes a path); when the block ends normally ``tmp`` replaces ``path`` (``os.replace``), when it
raises ``tmp`` is removed and the exception propagates, ``path`` untouched. The temporary lies in ``path``'s
directory (the rename stays on one file system), keeps ``path``'s suffix (writers that choose the format from it) and
has a name of its own per process and call (pid + random), so processes or threads writing the same ``path`` never
share a temporary: each rename puts a complete file in place and the last one stays.

Directories that appear as a whole (a DeepSpeed checkpoint tag, a set of conversion outputs renamed together after
they were hashed) keep their own rename logic.

A full disk (``ENOSPC``, or ``EDQUOT`` over a quota) is one error, :class:`DiskFullError`, whichever writer met it:
``atomic_path`` and :func:`disk_full_guard` (for appends, e.g. a CSV log) turn the ``OSError``, and the errors of
writers that wrap it — ``torch.save``'s ``unexpected pos N vs M`` after a short write, safetensors' ``StorageFull`` —
into one line naming the file and the space left on its file system; the temporary is removed first, so that figure
is what the user has, and the previous complete file stays in place.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Union

TMP_MARK = ".tmp-"  # in every temporary's name: <stem>.tmp-<pid>-<random><suffix>
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How writers that wrap the OSError say that the disk is full: torch.save's zip writer after a short write
# ("unexpected pos 4141312 vs 4141204"), safetensors (Rust's io::ErrorKind::StorageFull, os error 28), the C library.
FULL_MESSAGES = ("no space left on device", "disk quota exceeded", "storagefull", "os error 28", "os error 122")
SHORT_WRITE_MESSAGE = "unexpected pos"  # torch.save: fewer bytes written than asked; a full disk when space is short


class DiskFullError(OSError):
    """A write that ran out of space: names the file and the free space left (one line)."""

    def __init__(self, path: Union[str, Path], cause: BaseException):
        self.path = Path(path)
        free = free_bytes(self.path)
        where = f"{_human(free)} free on its file system" if free is not None else "free space unknown"
        super().__init__(errno.ENOSPC, f"disk full writing {self.path} ({where}; the previous complete file, if any, "
                                       f"is kept): {' '.join(str(cause).split())[:160]}")

    def __str__(self) -> str:
        return str(self.strerror)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: Union[str, Path]) -> Optional[int]:
    """Bytes available to this user on the file system holding ``path`` (its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, path: Union[str, Path, None] = None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk is full. A short write (torch's
    ``unexpected pos``) counts as one when less than 1 MiB is left where ``path`` lies."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        text = str(exc).lower()
        if any(m in text for m in FULL_MESSAGES):
            return True
        if SHORT_WRITE_MESSAGE in text and path is not None:
            free = free_bytes(path)
            if free is not None and free < 2**20:
                return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


@contextlib.contextmanager
def disk_full_guard(path: Union[str, Path]) -> Iterator[None]:
    """Turn a full disk met inside the block (writing ``path`` in place, e.g. appending a log row) into
    :class:`DiskFullError`; other errors pass unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e, path):
            raise DiskFullError(path, e) from e
        raise


def temporary_path(path: Path) -> Path:
    """A fresh temporary name beside ``path``: ``<stem>.tmp-<pid>-<8 hex digits><suffix>``."""
    return path.with_name(f"{path.stem}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Union[str, Path], fsync: bool = False) -> Iterator[Path]:
    """The temporary to write ``path`` through; it replaces ``path`` when the block succeeds and is removed when it
    raises. ``fsync``: flush the temporary to disk before the rename (checkpoints, exports)."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        full = is_disk_full(e)  # before the unlink: a short write is judged by the space left with the temporary
        if not full and isinstance(e, Exception) and SHORT_WRITE_MESSAGE in str(e).lower():
            full = is_disk_full(e, tmp)
        tmp.unlink(missing_ok=True)
        if full and not isinstance(e, DiskFullError):
            raise DiskFullError(path, e) from e
        raise


def write_bytes_atomic(path: Union[str, Path], data: bytes, fsync: bool = False) -> Path:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: Union[str, Path], text: str, fsync: bool = False) -> Path:
    with atomic_path(path, fsync) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: Union[str, Path], obj: Any, indent: int = 1, **dumps_kwargs: Any) -> Path:
    """``json.dumps(obj, indent=indent, **dumps_kwargs)`` written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, **dumps_kwargs))

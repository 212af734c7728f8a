"""Write-then-rename: a file is either its old content or its complete new content, never a half-written one.

``with atomic_path(path) as tmp:`` write ``tmp`` with any writer (``open``, ``np.save``, ``torch.save``, ``savefig``,
a library that takes a path); when the block ends normally ``tmp`` replaces ``path`` (``os.replace``), when it
raises ``tmp`` is removed and the exception propagates, ``path`` untouched. The temporary lies in ``path``'s
directory (the rename stays on one file system), keeps ``path``'s suffix (writers that choose the format from it) and
has a name of its own per process and call (pid + random), so processes or threads writing the same ``path`` never
share a temporary: each rename puts a complete file in place and the last one stays.

Directories that appear as a whole (a DeepSpeed checkpoint tag, a set of conversion outputs renamed together after
they were hashed) keep their own rename logic.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator, Union

TMP_MARK = ".tmp-"  # in every temporary's name: <stem>.tmp-<pid>-<random><suffix>


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
    except BaseException:
        tmp.unlink(missing_ok=True)
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

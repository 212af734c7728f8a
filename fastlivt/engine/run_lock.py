"""One owner per run directory: ``<run.out>/.lock``, taken before anything is written there, held for the run's life.

The lock is an ``fcntl.flock`` on the open lock file: the kernel drops it when the holder's last descriptor closes,
so a run that dies (even by SIGKILL) frees the directory by itself. The file's content — ``pid host start-time`` —
is only for the message that refuses a second run. Two cases need the content:

- a dead holder whose descriptor outlived it in a forked child (a loader worker still exiting): the flock is busy
  but the recorded pid is dead on this host. The lock is *stale*: the file is replaced by a new one (a new inode, so
  the orphan's flock no longer matters), with a warning;
- a holder on another host (a shared file system): never taken over; its owner must be stopped or the lock removed.

Replacing a stale lock and taking a fresh one happen under a second, short ``flock`` on the directory itself, so
two runs starting at once cannot both take over the same stale lock. ``--resume`` takes the lock the same way.
Under torchrun/DeepSpeed only rank 0 takes it; :func:`acquire_for_ranks` tells the other ranks whether it did, so
every rank stops together when the directory is busy.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Optional, Tuple

from fastlivt.data_prep.atomic import disk_full_guard
from fastlivt.logs import get_logger

log = get_logger(__name__)
LOCK_NAME = ".lock"


class RunDirBusyError(RuntimeError):
    """Another live run owns this run directory (one line, naming it)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_owner(path: Path) -> Tuple[Optional[int], str, str]:
    """(pid, host, start time) recorded in the lock file; (None, '', '') when unreadable or empty."""
    try:
        fields = path.read_text().split()
    except OSError:
        return None, "", ""
    try:
        return int(fields[0]), fields[1], " ".join(fields[2:])
    except (IndexError, ValueError):
        return None, "", ""


@contextlib.contextmanager
def _directory_lock(out: Path) -> Iterator[None]:
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class RunLock:
    """The held lock of one run directory; :meth:`release` (or process exit) frees it."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.out.mkdir(parents=True, exist_ok=True)
        with _directory_lock(self.out):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if self._try(fd):
                pid, host, started = _read_owner(self.path)  # a run that ended normally left the file empty
                if pid is not None:
                    log.warning("%s: taking over the lock of pid %d on %s (started %s), which ended without releasing "
                                "it", self.path, pid, host, started)
            else:
                os.close(fd)
                pid, host, started = _read_owner(self.path)
                here = socket.gethostname()
                if pid is None or host != here or _pid_alive(pid):
                    owner = f"pid {pid} on {host}, started {started}" if pid is not None else "an unknown process"
                    raise RunDirBusyError(f"{self.out} is in use by another run ({owner}; lock file {self.path}); "
                                          f"wait for it, stop it, or choose another run.out")
                log.warning("%s: taking over a stale lock of pid %d on %s (started %s; that process is gone)",
                            self.path, pid, host, started)
                self.path.unlink(missing_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                if not self._try(fd):  # cannot happen under the directory lock; never write over an owner's file
                    os.close(fd)
                    raise RunDirBusyError(f"{self.out}: the lock {self.path} was taken while replacing a stale one")
            self.fd = fd
            stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
            with disk_full_guard(self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {stamp}\n".encode(), 0)
        return self

    @staticmethod
    def _try(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise

    def release(self) -> None:
        """Free the lock (the file stays: removing it could race with the next run taking it)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)  # empty: the next run knows this one ended cleanly
            os.close(self.fd)
            self.fd = None


def acquire_for_ranks(out: str | Path, runtime) -> Optional[RunLock]:
    """Rank 0 takes the lock of ``out``; every rank learns whether it did (one all-reduce) and raises with it."""
    lock, error = None, None
    if runtime.is_main:
        try:
            lock = RunLock(out).acquire()
        except RunDirBusyError as e:
            error = e
    if runtime.world > 1:
        import torch

        flag = torch.tensor([0.0 if error is None else 1.0], device=runtime.device)
        torch.distributed.all_reduce(flag)
        if flag.item() and error is None:
            if lock is not None:
                lock.release()
            raise RunDirBusyError(f"{out} is in use by another run (rank 0 could not take its lock)")
    if error is not None:
        raise error
    return lock

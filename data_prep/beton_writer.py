"""The FFCV ``.beton`` writer, run so that a dead process is an error and never a wait.

FFCV's writer waits forever for the samples of a writer process that died. :func:`write_beton` therefore runs the
whole DatasetWriter in a child process of its own (a new process group), and waits only with
``multiprocessing.connection.wait`` on that child's sentinel and its result pipe: a wait that returns when the child
ends, however it ends, whatever the parent's threads or signal handlers do. Inside the child a watcher thread waits
the same way on the sentinels of FFCV's writer processes; when one of them dies abnormally it sends the parent a
message naming that process and its exit code, kills the rest and ends the child with ``os._exit``. The parent
kills what is left of the group and raises ``RuntimeError`` naming what died. A converter killed outright (its
process group killed, or the out-of-memory killer) closes the child's lifeline pipe: the child then kills its group.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from fastlivt.data_prep.writers import StagedImages


class _Guarded:
    """``dataset`` for FFCV's writer processes, which must never raise (FFCV's writer would wait forever for the
    samples of a dead process): the first error is stored in the shared ``error`` buffer and a black image of the
    right size stands in, so that the writer finishes and the caller can fail cleanly."""

    def __init__(self, dataset: StagedImages, error):
        self.dataset, self.error = dataset, error

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, int]:
        try:
            return self.dataset[i]
        except Exception as e:  # reported by write_beton once the writer is done
            if not self.error.value:
                self.error.value = f"sample {i}: {type(e).__name__}: {e}".encode()[: len(self.error) - 1]
            h, w = (int(v) for v in self.dataset.shapes[i])
            return np.zeros((h, w, 3), np.uint8), 0


def _page_size(max_sample_bytes: int) -> int:
    """FFCV page size (a power of two >= 8 MiB) that fits the largest sample: a sample that fits no page makes a
    writer process die, and FFCV's writer then waits for it forever."""
    from ffcv.writer import MIN_PAGE_SIZE

    need = max(4 * MIN_PAGE_SIZE, 2 * max_sample_bytes + (1 << 20))
    return 1 << (need - 1).bit_length()


def _writer_processes() -> List[multiprocessing.process.BaseProcess]:
    """The processes this process started (the registry itself: ``active_children()`` would reap and hide a child
    that died)."""
    children = getattr(multiprocessing.process, "_children", None)
    return list(children) if children is not None else multiprocessing.active_children()


def _watch_writers(conn: Connection, lifeline: int, done: threading.Event, state: Dict[str, object]) -> None:
    """In the writer child: wait on the sentinels of FFCV's writer processes and on ``lifeline`` (a pipe whose write
    end only the parent holds). On an abnormal end of a writer process, report it, kill the others and end this
    process; when the parent is gone (end of file on the lifeline), kill this whole process group."""
    seen: Dict[int, multiprocessing.process.BaseProcess] = {}
    while not done.is_set():
        for p in _writer_processes():
            seen.setdefault(p.pid, p)
        ready = wait([lifeline] + [p.sentinel for p in seen.values() if p.exitcode is None], timeout=0.2)
        if lifeline in ready:
            os.killpg(0, signal.SIGKILL)
        dead = [p for p in seen.values() if p.exitcode not in (None, 0)]
        if dead and not done.is_set():
            p = dead[0]
            how = f"was killed by signal {-p.exitcode}" if p.exitcode < 0 else f"exited with code {p.exitcode}"
            conn.send(("died", f"FFCV writer process {p.pid} {how} (its traceback, if any, is above)"))
            for other in seen.values():
                if other.exitcode is None:
                    other.kill()
            shm = getattr(state.get("writer"), "metadata_sm", None)  # FFCV unlinks it only after a complete write
            if hasattr(shm, "unlink"):
                try:
                    shm.close()
                    shm.unlink()
                except OSError:
                    pass
            os._exit(1)


def _write_child(conn: Connection, lifeline: Tuple[int, int], path: str, dataset: "StagedImages", fields,
                 page_size: int, workers: int) -> None:
    """Body of the writer child: FFCV's DatasetWriter over ``dataset``, the outcome sent on ``conn``."""
    os.setpgid(0, 0)  # FFCV's writer processes join this group: the parent can end them all at once
    os.close(lifeline[1])  # only the parent holds the write end: its death reads as end of file
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):  # whatever the parent installed
        signal.signal(signum, signal.SIG_DFL)
    done = threading.Event()
    state: Dict[str, object] = {}
    watcher = threading.Thread(target=_watch_writers, args=(conn, lifeline[0], done, state), name="ffcv-writer-watch",
                               daemon=True)
    watcher.start()
    status = 1
    try:
        from ffcv.writer import DatasetWriter

        error = multiprocessing.Array("c", 4096)  # the default context, like the Process class FFCV uses
        writer = state["writer"] = DatasetWriter(path, fields, page_size=page_size, num_workers=workers)
        writer.from_indexed_dataset(_Guarded(dataset, error), chunksize=64)
        done.set()
        conn.send(("error", error.value.decode(errors="replace")) if error.value else ("ok", ""))
        status = 0
    except BaseException as e:  # noqa: BLE001 - everything goes to the parent
        done.set()
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()
        os._exit(status)  # no inherited exit handlers run in this fork


def _end_group(child: multiprocessing.process.BaseProcess) -> None:
    """Kill the child and its process group (FFCV's writer processes) and reap the child. The child is killed by
    pid too: one stopped before it made its group has no group to kill."""
    for kill in (lambda: os.kill(child.pid, signal.SIGKILL), lambda: os.killpg(child.pid, signal.SIGKILL)):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    wait([child.sentinel])  # ready once the killed child is gone
    child.join(timeout=5)


def write_beton(path: Path, dataset: StagedImages, write_mode: str, jpeg_quality: int, compress_probability: float,
                workers: int) -> None:
    """Write ``dataset`` (already validated and resized) to the FFCV file ``path`` with FFCV's DatasetWriter, in a
    child process (see the module docstring); ``RuntimeError`` naming what failed or died."""
    from ffcv.fields import IntField, RGBImageField

    if len(dataset) == 0:
        raise ValueError("no samples to write")
    largest = int((dataset.shapes[:, 0].astype(np.int64) * dataset.shapes[:, 1] * 3).max())
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=None, jpeg_quality=jpeg_quality,
                               compress_probability=compress_probability),
        "label": IntField(),
    }
    ctx = multiprocessing.get_context("fork")  # the dataset (staging maps, test doubles) is inherited, not pickled
    receive, send = ctx.Pipe(duplex=False)
    lifeline = os.pipe()
    child = ctx.Process(target=_write_child, name="ffcv-writer",
                        args=(send, lifeline, str(path), dataset, fields, _page_size(largest), max(1, workers)))
    child.start()
    send.close()
    os.close(lifeline[0])
    outcome = None
    try:
        while outcome is None:
            ready = wait([receive, child.sentinel])
            if receive in ready:
                try:
                    outcome = receive.recv()
                except EOFError:  # the child ended without a word
                    outcome = ("gone", "")
            elif child.sentinel in ready and not receive.poll():
                outcome = ("gone", "")
    finally:
        if outcome is not None and outcome[0] == "ok":
            child.join()
        else:
            _end_group(child)
        receive.close()
        os.close(lifeline[1])
    kind, message = outcome
    if kind == "gone":
        code = child.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        message = f"the FFCV writer process {child.pid} {how} before reporting (out of memory?)"
    if kind != "ok":
        raise RuntimeError(f"writing {path} failed: {message}")
    if not os.path.isfile(path):
        raise RuntimeError(f"FFCV writer finished without writing {path}")

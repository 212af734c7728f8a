"""fastlivt.data_prep.atomic: write-then-rename leaves either the old or the complete new file, never a partial one or a
temporary, also when processes or threads write the same path at once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

import pytest

from fastlivt.data_prep.atomic import (TMP_MARK, atomic_path, temporary_path, write_bytes_atomic, write_json_atomic,
                              write_text_atomic)

ROOT = Path(__file__).resolve().parents[2]
SIZE = 1 << 20  # large enough that a write is many system calls


def test_success_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".json" and TMP_MARK in tmp.name
        tmp.write_text("new")
        assert path.read_text() == "old"  # not replaced before the block ends
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_an_exception_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_an_exception_before_anything_was_written(tmp_path):
    path = tmp_path / "x.txt"
    with pytest.raises(KeyError):
        with atomic_path(path):
            raise KeyError("nothing written")
    assert list(tmp_path.iterdir()) == []


def test_temporary_names_differ_per_call_and_carry_the_pid(tmp_path):
    names = {temporary_path(tmp_path / "a.csv").name for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith(f"a{TMP_MARK}{os.getpid()}-") and n.endswith(".csv") for n in names)


def test_fsync_flushes_the_temporary_before_the_rename(tmp_path):
    path = tmp_path / "ckpt.bin"
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        assert not path.exists()  # before the rename
        return real_fsync(fd)

    with mock.patch("os.fsync", side_effect=fsync):
        write_bytes_atomic(path, b"data", fsync=True)
        write_bytes_atomic(tmp_path / "nosync.bin", b"data")
    assert len(synced) == 1 and TMP_MARK in Path(synced[0]).name
    assert path.read_bytes() == b"data"


def test_text_and_json_conveniences(tmp_path):
    assert write_text_atomic(tmp_path / "a.md", "x\n").read_text() == "x\n"
    out = write_json_atomic(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert out.read_text() == json.dumps({"b": 1, "a": [1, 2]}, indent=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "m.json"]


def _check_complete(data: bytes, payloads) -> None:
    assert data in payloads, (len(data), data[:1], data[-1:])


def test_threads_writing_the_same_path_all_succeed_and_readers_never_see_a_partial_file(tmp_path):
    path = tmp_path / "shared.bin"
    payloads = [bytes([65 + k]) * SIZE for k in range(4)]
    write_bytes_atomic(path, payloads[0])
    errors, stop = [], threading.Event()
    start = threading.Barrier(len(payloads) + 1)

    def writer(payload):
        try:
            start.wait()
            for _ in range(10):
                write_bytes_atomic(path, payload)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def reader():
        start.wait()
        while not stop.is_set():
            data = path.read_bytes()
            if data not in payloads:
                errors.append(f"read a partial file: {len(data)} bytes")

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    read = threading.Thread(target=reader)
    read.start()
    for t in threads:
        t.join()
    stop.set()
    read.join()
    assert errors == []
    _check_complete(path.read_bytes(), payloads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.bin"]


_WRITER = """
import sys, time
from fastlivt.data_prep.atomic import write_bytes_atomic
path, byte, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
while time.time() < start:
    time.sleep(0.001)
for _ in range(20):
    write_bytes_atomic(path, bytes([byte]) * (1 << 20))
"""


def test_processes_writing_the_same_path_all_succeed(tmp_path):
    import time

    path = tmp_path / "shared.gz"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(byte), str(start)], env=env,
                              stderr=subprocess.PIPE, text=True) for byte in (65, 66, 67)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), results
    _check_complete(path.read_bytes(), [bytes([b]) * SIZE for b in (65, 66, 67)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.gz"]

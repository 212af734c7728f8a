"""FFCV jpg/proportion modes and resizing, the kill-safety of the outputs, and --verify."""
import contextlib
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from convert_testdata import check_outputs, make_files, read_beton
from fastlivt.data_prep.beton_writer import write_beton
from fastlivt.data_prep.cli import main
from fastlivt.data_prep.manifest import load_manifest
from fastlivt.data_prep.sources import Source, SourceError
from fastlivt.data_prep.writers import StagedImages

REPO = Path(__file__).resolve().parents[2]
FINAL = re.compile(r"^(train\.beton|train-\d{5}\.(tar|idx)|labels\.npy|manifest\.json)$")


def test_jpg_mode_resized_to_max_resolution(tmp_path):
    items = make_files(tmp_path / "raw", [4, 4], size=(90, 120))
    rc = main(["imagefolder", "--root", str(tmp_path / "raw"), "--formats", "ffcv,dali", "--out", str(tmp_path / "o"),
               "--write-mode", "jpg", "--max-resolution", "64", "--jpeg-quality", "90", "--workers", "2",
               "--shard-size", "3", "--no-progress"])
    assert rc == 0
    m = check_outputs(tmp_path / "o", [(y, px) for _, y, px in items], exact=False, jpeg_tol=6.0)
    assert m["image"] == {"write_mode": "jpg", "max_resolution": 64, "jpeg_quality": 90}
    rows, labels = read_beton(tmp_path / "o" / "train.beton")
    assert rows.shape == (8, 48, 64, 3)
    # every written row is, within JPEG error, one reference image shrunk with INTER_AREA, with its label
    refs = [(y, cv2.resize(px, (64, 48), interpolation=cv2.INTER_AREA).astype(np.int16)) for _, y, px in items]
    used = set()
    for row, y in zip(rows.astype(np.int16), labels):
        errs = [np.abs(row - ref).mean() if ry == y else np.inf for ry, ref in refs]
        best = int(np.argmin(errs))
        assert errs[best] < 3.0 and best not in used
        used.add(best)


def test_proportion_mode_is_mixed_and_deterministic(tmp_path):
    from ffcv.reader import Reader

    items = make_files(tmp_path / "raw", [20, 20], size=(16, 16))
    modes = []
    for run in ("a", "b"):
        rc = main(["imagefolder", "--root", str(tmp_path / "raw"), "--formats", "ffcv", "--out", str(tmp_path / run),
                   "--write-mode", "proportion", "--compress-probability", "0.5", "--workers", "2", "--no-progress"])
        assert rc == 0
        modes.append(Reader(str(tmp_path / run / "train.beton")).metadata["f0"]["mode"].copy())
    assert 0 < modes[0].sum() < len(modes[0])  # some rows raw (1), some jpg (0)
    assert np.array_equal(modes[0], modes[1])
    rows, labels = read_beton(tmp_path / "a" / "train.beton")
    assert len(rows) == 40 and np.array_equal(labels, np.load(tmp_path / "a" / "labels.npy"))


@pytest.mark.slow
def test_killed_conversion_leaves_nothing_finished(tmp_path):
    make_files(tmp_path / "raw", [60, 60], size=(128, 128))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastlivt.data_prep", "imagefolder", "--root", str(tmp_path / "raw"), "--out", str(out),
           "--formats", "ffcv,dali", "--shard-size", "5", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    try:
        while time.time() < deadline and proc.poll() is None:
            if out.is_dir() and any(".tar" in p.name for p in out.iterdir()):
                break
            time.sleep(0.002)
        assert proc.poll() is None, "conversion ended before a shard appeared"
        os.killpg(proc.pid, signal.SIGKILL)  # the converter and the pool it started (its own session)
    finally:
        proc.wait(timeout=30)
    left = sorted(p.name for p in out.iterdir())
    assert any(name.endswith(".tmp") for name in left), left  # it was killed midway
    assert not [name for name in left if FINAL.match(name)], left  # nothing that looks finished
    # a new run over the leftovers completes, verifies, and cleans them up
    assert main(cmd[3:] + ["--workers", "2"]) == 0
    assert main(["--verify", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if not FINAL.match(p.name)) == []


def test_verify_detects_a_flipped_byte(tmp_path, capsys):
    make_files(tmp_path / "raw", [3, 3], size=(16, 16))
    out = tmp_path / "o"
    assert main(["imagefolder", "--root", str(tmp_path / "raw"), "--formats", "ffcv,dali", "--out", str(out),
                 "--shard-size", "2", "--workers", "0", "--no-progress"]) == 0
    m = load_manifest(out)  # the shared contract reads it
    assert m.num_samples == 6 and m.labels().tolist() == np.load(out / "labels.npy").tolist()
    assert main(["--verify", str(out)]) == 0
    assert "all 8 files match" in capsys.readouterr().out
    for name in ("train-00001.tar", "train.beton", "labels.npy"):
        data = bytearray((out / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (out / name).write_bytes(bytes(data))
        assert main(["--verify", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"{name}: differs" in err and err.count("differs") == 1
        data[len(data) // 2] ^= 0x01
        (out / name).write_bytes(bytes(data))
    (out / "train-00002.idx").unlink()
    assert main(["--verify", str(out)]) == 1
    assert "train-00002.idx: missing" in capsys.readouterr().err


class _Unreadable(StagedImages):
    def __getitem__(self, i):
        if i == 5:
            raise OSError("staging file unreadable")
        return np.zeros((4, 4, 3), np.uint8), 0


class _Exiting(StagedImages):
    def __getitem__(self, i):
        if i == 5:
            os._exit(3)
        return np.zeros((4, 4, 3), np.uint8), 0


class _Killed(StagedImages):
    def __getitem__(self, i):
        if i == 5:
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would end it
        return np.zeros((4, 4, 3), np.uint8), 0


class _Fine(StagedImages):
    def __getitem__(self, i):
        return np.full((4, 4, 3), i, np.uint8), i % 3


class _CrashingSource(Source):
    def read(self, i):
        if i == 7:  # as a decoder segfault on a corrupt file would
            os.kill(os.getpid(), signal.SIGKILL)
        return np.zeros((4, 4), np.uint8)


@contextlib.contextmanager
def _hostile_process_state():
    """The states that broke a thread-interrupting watcher: busy and blocked threads, replaced SIGINT/SIGCHLD
    handlers, unrelated children (one still running, one already dead with a non-zero code)."""
    stop, blocked = threading.Event(), threading.Lock()
    blocked.acquire()

    def busy():
        while not stop.is_set():
            sum(range(1000))

    threads = [threading.Thread(target=busy), threading.Thread(target=lambda: blocked.acquire(timeout=600))]
    for t in threads:
        t.start()
    handlers = {sig: signal.signal(sig, lambda *a: None) for sig in (signal.SIGINT, signal.SIGCHLD)}
    ctx = multiprocessing.get_context("fork")
    dead = ctx.Process(target=os._exit, args=(5,))
    alive = ctx.Process(target=time.sleep, args=(600,))
    dead.start()
    alive.start()
    dead.join()
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        stop.set()
        blocked.release()
        for t in threads:
            t.join()
        alive.kill()
        alive.join()


@pytest.mark.timeout(900)
def test_dead_writer_or_decoder_is_an_error_in_any_process_state(tmp_path):
    """FFCV's writer waits forever for a writer process that died, and a plain process pool for a dead decoder:
    each death must become an error naming it, every time, whatever else runs in the process."""
    from fastlivt.data_prep.decode import DecodeJob, WorkerDied, decode_all

    n = 20
    args = ([], np.zeros(n, int), np.zeros(n, int), np.full((n, 2), 4), np.zeros(n, int))
    source = _CrashingSource("fmnist", 1, ["a"], [f"file{i}.jpg" for i in range(40)], np.zeros(40, np.int64))
    with _hostile_process_state():
        for k in range(3):
            with pytest.raises(RuntimeError, match="sample 5: OSError: staging file unreadable"):
                write_beton(tmp_path / f"u{k}.beton", _Unreadable(*args, seed=0, reseed=False), "raw", 90, 0.5, 2)
            with pytest.raises(RuntimeError, match=r"FFCV writer process \d+ exited with code 3"):
                write_beton(tmp_path / f"e{k}.beton", _Exiting(*args, seed=0, reseed=False), "raw", 90, 0.5, 2)
            with pytest.raises(RuntimeError, match=r"FFCV writer process \d+ was killed by signal 9"):
                write_beton(tmp_path / f"k{k}.beton", _Killed(*args, seed=0, reseed=False), "raw", 90, 0.5, 2)
            # the message lists every file in flight: the crashing one, and what the other worker was decoding
            with pytest.raises(WorkerDied, match=r"were decoding (\S+, )*file7\.jpg(, \S+)*$"):
                for _ in decode_all(DecodeJob(source, None, 90, True, None), list(range(40)), workers=2):
                    pass
            write_beton(tmp_path / f"f{k}.beton", _Fine(*args, seed=0, reseed=False), "raw", 90, 0.5, 2)
            rows, labels = read_beton(tmp_path / f"f{k}.beton")
            assert rows[:, 0, 0, 0].tolist() == list(range(n)) and labels.tolist() == [i % 3 for i in range(n)]
    assert multiprocessing.active_children() == []  # no writer process left behind


@pytest.mark.timeout(600)
def test_conversion_with_a_dying_writer_fails_and_leaves_nothing(tmp_path, monkeypatch):
    make_files(tmp_path / "raw", [6, 6], size=(16, 16))
    real = StagedImages.__getitem__

    def dies_on_sample_3(self, i):
        if i == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, i)

    monkeypatch.setattr(StagedImages, "__getitem__", dies_on_sample_3)
    out = tmp_path / "o"
    rc = main(["imagefolder", "--root", str(tmp_path / "raw"), "--formats", "ffcv,dali", "--out", str(out),
               "--workers", "2", "--shard-size", "5", "--no-progress"])
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == []  # no temporaries, no staging, nothing that looks finished


_SLOW_WRITE = r"""
import sys, time
import numpy as np
from fastlivt.data_prep.beton_writer import write_beton
from fastlivt.data_prep.writers import StagedImages

class Slow(StagedImages):
    def __getitem__(self, i):
        time.sleep(0.05)
        return np.zeros((4, 4, 3), np.uint8), 0

n = 2000
write_beton(sys.argv[1], Slow([], np.zeros(n, int), np.zeros(n, int), np.full((n, 2), 4), np.zeros(n, int), seed=0,
                               reseed=False), "raw", 90, 0.5, 2)
"""


def _process_groups():
    """pid -> (parent pid, process group) of every process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_converter_takes_its_ffcv_writers_along(tmp_path):
    """The writer child has a process group of its own; when the converter is killed outright, the child's lifeline
    pipe reaches end of file and the child kills that group: no writer process is left running."""
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_WRITE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "x.beton")], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, group = time.time() + 400, None
        while group is None and time.time() < deadline and proc.poll() is None:
            table = _process_groups()
            for pid, (ppid, pgid) in table.items():
                if ppid == proc.pid and pgid == pid and sum(g == pgid for _, g in table.values()) >= 3:
                    group = pgid  # the writer child, leader of its group, with FFCV's 2 writer processes
            time.sleep(0.05)
        assert group is not None, "no FFCV writer group appeared"
        proc.kill()  # the converter alone, as the out-of-memory killer would
    finally:
        proc.wait(timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline and any(g == group for _, g in _process_groups().values()):
        time.sleep(0.1)
    assert not any(g == group for _, g in _process_groups().values()), "FFCV writer processes outlived the converter"


def test_rerun_replaces_same_split_and_refuses_another(tmp_path, capsys):
    make_files(tmp_path / "raw" / "train", [3, 2], size=(8, 8))
    make_files(tmp_path / "raw" / "val", [1, 1], size=(8, 8))
    base = ["imagefolder", "--root", str(tmp_path / "raw"), "--formats", "dali", "--workers", "0", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "o"), "--shard-size", "2"]) == 0
    assert main(base + ["--out", str(tmp_path / "o"), "--shard-size", "5"]) == 0  # fewer shards than before
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "labels.npy", "manifest.json", "train-00000.idx", "train-00000.tar"]
    from fastlivt.data_prep.cli import run_as_program

    assert run_as_program(base + ["--out", str(tmp_path / "o"), "--split", "val"]) == 2  # a user's mistake: exit 2
    err = capsys.readouterr().err
    assert "holds the converted 'train' split" in err and "Traceback" not in err
    assert main(["--verify", str(tmp_path / "o")]) == 0
    # a conversion that fails while listing leaves the earlier one untouched
    with pytest.raises(SourceError, match="missing: not a directory"):
        main(base[:2] + [str(tmp_path / "missing")] + base[3:] + ["--out", str(tmp_path / "o")])
    assert main(["--verify", str(tmp_path / "o")]) == 0

"""Through the command line and other processes: a diverging run exits in one line leaving only finite checkpoints,
a second run into a busy run.out exits 2 in one line, a full disk says so and keeps the previous checkpoint, and a
DeepSpeed run stops on a non-finite loss keeping its good checkpoint."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastlivt.engine.checkpoint import safe_load
from run_safety_doubles import all_finite

REPO = Path(__file__).resolve().parents[2]


def _train_cli(tmp: Path, data: Path, out: Path, *extra: str):
    cmd = [sys.executable, "-m", "fastlivt", "finetune", "--config", str(REPO / "configs/fmnist_lt/bft.yaml"),
           f"data.train={data}", "model.init=", f"run.out={out}", "run.progress=false", "run.tensorboard=false",
           "run.epochs=1", "optim.warmup_epochs=0.2", "data.backend=torch", "data.workers=0", "loss.fused=torch",
           *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp)


@pytest.fixture(scope="module")
def fmnist_like(tmp_path_factory):
    """A converted 28-px split (torch backend: no numba compile in each CLI process)."""
    from fastlivt.data_prep.cli import main
    from PIL import Image

    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    for c, n in enumerate([60, 30, 20, 10]):
        (root / "src" / f"c{c}").mkdir(parents=True)
        for k in range(n):
            Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(root / "src" / f"c{c}" / f"{k}.png")
    assert main(["imagefolder", "--root", str(root / "src"), "--formats", "ffcv,dali", "--out", str(root / "data"),
                 "--workers", "0", "--no-progress"]) == 0
    return root / "data"


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("fastlivt: error:")]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_cli_diverging_run_leaves_only_finite_checkpoints(fmnist_like, tmp_path):
    out = tmp_path / "div"
    proc = _train_cli(tmp_path, fmnist_like, out, "optim.blr=1e6", "optim.warmup_epochs=0", "run.ckpt_every_steps=1",
                      "data.batch_size=8", "run.max_steps=12")
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "non-finite" in line and "at step" in line and "last good checkpoint" in line
    for f in (out / "checkpoints").glob("*.pt"):
        assert all_finite(safe_load(f)["model"]), f
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_cli_second_run_into_a_busy_run_out_exits_2_in_one_line(fmnist_like, tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fastlivt.engine.run_lock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)", str(out)],
                              stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])))
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _train_cli(tmp_path, fmnist_like, out)
        assert proc.returncode == 2
        line = _one_error_line(proc.stderr)
        assert f"{out} is in use by another run (pid {holder.pid} on {socket.gethostname()}" in line
        assert not (out / "config.yaml").exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.slow
def test_cli_full_disk_says_so_and_keeps_the_previous_checkpoint(fmnist_like, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "12m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        proc = _train_cli(tmp_path, fmnist_like, disk / "run", "run.ckpt_every_steps=1", "data.batch_size=8",
                          "run.max_steps=6")
        assert proc.returncode == 2
        line = _one_error_line(proc.stderr)
        assert "disk full writing" in line and "free on its file system" in line, line
        last = safe_load(disk / "run" / "checkpoints" / "last.pt")  # the previous complete checkpoint
        assert last["meta"]["step"] >= 1 and all_finite(last["model"])
        assert not [p for p in (disk / "run" / "checkpoints").iterdir() if ".tmp-" in p.name]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
def test_deepspeed_stops_on_non_finite_and_keeps_the_good_checkpoint(tmp_path):
    import json

    pytest.importorskip("deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests" / "helpers"), os.environ.get("PYTHONPATH", "")]))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "ds_nonfinite_worker.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["error"] and "non-finite loss at step 5" in result["error"], result
    assert f"{tmp_path / 'run' / 'checkpoints' / 'last'} (step 4)" in result["error"]
    assert result["finite"] and result["meta_step"] == 4

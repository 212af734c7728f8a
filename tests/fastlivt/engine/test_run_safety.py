"""A run that goes wrong says so in one line and loses nothing: non-finite values (stop | skip), a busy run
directory, a full disk, keys that cannot work together, a test split used for model selection."""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_doubles import write_manifest
from fastlivt.config import ConfigError, TrainConfig, check_combinations, load_config
from fastlivt.engine.checkpoint import safe_load, save_safetensors
from fastlivt.engine.loop import train
from fastlivt.engine.nonfinite import NonFiniteError
from fastlivt.engine.pretrain import MGPTask
from fastlivt.engine.run_lock import RunDirBusyError, RunLock
from run_safety_doubles import PoisonedMGP, all_finite, loader_factory, tiny_mgp

REPO = Path(__file__).resolve().parents[3]
def test_stop_names_step_quantity_and_last_good_checkpoint_then_resume_continues(tmp_path):
    make = loader_factory(tmp_path)
    out = tmp_path / "run"  # 6 steps per epoch; checkpoints at steps 2 and 4; NaN loss from step 5 on
    with pytest.raises(NonFiniteError) as err:
        train(tiny_mgp(out), PoisonedMGP(range(5, 100)), make_loader=make)
    msg = str(err.value)
    assert "non-finite loss at step 5" in msg and "run.nonfinite=stop" in msg and "\n" not in msg
    assert f"the last good checkpoint is {out / 'checkpoints' / 'last'} (step 4)" in msg
    saved = safe_load(out / "checkpoints" / "last.pt")
    assert saved["meta"]["step"] == 4 and all_finite(saved["model"])  # step 6's save was refused
    assert RunLock(out).acquire().release() is None  # the failed run released the directory
    resumed = train(tiny_mgp(out), MGPTask(), resume=True, make_loader=make)
    assert resumed.step == 12 and all_finite(resumed.runtime.unwrap().state_dict())


def test_skip_drops_the_update_on_the_device_and_counts_it(tmp_path):
    make = loader_factory(tmp_path)
    ref = train(tiny_mgp(tmp_path / "ref", max_steps=2), MGPTask(), make_loader=make)
    run = train(tiny_mgp(tmp_path / "skip", nonfinite="skip", max_steps=3), PoisonedMGP({3}), make_loader=make)
    assert run.summary["nonfinite_skipped_steps"] == 1
    # step 3 changed nothing: weights and Adam state equal those after step 2 (fused AdamW's found_inf)
    a, b = ref.runtime.unwrap().state_dict(), run.runtime.unwrap().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = {float(s["step"]) for s in run.runtime.optimizer.state.values()}
    assert steps == {2.0}


def test_skip_stops_after_max_skips_in_a_row(tmp_path):
    cfg = tiny_mgp(tmp_path / "run", nonfinite="skip", nonfinite_max_skips=2, log_every=1)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3 .*2 steps in a row, run.nonfinite_max_skips=2"):
        train(cfg, PoisonedMGP({3, 4, 5}), make_loader=loader_factory(tmp_path))


def test_writers_refuse_a_non_finite_tensor_and_keep_the_previous_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors({"w": torch.ones(3)}, path, {})
    before = path.read_bytes()
    with pytest.raises(NonFiniteError, match="tensor w is not finite"):
        save_safetensors({"w": torch.tensor([1.0, float("inf"), 0.0])}, path, {})
    assert path.read_bytes() == before


# --------------------------------------------------------------------------------------------------- the lock
def test_second_owner_is_refused_and_a_released_lock_is_free(tmp_path):
    first = RunLock(tmp_path / "run").acquire()
    with pytest.raises(RunDirBusyError, match=rf"in use by another run \(pid {os.getpid()} on "):
        RunLock(tmp_path / "run").acquire()
    first.release()
    RunLock(tmp_path / "run").acquire().release()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # the dead run's descriptor still open in an orphan (a forked worker): flock busy, recorded pid gone
    (out / ".lock").write_text(f"{dead.pid} {socket.gethostname()} 2026-01-01 00:00:00 UTC\n")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'r+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    import logging

    logger = logging.getLogger("fastlivt.engine.run_lock")
    logger.addHandler(caplog.handler)  # the project's loggers do not propagate to the root logger
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = RunLock(out).acquire()
        assert f"stale lock of pid {dead.pid}" in caplog.text
        assert (out / ".lock").read_text().split()[0] == str(os.getpid())
        lock.release()
    finally:
        logger.removeHandler(caplog.handler)
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------------------------------- full disk
def test_enospc_anywhere_in_an_atomic_write_is_one_disk_full_error(tmp_path, monkeypatch):
    from fastlivt.data_prep.atomic import DiskFullError, atomic_path, disk_full_guard, write_text_atomic

    target = write_text_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(DiskFullError) as err:
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value).startswith(f"disk full writing {target} (") and "free on its file system" in str(err.value)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with pytest.raises(DiskFullError):  # torch.save's wrapper of a short write, judged by the space left
        monkeypatch.setattr("fastlivt.data_prep.atomic.free_bytes", lambda p: 1000)
        with atomic_path(target):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4141312 vs 4141204")
    with pytest.raises(DiskFullError), disk_full_guard(tmp_path / "train.csv"):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(ValueError), disk_full_guard(tmp_path / "x"):  # anything else passes unchanged
        raise ValueError("not a full disk")


# --------------------------------------------------------------------------------------------------- keys
@pytest.mark.parametrize("overrides, names", [
    (["loss.name=bal_bce", "loss.form=official", "loss.test_prior=[1,1,1,1,1,1,1,1,1,1]"],
     ["loss.test_prior", "loss.form=paper"]),
    (["loss.name=ce", "loss.test_prior=[1,1]"], ["loss.test_prior", "bal_ce or bal_bce"]),
    (["loss.name=bce", "loss.add_log_c=true"], ["loss.add_log_c", "loss.name=bal_ce"]),
    (["loss.name=ce", "loss.fused=triton"], ["loss.fused=triton", "loss.fused=auto or torch"]),
    (["run.nonfinite=skip", "deepspeed=configs/deepspeed/zero2.json"], ["run.nonfinite=skip", "run.nonfinite=stop"]),
    (["model.img_size=32"], ["model.img_size=32", "data.img_size=28"]),
])
def test_keys_that_cannot_work_together_are_one_line_at_start(overrides, names, capsys):
    from fastlivt.cli import main

    with pytest.raises(ConfigError) as err:
        check_combinations(load_config(TrainConfig, REPO / "configs/fmnist_lt/bft.yaml", overrides))
    assert all(n in str(err.value) for n in names), str(err.value)
    assert main(["finetune", "--config", str(REPO / "configs/fmnist_lt/bft.yaml"), *overrides]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith("fastlivt: error: ") and err_text.count("\n") == 1


def test_a_test_split_in_data_val_is_refused_unless_allowed(tmp_path):
    from fastlivt.engine.finetune import check_not_test

    labels = np.repeat(np.arange(3), 4)
    cfg = load_config(TrainConfig, REPO / "configs/fmnist_lt/bft.yaml", [f"data.val={tmp_path / 't'}"])
    write_manifest(tmp_path / "t", labels, 3, split="test")
    with pytest.raises(ConfigError, match="is a converted 'test' split.*run.select_on_test=true"):
        check_not_test(cfg)
    cfg.run.select_on_test = True
    check_not_test(cfg)
    write_manifest(tmp_path / "t", labels, 3, split="val")
    cfg.run.select_on_test = False
    check_not_test(cfg)


def test_shipped_bft_configs_never_select_on_a_test_split():
    import yaml

    for path in sorted(REPO.glob("configs/*/bft*.yaml")):
        cfg = load_config(TrainConfig, path)
        assert not cfg.data.val.rstrip("/").endswith("test") or cfg.run.select_on_test, path
    assert load_config(TrainConfig, REPO / "configs/imagenet_lt/bft.yaml").data.val == "data/imagenet_lt/val"
    assert load_config(TrainConfig, REPO / "configs/places_lt/bft.yaml").data.val == "data/places_lt/val"
    assert load_config(TrainConfig, REPO / "configs/inat18/bft.yaml").data.val == ""
    assert yaml.safe_load((REPO / "configs/fmnist_lt/bft.yaml").read_text())["data"]["val"] == ""

"""Checkpoints of the first on-disk format (written by the engine before the training state became parts) keep
loading: a resume from ``tests/data/checkpoint_format1/last.pt`` continues exactly where it was written."""
from __future__ import annotations

import shutil

import pytest
import torch

from engine_doubles import FMNIST
from legacy_checkpoint import FIXTURE, N_TRAIN, fixture_cfg, fixture_loaders
from fastlivt.engine.checkpoint import safe_load
from fastlivt.engine.finetune import BFTTask
from fastlivt.engine.loop import train

pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason=f"Fashion-MNIST not installed at {FMNIST}")


def test_resume_from_a_first_format_checkpoint_equals_the_uninterrupted_run(tmp_path):
    saved = safe_load(FIXTURE / "last.pt")["meta"]
    assert (saved["epoch"], saved["step"], saved["sampler"]["samples_consumed"]) == (1, 4, 16)  # mid-epoch
    shutil.copytree(FIXTURE, tmp_path / "data")
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(FIXTURE / "last.pt", tmp_path / "b" / "checkpoints" / "last.pt")

    # the run that never stopped: the fixture's training (its batch augmentation from the global generators, as
    # written) up to the checkpoint at epoch 1, position 16, then the current augmentation, as the resumed run
    make_a = fixture_loaders(tmp_path / "data", tmp_path / "val_a", fixture_until=(1, 16))
    task_a = BFTTask()
    a = train(fixture_cfg(tmp_path / "a", max_steps=0), task_a, make_loader=make_a)
    loaders_b = []
    make_b = fixture_loaders(tmp_path / "data", tmp_path / "val_b")

    def make(cfg, split, stage, runtime):
        loaders_b.append(make_b(cfg, split, stage, runtime))
        return loaders_b[-1]
    task_b = BFTTask()
    b = train(fixture_cfg(tmp_path / "b", max_steps=0), task_b, resume=True, make_loader=make)
    assert a.step == b.step == 6

    # the resumed run read the rest of epoch 1's order (samples 16..47 of its permutation), then nothing else
    order = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(0 * 100003 + 1))
    assert [i for _, batch in loaders_b[0].read for i in batch] == order[16:].tolist()
    assert {e for e, _ in loaders_b[0].read} == {1}
    # weights, optimizer, EMA, best top-1 and the evaluation agree with the run that never stopped (same machine:
    # bit for bit; the tolerance only covers another CPU's float rounding of the reference run)
    for x, y in ((a.runtime.unwrap().state_dict(), b.runtime.unwrap().state_dict()),
                 (a.runtime.optimizer.state_dict()["state"], b.runtime.optimizer.state_dict()["state"]),
                 (task_a.ema.module.state_dict(), task_b.ema.module.state_dict())):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    assert task_b.best_top1 == pytest.approx(task_a.best_top1)
    assert b.summary["last_eval"] == pytest.approx(a.summary["last_eval"])
    assert a.runtime.lrs() == b.runtime.lrs()

    # and what the engine writes now is the same format: the same files' entries, meta entries and sampler fields
    old, new = safe_load(FIXTURE / "last.pt"), safe_load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert new.keys() == old.keys() and new["runtime"].keys() == old["runtime"].keys()
    assert new["meta"].keys() == old["meta"].keys()
    for entry in ("sampler", "rng", "schedule", "extra"):
        assert new["meta"][entry].keys() == old["meta"][entry].keys(), entry
    assert (new["meta"]["epoch"], new["meta"]["step"], new["meta"]["sampler"]["samples_consumed"]) == (2, 6, 0)

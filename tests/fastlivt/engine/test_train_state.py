"""The training state as parts: the position arithmetic of an epoch's pass, the Stateful protocol of every part, the
random streams restored at their capture point, resume planning that leaves the config alone, and the config's path
through ``fastlivt.engine`` (no module entered more than twice)."""
from __future__ import annotations

import random
import shutil
from unittest import mock

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.stateful import Stateful

from cfg_path import entries, trace_cfg_path
from engine_doubles import FMNIST
from legacy_checkpoint import FIXTURE, fixture_cfg, fixture_loaders
from fastlivt.engine.checkpointer import RandomStreams
from fastlivt.engine.train_state import Geometry, LoaderPosition, TrainState


class _Seeks:
    def __init__(self):
        self.calls = []

    def set_epoch(self, epoch):
        self.calls.append(("set_epoch", epoch))

    def seek(self, consumed, end):
        self.calls.append(("seek", consumed, end))


def test_a_pass_reads_whole_steps_of_what_is_left_and_the_state_round_trips():
    # 48 samples a epoch on 1 process: batch 8, accumulation 2 -> 6 micro-batches, 3 steps
    one = Geometry(per_micro=8, accum=2, micro_per_epoch=6)
    state = TrainState(epoch=1)
    assert state.begin_pass(one) == 6 and state.end == 48 and not state.mid_epoch
    for _ in range(2):
        state.advance(one)
    assert state.consumed == 16 and state.mid_epoch
    # resumed on 3 processes (24 positions a micro-batch, accumulation 1): 32 left, one whole step, 8 left out
    three = Geometry(per_micro=24, accum=1, micro_per_epoch=2)
    resumed = TrainState()
    resumed.load_state_dict(state.state_dict())
    assert (resumed.epoch, resumed.consumed, resumed.end) == (1, 16, 48)
    assert resumed.begin_pass(three) == 1 and resumed.end == 48  # a resumed pass keeps its planned end
    assert resumed.left_out(three, 1) == 8
    resumed.end_epoch(three)
    assert (resumed.epoch, resumed.consumed, resumed.end) == (2, 0, 48)


def test_every_part_is_a_stateful_and_the_loader_position_is_the_sampler_entry():
    state = TrainState(epoch=2, step=7, consumed=16, end=48)
    loader = _Seeks()
    position = LoaderPosition(loader, state, "instance", 3, 2, 4, 8)
    for part in (state, position, RandomStreams()):
        assert isinstance(part, Stateful)
    assert position.state_dict() == {"kind": "instance", "seed": 3, "epoch": 2, "samples_consumed": 16,
                                     "epoch_samples": 48, "world": 2, "accum": 4, "batch_size": 8}
    position.apply()
    assert loader.calls == [("set_epoch", 2), ("seek", 16, 48)]
    with pytest.raises(RuntimeError, match="epoch 2, sample 24.*epoch 2, sample 16"):
        position.load_state_dict({**position.state_dict(), "samples_consumed": 24})


def _draw():
    return (random.random(), float(np.random.rand()), float(torch.rand(())))


def _batches(log):
    log.append(("created", _draw()))  # creating the iterator draws (as a DataLoader's base seed does)
    for _ in range(2):
        log.append(("batch", _draw()))
        yield len(log)


@pytest.mark.parametrize("mid_epoch", [False, True])
def test_random_streams_are_restored_where_they_were_captured(mid_epoch):
    streams = RandomStreams()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    saved = streams.state_dict()
    expected = [_draw() for _ in range(2)]  # the two draws after the capture point
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    streams.load_state_dict(saved)
    log = []
    list(streams.around(_batches(log), mid_epoch=mid_epoch))
    if mid_epoch:  # after the iterator has produced its first batch: its creation drew from the old streams
        assert log[2][1] == expected[0] and log[0][1] != expected[0]
    else:  # at an epoch boundary: before the iterator is created
        assert [log[0][1], log[1][1]] == expected
    log2 = []
    list(streams.around(_batches(log2), mid_epoch=mid_epoch))  # restored once only
    assert log2[0][1] != expected[0]


def _resumable(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "data")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(FIXTURE / "last.pt", tmp_path / "run" / "checkpoints" / "last.pt")
    return fixture_cfg(tmp_path / "run", max_steps=0)


def test_resume_planning_returns_a_new_config_and_state(tmp_path, monkeypatch):
    from fastlivt.engine.resume import read_resume

    cfg = _resumable(tmp_path)  # written on 1 process with accumulation 2, mid-epoch 1 at sample 16, step 4
    monkeypatch.setenv("WORLD_SIZE", "2")
    resumed, plan = read_resume(cfg)
    assert cfg.optim.accum_iter == 2 and resumed.optim.accum_iter == 1  # effective batch 16 kept on 2 processes
    assert resumed is not cfg and resumed.data == cfg.data
    same = plan.state(Geometry(per_micro=16, accum=1, micro_per_epoch=3), steps_per_epoch=3)
    assert (same.epoch, same.step, same.consumed, same.end) == (1, 4, 16, 48)
    # 2 steps an epoch instead of 3: sample 16 of epoch 1 is step 2 + 16 // 16 = 3 of the new schedule
    fewer = plan.state(Geometry(per_micro=16, accum=1, micro_per_epoch=2), steps_per_epoch=2)
    assert (fewer.epoch, fewer.step, fewer.consumed, fewer.end) == (1, 3, 16, 48)


@pytest.mark.skipif(not FMNIST.is_dir(), reason=f"Fashion-MNIST not installed at {FMNIST}")
def test_the_config_enters_no_engine_module_more_than_twice(tmp_path):
    from fastlivt.engine.finetune import BFTTask
    from fastlivt.engine.loop import train

    cfg = _resumable(tmp_path)
    make = fixture_loaders(tmp_path / "data", tmp_path / "val")
    run, path = trace_cfg_path(lambda: train(cfg, BFTTask(), resume=True, make_loader=make))
    assert run.step == 6
    assert path[:3] == ["loop", "resume", "elastic"] and "torch_runtime" in path  # the tracer sees the calls
    assert max(entries(path).values()) <= 2, " -> ".join(path)


@pytest.mark.skipif(not FMNIST.is_dir(), reason=f"Fashion-MNIST not installed at {FMNIST}")
def test_a_kill_between_the_last_steps_checkpoint_and_the_epoch_end_resumes_exactly(tmp_path):
    # 'last' then holds epoch 0 with its whole plan consumed: the resumed pass reads nothing, ends the epoch, goes on
    from engine_doubles import SimulatedCrash
    from fastlivt.engine.checkpoint import safe_load
    from fastlivt.engine.checkpointer import Checkpointer
    from fastlivt.engine.finetune import BFTTask
    from fastlivt.engine.loop import train

    shutil.copytree(FIXTURE, tmp_path / "data")

    def cfg(out):
        c = fixture_cfg(out, max_steps=0)
        c.run.ckpt_every_steps = 1
        return c
    a = train(cfg(tmp_path / "a"), BFTTask(), make_loader=fixture_loaders(tmp_path / "data", tmp_path / "va"))
    original = Checkpointer.save

    def save(self, tag):
        if tag == "last" and (self.state.epoch, self.state.consumed) == (1, 0):
            raise SimulatedCrash("killed before the epoch-end checkpoint")
        original(self, tag)
    with mock.patch.object(Checkpointer, "save", save), pytest.raises(SimulatedCrash):
        train(cfg(tmp_path / "b"), BFTTask(), make_loader=fixture_loaders(tmp_path / "data", tmp_path / "vb"))
    meta = safe_load(tmp_path / "b" / "checkpoints" / "last.pt")["meta"]
    assert (meta["epoch"], meta["step"], meta["sampler"]["samples_consumed"], meta["sampler"]["epoch_samples"]) == \
        (0, 3, 48, 48)
    b = train(cfg(tmp_path / "b"), BFTTask(), resume=True,
              make_loader=fixture_loaders(tmp_path / "data", tmp_path / "vb2"))
    assert a.step == b.step == 6
    sa, sb = a.runtime.unwrap().state_dict(), b.runtime.unwrap().state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

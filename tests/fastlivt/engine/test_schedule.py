"""The warmup + half-cosine learning-rate schedule: values at known steps, timm's per-iteration cosine, resume checks."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastlivt.engine.schedule import WarmupCosine


def test_schedule_values_at_known_steps():
    # peak 1.0, floor 0.1, 2 warmup epochs of 10, 5 optimizer steps per epoch (50 steps)
    s = WarmupCosine(peak_lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10, steps_per_epoch=5)
    assert s.total_steps == 50
    expected = {
        0: 0.0,
        1: 0.1,                 # 0.2 epochs / 2 warmup epochs
        5: 0.5,                 # end of the first epoch: half of the warmup
        10: 1.0,                # end of warmup: peak (cos 0)
        30: 0.55,               # half-way through the cosine: 0.1 + 0.9 * 0.5
        20: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),   # a quarter of the cosine
        49: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 39 / 40)),
        50: 0.1,
    }
    for step, lr in expected.items():
        assert s(step) == pytest.approx(lr, abs=1e-12), step


def test_schedule_matches_timm_cosine_per_iteration():
    from timm.scheduler import CosineLRScheduler

    steps_per_epoch, warmup, epochs, peak, floor = 7, 3, 12, 2e-3, 1e-6
    s = WarmupCosine(peak, floor, warmup, epochs, steps_per_epoch)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    timm_s = CosineLRScheduler(opt, t_initial=(epochs - warmup) * steps_per_epoch, lr_min=floor,
                               warmup_t=warmup * steps_per_epoch, warmup_lr_init=0.0, warmup_prefix=True,
                               t_in_epochs=False)
    for step in range(epochs * steps_per_epoch):
        timm_s.step_update(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(s(step), rel=1e-12, abs=1e-15), step


def test_schedule_refuses_changed_resume():
    a = WarmupCosine(1.0, 0.0, 1, 4, 10)
    a.check_resumable(a.state_dict())
    with pytest.raises(ValueError, match="steps_per_epoch"):
        WarmupCosine(1.0, 0.0, 1, 4, 11).check_resumable(a.state_dict())

"""The device RandAugment against timm's own PIL ops with the same draws, and its operation count against the batch
size (its policy parsing and sampler against timm's: test_device_randaugment_sampler.py)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa

from fastlivt.config import ConfigError
from fastlivt.data import device_randaugment as dra
from fastlivt.data import ra_fidelity as rf
from fastlivt.data.ra_fidelity import timm_rand_augment
from fastlivt.data.sample_rng import RandAugmentDraws, sample_keys

CONFIG = "rand-m9-mstd0.5-inc1"
MEAN = (0.485, 0.456, 0.406)
FILL = dra.img_mean(MEAN)
N_IMAGES, SIZE = 64, 48


@pytest.fixture(scope="module")
def setup():
    ra = timm_rand_augment(CONFIG, SIZE, MEAN, "random")
    images = rf.fidelity_images(N_IMAGES, SIZE, seed=1)
    draws = dra.draw(dra.parse_policy(CONFIG), sample_keys(7, 2, np.arange(N_IMAGES)), "random")
    return ra, images, draws


@pytest.mark.parametrize("op", range(len(dra.OPS)), ids=list(dra.OPS))
def test_each_op_matches_timm(setup, op):
    ra, images, draws = setup
    one = rf.forced(draws, op)
    name = dra.OPS[op]
    ref = np.stack([rf.timm_reference(ra, images[i], one, i) for i in range(N_IMAGES)])
    changed = np.mean(ref != images)
    assert changed > 0.05, f"{name}: timm's op left {100 * (1 - changed):.1f}% of values unchanged (harness broken?)"
    figures = rf.compare(ra, images, one, FILL)
    if name in rf.INTEGER_OPS:
        assert figures["max"] == 0, (name, figures)
    elif name in rf.ENHANCE_OPS:
        assert figures["max"] <= 1, (name, figures)
    else:
        assert name in rf.GEOMETRIC_OPS
        assert figures["within1"] >= 99.0 and figures["mean"] <= 0.25, (name, figures)


class _RecordingRandom:
    """timm's ``random`` seen through: every answer it gives, in order, with the op it was given to."""

    def __init__(self):
        self.calls = []  # (op index, method, value)
        self.op = -1

    def random(self):
        v = random.random()
        self.calls.append((self.op, "random", v))
        return v

    def gauss(self, mu, sigma):
        v = random.gauss(mu, sigma)
        self.calls.append((self.op, "gauss", v))
        return v

    def choice(self, seq):
        v = random.choice(seq)
        self.calls.append((self.op, "choice", list(seq).index(v)))
        return v


def _replay(calls, slots):
    """The draws of one image from timm's recorded calls: the prob test, the magnitude, the sign, the filter."""
    applied, magnitude, negate, bicubic = [False] * 2, [0.0] * 2, [False] * 2, [True] * 2
    for slot in range(slots):
        mine = [(m, v) for k, m, v in calls if k == slot]
        applied[slot] = mine[0][1] <= 0.5
        rest = dict(mine[1:])
        magnitude[slot] = min(max(rest.get("gauss", 0.0), 0.0), 10.0)
        negate[slot] = rest.get("random", 0.0) > 0.5
        bicubic[slot] = rest.get("choice", 1) == 1
    return applied, magnitude, negate, bicubic


def test_timms_own_random_run_is_reproduced_from_its_recorded_draws(setup, monkeypatch):
    """timm's RandAugment with its real generators, recorded; the device output from those draws equals it: the
    draw semantics (apply when random() <= p, negate when random() > 0.5, filter = choice) are timm's."""
    ra, images, _ = setup
    recorder = _RecordingRandom()
    monkeypatch.setattr(timm_aa, "random", recorder)
    state = random.getstate(), np.random.get_state()
    random.seed(5)
    np.random.seed(5)
    outputs, rows = [], []
    try:
        for image in images:
            chosen = np.random.choice(len(ra.ops), ra.num_layers, replace=True)
            recorder.calls = []
            out = Image.fromarray(image)
            for slot, k in enumerate(chosen):
                recorder.op = slot
                out = ra.ops[int(k)](out)
            outputs.append(np.asarray(out))
            rows.append((chosen, *_replay(recorder.calls, ra.num_layers)))
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
    ops, applied, magnitude, negate, bicubic = (np.array([r[i] for r in rows]) for i in range(5))
    draws = RandAugmentDraws(ops.astype(np.int64), applied, magnitude, negate, bicubic)
    assert 0 < applied.mean() < 1 and 0 < bicubic[applied].mean() < 1
    ours = dra.device_rand_augment(torch.from_numpy(images), dra.DeviceDraws.from_draws(draws, torch.device("cpu")),
                                   FILL, channels_last=True).numpy()
    figures = rf.diff_figures(ours, np.stack(outputs))
    assert figures["max"] <= 1 and figures["psnr"] >= 35.0, figures


def test_geometric_ops_exercise_both_filters_and_signs(setup):
    _, _, draws = setup
    assert draws.bicubic[:, 0].any() and not draws.bicubic[:, 0].all()
    assert draws.negate[:, 0].any() and not draws.negate[:, 0].all()


@pytest.mark.parametrize("compact", [True, False])
def test_whole_policy_matches_timm(setup, compact):
    ra, images, draws = setup
    assert 0 < draws.applied.mean() < 1
    figures = rf.compare(ra, images, draws, FILL, compact=compact, geometry_dtype=torch.float64)
    assert figures["psnr"] >= 35.0 and figures["max"] <= 1, figures  # float64 geometry: Pillow's own arithmetic


@pytest.mark.parametrize("magnitude", [0.0, 10.0])
def test_every_op_at_the_magnitude_bounds_matches_timm_exactly(setup, magnitude):
    """m = 0 (Rotate by 0 is Pillow's copy) and m = 10 (Posterize to 0 bits = black, Solarize everything)."""
    ra, images, draws = setup
    for op in range(len(dra.OPS)):
        one = rf.forced(draws, op)
        one.magnitude[:] = magnitude
        figures = rf.compare(ra, images[:16], _first(one, 16), FILL, geometry_dtype=torch.float64)
        assert figures["max"] == 0, (dra.OPS[op], magnitude, figures)


def test_non_square_images_match_timm():
    h, w = 40, 56
    ra = timm_rand_augment(CONFIG, max(h, w), MEAN, "random")
    images = rf.fidelity_images(48, w, seed=3)[:, :h]
    draws = dra.draw(dra.parse_policy(CONFIG), sample_keys(9, 0, np.arange(48)), "random")
    for op in [dra.OPS.index(n) for n in rf.GEOMETRIC_OPS]:
        figures = rf.compare(ra, images, rf.forced(draws, op), FILL)
        assert figures["max"] <= 1 and figures["within1"] >= 99.0, (dra.OPS[op], figures)
    assert rf.compare(ra, images, draws, FILL)["psnr"] >= 35.0


def _first(d, n: int):
    return type(d)(d.ops[:n], d.applied[:n], d.magnitude[:n], d.negate[:n], d.bicubic[:n])


def test_float32_geometry_stays_close(setup):
    ra, images, draws = setup
    geometric = [dra.OPS.index(n) for n in rf.GEOMETRIC_OPS]
    for op in geometric:
        figures = rf.compare(ra, images, rf.forced(draws, op), FILL, geometry_dtype=torch.float32)
        assert figures["within1"] >= 99.0 and figures["mean"] <= 0.25, (dra.OPS[op], figures)


def test_cpu_default_geometry_is_float32(setup):
    """On CPU the geometric ops run in float32 unless float64 (Pillow's arithmetic exactly) is asked for."""
    _, images, draws = setup
    d = dra.DeviceDraws.from_draws(rf.forced(draws, dra.OPS.index("Rotate")), torch.device("cpu"))
    x = torch.from_numpy(images)
    default = dra.device_rand_augment(x, d, FILL, channels_last=True)
    assert dra.default_geometry_dtype(torch.device("cpu")) == torch.float32
    assert torch.equal(default, dra.device_rand_augment(x, d, FILL, torch.float32, channels_last=True))
    assert not torch.equal(default, dra.device_rand_augment(x, d, FILL, torch.float64, channels_last=True))


@pytest.mark.parametrize("axes", ["x", "y", "xy"])
@pytest.mark.parametrize("bicubic", [False, True])
def test_resampling_lane_by_lane_equals_all_lanes_at_once(setup, axes, bicubic):
    """CPU filters one colour lane at a time, accelerators all three at once: the same arithmetic."""
    from fastlivt.data.device_ra_geometry import resample

    _, images, draws = setup
    op = {"x": "ShearX", "y": "TranslateYRel", "xy": "Rotate"}[axes]
    args = dra._slot_arguments(torch.full((N_IMAGES,), dra.OPS.index(op)), torch.from_numpy(draws.magnitude[:, 0]),
                               torch.from_numpy(draws.negate[:, 0]), SIZE, SIZE)
    x = torch.from_numpy(images)
    for dtype in (torch.float32, torch.float64):
        one = resample(x, args.matrix, axes, bicubic, FILL, dtype, lanes=1)
        assert torch.equal(one, resample(x, args.matrix, axes, bicubic, FILL, dtype, lanes=3))
        assert not torch.equal(one, x)


def test_compact_equals_whole_batch(setup):
    _, images, draws = setup
    d = dra.DeviceDraws.from_draws(draws, torch.device("cpu"))
    sizes = np.array([[len(m) for m in slot] for slot in d.members])
    assert sizes.shape == (2, len(dra.GROUPS)) and sizes.max() < N_IMAGES, sizes
    assert (sizes.max(0) > 0).all(), sizes  # every group runs on a proper subset in some slot
    x = torch.from_numpy(images)
    compact = dra.device_rand_augment(x, d, FILL, channels_last=True)
    assert torch.equal(compact, dra.device_rand_augment(x, d, FILL, channels_last=True, compact=False))


def test_channels_first_equals_channels_last(setup):
    _, images, draws = setup
    d = dra.DeviceDraws.from_draws(draws, torch.device("cpu"))
    nhwc = torch.from_numpy(images)
    last = dra.device_rand_augment(nhwc, d, FILL, channels_last=True)
    first = dra.device_rand_augment(nhwc.permute(0, 3, 1, 2).contiguous(), d, FILL)
    assert torch.equal(first.permute(0, 2, 3, 1), last)
    assert not torch.equal(last, nhwc)


def test_bad_input_is_refused():
    d = dra.DeviceDraws.from_draws(dra.draw(dra.parse_policy(CONFIG), sample_keys(0, 0, np.arange(2))),
                                   torch.device("cpu"))
    with pytest.raises(ValueError, match="uint8 RGB"):
        dra.device_rand_augment(torch.zeros(2, 3, 8, 8), d, FILL)
    for bad in ("rand-m9-mstd0.5", "rand-m9-inc1-tweights", "augmix-m5", "rand-m9-q3-inc1"):
        with pytest.raises(ConfigError, match="data.auto_augment"):
            dra.parse_policy(bad)


def _ops_for(batch: int, seed: int, compact: bool) -> int:
    images = torch.from_numpy(rf.fidelity_images(batch, 16, seed)).permute(0, 3, 1, 2).contiguous()
    draws = dra.draw(dra.parse_policy(CONFIG), sample_keys(seed, 0, np.arange(batch)), "random")
    d = dra.DeviceDraws.from_draws(draws, torch.device("cpu"))
    return rf.count_ops(images, d, FILL, compact=compact)


@pytest.mark.parametrize("compact", [True, False])
def test_operation_count_does_not_depend_on_the_batch(compact):
    counts = {_ops_for(32, 0, compact), _ops_for(256, 1, compact), _ops_for(32, 2, compact)}
    assert len(counts) == 1 and counts.pop() > 50


def _ops_with(batch: int, seed: int, interpolation: str) -> int:
    images = torch.from_numpy(rf.fidelity_images(batch, 16, seed)).permute(0, 3, 1, 2).contiguous()
    draws = dra.draw(dra.parse_policy(CONFIG), sample_keys(seed, 0, np.arange(batch)), interpolation)
    return rf.count_ops(images, dra.DeviceDraws.from_draws(draws, torch.device("cpu"), interpolation), FILL)


def test_one_filter_policy_runs_only_its_groups():
    """A fixed filter leaves the other filter's geometric groups out: fewer operations, still none per image."""
    bicubic = {_ops_with(32, 0, "bicubic"), _ops_with(256, 1, "bicubic")}
    assert len(bicubic) == 1 and bicubic.pop() < _ops_with(32, 0, "random")
    mixed = dra.draw(dra.parse_policy(CONFIG), sample_keys(3, 0, np.arange(64)), "random")
    with pytest.raises(ValueError, match="bilinear"):
        dra.DeviceDraws.from_draws(rf.forced(mixed, dra.OPS.index("Rotate")), torch.device("cpu"), "bicubic")


@pytest.mark.cuda
def test_cuda_matches_cpu(setup):
    _, images, draws = setup
    x = torch.from_numpy(images)
    cpu = dra.device_rand_augment(x, dra.DeviceDraws.from_draws(draws, torch.device("cpu")), FILL, torch.float64,
                                  channels_last=True)
    cuda = torch.device("cuda")
    gpu = dra.device_rand_augment(x.to(cuda), dra.DeviceDraws.from_draws(draws, cuda), FILL, channels_last=True)
    whole = dra.device_rand_augment(x.to(cuda), dra.DeviceDraws.from_draws(draws, cuda), FILL, channels_last=True,
                                    compact=False)
    assert gpu.is_cuda and torch.equal(gpu, whole)
    figures = rf.diff_figures(gpu.cpu().numpy(), cpu.numpy())
    assert figures["max"] <= 1 and figures["within1"] == 100.0 and figures["mean"] < 0.01, figures


def test_nothing_applied_is_the_identity_with_the_same_operation_count():
    images = torch.from_numpy(rf.fidelity_images(8, 16, seed=4)).permute(0, 3, 1, 2).contiguous()
    draws = dra.draw(dra.parse_policy(CONFIG), sample_keys(4, 0, np.arange(8)), "random")
    some = rf.count_ops(images, dra.DeviceDraws.from_draws(draws, torch.device("cpu")), FILL)
    draws.applied[:] = False
    none = dra.DeviceDraws.from_draws(draws, torch.device("cpu"))
    assert all(len(m) == 0 for slot in none.members for m in slot)
    assert torch.equal(dra.device_rand_augment(images, none, FILL), images)
    assert rf.count_ops(images, none, FILL) == some

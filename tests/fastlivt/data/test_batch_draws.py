"""BFT's batch augmentation (RandomErasing, Mixup/CutMix) from (seed, epoch, positions): timm's results given the same
draws (timm's own code run on our draws), timm's samplers' distributions (timm's code drawing from its own
generators), a pure function of the positions, a fixed number of device operations per batch, clear errors."""
import math
import random

import numpy as np
import pytest
import torch
import timm.data.mixup as timm_mixup
import timm.data.random_erasing as timm_erasing
from timm.data.mixup import Mixup, cutmix_bbox_and_lam
from timm.data.random_erasing import RandomErasing

from fastlivt.data import batch_draws as bd
from fastlivt.data import sample_rng as sr
from fastlivt.data.augment import BatchAugment, erase, mix
from fastlivt.data.ra_fidelity import dispatched_ops
from fastlivt.data.sample_rng import sample_keys, uniforms

C = 7


def _ks(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic D."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / a.size - np.searchsorted(b, grid, "right") / b.size).max())


def _ks_ok(a, b) -> bool:
    """D below the 0.0001-level critical value sqrt(-ln(0.0001/2)/2) sqrt((n+m)/(nm)) (conservative for ties)."""
    return _ks(a, b) < math.sqrt(-math.log(0.00005) / 2) * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


def _same_rate(k1, n1, k2, n2) -> bool:
    """Two-proportion z-test, |z| < 4."""
    p = (k1 + k2) / (n1 + n2)
    return abs(k1 / n1 - k2 / n2) < 4 * math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))


# ------------------------------------------------------------------------------------------ timm's code, our draws
class _ErasingSource:
    """Python's ``random`` inside timm.data.random_erasing, handing out our uniforms in the order ``_erase`` asks."""

    def __init__(self, keys):
        a = bd.ERASE_ATTEMPTS
        self.erase, self.top, self.left = (uniforms(keys, s)[:, 0] for s in (bd._ERASE, bd._ERASE_TOP, bd._ERASE_LEFT))
        self.area, self.ratio = uniforms(keys, bd._ERASE_AREA, a), uniforms(keys, bd._ERASE_RATIO, a)
        self.i, self.boxes = -1, []

    def random(self):  # first call of each sample
        self.i, self.calls, self.ints = self.i + 1, 0, []
        return self.erase[self.i]

    def uniform(self, lo, hi):  # area, ratio, area, ratio, ... of the attempts
        k, which = divmod(self.calls, 2)
        self.calls += 1
        return lo + (hi - lo) * (self.area if which == 0 else self.ratio)[self.i, k]

    def randint(self, lo, hi):  # top, then left (inclusive bounds)
        u = (self.top, self.left)[len(self.ints)][self.i]
        self.ints.append(lo + int(u * (hi - lo + 1)))
        return self.ints[-1]


def test_erasing_equals_timms_erase_given_the_same_draws(monkeypatch):
    b, h, w = 64, 23, 31
    images = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(0))
    keys = sample_keys(3, 1, np.arange(100, 100 + b))
    boxes = bd.erase_boxes(keys, h, w, bd.EraseConfig(0.6))
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(123))
    ours = erase(images.clone(), torch.from_numpy(boxes), 123)

    source = _ErasingSource(keys)

    def pixels(per_pixel, rand_color, patch_size, dtype, device):  # the noise at the box timm just placed
        assert per_pixel and not rand_color
        top, left = source.ints
        return noise[source.i, :, top:top + patch_size[1], left:left + patch_size[2]]

    monkeypatch.setattr(timm_erasing, "random", source)
    monkeypatch.setattr(timm_erasing, "_get_pixels", pixels)
    ref = RandomErasing(0.6, mode="pixel", max_count=1, device="cpu")(images.clone())
    assert source.i == b - 1
    assert torch.equal(ours, ref)
    erased = (boxes[:, 2] > 0)
    assert 0.4 < erased.mean() < 0.8 and torch.equal((ours != images).flatten(1).any(1), torch.from_numpy(erased))


class _MixSource:
    """numpy inside timm.data.mixup: ``np.random`` hands out our batch draws in the order ``_mix_batch`` asks."""

    def __init__(self, key):
        self.key, self.rands, self.ints = key, [uniforms(key, bd._MIX)[0, 0], uniforms(key, bd._SWITCH)[0, 0]], \
            [uniforms(key, bd._CUT_Y)[0, 0], uniforms(key, bd._CUT_X)[0, 0]]
        self.random = self

    def __getattr__(self, name):  # np.sqrt, np.clip, ...
        return getattr(np, name)

    def rand(self):
        return self.rands.pop(0)

    def beta(self, a, b):
        assert a == b
        return bd.beta(self.key, a)

    def randint(self, lo, hi, size=None):
        assert size is None
        return lo + int(self.ints.pop(0) * (hi - lo))


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixing_equals_timms_mix_batch_given_the_same_draws(monkeypatch, mixup, cutmix):
    b, h, w = 8, 19, 26
    kinds = set()
    for k in range(40):
        x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(k))
        key = sample_keys(5, 2, np.array([k * b]))
        params = bd.mix_params(key, h, w, bd.MixConfig(mixup, cutmix, 0.8, 0.5))
        ours = mix(x.clone(), params)
        monkeypatch.setattr(timm_mixup, "np", _MixSource(key))
        ref = x.clone()
        lam = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=0.8, switch_prob=0.5, mode="batch",
                    correct_lam=True, num_classes=C)._mix_batch(ref)
        monkeypatch.undo()
        assert torch.equal(ours, ref) and lam == params.lam
        kinds.add("none" if params.lam == 1.0 else "cutmix" if params.box else "mixup")
    assert kinds == {"none", "mixup", "cutmix"} if mixup and cutmix else {"none", "cutmix" if cutmix else "mixup"}


# ------------------------------------------------------------------------------------------------ timm's samplers
def _boxes_of(erased: torch.Tensor) -> np.ndarray:
    """(top, left, h, w) of each sample's zeroed box in ``erased`` ([N,1,H,W] of ones), zeros when none."""
    mask = erased[:, 0] == 0
    rows, cols = mask.any(2), mask.any(1)
    h, w = rows.sum(1), cols.sum(1)
    top, left = rows.float().argmax(1), cols.float().argmax(1)
    return torch.stack([top, left, h, w], 1).numpy()


def test_erasing_boxes_follow_timms_distribution():
    n, h, w = 8000, 20, 28
    random.seed(0)
    theirs = _boxes_of(RandomErasing(0.6, mode="const", max_count=1, device="cpu")(torch.ones(n, 1, h, w)))
    ours = bd.erase_boxes(sample_keys(11, 0, np.arange(n)), h, w, bd.EraseConfig(0.6))
    t_on, o_on = theirs[:, 2] > 0, ours[:, 2] > 0
    assert _same_rate(t_on.sum(), n, o_on.sum(), n) and 0.55 < o_on.mean() < 0.65
    t, o = theirs[t_on], ours[o_on]
    for col in range(4):  # top, left, height, width
        assert _ks_ok(t[:, col], o[:, col]), col
    assert _ks_ok(t[:, 2] * t[:, 3], o[:, 2] * o[:, 3])  # area
    assert _ks_ok(np.log(t[:, 2] / t[:, 3]), np.log(o[:, 2] / o[:, 3]))  # aspect
    # and the test has power: a box of twice the largest area is told apart
    wrong = bd.erase_boxes(sample_keys(11, 0, np.arange(n)), h, w, bd.EraseConfig(0.6, max_area=2 / 3))
    assert not _ks_ok(t[:, 2] * t[:, 3], wrong[wrong[:, 2] > 0][:, 2] * wrong[wrong[:, 2] > 0][:, 3])


def test_mixing_parameters_follow_timms_distribution():
    n, h, w = 4000, 20, 28
    mixer = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, switch_prob=0.5, mode="batch", num_classes=C)
    np.random.seed(0)
    theirs = []  # (kind, lam, yl, xl): kind 0 none, 1 mixup, 2 cutmix
    for _ in range(n):
        lam, cut = mixer._params_per_batch()
        if lam == 1.0:
            theirs.append((0, 1.0, 0, 0))
        elif cut:
            (yl, _, xl, _), lam = cutmix_bbox_and_lam((1, 3, h, w), lam, correct_lam=True)
            theirs.append((2, lam, yl, xl))
        else:
            theirs.append((1, lam, 0, 0))
    cfg = bd.MixConfig(0.8, 1.0, 0.7, 0.5)
    ours = []
    for k in range(n):
        p = bd.mix_params(sample_keys(2, 3, np.array([64 * k])), h, w, cfg)
        ours.append((0 if p.lam == 1.0 and p.box is None else 2 if p.box else 1, p.lam,
                     *(p.box[0::2] if p.box else (0, 0))))
    t, o = np.array(theirs), np.array(ours)
    for kind in (0, 1, 2):
        assert _same_rate((t[:, 0] == kind).sum(), n, (o[:, 0] == kind).sum(), n), kind
    for kind in (1, 2):
        assert _ks_ok(t[t[:, 0] == kind, 1], o[o[:, 0] == kind, 1]), kind  # lambda (CutMix's corrected)
    for col in (2, 3):
        assert _ks_ok(t[t[:, 0] == 2, col], o[o[:, 0] == 2, col]), col  # CutMix box corner
    assert not _ks_ok(t[t[:, 0] == 1, 1], [bd.beta(sample_keys(2, 3, np.array([k])), 0.2) for k in range(1000)])


# ------------------------------------------------------------------------------------------------ determinism
def test_draws_are_a_pure_function_of_seed_epoch_and_positions():
    aug = BatchAugment(C, mixup=0.8, cutmix=1.0, reprob=0.5, seed=7)
    a, b = aug.draws(2, np.arange(32, 48), 24, 24), aug.draws(2, np.arange(32, 48), 24, 24)
    assert np.array_equal(a.boxes, b.boxes) and a.mix == b.mix and a.noise_seed == b.noise_seed
    # a sample's box is its own: the same in any batch and for any world size (rank 1 of 2 reads 33, 35, ...)
    whole = aug.draws(2, np.arange(32, 64), 24, 24)
    assert np.array_equal(whole.boxes[1::2], aug.draws(2, np.arange(33, 64, 2), 24, 24).boxes)
    # the batch's mixing comes from its first position: another epoch, seed or first position draws anew
    others = [aug.draws(3, np.arange(32, 48), 24, 24), BatchAugment(C, seed=8).draws(2, np.arange(32, 48), 24, 24),
              aug.draws(2, np.arange(48, 64), 24, 24)]
    assert all(o.noise_seed != a.noise_seed and o.mix != a.mix for o in others)
    assert not np.array_equal(others[0].boxes, a.boxes)
    images, labels = torch.randn(16, 3, 24, 24), torch.arange(16) % C
    x1, t1 = aug(images.clone(), labels, 2, np.arange(32, 48))
    x2, t2 = aug(images.clone(), labels, 2, np.arange(32, 48))
    assert torch.equal(x1, x2) and t1.lam == t2.lam == a.mix.lam and torch.equal(t1.label_b, labels.flip(0))


def test_streams_are_distinct_from_the_per_sample_streams():
    used = [v for k, v in vars(sr).items() if k.startswith("_") and k.isupper() and isinstance(v, int)]
    assert max(used) + 32 <= min(bd.STREAMS)  # each RandAugment stream spans up to 32 (64 for the normals: below)
    assert sr._RA_NORMAL + 64 <= sr._RA_INTERP < sr._RA_INTERP + 32 <= min(bd.STREAMS)
    assert len(set(bd.STREAMS)) == bd._NOISE - bd._ERASE + 1 and bd._ERASE_LEFT < bd._MIX


def test_device_work_is_a_fixed_number_of_operations_for_any_batch():
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        aug = BatchAugment(C, mixup=mixup, cutmix=cutmix, reprob=1.0, seed=0)
        counts = []
        for b in (32, 256):
            images, labels = torch.randn(b, 3, 12, 12), torch.arange(b) % C
            draws = aug.draws(0, np.arange(b), 12, 12)
            assert (draws.mix.box is not None) == (cutmix > 0) and draws.mix.lam < 1
            counts.append(dispatched_ops(lambda: aug.apply(images, labels, draws)))
        assert counts[0] == counts[1] > 5, (mixup, cutmix, counts)


def test_bad_input_is_a_clear_error():
    aug = BatchAugment(C, mixup=0.8, cutmix=1.0, seed=0)
    x, y = torch.randn(5, 3, 8, 8), torch.arange(5)
    with pytest.raises(ValueError, match="even batch size"):
        aug(x, y, 0, np.arange(5))
    with pytest.raises(ValueError, match="4 positions for a batch of 5"):
        aug(x, y, 0, np.arange(4))
    with pytest.raises(ValueError, match="reprob is a probability"):
        BatchAugment(C, reprob=1.5, seed=0)
    with pytest.raises(ValueError, match="mixup must be >= 0"):
        BatchAugment(C, mixup=-1, seed=0)
    with pytest.raises(ValueError, match="3 erasing boxes for 4 images"):
        BatchAugment(C, mixup=0, cutmix=0, reprob=1.0, seed=0).apply(torch.randn(4, 3, 8, 8), torch.arange(4),
                                                                     bd.batch_draws(0, 0, np.arange(3), 8, 8,
                                                                                    bd.EraseConfig(1.0), None))


"""BFT augmentation: normalisation, timm Mixup/CutMix as a MixTarget, RandomErasing, and the timm RandAugment reference's policy
(the draws against timm's code and samplers: test_batch_draws.py)."""
import numpy as np
import pytest
import torch
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.mixup import mixup_target

from fastlivt.data.augment import BatchAugment, Normalize
from fastlivt.data.ra_fidelity import timm_rand_augment

C = 7
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _batch(b=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g), torch.randint(0, C, (b,), generator=g)


def test_normalize_matches_float64_reference():
    x = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    ref = (x.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        STD, dtype=torch.float64).view(1, 3, 1, 1)
    out = Normalize(MEAN, STD)(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def _smooth_reference(labels, lam, smoothing):
    off = smoothing / C
    y = torch.full((labels.numel(), C), off, dtype=torch.float64)
    y[torch.arange(labels.numel()), labels] = 1 - smoothing + off
    return lam * y + (1 - lam) * y.flip(0)


def test_mix_target_is_timms_soft_target_and_the_images_are_mixed_as_it_says():
    kinds = set()
    for s in range(12):
        x, y = _batch(seed=s)
        x_ours, target = BatchAugment(C, mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.0, seed=1)(
            x.clone(), y.clone(), 0, np.arange(8 * s, 8 * s + 8))
        assert torch.equal(target.label_a, y) and torch.equal(target.label_b, y.flip(0))
        assert 0.0 <= target.lam <= 1.0 and target.smoothing == 0.1
        torch.testing.assert_close(target.dense(C), mixup_target(y, C, target.lam, 0.1), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(target.dense(C, torch.float64), _smooth_reference(y, target.lam, 0.1))
        # which kind of mixing happened: mixup blends every pixel; cutmix copies a box of the partner image, and its
        # lambda is the share of the image left
        blended = torch.allclose(x_ours, target.lam * x + (1 - target.lam) * x.flip(0), atol=1e-5)
        own = (x_ours == x).all(1)
        boxed = bool(((x_ours == x) | (x_ours == x.flip(0))).all())
        assert blended or (boxed and own.float().mean().item() == pytest.approx(target.lam, abs=0.01))
        kinds.add("mixup" if blended else "cutmix")
    assert kinds == {"mixup", "cutmix"}


def test_no_mixing_gives_smoothed_hard_targets():
    x, y = _batch()
    out, target = BatchAugment(C, mixup=0.0, cutmix=0.0, smoothing=0.1, reprob=0.0, seed=0)(x.clone(), y, 0,
                                                                                          np.arange(8))
    assert torch.equal(out, x) and target.lam == 1.0
    torch.testing.assert_close(target.dense(C, torch.float64), _smooth_reference(y, 1.0, 0.1))


def test_random_erasing_puts_one_box_of_noise_in_each_image():
    x, y = _batch(b=6, size=24)
    out, target = BatchAugment(C, mixup=0.0, cutmix=0.0, smoothing=0.0, reprob=1.0, seed=0)(x.clone(), y, 0,
                                                                                          np.arange(6))
    changed = (out != x).flatten(1).float().mean(1)
    assert ((changed > 0.01) & (changed < 0.5)).all()  # every image got one box of 2%-33% of its area
    assert target.lam == 1.0 and abs(out[out != x].std().item() - 1.0) < 0.2  # standard normal noise


def test_odd_batch_with_mixing_is_a_clear_error():
    x, y = _batch(b=5)
    with pytest.raises(ValueError, match="even batch size"):
        BatchAugment(C, mixup=0.8, cutmix=1.0, seed=0)(x, y, 0, np.arange(5))


# ------------------------------------------------------------------------------------------------ RandAugment
def _find_rand_augment(t):
    for tr in getattr(t, "transforms", []):
        if isinstance(tr, RandAugment):
            return tr
    raise AssertionError("no RandAugment inside timm's transform")


def test_rand_augment_has_timms_policy():
    cfg = "rand-m9-mstd0.5-inc1"
    ref = _find_rand_augment(create_transform(96, is_training=True, auto_augment=cfg, interpolation="bicubic",
                                              mean=MEAN, std=STD))
    ours = timm_rand_augment(cfg, 96, MEAN, "bicubic")
    assert ours.num_layers == ref.num_layers == 2 and ours.choice_weights is ref.choice_weights is None
    assert [op.name for op in ours.ops] == [op.name for op in ref.ops]
    assert "PosterizeIncreasing" in [op.name for op in ours.ops]  # the 'inc1' suite
    for a, b in zip(ours.ops, ref.ops):
        assert (a.prob, a.magnitude, a.magnitude_std, a.magnitude_max) == (b.prob, b.magnitude, b.magnitude_std, b.magnitude_max)
        assert a.magnitude == 9 and a.magnitude_std == 0.5 and a.prob == 0.5
        assert a.hparams == b.hparams and a.kwargs == b.kwargs


def test_timm_reference_rejects_non_rand_policy():
    with pytest.raises(ValueError, match="rand-"):
        timm_rand_augment("v0", 32, MEAN)

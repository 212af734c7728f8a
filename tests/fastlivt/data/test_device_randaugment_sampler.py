"""The device RandAugment's policy parsing and sampler against timm's: the parsed settings, the draws as a function of
the sample key alone, and op / p / magnitude / sign frequencies over 100k draws (chi-square against timm's sampler)."""
from __future__ import annotations

import random

import numpy as np
import pytest
from timm.data import auto_augment as timm_aa

from fastlivt.data import device_randaugment as dra
from fastlivt.data.sample_rng import rand_augment_draws, sample_keys

CONFIG = "rand-m9-mstd0.5-inc1"
FILL = dra.img_mean((0.485, 0.456, 0.406))


@pytest.mark.parametrize("config", [CONFIG, "rand-m7-n3-p0.8-mstd1-inc1", "rand-m10-mstd101-mmax12-inc1"])
def test_policy_parse_agrees_with_timm(config):
    policy = dra.parse_policy(config)
    ra = timm_aa.rand_augment_transform(config, {"translate_const": 100, "img_mean": FILL})
    assert [op.name for op in ra.ops] == list(dra.OPS)
    op = ra.ops[0]
    assert (policy.layers, policy.prob, policy.magnitude) == (ra.num_layers, op.prob, op.magnitude)
    assert policy.magnitude_std == op.magnitude_std
    assert policy.magnitude_max == (op.magnitude_max or 10)


def test_draws_are_a_function_of_the_key_alone():
    keys = sample_keys(3, 1, np.arange(500))
    full = rand_augment_draws(keys, 15, interpolation="random")
    part = rand_augment_draws(keys[100:200], 15, interpolation="random")
    for field in ("ops", "applied", "magnitude", "negate", "bicubic"):
        assert np.array_equal(getattr(full, field)[100:200], getattr(part, field))
    other = rand_augment_draws(sample_keys(3, 2, np.arange(500)), 15, interpolation="random")
    assert not np.array_equal(full.magnitude, other.magnitude)


# 0.999 quantiles of chi-square, for when scipy is absent
_CHI2_999 = {1: 10.828, 9: 27.877, 14: 36.123}


def _chi2_two_sample(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's statistic of the 2 x k table (a, b) of counts."""
    table = np.stack([a, b]).astype(np.float64)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum())


def _threshold(dof: int) -> float:
    try:
        from scipy.stats import chi2
    except ImportError:
        return _CHI2_999[dof]
    return float(chi2.ppf(0.999, dof))


def _timm_sampler(n: int):
    """timm's RandAugment draws over ``n`` images, recorded: op index per layer, and for each applied op its clipped
    magnitude and whether timm negated it."""
    ra = timm_aa.rand_augment_transform(CONFIG, {"translate_const": 100, "img_mean": FILL})
    chosen, magnitudes, negated = [], [], []
    for k, op in enumerate(ra.ops):
        def record(img, m, neg, k=k, **_kwargs):
            chosen.append(k)
            magnitudes.append(m)
            negated.append(neg)
            return img

        op.level_fn = lambda m, _h: (m, timm_aa._randomly_negate(1.0) < 0)
        op.aug_fn = record
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(11)
    random.seed(11)
    try:
        picks = [np.random.choice(len(ra.ops), ra.num_layers, replace=True) for _ in range(n)]
        np.random.seed(11)
        for _ in range(n):
            ra(None)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return np.concatenate(picks), len(chosen), np.array(magnitudes), np.array(negated)


def test_sampler_matches_timms_over_100k_draws():
    n = 100_000
    picks, applied, mags, negs = _timm_sampler(n)
    ours = dra.draw(dra.parse_policy(CONFIG), sample_keys(5, 0, np.arange(n)))
    stats = {
        "op": (np.bincount(ours.ops.ravel(), minlength=15), np.bincount(picks, minlength=15), 14),
        "applied": (np.array([ours.applied.sum(), (~ours.applied).sum()]), np.array([applied, 2 * n - applied]), 1),
    }
    edges = np.array([0, 8.0, 8.4, 8.6, 8.8, 9.0, 9.2, 9.4, 9.6, 10.0 - 1e-9, 10.0 + 1e-9])
    ours_mag = ours.magnitude[ours.applied]
    stats["magnitude"] = (np.histogram(ours_mag, edges)[0], np.histogram(mags, edges)[0], 9)
    ours_neg = ours.negate[ours.applied]
    stats["sign"] = (np.array([ours_neg.sum(), (~ours_neg).sum()]), np.array([negs.sum(), (~negs).sum()]), 1)
    for what, (a, b, dof) in stats.items():
        assert len(a) == dof + 1 and a.min() > 100 and b.min() > 100, (what, a, b)
        value = _chi2_two_sample(a, b)
        assert value < _threshold(dof), f"{what}: chi2 {value:.1f} over {dof} dof; ours {a}, timm {b}"
    assert abs(ours_mag.mean() - mags.mean()) < 0.01 and (ours_mag == 10.0).mean() > 0.01

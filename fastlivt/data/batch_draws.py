"""BFT's batch-augmentation draws as a pure function of (run seed, epoch, global positions): RandomErasing boxes per
sample and the Mixup/CutMix parameters per batch, with the distributions of timm's samplers.

The keys are :func:`fastlivt.data.sample_rng.sample_keys` of the samples' positions in the epoch's global order, read
on draw streams that no per-sample draw of :mod:`fastlivt.data.sample_rng` uses (those end below 384; the ranges are
checked by ``tests/fastlivt/data/test_batch_draws.py``):

* erasing (per sample, timm ``RandomErasing(mode='pixel', max_count=1)``'s ``_erase``): erase when a uniform is
  ``<= prob``; then up to 10 attempts of a target area ``uniform(min_area, max_area) * H * W`` and an aspect ratio
  ``exp(uniform(log min_aspect, log max_aspect))``, ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area /
  aspect))``; the first attempt with ``h < H`` and ``w < W`` is the box, at ``top`` uniform in ``0..H - h`` and
  ``left`` uniform in ``0..W - w``; no box when none fits.
* mixing (per batch, timm ``Mixup(mode='batch', correct_lam=True)``'s ``_params_per_batch`` and ``rand_bbox``): the
  batch's key is its *first* sample's key read on the batch streams (512 and up), so two batches of an epoch never
  share one and a batch's draws never reuse a per-sample stream. Mix when a uniform is ``< mix_prob``; CutMix
  instead of Mixup when a second one is ``< switch_prob`` (both alphas on; otherwise whichever is on); lambda ~
  Beta(alpha, alpha); CutMix's box centre uniform over the image, sides ``int(H sqrt(1 - lam))`` x
  ``int(W sqrt(1 - lam))`` clipped to the image, and lambda recomputed from the clipped box's area.
* lambda: numpy's ``Generator(PCG64(s)).beta(alpha, alpha)`` with ``s`` 53 bits of the batch key (stream
  ``_BETA``). Beta has no closed-form inverse CDF; numpy's sampler (gamma ratio, Marsaglia-Tsang) seeded by the key
  is a pure function of it, exact in distribution, and costs one generator per batch. Its stream is numpy's: the
  same on every machine for one numpy version (numpy keeps the right to change ``Generator`` algorithms between
  feature releases, so a run resumed under another numpy draws other lambdas from there on).
* erasing noise (mode 'pixel': one normal per pixel and channel): ``noise_seed`` (stream ``_NOISE``) seeds a
  ``torch.Generator`` on the batch's device, which draws a ``[B, C, H, W]`` normal tensor whose boxes the device
  stage keeps (:mod:`fastlivt.data.augment`). A sample's noise therefore depends on its batch (its key and its
  index in it), which the seed, the epoch and the plan fix for a given world size and batch size; the generator is
  the device type's (CPU: Mersenne Twister, CUDA: Philox, whose mapping of values to elements follows the GPU's
  launch grid), so CPU and GPU runs, and runs on different GPU models, erase with different noise. A
  counter-based normal per (sample, channel, pixel) would make it per-sample, at the cost of an integer hash per
  pixel on the device: one generator call per batch was chosen instead.

Only integer arithmetic and float64 ``log``/``exp``/``sqrt`` enter the boxes (see :mod:`fastlivt.data.sample_rng`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from fastlivt.data.sample_rng import sample_keys, uniforms

ERASE_ATTEMPTS = 10  # timm's _erase
# draw streams of a sample's key (per-sample) and of a batch's first sample's key (per-batch)
_ERASE, _ERASE_AREA, _ERASE_RATIO = 384, 385, 385 + ERASE_ATTEMPTS
_ERASE_TOP, _ERASE_LEFT = 385 + 2 * ERASE_ATTEMPTS, 386 + 2 * ERASE_ATTEMPTS
_MIX, _SWITCH, _BETA, _CUT_Y, _CUT_X, _NOISE = 512, 513, 514, 515, 516, 517
STREAMS = range(_ERASE, _NOISE + 1)  # every stream read here


@dataclass(frozen=True)
class EraseConfig:
    """timm ``RandomErasing``'s parameters (``max_count=1``): probability, area fraction range, aspect range."""

    prob: float
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3
    max_aspect: Optional[float] = None  # timm: 1 / min_aspect

    def log_aspect(self) -> Tuple[float, float]:
        return math.log(self.min_aspect), math.log(self.max_aspect or 1 / self.min_aspect)


@dataclass(frozen=True)
class MixConfig:
    """timm ``Mixup``'s batch-mode parameters: Beta alphas (0 = off), ``mix_prob``, ``switch_prob``."""

    mixup_alpha: float
    cutmix_alpha: float
    mix_prob: float = 1.0
    switch_prob: float = 0.5

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclass
class MixParams:
    """One batch's mixing: ``lam`` (1.0: left unmixed) and, for CutMix, ``box = (yl, yh, xl, xh)`` (None: Mixup
    when ``lam < 1``), ``lam`` then being 1 - the clipped box's share of the image."""

    lam: float
    box: Optional[Tuple[int, int, int, int]] = None


def erase_boxes(keys: np.ndarray, img_h: int, img_w: int, cfg: EraseConfig) -> np.ndarray:
    """int64 ``[n, 4] = (top, left, height, width)`` of each key's erased box; height = width = 0: not erased."""
    area = float(img_h * img_w)
    lo, hi = cfg.log_aspect()
    n = len(keys)
    erase = uniforms(keys, _ERASE)[:, 0] <= cfg.prob  # timm skips when random() > probability
    target = (cfg.min_area + (cfg.max_area - cfg.min_area) * uniforms(keys, _ERASE_AREA, ERASE_ATTEMPTS)) * area
    aspect = np.exp(lo + (hi - lo) * uniforms(keys, _ERASE_RATIO, ERASE_ATTEMPTS))
    h = np.round(np.sqrt(target * aspect)).astype(np.int64)  # round half to even, as Python's round
    w = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w < img_w) & (h < img_h)
    first = np.argmax(ok, axis=1)
    rows = np.arange(n)
    keep = erase & ok[rows, first]
    h_sel, w_sel = np.where(keep, h[rows, first], 0), np.where(keep, w[rows, first], 0)
    top = np.floor(uniforms(keys, _ERASE_TOP)[:, 0] * (img_h - h_sel + 1)).astype(np.int64)
    left = np.floor(uniforms(keys, _ERASE_LEFT)[:, 0] * (img_w - w_sel + 1)).astype(np.int64)
    return np.stack([np.where(keep, top, 0), np.where(keep, left, 0), h_sel, w_sel], axis=1)


def beta(key: np.ndarray, alpha: float) -> float:
    """Beta(alpha, alpha) of one batch key (see the module docstring)."""
    seed = int(uniforms(key, _BETA)[0, 0] * (1 << 53))
    return float(np.random.Generator(np.random.PCG64(seed)).beta(alpha, alpha))


def mix_params(key: np.ndarray, img_h: int, img_w: int, cfg: MixConfig) -> MixParams:
    """timm ``Mixup._mix_batch``'s parameters (``correct_lam=True``, no ``cutmix_minmax``) of the batch key ``key``
    (a 1-element uint64 array) for ``img_h x img_w`` images."""
    if not cfg.enabled or not uniforms(key, _MIX)[0, 0] < cfg.mix_prob:
        return MixParams(1.0)
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        cutmix = bool(uniforms(key, _SWITCH)[0, 0] < cfg.switch_prob)
    else:
        cutmix = cfg.cutmix_alpha > 0
    lam = beta(key, cfg.cutmix_alpha if cutmix else cfg.mixup_alpha)
    if lam == 1.0 or not cutmix:
        return MixParams(lam)
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    cy = min(int(uniforms(key, _CUT_Y)[0, 0] * img_h), img_h - 1)  # np.random.randint(0, img_h)
    cx = min(int(uniforms(key, _CUT_X)[0, 0] * img_w), img_w - 1)
    yl, yh = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, img_h)
    xl, xh = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, img_w)
    return MixParams(1.0 - (yh - yl) * (xh - xl) / float(img_h * img_w), (yl, yh, xl, xh))


def noise_seed(key: np.ndarray) -> int:
    """The seed (53 bits) of the batch's erasing-noise generator."""
    return int(uniforms(key, _NOISE)[0, 0] * (1 << 53))


@dataclass
class BatchDraws:
    """Host-side draws of one batch: ``boxes`` int64 ``[B, 4]`` (None: no erasing), ``mix``, ``noise_seed``."""

    boxes: Optional[np.ndarray]
    mix: MixParams
    noise_seed: int


def batch_draws(seed: int, epoch: int, positions: np.ndarray, img_h: int, img_w: int,
                erase: Optional[EraseConfig], mix: Optional[MixConfig]) -> BatchDraws:
    """The draws of the batch whose samples sit at ``positions`` (in batch order) of ``epoch``'s global order."""
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    if positions.size == 0:
        raise ValueError("batch_draws: a batch needs at least one sample position")
    keys = sample_keys(seed, epoch, positions)
    key = keys[:1]
    boxes = erase_boxes(keys, img_h, img_w, erase) if erase is not None and erase.prob > 0 else None
    params = mix_params(key, img_h, img_w, mix) if mix is not None else MixParams(1.0)
    return BatchDraws(boxes, params, noise_seed(key))

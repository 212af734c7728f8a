"""Per-sample random parameters as a pure function of (seed, epoch, position): the same on every backend and run.

A loader's augmentation must not draw from a generator whose state depends on thread scheduling, on how many
workers there are, or on where a resumed run started. Every random choice of a training sample is therefore derived
from a 64-bit key, ``sample_keys(seed, epoch, positions)``, by a counter-based hash (splitmix64's finaliser):

* ``positions``: the sample's position in the epoch's *global* order (before sharding), i.e. for rank r of W reading
  its k-th planned index after a resume at ``offset``, ``offset + r + k * W`` (:func:`epoch_positions`). Keys do not depend on the world size, the batch
  size, the number of workers or on a resume, and a sample drawn twice in one epoch (class-balanced sampling) gets two
  different augmentations.
* ``uniforms(keys, stream, count)``: float64 uniforms in [0, 1), stream s = an independent draw for each key.
* ``rrc_windows``: torchvision's ``RandomResizedCrop.get_params`` (10 attempts of area in ``scale`` and log-uniform
  aspect ratio in ``ratio``, then the center-crop fallback), vectorised: ``(top, left, height, width)`` per sample.
* ``flips``: horizontal flip with probability ``p``.
* ``choices``: ``count`` integers in [0, n) per sample (RandAugment op indices), ``signs``: {0, 1} per draw.
* ``rand_augment_draws``: everything timm's RandAugment draws for one image (op choices with replacement, the
  p = 0.5 apply test, the magnitude noise, the sign, the bilinear/bicubic choice), for the device implementation
  (:mod:`fastlivt.data.device_randaugment`).
* :func:`train_params` bundles what a training loader needs: ``SampleParams(windows, flip)``.

Only integer arithmetic and IEEE float64 (``log``, ``exp``, ``sqrt``) enter the parameters: they are the same on
every machine up to the last-ulp behaviour of the platform's ``exp``/``log``, which can move a crop edge by one pixel
in rare cases; the pixels themselves depend on each library's decoder and resizer builds (same machine only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
RRC_ATTEMPTS = 10  # torchvision's


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> _S30)) * _M1
        x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


def _u64(v: int) -> np.ndarray:
    """A Python int (any sign or size) as a 1-element uint64 array, modulo 2**64."""
    return np.array([int(v) % (1 << 64)], dtype=np.uint64)


def sample_keys(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
    """uint64 key of each position of ``epoch`` under run seed ``seed`` (a pure function of the three)."""
    with np.errstate(over="ignore"):
        base = _mix(_mix(_u64(seed) + _GOLDEN) + _u64(epoch) * _GOLDEN)
        return _mix(base ^ _mix(np.asarray(positions, dtype=np.int64).astype(np.uint64) + _GOLDEN))


def epoch_positions(rank: int, world: int, offset: int, count: int) -> np.ndarray:
    """Global positions of the ``count`` indices rank ``rank`` (of ``world``) reads in a pass that starts after
    ``offset`` positions of the epoch's order: the sampler gives rank r the positions offset + r, offset + r + W, ...
    (torch DistributedSampler's striding of what is left of the epoch)."""
    return offset + rank + world * np.arange(count, dtype=np.int64)


def uniforms(keys: np.ndarray, stream: int, count: int = 1) -> np.ndarray:
    """float64 uniforms in [0, 1), shape ``(len(keys), count)``: draws ``stream .. stream + count - 1`` of each key."""
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1, 1)
    draws = np.arange(stream, stream + count, dtype=np.uint64).reshape(1, -1)
    with np.errstate(over="ignore"):
        bits = _mix(keys ^ _mix((draws + np.uint64(1)) * _GOLDEN))
    return (bits >> _S11).astype(np.float64) * (1.0 / (1 << 53))


# draw streams of one key: nothing else may use these ranges
_AREA, _RATIO, _TOP, _LEFT = 0, RRC_ATTEMPTS, 2 * RRC_ATTEMPTS, 2 * RRC_ATTEMPTS + 1
_FLIP, _AUG, _CHOICE = 2 * RRC_ATTEMPTS + 2, 2 * RRC_ATTEMPTS + 3, 64
_SIGN = 128
_RA_APPLY, _RA_NORMAL, _RA_INTERP = 192, 224, 288  # <= 32 layers each (the normal draw takes 2 uniforms a layer)


def rrc_windows(keys: np.ndarray, heights: np.ndarray, widths: np.ndarray, scale: Sequence[float] = (0.08, 1.0),
                ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """RandomResizedCrop windows ``int64 [n, 4] = (top, left, height, width)`` of images ``heights x widths``."""
    h_img = np.asarray(heights, dtype=np.int64).reshape(-1, 1)
    w_img = np.asarray(widths, dtype=np.int64).reshape(-1, 1)
    area = (h_img * w_img).astype(np.float64)
    lo, hi = np.log(float(ratio[0])), np.log(float(ratio[1]))
    target = area * (scale[0] + (scale[1] - scale[0]) * uniforms(keys, _AREA, RRC_ATTEMPTS))
    aspect = np.exp(lo + (hi - lo) * uniforms(keys, _RATIO, RRC_ATTEMPTS))
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= w_img) & (h > 0) & (h <= h_img)
    first = np.argmax(ok, axis=1)
    rows = np.arange(ok.shape[0])
    found = ok[rows, first]
    h_sel, w_sel = h[rows, first], w[rows, first]
    # fallback (no attempt fits): the whole image clipped to the ratio range, centred
    hh, ww = h_img[:, 0], w_img[:, 0]
    in_ratio = ww / hh
    fb_w = np.where(in_ratio < min(ratio), ww, np.where(in_ratio > max(ratio), np.round(hh * max(ratio)), ww))
    fb_h = np.where(in_ratio < min(ratio), np.round(ww / min(ratio)), hh)
    fb_w, fb_h = fb_w.astype(np.int64), fb_h.astype(np.int64)
    h_sel, w_sel = np.where(found, h_sel, fb_h), np.where(found, w_sel, fb_w)
    top_u, left_u = uniforms(keys, _TOP)[:, 0], uniforms(keys, _LEFT)[:, 0]
    top = np.where(found, np.floor(top_u * (hh - h_sel + 1)), (hh - h_sel) // 2).astype(np.int64)
    left = np.where(found, np.floor(left_u * (ww - w_sel + 1)), (ww - w_sel) // 2).astype(np.int64)
    return np.stack([top, left, h_sel, w_sel], axis=1)


def flips(keys: np.ndarray, p: float = 0.5) -> np.ndarray:
    """bool per key: flip horizontally (probability ``p``)."""
    return uniforms(keys, _FLIP)[:, 0] < p


def choices(keys: np.ndarray, n: int, count: int) -> np.ndarray:
    """int32 ``[len(keys), count]``: uniform choices in [0, n), with replacement."""
    return np.minimum(np.floor(uniforms(keys, _CHOICE, count) * n), n - 1).astype(np.int32)


def signs(keys: np.ndarray, count: int) -> np.ndarray:
    """int32 ``[len(keys), count]`` of {0, 1}, each 1 with probability 0.5."""
    return (uniforms(keys, _SIGN, count) < 0.5).astype(np.int32)


@dataclass
class RandAugmentDraws:
    """timm's RandAugment draws of each sample, ``[n, layers]`` each: ``ops`` int64 (index into the op list),
    ``applied`` bool (the op's ``random() <= prob`` test passed), ``magnitude`` float64 (noise added, clipped to
    ``[0, magnitude_max]``), ``negate`` bool (``_randomly_negate``), ``bicubic`` bool (``_interpolation``'s choice
    of (BILINEAR, BICUBIC); all True/False when the interpolation is fixed)."""

    ops: np.ndarray
    applied: np.ndarray
    magnitude: np.ndarray
    negate: np.ndarray
    bicubic: np.ndarray


def rand_augment_draws(keys: np.ndarray, num_ops: int, layers: int = 2, prob: float = 0.5, magnitude: float = 9.0,
                       magnitude_std: float = 0.5, magnitude_max: float = 10.0,
                       interpolation: str = "bicubic") -> RandAugmentDraws:
    """timm ``RandAugment``'s draws for ``layers`` ops of ``num_ops`` (uniform, with replacement), as
    ``AugmentOp.__call__`` makes them: applied with probability ``prob``, magnitude ``N(magnitude, magnitude_std)``
    (``U(0, magnitude)`` when the std is infinite; exact when 0) clipped to ``[0, magnitude_max]``, negated with
    probability 0.5, ``interpolation`` 'bilinear', 'bicubic' or 'random' (each with probability 0.5)."""
    if not 1 <= layers <= 32:
        raise ValueError(f"RandAugment layers must be in 1..32, got {layers}")
    if interpolation not in ("bilinear", "bicubic", "random"):
        raise ValueError(f"RandAugment interpolation must be bilinear, bicubic or random, got {interpolation!r}")
    n = len(keys)
    applied = uniforms(keys, _RA_APPLY, layers) <= prob  # timm skips the op when random() > prob
    if magnitude_std == float("inf"):
        mag = magnitude * uniforms(keys, _RA_NORMAL, layers)
    elif magnitude_std > 0:  # Box-Muller on two uniforms of the layer
        u = uniforms(keys, _RA_NORMAL, 2 * layers).reshape(n, layers, 2)
        normal = np.sqrt(-2.0 * np.log1p(-u[..., 0])) * np.cos(2.0 * np.pi * u[..., 1])
        mag = magnitude + magnitude_std * normal
    else:
        mag = np.full((n, layers), float(magnitude))
    if interpolation == "random":
        bicubic = uniforms(keys, _RA_INTERP, layers) >= 0.5  # random.choice((BILINEAR, BICUBIC))
    else:
        bicubic = np.full((n, layers), interpolation == "bicubic")
    return RandAugmentDraws(choices(keys, num_ops, layers).astype(np.int64), applied,
                            np.clip(mag, 0.0, float(magnitude_max)), signs(keys, layers).astype(bool), bicubic)


@dataclass
class SampleParams:
    """What a training loader draws per sample for its crop: ``windows`` int64 [n, 4] (top, left, height, width),
    ``flip`` bool [n] (RandAugment's draws: :func:`rand_augment_draws`)."""

    windows: np.ndarray
    flip: np.ndarray


def train_params(seed: int, epoch: int, positions: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                 scale: Tuple[float, float], ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> SampleParams:
    """RandomResizedCrop window and flip of the samples at ``positions`` of ``epoch``, whose
    images are ``heights x widths``."""
    keys = sample_keys(seed, epoch, positions)
    return SampleParams(rrc_windows(keys, heights, widths, scale, ratio), flips(keys))

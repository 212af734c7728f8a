"""Per-sample RandAugment for FFCV pipelines, built from timm's own operators, reproducible per sample.

FFCV has no RandAugment. :class:`fastlivt.data.ffcv_ops.FFCVRandAugment` (an FFCV ``Operation``, kept with the
FFCV backend so that this module needs no FFCV) hands every uint8 HWC image of the
batch to timm's ``RandAugment`` (a fresh random choice of ops and magnitudes *per sample*) through PIL, with exactly
the parameters timm's ``create_transform(..., auto_augment=config)`` gives it (:func:`timm_rand_augment`): for
BFT that is ``rand-m9-mstd0.5-inc1`` = 2 ops out of the 'increasing' suite, magnitude 9/10 with std 0.5 noise, each
applied with probability 0.5, translate up to 0.45 * img_size, fill = the dataset mean, bicubic resampling.

Reproducibility: timm draws from Python's global ``random`` and NumPy's global generator, which the loader's threads
would share in a schedule-dependent order. :func:`seeded_rand_augment` applies timm's ops to one image with every draw
taken from a generator seeded by that sample's seed (:func:`fastlivt.data.sample_rng.aug_seeds`): the op choice from
``numpy.random.default_rng(seed)`` exactly as timm's ``RandAugment.__call__`` draws it, and the ops' own draws
(probability, magnitude noise, sign) from a ``random.Random`` that timm's module sees, for the calling thread only,
in place of its global ``random`` (:class:`_ThreadLocalRandom`; other threads and callers keep the global one).
The seeds reach the operation through its last memory buffer, filled per batch by the FFCV loader.

It runs outside numba (``jit_mode=False``); the batch's images are split over a small thread pool because PIL
releases the GIL inside its image operations.
"""
from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from timm.data import auto_augment as timm_auto_augment
from timm.data.auto_augment import RandAugment, rand_augment_transform
from timm.data.transforms import str_to_pil_interp

from fastlivt.config import ConfigError


def timm_rand_augment(config: str, img_size: int, mean: Sequence[float], interpolation: str = "bicubic") -> RandAugment:
    """timm's RandAugment for ``config`` with the hyper-parameters ``transforms_imagenet_train`` passes it."""
    if not config.startswith("rand"):
        raise ConfigError(f"data.auto_augment: only RandAugment policies ('rand-...') are supported, got {config!r}")
    hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean))
    if interpolation and interpolation != "random":
        hparams["interpolation"] = str_to_pil_interp(interpolation)
    return rand_augment_transform(config, hparams)


class _ThreadLocalRandom:
    """Stands in for the ``random`` module inside timm's auto_augment: attribute look-ups go to the calling thread's
    ``random.Random`` while :func:`seeded_rand_augment` runs in it, to the real module otherwise."""

    def __init__(self):
        self._local = threading.local()

    def __getattr__(self, name: str):
        return getattr(getattr(self._local, "rng", None) or random, name)

    def use(self, rng: Optional[random.Random]) -> None:
        self._local.rng = rng


_LOCK = threading.Lock()


def _thread_local_random() -> _ThreadLocalRandom:
    with _LOCK:
        proxy = timm_auto_augment.random
        if not isinstance(proxy, _ThreadLocalRandom):
            proxy = timm_auto_augment.random = _ThreadLocalRandom()
        return proxy


def seeded_rand_augment(ra: RandAugment, image: Image.Image, seed: int) -> Image.Image:
    """timm's ``ra(image)`` with all its randomness from ``seed``: the same (image, seed) give the same output in
    any thread, whatever else runs."""
    proxy = _thread_local_random()
    chosen = np.random.default_rng(int(seed)).choice(len(ra.ops), ra.num_layers, replace=ra.choice_weights is None,
                                                   p=ra.choice_weights)
    proxy.use(random.Random(int(seed)))
    try:
        for k in chosen:
            image = ra.ops[int(k)](image)
    finally:
        proxy.use(None)
    return image


def rand_augment_batch(ra: RandAugment, images: np.ndarray, dst: np.ndarray, seeds: np.ndarray,
                       pool: Optional[ThreadPoolExecutor] = None) -> np.ndarray:
    """``dst[i] = ra(images[i])`` (uint8 HWC) drawing from ``seeds[i]``, for each i independently."""

    def one(i: int) -> None:
        dst[i] = np.asarray(seeded_rand_augment(ra, Image.fromarray(images[i]), int(seeds[i])))

    if pool is None:
        for i in range(images.shape[0]):
            one(i)
    else:
        list(pool.map(one, range(images.shape[0])))
    return dst

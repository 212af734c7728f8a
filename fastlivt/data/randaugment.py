"""Per-sample RandAugment for FFCV pipelines, built from timm's own operators.

FFCV has no RandAugment. :class:`FFCVRandAugment` is an FFCV ``Operation`` that hands every uint8 HWC image of the
batch to timm's ``RandAugment`` (a fresh random choice of ops and magnitudes *per sample*) through PIL, with exactly
the parameters timm's ``create_transform(..., auto_augment=config)`` gives it (:func:`timm_rand_augment`): for
BFT that is ``rand-m9-mstd0.5-inc1`` = 2 ops out of the 'increasing' suite, magnitude 9/10 with std 0.5 noise, each
applied with probability 0.5, translate up to 0.45 * img_size, fill = the dataset mean, bicubic resampling.

It runs outside numba (``jit_mode=False``); the batch's images are split over a small thread pool because PIL
releases the GIL inside its image operations.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from timm.data.auto_augment import RandAugment, rand_augment_transform
from timm.data.transforms import str_to_pil_interp


def timm_rand_augment(config: str, img_size: int, mean: Sequence[float], interpolation: str = "bicubic") -> RandAugment:
    """timm's RandAugment for ``config`` with the hyper-parameters ``transforms_imagenet_train`` passes it."""
    if not config.startswith("rand"):
        raise ValueError(f"data.auto_augment: only RandAugment policies ('rand-...') are supported, got {config!r}")
    hparams = dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean))
    if interpolation and interpolation != "random":
        hparams["interpolation"] = str_to_pil_interp(interpolation)
    return rand_augment_transform(config, hparams)


def rand_augment_batch(ra: Callable, images: np.ndarray, dst: np.ndarray, pool: Optional[ThreadPoolExecutor] = None) -> np.ndarray:
    """Apply ``ra`` (PIL image -> PIL image) to each ``images[i]`` (uint8 HWC) independently, writing ``dst[i]``."""

    def one(i: int) -> None:
        dst[i] = np.asarray(ra(Image.fromarray(images[i])))

    if pool is None:
        for i in range(images.shape[0]):
            one(i)
    else:
        list(pool.map(one, range(images.shape[0])))
    return dst


def _ffcv_operation_base():
    from ffcv.pipeline.operation import Operation

    return Operation


class FFCVRandAugment(_ffcv_operation_base()):
    """FFCV operation: per-sample timm RandAugment on a batch of uint8 ``[B,H,W,3]`` arrays (same shape out).

    Place it after the decoder (and flip), before ``ToTensor``. ``num_threads`` > 1 splits the batch over threads.
    """

    def __init__(self, config: str, img_size: int, mean: Sequence[float], interpolation: str = "bicubic",
                 num_threads: int = 1):
        super().__init__()
        self.ra = timm_rand_augment(config, img_size, mean, interpolation)
        self.num_threads = max(1, int(num_threads))
        self._pool: Optional[ThreadPoolExecutor] = None

    def generate_code(self) -> Callable:
        ra = self.ra
        if self.num_threads > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="randaugment")
        pool = self._pool

        def rand_augment(images: np.ndarray, dst: np.ndarray) -> np.ndarray:
            return rand_augment_batch(ra, images, dst, pool)

        return rand_augment

    def declare_state_and_memory(self, previous_state) -> Tuple[object, object]:
        from ffcv.pipeline.allocation_query import AllocationQuery

        if len(previous_state.shape) != 3 or previous_state.shape[-1] != 3 or previous_state.dtype != np.dtype("uint8"):
            raise ValueError(f"FFCVRandAugment expects uint8 HWC images, got shape {previous_state.shape} "
                             f"dtype {previous_state.dtype} (place it before ToTensor)")
        return replace(previous_state, jit_mode=False), AllocationQuery(previous_state.shape, previous_state.dtype)

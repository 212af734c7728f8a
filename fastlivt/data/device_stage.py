"""The device stage every loader backend shares: what runs per pixel after the backend's crop, on the batch's device.

A backend hands over uint8 ``[B,3,H,W]`` crops (any memory layout) with the samples' global positions in the epoch;
:class:`DeviceStage` draws each sample's RandAugment parameters on the host (:meth:`DeviceStage.draws`, a pure
function of (run.seed, epoch, position): :func:`fastlivt.data.device_randaugment.draw`), copies them to the device
and applies timm's RandAugment per sample (finetune with ``data.auto_augment``), then normalises
(:meth:`DeviceStage.apply`). The same code for ffcv, dali and torch, and for CPU runs with the CPU as the device.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from fastlivt.data import device_randaugment as dra
from fastlivt.data.augment import Normalize
from fastlivt.data.sample_rng import sample_keys


class DeviceStage:
    """RandAugment ``policy`` (None: none) with fill timm's ``img_mean`` of ``mean``, then ``(x/255 - mean) / std``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device, seed: int,
                 policy: Optional[dra.RandAugmentPolicy] = None, interpolation: str = "bicubic"):
        self.normalize = Normalize(mean, std, device)
        self.fill = dra.img_mean(mean)
        self.seed, self.policy, self.interpolation = int(seed), policy, interpolation

    def draws(self, epoch: int, positions: np.ndarray, device: torch.device) -> Optional[dra.DeviceDraws]:
        """Host side: the RandAugment draws of the samples at ``positions`` of ``epoch``, on their way to
        ``device`` (None without a policy)."""
        if self.policy is None:
            return None
        keys = sample_keys(self.seed, epoch, np.asarray(positions, dtype=np.int64))
        return dra.DeviceDraws.from_draws(dra.draw(self.policy, keys, self.interpolation), device,
                                          self.interpolation)

    def augment(self, images: torch.Tensor, draws: Optional[dra.DeviceDraws]) -> torch.Tensor:
        """Device side, RandAugment alone: uint8 ``[B,3,H,W]`` -> uint8 ``[B,3,H,W]`` in channels_last memory
        (``images`` itself when ``draws`` is None)."""
        if draws is None:
            return images
        return dra.device_rand_augment(images.permute(0, 2, 3, 1), draws, self.fill,
                                       channels_last=True).permute(0, 3, 1, 2)

    def apply(self, images: torch.Tensor, draws: Optional[dra.DeviceDraws]) -> torch.Tensor:
        """Device side: uint8 ``[B,3,H,W]`` -> RandAugment with ``draws`` (when given) -> normalised float32."""
        return self.normalize(self.augment(images, draws))

    def __call__(self, images: torch.Tensor, epoch: int, positions: np.ndarray) -> torch.Tensor:
        return self.apply(images, self.draws(epoch, positions, images.device))

"""Device-side batch work shared by every loader backend: normalisation and BFT's batch augmentation.

* :class:`Normalize` turns uint8 ``[B,3,H,W]`` images into float ``(x / 255 - mean) / std`` on the device.
* :class:`BatchAugment` is the second half of BFT's augmentation (paper Table 9, timm's recipe as in LiVT/MAE
  fine-tuning): RandomErasing per sample (timm ``RandomErasing``, mode 'pixel', one box, probability ``reprob``),
  then Mixup / CutMix over the batch (timm ``Mixup``, mode 'batch': one lambda per batch, switching to CutMix with
  probability 0.5 when both are on). It returns the images and a :class:`fastlivt.targets.MixTarget`
  ``(label_a, label_b = label_a.flip(0), lam, smoothing)``, whose ``.dense(C)`` is exactly timm's soft target.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from timm.data.mixup import Mixup
from timm.data.random_erasing import RandomErasing

from fastlivt.targets import MixTarget


class Normalize:
    """``(x - 255 mean) / (255 std)`` for uint8 (or float 0..255) images ``[B,3,H,W]``; output float32."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"):
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"normalisation needs 3 means and 3 positive stds, got mean={mean} std={std}")
        self.mean = torch.tensor([255.0 * m for m in mean], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std], device=device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Normalize expects [B,3,H,W] images, got shape {tuple(images.shape)}")
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return images.float().sub_(mean).div_(std)


class _MixupWithLam(Mixup):
    """timm's Mixup in batch mode, returning the per-batch lambda instead of a dense target."""

    def mix(self, x: torch.Tensor) -> float:
        if len(x) % 2 != 0:
            raise ValueError(f"Mixup/CutMix needs an even batch size (timm pairs sample i with B-1-i), got {len(x)}")
        return float(self._mix_batch(x))  # mixes x in place; 1.0 when this batch is left unmixed


class BatchAugment:
    """``(images float[B,3,H,W] normalised, labels long[B]) -> (images, MixTarget)`` on the images' device.

    ``mixup``/``cutmix``: the Beta(alpha, alpha) parameters (0 disables each; both 0 = no mixing, lam = 1);
    ``mix_prob``: probability that a batch is mixed at all; ``switch_prob``: probability of CutMix instead of Mixup
    when both are on; ``smoothing``: label smoothing carried in the target; ``reprob``: RandomErasing probability.
    The images are modified in place. Randomness comes from Python's ``random`` (erasing boxes), numpy's global
    generator (lambda, CutMix box) and torch's (erased pixels), as in timm.
    """

    def __init__(self, num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, smoothing: float = 0.1,
                 reprob: float = 0.25, mix_prob: float = 1.0, switch_prob: float = 0.5,
                 device: torch.device | str = "cpu"):
        if num_classes < 1:
            raise ValueError(f"BatchAugment: num_classes must be >= 1, got {num_classes}")
        for name, v in (("mixup", mixup), ("cutmix", cutmix), ("reprob", reprob), ("smoothing", smoothing)):
            if v < 0:
                raise ValueError(f"BatchAugment: {name} must be >= 0, got {v}")
        self.num_classes = num_classes
        self.smoothing = smoothing
        self.mixer = None
        if mixup > 0 or cutmix > 0:
            self.mixer = _MixupWithLam(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mix_prob, switch_prob=switch_prob,
                                       mode="batch", correct_lam=True, label_smoothing=smoothing,
                                       num_classes=num_classes)
        self.eraser = None
        if reprob > 0:
            self.eraser = RandomErasing(reprob, mode="pixel", max_count=1, num_splits=0, device=str(device))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, MixTarget]:
        if self.eraser is not None:
            self.eraser.device = images.device
            images = self.eraser(images)
        lam = self.mixer.mix(images) if self.mixer is not None else 1.0
        return images, MixTarget(labels, labels.flip(0), lam, self.smoothing)

    def __repr__(self) -> str:
        m = self.mixer
        mix = f"mixup={m.mixup_alpha}, cutmix={m.cutmix_alpha}, prob={m.mix_prob}" if m else "no mixing"
        return f"BatchAugment({mix}, smoothing={self.smoothing}, reprob={self.eraser.probability if self.eraser else 0})"

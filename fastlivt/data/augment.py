"""Device-side batch work shared by every loader backend: normalisation and BFT's batch augmentation.

* :class:`Normalize` turns uint8 ``[B,3,H,W]`` images into float ``(x / 255 - mean) / std`` on the device.
* :class:`BatchAugment` is the second half of BFT's augmentation (paper Table 9, timm's recipe as in LiVT/MAE
  fine-tuning): RandomErasing per sample (timm ``RandomErasing``, mode 'pixel', one box, probability ``reprob``),
  then Mixup / CutMix over the batch (timm ``Mixup``, mode 'batch': one lambda per batch, switching to CutMix with
  probability 0.5 when both are on, ``correct_lam``). It returns the images and a :class:`fastlivt.targets.MixTarget`
  ``(label_a, label_b = label_a.flip(0), lam, smoothing)``, whose ``.dense(C)`` is exactly timm's soft target.
  Every draw is a pure function of (run seed, epoch, the batch's global positions) made on the host
  (:mod:`fastlivt.data.batch_draws`); the device applies them to the whole batch with a fixed number of tensor
  operations whatever the batch size (a box mask from broadcast comparisons, one noise tensor, timm's flip-and-blend
  or box copy). The loader applies it after its device stage (:meth:`fastlivt.data.base.EpochLoader.__iter__`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from fastlivt.data import batch_draws as bd
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


def erase(images: torch.Tensor, boxes: torch.Tensor, noise_seed: int) -> torch.Tensor:
    """timm's per-pixel RandomErasing of ``images [B,C,H,W]`` in the boxes ``boxes`` (int64 ``[B, 4]`` = top, left,
    height, width on the images' device; 0 x 0: not erased): each box's pixels become the matching pixels of one
    standard-normal tensor of the images' shape drawn by a generator seeded with ``noise_seed``. A new tensor."""
    b, _, h, w = images.shape
    top, left, height, width = boxes.view(b, 4, 1, 1).unbind(1)  # each [B, 1, 1]
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
    generator = torch.Generator(device=images.device)
    generator.manual_seed(noise_seed)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype, device=images.device)
    return torch.where(inside.unsqueeze(1), noise, images)


def mix(images: torch.Tensor, params: bd.MixParams) -> torch.Tensor:
    """timm ``Mixup._mix_batch`` with the drawn ``params``, in place: CutMix copies the box from the flipped batch
    (sample i gets sample B-1-i's box), Mixup blends ``lam * x + (1 - lam) * x.flip(0)``."""
    if params.box is not None:
        yl, yh, xl, xh = params.box
        images[:, :, yl:yh, xl:xh] = images.flip(0)[:, :, yl:yh, xl:xh]
    elif params.lam != 1.0:
        flipped = images.flip(0).mul_(1.0 - params.lam)
        images.mul_(params.lam).add_(flipped)
    return images


class BatchAugment:
    """``(images float[B,3,H,W] normalised, labels long[B], epoch, positions) -> (images, MixTarget)`` on the images'
    device, ``positions`` being the batch's samples' positions in the epoch's global order.

    ``mixup``/``cutmix``: the Beta(alpha, alpha) parameters (0 disables each; both 0 = no mixing, lam = 1);
    ``mix_prob``: probability that a batch is mixed at all; ``switch_prob``: probability of CutMix instead of Mixup
    when both are on; ``smoothing``: label smoothing carried in the target; ``reprob``: RandomErasing probability;
    ``seed``: the run's seed, which with the epoch and the positions fixes every draw. :meth:`draws` is the host
    half, :meth:`apply` the device half; ``__call__`` does both.
    """

    def __init__(self, num_classes: int, mixup: float = 0.8, cutmix: float = 1.0, smoothing: float = 0.1,
                 reprob: float = 0.25, mix_prob: float = 1.0, switch_prob: float = 0.5, *, seed: int):
        if num_classes < 1:
            raise ValueError(f"BatchAugment: num_classes must be >= 1, got {num_classes}")
        for name, v in (("mixup", mixup), ("cutmix", cutmix), ("reprob", reprob), ("smoothing", smoothing)):
            if v < 0:
                raise ValueError(f"BatchAugment: {name} must be >= 0, got {v}")
        for name, v in (("reprob", reprob), ("mix_prob", mix_prob), ("switch_prob", switch_prob)):
            if v > 1:
                raise ValueError(f"BatchAugment: {name} is a probability, must be <= 1, got {v}")
        self.num_classes, self.smoothing, self.seed = num_classes, smoothing, int(seed)
        self.mixing: Optional[bd.MixConfig] = bd.MixConfig(mixup, cutmix, mix_prob, switch_prob) \
            if mixup > 0 or cutmix > 0 else None
        self.erasing: Optional[bd.EraseConfig] = bd.EraseConfig(reprob) if reprob > 0 else None

    def draws(self, epoch: int, positions: np.ndarray, img_h: int, img_w: int) -> bd.BatchDraws:
        """Host half: the batch's erasing boxes and mixing parameters
        (:func:`fastlivt.data.batch_draws.batch_draws`)."""
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if self.mixing is not None and positions.size % 2:
            raise ValueError(f"Mixup/CutMix needs an even batch size (timm pairs sample i with B-1-i), got "
                             f"{positions.size}")
        return bd.batch_draws(self.seed, epoch, positions, img_h, img_w, self.erasing, self.mixing)

    def apply(self, images: torch.Tensor, labels: torch.Tensor,
              draws: bd.BatchDraws) -> Tuple[torch.Tensor, MixTarget]:
        """Device half: erasing, then mixing, with ``draws`` (of this batch's size and image size)."""
        if images.ndim != 4 or labels.shape != images.shape[:1]:
            raise ValueError(f"BatchAugment expects images [B,C,H,W] and labels [B], got {tuple(images.shape)} and "
                             f"{tuple(labels.shape)}")
        if draws.boxes is not None:
            if draws.boxes.shape != (images.shape[0], 4):
                raise ValueError(f"BatchAugment: {draws.boxes.shape[0]} erasing boxes for {images.shape[0]} images")
            boxes = torch.from_numpy(draws.boxes)
            boxes = boxes.pin_memory().to(images.device, non_blocking=True) if images.is_cuda else boxes
            images = erase(images, boxes, draws.noise_seed)
        if self.mixing is not None:
            if len(images) % 2:
                raise ValueError(f"Mixup/CutMix needs an even batch size (timm pairs sample i with B-1-i), got "
                                 f"{len(images)}")
            images = mix(images, draws.mix)
        return images, MixTarget(labels, labels.flip(0), draws.mix.lam, self.smoothing)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int,
                 positions: np.ndarray) -> Tuple[torch.Tensor, MixTarget]:
        if len(positions) != len(images):
            raise ValueError(f"BatchAugment: {len(positions)} positions for a batch of {len(images)} images")
        return self.apply(images, labels, self.draws(epoch, positions, images.shape[-2], images.shape[-1]))

    def __repr__(self) -> str:
        m = self.mixing
        mixing = f"mixup={m.mixup_alpha}, cutmix={m.cutmix_alpha}, prob={m.mix_prob}" if m else "no mixing"
        reprob = self.erasing.prob if self.erasing else 0
        return f"BatchAugment({mixing}, smoothing={self.smoothing}, reprob={reprob}, seed={self.seed})"

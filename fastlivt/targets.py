"""Training targets shared by the augmentation (producer) and the losses (consumer)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MixTarget:
    """The compact form of a Mixup/CutMix target: y = lam * smooth(label_a) + (1 - lam) * smooth(label_b).

    ``smooth(y)`` is one-hot with on = 1 - s + s/C and off = s/C (timm's ``mixup_target``). ``lam`` is one value
    per batch (timm ``mode='batch'``). The fused loss kernel builds targets from this without an N x C tensor.
    """

    label_a: torch.Tensor  # long [N]
    label_b: torch.Tensor  # long [N]
    lam: float
    smoothing: float = 0.0

    def dense(self, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The materialised N x C soft target (identical to timm.data.mixup.mixup_target)."""
        off = self.smoothing / num_classes
        on = 1.0 - self.smoothing + off
        device = self.label_a.device
        ya = torch.full((self.label_a.shape[0], num_classes), off, device=device, dtype=dtype)
        yb = ya.clone()
        ya.scatter_(1, self.label_a.view(-1, 1), on)
        yb.scatter_(1, self.label_b.view(-1, 1), on)
        return ya * self.lam + yb * (1.0 - self.lam)

    def to(self, device) -> "MixTarget":
        return MixTarget(self.label_a.to(device), self.label_b.to(device), self.lam, self.smoothing)

    @staticmethod
    def from_labels(labels: torch.Tensor, smoothing: float = 0.0) -> "MixTarget":
        """Hard labels (optionally smoothed) in the compact form: lam = 1, label_b = label_a."""
        return MixTarget(labels, labels, 1.0, smoothing)

"""Float64 PyTorch reference of the fused Balanced-BCE kernel, written from the formulas (for tests).

    x = z + b,  loss = (1/N) Σ_n Σ_c [max(x, 0) − x·y + log(1 + exp(−|x|))],  ∂loss/∂z = (σ(x) − y) / N
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def soft_target(label_a: torch.Tensor, label_b: torch.Tensor, lam: float, smoothing: float, num_classes: int) -> torch.Tensor:
    """λ · smooth(label_a) + (1 − λ) · smooth(label_b) in float64, with on = 1 − s + s/C and off = s/C."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    eye = torch.eye(num_classes, dtype=torch.float64, device=label_a.device)
    one_hot_a, one_hot_b = eye[label_a.long()], eye[label_b.long()]
    return lam * (off + (on - off) * one_hot_a) + (1.0 - lam) * (off + (on - off) * one_hot_b)


def bal_bce_reference(logits: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, gradient) in float64 for logits [N, C], τ-scaled bias [C] (or None) and a dense target [N, C]."""
    z = logits.detach().to(torch.float64)
    x = z + bias.detach().to(torch.float64) if bias is not None else z
    y = target.detach().to(torch.float64)
    n = z.shape[0]
    per_element = torch.clamp(x, min=0) - x * y + torch.log1p(torch.exp(-x.abs()))
    loss = per_element.sum() / n
    # σ(x) − y, with σ(x) = 1 − σ(−x) for x >= 0 so that y = 1 and x >> 0 keep their tiny gradient
    grad = torch.where(x >= 0, (1.0 - y) - torch.sigmoid(-x), torch.sigmoid(x) - y) / n
    return loss, grad

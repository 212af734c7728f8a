"""timm layers with one CPU-specific adjustment for bf16 autocast (``run.cpu_bf16``), and :func:`compute_dtype`.

On CPU, autocast runs the patch-embedding convolution in bf16, and its backward there is pathologically slow (on a
2-core AVX512-BF16 machine, 0.94 s per step for the demo ViT's 4×4 patch conv — 60 % of the whole step, against
milliseconds in fp32). :class:`PatchEmbed` therefore runs the projection in fp32 when CPU autocast is on; everywhere
else it is timm's ``PatchEmbed`` unchanged (same parameters, same state-dict keys).
"""
from __future__ import annotations

import torch
from timm.layers import PatchEmbed as TimmPatchEmbed


class PatchEmbed(TimmPatchEmbed):
    """timm's ``PatchEmbed``; under CPU autocast the convolution runs in fp32 (its output is fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype activations on ``x``'s device compute in: autocast's dtype when autocast is on there, else ``x``'s.

    Positions, class and mask tokens are cast to it before they are added, so that under bf16 autocast the residual
    stream stays bf16 (an fp32 parameter added to bf16 activations would promote every block's stream to fp32).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype

"""RandAugment's pixel-value operations on a batch of uint8 ``[B,H,W,3]`` images, each sample with its own op and
argument, on any torch device, reproducing Pillow's integer arithmetic (Pillow 12, what timm calls).

Every function takes the whole batch and per-sample tensors and does a fixed sequence of tensor operations (no loop
over images, no data-dependent shapes): a sample whose op is another one gets a result that the caller discards.

* Look-up-table ops (:func:`lut_ops`): one ``[B,3,256]`` table per sample, applied with one gather. The tables are
  Pillow's: ``ImageOps.invert``, ``posterize`` (``i & ~(2**(8-bits)-1)``, 0 bits = black), ``solarize``, timm's
  ``solarize_add``, ``ImageOps.autocontrast`` (cutoff 0: ``int(i * 255.0/(hi-lo) - lo * scale)`` clipped, in float64)
  and ``ImageOps.equalize`` (``(step // 2 + cumulative count) // step`` with ``step = (count - count of the highest
  level) // 255``, identity when ``step`` is 0), from per-sample, per-channel histograms (one ``scatter_add``).
* Enhance ops (:func:`enhance_ops`): ``ImageEnhance`` = ``Image.blend(degenerate, image, factor)``, computed as
  Pillow's C does in float32 (``deg + factor * (img - deg)``, clipped, truncated). Degenerate images: Color = the 'L'
  image (``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``) as RGB, Contrast = ``int(mean(L) + 0.5)``, Brightness = 0,
  Sharpness = ``ImageFilter.SMOOTH`` (3x3 ``[[1,1,1],[1,5,1],[1,1,1]] / 13`` in float32, rounded, border pixels kept).
"""
from __future__ import annotations

import torch

LEVELS = 256


def channel_offsets(img: torch.Tensor) -> torch.Tensor:
    """int64 ``[B,H,W,3]``: index of each pixel value in a flat ``[B,3,256]`` table (sample, channel, value)."""
    b = img.shape[0]
    base = (torch.arange(b, device=img.device).view(b, 1, 1, 1) * 3
            + torch.arange(3, device=img.device).view(1, 1, 1, 3)) * LEVELS
    return base + img.long()


def histograms(offsets: torch.Tensor, batch: int) -> torch.Tensor:
    """int64 ``[B,3,256]`` pixel counts per sample and channel, from :func:`channel_offsets`."""
    flat = offsets.reshape(-1)
    hist = torch.zeros(batch * 3 * LEVELS, dtype=torch.int64, device=offsets.device)
    hist.scatter_add_(0, flat, flat.new_ones(()).expand(flat.shape))
    return hist.view(batch, 3, LEVELS)


def autocontrast_lut(hist: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast(image)``'s table per sample and channel (int64 ``[B,3,256]``)."""
    levels = torch.arange(LEVELS, device=hist.device)
    present = hist > 0
    lo = torch.argmax(present.to(torch.uint8), dim=-1, keepdim=True)
    hi = LEVELS - 1 - torch.argmax(present.flip(-1).to(torch.uint8), dim=-1, keepdim=True)
    spread = (hi - lo).clamp_min(1).to(torch.float64)
    scale = torch.full_like(spread, 255.0) / spread  # a true division (``scalar / tensor`` multiplies by a reciprocal)
    offset = (-lo).to(torch.float64) * scale
    mapped = torch.trunc(levels.to(torch.float64) * scale + offset).clamp(0, 255).long()
    return torch.where(hi > lo, mapped, levels)


def equalize_lut(hist: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize(image)``'s table per sample and channel (int64 ``[B,3,256]``)."""
    levels = torch.arange(LEVELS, device=hist.device)
    present = hist > 0
    hi = LEVELS - 1 - torch.argmax(present.flip(-1).to(torch.uint8), dim=-1, keepdim=True)
    top_count = torch.gather(hist, -1, hi)
    step = torch.div(hist.sum(-1, keepdim=True) - top_count, 255, rounding_mode="floor")
    before = torch.cumsum(hist, -1) - hist  # count of the levels below each level
    mapped = torch.div(torch.div(step, 2, rounding_mode="floor") + before, step.clamp_min(1), rounding_mode="floor")
    return torch.where(step > 0, mapped.clamp_max(255), levels)


def lut_ops(img: torch.Tensor, kind: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """Apply per sample ``kind`` (int64 ``[B]``: 0 identity, 1 autocontrast, 2 equalize, 3 invert, 4 posterize to
    ``arg`` bits, 5 solarize at threshold ``arg``, 6 solarize_add of ``arg`` below 128) to uint8 ``[B,H,W,3]``."""
    b = img.shape[0]
    offsets = channel_offsets(img)
    hist = histograms(offsets, b)
    levels = torch.arange(LEVELS, device=img.device).view(1, 1, LEVELS)
    a = arg.long().view(b, 1, 1)
    shift = 8 - a
    tables = [
        levels.expand(b, 3, LEVELS),
        autocontrast_lut(hist),
        equalize_lut(hist),
        255 - levels,
        torch.bitwise_left_shift(torch.bitwise_right_shift(levels, shift), shift),
        torch.where(levels < a, levels, 255 - levels),
        torch.where(levels < 128, (levels + a).clamp_max(255), levels),
    ]
    k = kind.view(b, 1, 1)
    lut = tables[0]
    for code in range(1, len(tables)):
        lut = torch.where(k == code, tables[code], lut)
    return torch.take(lut.to(torch.uint8), offsets)


def grey_levels(img: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> 'L' conversion, int32 ``[B,H,W,1]``."""
    rgb = img.to(torch.int32)
    weighted = rgb[..., 0:1] * 19595 + rgb[..., 1:2] * 38470 + rgb[..., 2:3] * 7471 + 0x8000
    return torch.bitwise_right_shift(weighted, 16)


def smooth(img: torch.Tensor) -> torch.Tensor:
    """``image.filter(ImageFilter.SMOOTH)`` as float32 ``[B,H,W,3]`` integer values (border pixels unchanged)."""
    _, h, w, _ = img.shape
    x = img.to(torch.float32)
    weights = (torch.tensor([1.0, 5.0], dtype=torch.float32, device=img.device)
               / torch.tensor([13.0, 13.0], dtype=torch.float32, device=img.device))  # Pillow: kernel / divisor
    one, five = weights[0], weights[1]
    centre_rows = x[:, 1:h - 1]

    def row(r: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        return r[:, :, 0:w - 2] * one + r[:, :, 1:w - 1] * mid + r[:, :, 2:w] * one

    total = row(x[:, 2:h], one) + row(centre_rows, five) + row(x[:, 0:h - 2], one)
    rounded = torch.floor(total.clamp(0.0, 255.0) + 0.5).clamp_max(255.0)
    out = x.clone()
    out[:, 1:h - 1, 1:w - 1] = rounded
    return out


def enhance_ops(img: torch.Tensor, kind: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, img, factor)`` per sample; ``kind`` int64 ``[B]``: 0 Brightness, 1 Color,
    2 Contrast, 3 Sharpness; ``factor`` ``[B]`` (made float32, as Pillow's C takes it). uint8 ``[B,H,W,3]``."""
    b, h, w, _ = img.shape
    grey = grey_levels(img)
    total = grey.view(b, h * w).sum(-1).to(torch.float64)
    mean = total / torch.full_like(total, float(h * w))  # true division, as ImageStat's
    mean_level = torch.floor(mean + 0.5).to(torch.float32).view(b, 1, 1, 1)
    k = kind.view(b, 1, 1, 1)
    zero = torch.zeros((), dtype=torch.float32, device=img.device)
    degenerate = torch.where(k == 1, grey.to(torch.float32), torch.where(k == 2, mean_level, zero))
    degenerate = torch.where(k == 3, smooth(img), degenerate)
    alpha = factor.to(torch.float32).view(b, 1, 1, 1)
    blended = degenerate + alpha * (img.to(torch.float32) - degenerate)
    return torch.trunc(blended.clamp(0.0, 255.0)).to(torch.uint8)

"""RandAugment's pixel-value operations on a group of uint8 ``[k,H,W,3]`` images, each sample with its own op and
argument, on any torch device, reproducing Pillow's integer and float32 arithmetic (Pillow 12, what timm calls).

Every function takes the group and per-sample tensors and does a fixed sequence of tensor operations (no loop over
images, no data-dependent shapes), the same for any group size, zero included (a copy is an explicit ``clone``, not a
``reshape`` or ``contiguous`` that copies or not by the strides); a sample whose op is another one of the same
function gets a result the caller discards.

* Table ops: an op whose output value is a function of the input value and the sample's statistics is one gather
  from a per-sample, per-channel ``[k,3,256]`` table (:func:`apply_tables`): Pillow's ``ImageOps.invert``,
  ``posterize`` (``i & ~(2**(8-bits)-1)``, 0 bits = black), ``solarize``, timm's ``solarize_add``
  (:func:`value_tables`); ``ImageEnhance.Brightness`` and ``Contrast`` (:func:`blend_tables`: a blend with the constant
  0 or ``int(mean(L) + 0.5)``); ``ImageOps.autocontrast`` (cutoff 0: ``int(i * 255.0/(hi-lo) - lo * scale)``
  clipped, in float64) and ``ImageOps.equalize`` (``(step // 2 + cumulative count) // step`` with
  ``step = (count - count of the highest level) // 255``, identity when ``step`` is 0) from per-sample, per-channel
  histograms (:func:`histogram_tables`).
* ``ImageEnhance`` = ``Image.blend(degenerate, image, factor)``, computed as Pillow's C does in float32
  (``deg + factor * (img - deg)``, clipped, truncated); per pixel for Color (:func:`color`: the 'L' image
  ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16`` as RGB) and Sharpness (:func:`sharpness`: ``ImageFilter.SMOOTH``,
  3x3 ``[[1,1,1],[1,5,1],[1,1,1]] / 13`` in float32, rounded, border pixels kept).
* Channels-last throughout; per-pixel quantities that all three channels read (the 'L' level) are laid out once per
  channel, since a tensor operation that broadcasts along the innermost 3 is slow on CPU.
"""
from __future__ import annotations

import torch

from fastlivt.data.device_constants import constant

LEVELS = 256
# table kinds of value_tables / histogram_tables / blend_tables
AUTOCONTRAST, EQUALIZE, INVERT, POSTERIZE, SOLARIZE, SOLARIZE_ADD, BRIGHTNESS, CONTRAST = range(1, 9)
_GREY_WEIGHTS = (19595.0, 38470.0, 7471.0)  # Pillow's RGB -> L, over 2**16


def table_index(img: torch.Tensor) -> torch.Tensor:
    """int32 ``[k, H, W*3]``: each value's index in the flat ``[k,3,256]`` tables (sample, channel, value)."""
    k, h, w, c = img.shape
    lanes = torch.arange(w * c, device=img.device, dtype=torch.int32).remainder_(c).mul_(LEVELS)  # one row's
    first = (torch.arange(k, device=img.device, dtype=torch.int32) * (c * LEVELS)).view(k, 1, 1)
    return torch.add(img.view(k, h, w * c), lanes).add_(first)


def apply_tables(img: torch.Tensor, tables: torch.Tensor, index: torch.Tensor = None) -> torch.Tensor:
    """``tables[i, c, img[i, y, x, c]]`` for uint8 ``[k,H,W,3]`` and uint8 ``[k,3,256]`` tables (or ``[k,1,256]``:
    one for the three channels); ``index`` = :func:`table_index` of ``img`` when already made."""
    index = table_index(img) if index is None else index
    flat = tables.expand(img.shape[0], 3, LEVELS).clone(memory_format=torch.contiguous_format).view(-1)
    return torch.index_select(flat, 0, index.view(-1)).view(img.shape)


def _levels(device: torch.device) -> torch.Tensor:
    return torch.arange(LEVELS, device=device).view(1, 1, LEVELS)


def value_tables(kind: torch.Tensor, arg: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """uint8 ``[k,1,256]``: per sample ``kind`` (int64 ``[k]``: INVERT, POSTERIZE to ``arg`` bits, SOLARIZE at threshold
    ``arg``, SOLARIZE_ADD of ``arg`` below 128, BRIGHTNESS by ``factor``)."""
    k = kind.shape[0]
    levels = _levels(kind.device)
    a = arg.long().view(k, 1, 1)
    shift = 8 - a
    tables = {
        INVERT: 255 - levels,
        POSTERIZE: torch.bitwise_left_shift(torch.bitwise_right_shift(levels, shift), shift),
        SOLARIZE: torch.where(levels < a, levels, 255 - levels),
        SOLARIZE_ADD: torch.where(levels < 128, (levels + a).clamp_max(255), levels),
        BRIGHTNESS: blend_tables(torch.zeros(k, device=kind.device), factor).long(),
    }
    return _select(kind, tables)


def _select(kind: torch.Tensor, tables: dict) -> torch.Tensor:
    """uint8 ``[k,1|3,256]``: each sample's table of its ``kind`` (the last kind's for a kind not in ``tables``)."""
    k = kind.view(-1, 1, 1)
    codes = list(tables)
    out = tables[codes[-1]]
    for code in codes[:-1]:
        out = torch.where(k == code, tables[code], out)
    return out.to(torch.uint8)


def blend_tables(degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """uint8 ``[k,1,256]``: ``Image.blend`` of a constant ``degenerate`` level with each value, by ``factor``
    (both ``[k]``; float32 arithmetic as Pillow's C: ``trunc(clip(deg + factor * (value - deg)))``)."""
    k = factor.shape[0]
    deg = degenerate.to(torch.float32).view(k, 1, 1)
    values = _levels(factor.device).to(torch.float32)
    blended = (values - deg).mul_(factor.to(torch.float32).view(k, 1, 1)).add_(deg)
    return blended.clamp_(0.0, 255.0).to(torch.int32).to(torch.uint8)


def histograms(index: torch.Tensor) -> torch.Tensor:
    """int64 ``[k,3,256]`` pixel counts per sample and channel, from :func:`table_index`; ``bincount`` on CPU,
    ``scatter_add_`` elsewhere (CUDA's ``bincount`` reads its input's maximum back to the host)."""
    k = index.shape[0]
    if index.device.type == "cpu":
        return torch.bincount(index.view(-1), minlength=k * 3 * LEVELS).view(k, 3, LEVELS)
    flat = index.view(-1).long()
    hist = torch.zeros(k * 3 * LEVELS, dtype=torch.int64, device=index.device)
    hist.scatter_add_(0, flat, flat.new_ones(()).expand(flat.shape))
    return hist.view(k, 3, LEVELS)


def autocontrast_lut(hist: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast(image)``'s table per sample and channel (int64 ``[k,3,256]``)."""
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
    """``ImageOps.equalize(image)``'s table per sample and channel (int64 ``[k,3,256]``)."""
    levels = torch.arange(LEVELS, device=hist.device)
    present = hist > 0
    hi = LEVELS - 1 - torch.argmax(present.flip(-1).to(torch.uint8), dim=-1, keepdim=True)
    top_count = torch.gather(hist, -1, hi)
    step = torch.div(hist.sum(-1, keepdim=True) - top_count, 255, rounding_mode="floor")
    before = torch.cumsum(hist, -1) - hist  # count of the levels below each level
    mapped = torch.div(torch.div(step, 2, rounding_mode="floor") + before, step.clamp_min(1), rounding_mode="floor")
    return torch.where(step > 0, mapped.clamp_max(255), levels)


def histogram_tables(kind: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
    """uint8 ``[k,3,256]``: AUTOCONTRAST or EQUALIZE per sample (``kind`` ``[k]``) from :func:`histograms`."""
    return _select(kind, {AUTOCONTRAST: autocontrast_lut(hist), EQUALIZE: equalize_lut(hist)})


def grey_levels(img: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> 'L' conversion of uint8 ``[k,H,W,3]``, float64 ``[k,H,W]`` integer values (the weighted sums
    stay below 2**24: exact in any float order)."""
    weights = constant(tuple(_GREY_WEIGHTS), torch.float64, img.device)
    weighted = torch.matmul(img.reshape(-1, 3).to(torch.float64), weights).view(img.shape[:3])
    return weighted.add_(0x8000).div_(65536.0).floor_()


def mean_grey_level(img: torch.Tensor) -> torch.Tensor:
    """``int(ImageStat.Stat(image.convert('L')).mean[0] + 0.5)`` per sample, float64 ``[k]``."""
    k, h, w, _ = img.shape
    total = grey_levels(img).view(k, h * w).sum(-1)
    mean = total / torch.full_like(total, float(h * w))  # true division, as ImageStat's
    return torch.floor(mean + 0.5)


def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, img, factor)``: float32 ``degenerate`` ``[k,H,W,3]`` (overwritten), uint8 ``img``,
    ``factor`` ``[k]``."""
    k = img.shape[0]
    alpha = factor.to(torch.float32).view(k, 1, 1, 1)
    blended = torch.sub(img, degenerate).mul_(alpha).add_(degenerate)
    return blended.clamp_(0.0, 255.0).to(torch.int32).to(torch.uint8)


def color(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Color(img).enhance(factor)`` per sample, uint8 ``[k,H,W,3]``."""
    grey = grey_levels(img).to(torch.float32)
    return _blend(grey.unsqueeze(-1).expand(img.shape).clone(memory_format=torch.contiguous_format), img, factor)


def smooth(img: torch.Tensor) -> torch.Tensor:
    """``image.filter(ImageFilter.SMOOTH)`` as float32 ``[k,H,W,3]`` integer values (border pixels unchanged).
    Pillow sums each row's three products left to right, then the rows below, centre, above; a product of a value and
    a weight is the same wherever it is used, so each is computed once."""
    _, h, w, _ = img.shape
    x = img.to(torch.float32)
    weights = constant(tuple((torch.tensor([1.0, 5.0]) / torch.tensor([13.0, 13.0])).tolist()), torch.float32,
                       img.device)  # Pillow: kernel / divisor, in float32
    side, centre = x * weights[0], x * weights[1]

    def row(top: int, middle: torch.Tensor) -> torch.Tensor:
        return (side[:, top:top + h - 2, 0:w - 2] + middle[:, top:top + h - 2, 1:w - 1]) + side[:, top:top + h - 2, 2:w]

    total = row(2, side).add_(row(1, centre)).add_(row(0, side))
    x[:, 1:h - 1, 1:w - 1] = total.clamp_(0.0, 255.0).add_(0.5).floor_().clamp_max_(255.0)
    return x


def sharpness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Sharpness(img).enhance(factor)`` per sample, uint8 ``[k,H,W,3]``."""
    return _blend(smooth(img), img, factor)

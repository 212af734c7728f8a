"""RandAugment's geometric operations on a group of uint8 ``[k,H,W,3]`` images, each sample with its own affine
matrix, on any torch device, reproducing Pillow's ``Image.transform(size, AFFINE, matrix, resample, fillcolor=...)``
(what timm's rotate / shear / translate call; ``Image.rotate`` builds its matrix as :func:`affine_matrices` does).

Pillow's convention (libImaging/Geometry.c): output pixel (x, y) reads the input at ``(a x' + b y' + c,
d x' + e y' + f)`` with ``x' = x + 0.5``, ``y' = y + 0.5`` (pixel centres); a point outside ``[0, W) x [0, H)`` keeps
the fill colour; inside, the filter runs on the neighbours of ``(x_in - 0.5, y_in - 0.5)`` with their indices clamped to
the image (edge replication):

* bilinear: ``v = a + (b - a) * d`` along x on two rows, then along y; truncated to uint8;
* bicubic: Pillow's cubic convolution on 4 x 4 neighbours, ``v = p1 + d (p2 + d (p3 + d p4))`` with
  ``p1 = v1``, ``p2 = -v0 + v2``, ``p3 = 2 (v0 - v1) + v2 - v3``, ``p4 = -v0 + v1 - v2 + v3`` (the a = -1 kernel of
  its transform filters), along x on four rows, then along y; clipped to [0, 255] and truncated.

How :func:`resample` computes it (one group = one filter and one set of moving axes, chosen on the host):

* ``axes`` 'x' (ShearX, TranslateX: ``y_in = y'`` exactly), 'y' (ShearY, TranslateY: ``x_in = x'``) or 'xy' (Rotate).
  Along an axis whose source coordinate is exact, ``d = 0`` and Pillow's filter returns the one tap unchanged, so
  only the moving axes are filtered: 4 (bicubic) or 2 (bilinear) taps per pixel instead of 16 or 4.
* Coordinates are computed once per pixel; the filter runs on lane-major ``[lanes, n]`` taps gathered at byte
  offsets of the channels-last images: no operation broadcasts along an innermost dimension of 3 (a slow stride
  pattern on CPU). On CPU one colour lane at a time (a third of the working set, in cache), elsewhere all three.
* Taps are gathered from a copy of the images with an edge-replicated border of ``PAD`` pixels and ``FILL_ROWS``
  rows of fill colour below: a point outside the image reads only those rows, and a filter of equal taps returns the
  tap exactly, so the fill needs no pass of its own.
* Integer taps go through the filter's differences in int16 (exact), the polynomial in ``dtype``: float64 is Pillow's
  arithmetic; float32 is faster and can move a value by one level.
* Large CPU tensors cost page faults when freshly allocated: results are written in place where Pillow's order
  allows, and one scratch buffer takes the integer-to-float conversions.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from fastlivt.data.device_constants import constant

PAD = 2  # the bicubic taps of an inside point reach 2 pixels past the edge
FILL_ROWS = 4  # rows of fill colour under the padded image: every tap of an outside point lands in them
AXES = ("x", "y", "xy")


def affine_matrices(kind: torch.Tensor, value: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """float64 ``[B,6]`` inverse affine matrices of Pillow. ``kind`` int64 ``[B]``: 0 identity, 1 rotate by ``value``
    degrees (``Image.rotate``: about the centre ``(W/2, H/2)``, coefficients rounded to 15 decimals), 2 shear x by
    ``value``, 3 shear y, 4 translate x by ``value`` pixels, 5 translate y."""
    v = value.to(torch.float64)
    angle = -torch.remainder(v, 360.0) * (math.pi / 180.0)
    cos, sin = torch.round(torch.cos(angle), decimals=15), torch.round(torch.sin(angle), decimals=15)
    cx, cy = width / 2.0, height / 2.0
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    rot = torch.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], -1)
    candidates = torch.stack([
        torch.stack([one, zero, zero, zero, one, zero], -1),
        rot,
        torch.stack([one, v, zero, zero, one, zero], -1),
        torch.stack([one, zero, zero, v, one, zero], -1),
        torch.stack([one, zero, v, zero, one, zero], -1),
        torch.stack([one, zero, zero, zero, one, v], -1),
    ], 1)  # [B, 6 kinds, 6]
    index = kind.long().clamp(0, 5).view(-1, 1, 1).expand(-1, 1, 6)
    return torch.gather(candidates, 1, index).squeeze(1)


def _padded(img: torch.Tensor, fill: Sequence[int]) -> torch.Tensor:
    """int16 ``[k, H + 2 PAD + FILL_ROWS, W + 2 PAD, 3]``: ``img`` with edges replicated ``PAD`` pixels outwards,
    then ``FILL_ROWS`` rows of ``fill``."""
    k, h, w, _ = img.shape
    out = torch.empty((k, h + 2 * PAD + FILL_ROWS, w + 2 * PAD, 3), dtype=torch.int16, device=img.device)
    body = out[:, PAD:PAD + h]
    body[:, :, PAD:PAD + w] = img
    body[:, :, :PAD] = img[:, :, :1]
    body[:, :, PAD + w:] = img[:, :, w - 1:]
    out[:, :PAD] = out[:, PAD:PAD + 1]
    out[:, PAD + h:2 * PAD + h] = out[:, PAD + h - 1:PAD + h]
    out[:, 2 * PAD + h:] = constant(tuple(int(c) for c in fill), torch.int16, img.device)
    return out


def _source_axis(src: torch.Tensor, size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(outside ``[0, size)``, first neighbour ``floor(src - 0.5)`` clamped to ``[-1, size - 1]``, fraction
    ``src - 0.5 - floor(src - 0.5)``) of source coordinates ``src`` (overwritten by the fraction)."""
    outside = (src < 0).logical_or_(src >= size)
    src.sub_(0.5)
    first = torch.floor(src)
    return outside, first.clamp_(-1, size - 1), src.sub_(first)


def _filter(taps: Sequence[torch.Tensor], d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pillow's cubic (4 taps) or linear (2) of int16 ``taps`` (overwritten) at ``d`` (broadcast over their leading
    dimensions), in ``dtype``. The taps' differences are exact integers, so their order is free; the polynomial is
    Pillow's."""
    if len(taps) == 2:
        v0, v1 = taps
        return v1.sub_(v0).to(dtype).mul_(d).add_(v0)
    v0, v1, v2, v3 = taps
    p3 = (v0 - v1).mul_(2).add_(v2).sub_(v3)
    p4 = v3.add_(v1).sub_(v0).sub_(v2)
    p2 = v2.sub_(v0)
    out = p4.to(dtype)
    scratch = torch.empty_like(out)  # one buffer for the int16 -> float conversions
    return out.mul_(d).add_(scratch.copy_(p3)).mul_(d).add_(scratch.copy_(p2)).mul_(d).add_(scratch.copy_(v1))


def _filter_rows(rows: Sequence[torch.Tensor], d: torch.Tensor) -> torch.Tensor:
    """Pillow's cubic (4 rows) or linear (2) of float ``rows`` (overwritten) at ``d``, in its exact operation order:
    ``p3 = 2 (r0 - r1) + r2 - r3``, ``p4 = ((-r0 + r1) - r2) + r3`` (``-a + b`` is ``b - a`` exactly)."""
    if len(rows) == 2:
        return rows[1].sub_(rows[0]).mul_(d).add_(rows[0])
    r0, r1, r2, r3 = rows
    p3 = (r0 - r1).mul_(2).add_(r2).sub_(r3)
    p4 = (r1 - r0).sub_(r2).add_(r3)
    return p4.mul_(d).add_(p3).mul_(d).add_(r2.sub_(r0)).mul_(d).add_(r1)


def _filter_lanes(flat: torch.Tensor, taps: torch.Tensor, dx: Optional[torch.Tensor], dy: Optional[torch.Tensor],
                  count: int, row_len: int, dtype: torch.dtype) -> torch.Tensor:
    """The filtered values ``[lanes, n]`` of colour lanes (``flat`` from the first one's first byte), with fractions
    ``dx``, ``dy`` ``[n]`` (None for an exact axis). ``taps``: the offsets ``[count, lanes, n]`` of the taps along
    the one moving axis, or, when both move, ``[lanes, n]`` of the first, the others read with ``count x count``
    gathers at shifted views of ``flat`` (each rereads the small offsets; all of them would be 16 times as large)."""
    if dx is None or dy is None:
        values = torch.index_select(flat, 0, taps.view(-1)).view(taps.shape)
        return _filter(values.unbind(0), dy if dx is None else dx, dtype)
    rows = []
    for r in range(count):  # row by row: the taps of one row at a time in cache
        values = torch.empty((count, taps.numel()), dtype=flat.dtype, device=flat.device)
        for c in range(count):
            torch.index_select(flat[r * row_len + 3 * c:], 0, taps.view(-1), out=values[c])
        rows.append(_filter(values.view((count,) + taps.shape).unbind(0), dx, dtype))
    return _filter_rows(rows, dy)


def resample(img: torch.Tensor, matrix: torch.Tensor, axes: str, bicubic: bool, fill: Sequence[int],
             dtype: torch.dtype = torch.float64, lanes: Optional[int] = None) -> torch.Tensor:
    """``Image.transform(img.size, AFFINE, matrix[i], BICUBIC if bicubic else BILINEAR, fillcolor=fill)`` for each
    sample ``i`` of uint8 ``[k,H,W,3]``; ``matrix`` ``[k,6]`` leaves the axes not in ``axes`` ('x', 'y', 'xy')
    exact (``x_in = x'`` or ``y_in = y'``); ``fill`` 3 ints. ``lanes``: colour lanes filtered at once, 1 or 3 (None:
    1 on CPU, where a third of the working set stays in cache, 3 elsewhere, a third of the operations)."""
    if lanes not in (None, 1, 3):
        raise ValueError(f"resample lanes must be 1 or 3, got {lanes!r}")
    if axes not in AXES:
        raise ValueError(f"resample axes must be one of {AXES}, got {axes!r}")
    k, h, w, _ = img.shape
    dev = img.device
    row_len = (w + 2 * PAD) * 3
    count = 4 if bicubic else 2
    lead = count // 2 - 1  # the first tap is ``lead`` pixels before the first neighbour
    coord = torch.float64 if dtype == torch.float64 else dtype
    m = matrix.to(coord).view(k, 6, 1, 1)
    xs = (torch.arange(w, device=dev, dtype=coord) + 0.5).view(1, 1, w)
    ys = (torch.arange(h, device=dev, dtype=coord) + 0.5).view(1, h, 1)
    # offset of each point's first tap (lane 0) within its padded sample, exact in ``coord``
    if "x" in axes:  # Pillow: a0 x' + a1 y' + a2, left to right
        outside, col, dx = _source_axis(torch.add(m[:, 0] * xs, m[:, 1] * ys).add_(m[:, 2]), w)
        offset = col.add_(PAD - lead).mul_(3)
    else:
        offset = (torch.arange(w, device=dev, dtype=coord) + PAD).mul_(3).view(1, 1, w)
    if "y" in axes:
        outside_y, row, dy = _source_axis(torch.add(m[:, 3] * xs, m[:, 4] * ys).add_(m[:, 5]), h)
        outside = outside.logical_or_(outside_y) if "x" in axes else outside_y
        offset = row.add_(PAD - lead).mul_(row_len).add_(offset)
    else:
        offset = offset.add_((torch.arange(h, device=dev, dtype=coord) + PAD).mul_(row_len).view(1, h, 1))
    offset.masked_fill_(outside, float((h + 2 * PAD) * row_len))  # an outside point reads the fill rows
    sample_len = (h + 2 * PAD + FILL_ROWS) * row_len
    first_of_sample = (torch.arange(k, device=dev, dtype=torch.int32) * sample_len).view(k, 1, 1)
    index = offset.to(torch.int32).add_(first_of_sample).view(-1)
    dx, dy = (dx.view(-1) if "x" in axes else None), (dy.view(-1) if "y" in axes else None)
    lanes = lanes or (1 if dev.type == "cpu" else 3)
    lane_index = torch.add(index.view(1, -1), torch.arange(lanes, device=dev, dtype=torch.int32).view(-1, 1))
    if axes == "xy":  # 4 filtered rows per point: on CPU in halves, to stay in cache
        parts = [(lane_index.narrow(1, *part), dx.narrow(0, *part), dy.narrow(0, *part))
                 for part in _pieces(index.numel(), 2 if lanes == 1 else 1)]
    else:  # the offsets of all the taps, for every lane
        steps = torch.arange(count, device=dev, dtype=torch.int32).view(-1, 1, 1) * (3 if axes == "x" else row_len)
        parts = [(torch.add(lane_index, steps), dx, dy)]
    flat = _padded(img, fill).view(-1)
    values = []
    for first in range(0, 3, lanes):
        values.append(torch.cat([_filter_lanes(flat[first:], *part, count, row_len, dtype) for part in parts], -1))
    lanes_out = torch.cat(values).clamp_(0, 255).to(torch.int32).unbind(0)
    return torch.stack(lanes_out, -1).to(torch.uint8).view(k, h, w, 3)


def _pieces(n: int, count: int) -> List[Tuple[int, int]]:
    """(start, length) of ``count`` consecutive pieces covering ``range(n)``."""
    bounds = [n * i // count for i in range(count + 1)]
    return [(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]

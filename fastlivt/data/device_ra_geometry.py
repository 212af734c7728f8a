"""RandAugment's geometric operations on a batch of uint8 ``[B,H,W,3]`` images, each sample with its own affine
matrix and resampling filter, on any torch device, reproducing Pillow's ``Image.transform(size, AFFINE, matrix,
resample, fillcolor=...)`` (what timm's rotate / shear / translate call; ``Image.rotate`` builds its matrix as
:func:`affine_matrices` does).

Pillow's convention (libImaging/Geometry.c): output pixel (x, y) reads the input at ``(a x' + b y' + c,
d x' + e y' + f)`` with ``x' = x + 0.5``, ``y' = y + 0.5`` (pixel centres); a point outside ``[0, W) x [0, H)`` keeps
the fill colour; inside, the filter runs on the neighbours of ``(x_in - 0.5, y_in - 0.5)`` with their indices clamped to
the image (edge replication):

* bilinear: ``v = a + (b - a) * d`` along x on two rows, then along y; truncated to uint8;
* bicubic: Pillow's cubic convolution on 4 x 4 neighbours, ``v = p1 + d (p2 + d (p3 + d p4))`` with
  ``p1 = v1``, ``p2 = -v0 + v2``, ``p3 = 2 (v0 - v1) + v2 - v3``, ``p4 = -v0 + v1 - v2 + v3`` (the a = -1 kernel of
  its transform filters), along x on four rows, then along y; clipped to [0, 255] and truncated.

The 16 neighbour reads are gathers over the whole batch; both filters are evaluated and selected per sample. The
arithmetic runs in float64 like Pillow's; a float32 ``dtype`` is faster and differs from it by at most one level on a
few pixels.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


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


def _cubic_into(out: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor,
                d: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``out`` = Pillow's cubic of ``v0..v3`` at ``d``, in its operation order (``-a + b`` is ``b - a`` exactly);
    overwrites ``v0`` and ``scratch``. Written into existing buffers: fresh large CPU tensors cost page faults."""
    torch.sub(v0, v1, out=scratch).mul_(2).add_(v2).sub_(v3)  # p3 = 2 (v0 - v1) + v2 - v3
    torch.sub(v1, v0, out=out).sub_(v2).add_(v3)  # p4 = -v0 + v1 - v2 + v3
    torch.sub(v2, v0, out=v0)  # p2 = -v0 + v2
    return out.mul_(d).add_(scratch).mul_(d).add_(v0).mul_(d).add_(v1)


def _linear_into(out: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``out`` = ``v0 + (v1 - v0) d`` (Pillow's BILINEAR step)."""
    return torch.sub(v1, v0, out=out).mul_(d).add_(v0)


def affine_transform(img: torch.Tensor, matrix: torch.Tensor, bicubic: torch.Tensor, fill: Sequence[int],
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``Image.transform(img.size, AFFINE, matrix[i], BICUBIC if bicubic[i] else BILINEAR, fillcolor=fill)`` for each
    sample ``i`` of uint8 ``[B,H,W,3]``; ``matrix`` ``[B,6]``, ``bicubic`` bool ``[B]``, ``fill`` 3 ints."""
    b, h, w, _ = img.shape
    dev = img.device
    m = matrix.to(torch.float64).view(b, 6, 1, 1)
    xs = (torch.arange(w, device=dev, dtype=torch.float64) + 0.5).view(1, 1, w)
    ys = (torch.arange(h, device=dev, dtype=torch.float64) + 0.5).view(1, h, 1)
    x_in = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]  # [B,H,W]
    y_in = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
    xf, yf = x_in - 0.5, y_in - 0.5
    x0, y0 = torch.floor(xf), torch.floor(yf)
    dx, dy = (xf - x0).to(dtype).unsqueeze(-1), (yf - y0).to(dtype).unsqueeze(-1)
    x0 = x0.clamp(-2, w + 1).long()  # far outside points are filled; keep their indices small
    y0 = y0.clamp(-2, h + 1).long()
    flat = img.reshape(b * h * w, 3)
    base = (torch.arange(b, device=dev) * (h * w)).view(b, 1, 1)
    cols = [(x0 + k).clamp(0, w - 1) for k in (-1, 0, 1, 2)]
    buffer = torch.empty((10, b, h, w, 3), dtype=dtype, device=dev)
    taps, rows, linear, scratch = buffer[0:4], buffer[4:8], buffer[8:10], torch.empty_like(buffer[0])
    index = torch.empty((b, h, w), dtype=torch.int64, device=dev)
    gathered = torch.empty((b * h * w, 3), dtype=torch.uint8, device=dev)
    for r, k in enumerate((-1, 0, 1, 2)):
        row = base + (y0 + k).clamp(0, h - 1) * w
        for c, col in enumerate(cols):
            torch.index_select(flat, 0, torch.add(row, col, out=index).view(-1), out=gathered)
            taps[c].copy_(gathered.view(b, h, w, 3))
        if k in (0, 1):
            _linear_into(linear[k], taps[1], taps[2], dx)
        _cubic_into(rows[r], *taps, dx, scratch)
    value = _cubic_into(scratch, *rows, dy, taps[0]).clamp_(0.0, 255.0).trunc_()
    bilinear = _linear_into(taps[1], linear[0], linear[1], dy).clamp_(0.0, 255.0).trunc_()
    value = torch.where(bicubic.view(b, 1, 1, 1), value, bilinear, out=value)
    fill_value = torch.tensor([float(c) for c in fill], dtype=dtype, device=dev)
    return torch.where(inside.unsqueeze(-1), value, fill_value).to(torch.uint8)

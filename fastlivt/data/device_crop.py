"""Per-sample crop + resize + flip of a whole batch on its device: the RandomResizedCrop every loader backend shares.

A backend hands over the samples' pixels as one padded uint8 batch ``[B,3,Hp,Wp]`` (any memory layout; what lies
outside a sample's image is never read with a weight other than 0, so the padding may hold anything) with each
sample's window; the resampling is Pillow's antialiased bicubic ``resize`` of the window (``Image.crop(box)
.resize(size, BICUBIC)``, what torchvision's and timm's RandomResizedCrop do to PIL images, and what torchvision's
tensor ``resize(antialias=True)`` reproduces): separable, horizontal pass first, each pass rounded to 0..255 as
Pillow's 8-bit passes are. For output position ``o`` of a window ``[start, start + length)`` resized to ``out``
samples, Pillow's coefficients are

    scale = length / out, support = 2 * max(scale, 1), center = (o + 0.5) * scale,
    taps j in [max(floor(center - support + 0.5), 0), min(floor(center + support + 0.5), length)),
    weight(j) = cubic((j - center + 0.5) / max(scale, 1)), normalised to sum 1   (cubic: a = -0.5)

so one pass of a batch is a batched matrix product with a ``[B, out, Hp or Wp]`` matrix of these weights (zero outside
each sample's window). Two ways to apply them, the same arithmetic:

* ``matmul`` (accelerators): the weights of the whole batch are built with tensor operations and applied by two
  batched matrix products: a fixed number of operations per batch whatever B is (a flip reverses the order of the
  horizontal matrix's rows). The products run in float32 outside any autocast; fastlivt never allows TF32 matrix
  products, which would round the weights to 10 bits (a run that turns them on moves about 1 % of the values by a
  level, 2 at most, still far above 35 dB: tested by rounding the weights so).
* ``per_sample`` (the CPU): torch's own uint8 antialiased bicubic kernel on each sample's window, one call per sample.
  On a CPU the dense products cost more than the per-sample kernel at ImageNet sizes (``B x out x Hp x Wp``
  multiply-adds against a few taps per output), so CPU runs keep the per-sample kernel.

``method="auto"`` picks ``per_sample`` on the CPU and ``matmul`` elsewhere; both are tested against Pillow.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = Union[np.ndarray, torch.Tensor]
Images = Union[torch.Tensor, Sequence[torch.Tensor]]  # a padded uint8 [B,3,Hp,Wp] batch, or uint8 [3,H,W] images
METHODS = ("auto", "matmul", "per_sample")


def pad_to_batch(images: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[3,H,W]`` images on one device -> (zero-padded uint8 ``[B,3,Hmax,Wmax]``, int64 ``[B,2]`` (H, W)):
    two dispatched operations whatever B is (a nested tensor of the images, then its padded form; how many kernels
    the padding takes on a GPU for uint8 is torch's, not measured here)."""
    if not images:
        raise ValueError("pad_to_batch: no images")
    sizes = torch.tensor([[int(im.shape[1]), int(im.shape[2])] for im in images], dtype=torch.int64)
    with warnings.catch_warnings():  # torch's nested tensors call themselves a prototype; these two calls are stable
        warnings.simplefilter("ignore", UserWarning)
        batch = torch.nested.as_nested_tensor(list(images)).to_padded_tensor(0)
    return batch, sizes


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic filter (a = -0.5), support 2."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, out_len: torch.Tensor, first: torch.Tensor,
                     count: int, padded: int, max_scale: float, reverse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 ``[B, count, padded]``: row r of sample b holds Pillow's weights of output position ``first[b] + r``
    (``first[b] + count - 1 - r`` where ``reverse[b]``: a mirror image) of the window ``[start[b], start[b] +
    length[b])`` resized to ``out_len[b]`` samples (see the module docstring); the arguments are int64 / bool ``[B]``
    tensors on the batch's device, ``max_scale`` bounds ``length / out_len``. The
    weights are computed on Pillow's ``2 ceil(support) + 1`` taps per output (float64, as Pillow) and scattered into
    the dense rows."""
    start, length, out_len, first = (t.to(torch.float64).view(-1, 1, 1) for t in (start, length, out_len, first))
    taps = 2 * math.ceil(2.0 * max(max_scale, 1.0)) + 1
    o = torch.arange(count, dtype=torch.float64, device=start.device).view(1, -1, 1)
    if reverse is not None:
        o = torch.where(reverse.view(-1, 1, 1), (count - 1) - o, o)
    o = o + first
    k = torch.arange(taps, dtype=torch.float64, device=start.device).view(1, 1, -1)
    scale = length / out_len
    filter_scale = scale.clamp_min(1.0)
    support = 2.0 * filter_scale
    center = (o + 0.5) * scale
    lo = torch.floor(center - support + 0.5).clamp_min(0.0)
    hi = torch.minimum(torch.floor(center + support + 0.5), length)
    j = lo + k  # tap positions in the window
    weights = _cubic((j - center + 0.5) / filter_scale) * (j < hi)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    index = (j + start).long().clamp_(0, padded - 1)  # taps past the window carry weight 0
    dense = torch.zeros((index.shape[0], count, padded), dtype=torch.float32, device=start.device)
    return dense.scatter_add_(2, index, weights.to(torch.float32))


def _rounded(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255)


def _apply(batch: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Pillow's two 8-bit passes, horizontal first, as batched products: ``rows`` ``[B,S,Hp]``, ``cols``
    ``[B,S',Wp]`` -> uint8 ``[B,3,S,S']`` in channels-last memory (what RandAugment reads)."""
    with torch.autocast(batch.device.type, enabled=False):  # float32 products whatever the caller's region
        return _products(batch, rows, cols)


def _products(batch: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    b, _, hp, wp = batch.shape
    x = torch.empty((b, wp, hp, 3), dtype=torch.float32, device=batch.device)
    x.copy_(batch.permute(0, 3, 2, 1))  # float, the width first: the product contracts it
    x = _rounded(torch.bmm(cols, x.view(b, wp, hp * 3))).view(b, -1, hp, 3)  # [B,S',Hp,3]
    x = x.transpose(1, 2).contiguous().view(b, hp, -1)  # the height first
    x = _rounded(torch.bmm(rows, x))  # [B,S,S'*3]
    return x.to(torch.uint8).view(b, rows.shape[1], cols.shape[1], 3).permute(0, 3, 1, 2)


def _as_tensor(a: ArrayLike, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host parameters on the device (through pinned memory without waiting, on CUDA)."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    t = t.to(dtype)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _host(a: ArrayLike) -> np.ndarray:
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _method(method: str, device: torch.device) -> str:
    if method not in METHODS:
        raise ValueError(f"crop method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "per_sample" if device.type == "cpu" else "matmul"
    return method


def _checked(images: Images, method: str) -> Tuple[Images, torch.device, str]:
    """(the images as the method reads them: a padded batch for ``matmul``, anything indexable per sample for
    ``per_sample``; their device; the method)."""
    first = images[0]
    if first.dtype != torch.uint8 or first.dim() != 3 or first.shape[0] != 3:
        raise ValueError(f"device crop expects uint8 RGB images [3,H,W] (or a [B,3,H,W] batch), got "
                         f"{first.dtype} {tuple(first.shape)}")
    method = _method(method, first.device)
    if method == "matmul" and not isinstance(images, torch.Tensor):
        images = pad_to_batch(images)[0]
    return images, first.device, method


def _one(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torch's antialiased bicubic resize of one uint8 ``[3,h,w]`` image (rounded and saturated on the CPU)."""
    if image.shape[1] == height and image.shape[2] == width:
        return image
    x = image.unsqueeze(0) if image.device.type == "cpu" else image.unsqueeze(0).float()
    out = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)[0]
    return out if out.dtype == torch.uint8 else _rounded(out).to(torch.uint8)


def crop_resize(images: Images, windows: ArrayLike, flip: ArrayLike, size: int,
                method: str = "auto") -> torch.Tensor:
    """Sample i's window ``windows[i] = (top, left, height, width)`` of ``images[i]`` resized to ``size x size``,
    mirrored where ``flip[i]``: uint8 ``[B,3,size,size]`` on the images' device."""
    batch, device, method = _checked(images, method)
    if method == "per_sample":  # the windows and flips read on the host: no device round trip
        out = batch[0].new_empty((len(batch), 3, size, size))
        for i, (t, l, h, w) in enumerate(_host(windows).reshape(-1, 4).tolist()):
            out[i] = _one(batch[i][:, t:t + h, l:l + w], size, size)
        flipped = np.flatnonzero(_host(flip))
        if flipped.size:
            at = _as_tensor(flipped, device, torch.int64)
            out[at] = out[at].flip(-1)
        return out
    win = _as_tensor(windows, device, torch.int64)
    mirror = _as_tensor(flip, device, torch.bool)
    top, left, height, width = win.unbind(1)
    zero = torch.zeros_like(top)
    full = torch.full_like(top, size)
    rows = resample_weights(top, height, full, zero, size, batch.shape[2], batch.shape[2] / size)
    cols = resample_weights(left, width, full, zero, size, batch.shape[3], batch.shape[3] / size, reverse=mirror)
    return _apply(batch, rows, cols)


def eval_geometry(sizes: np.ndarray, resize: int, size: int) -> np.ndarray:
    """torchvision's ``Resize(resize)`` (shorter side to ``resize``, the longer ``int(resize * long / short)``) then
    ``CenterCrop(size)``: int64 ``[B,4]`` = (resized height, resized width, crop top, crop left) per sample."""
    hw = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    out = np.empty((hw.shape[0], 4), dtype=np.int64)
    for i, (h, w) in enumerate(hw.tolist()):
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(resize * long / short)
        nh, nw = (resize, new_long) if h <= w else (new_long, resize)
        if nh < size or nw < size:
            raise ValueError(f"sample {i} of the batch: eval resize {resize} of a {h}x{w} image is smaller than the "
                             f"crop {size}")
        out[i] = (nh, nw, int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0)))
    return out


def resize_center_crop(images: Images, sizes: ArrayLike, resize: int, size: int,
                       method: str = "auto") -> torch.Tensor:
    """torchvision's ``Resize(resize)`` + ``CenterCrop(size)`` of each sample ``images[i][:, :H_i, :W_i]``
    (``sizes[i] = (H_i, W_i)``): uint8 ``[B,3,size,size]`` on the images' device."""
    batch, device, method = _checked(images, method)
    host_sizes = _host(sizes).astype(np.int64).reshape(-1, 2)
    geometry = eval_geometry(host_sizes, resize, size)
    if method == "per_sample":
        out = batch[0].new_empty((len(batch), 3, size, size))
        for i, ((h, w), (nh, nw, top, left)) in enumerate(zip(host_sizes.tolist(), geometry.tolist())):
            out[i] = _one(batch[i][:, :h, :w], nh, nw)[:, top:top + size, left:left + size]
        return out
    g = _as_tensor(geometry, device, torch.int64)
    zero = torch.zeros_like(g[:, 0])
    hw = _as_tensor(host_sizes, device, torch.int64)
    scale = host_sizes / geometry[:, :2]  # on the host: no device sync
    rows = resample_weights(zero, hw[:, 0], g[:, 0], g[:, 2], size, batch.shape[2], float(scale[:, 0].max()))
    cols = resample_weights(zero, hw[:, 1], g[:, 1], g[:, 3], size, batch.shape[3], float(scale[:, 1].max()))
    return _apply(batch, rows, cols)

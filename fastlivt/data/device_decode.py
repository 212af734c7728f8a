"""Batched decoding and per-sample crops on any torch device (the torch backend's work on a batch).

The crop windows and flips come from :mod:`fastlivt.data.sample_rng` (a pure function of seed, epoch and the
sample's position in the epoch), as in every backend.

* :func:`decode_batch`: JPEG bytes in one batched ``torchvision.io.decode_jpeg`` call on the device (nvJPEG on CUDA,
  libjpeg-turbo on CPU tensors); other encodings torchvision reads (PNG, GIF, WebP) on the CPU, then moved; anything
  else, or a decoder failure, is an :class:`UndecodableSample` naming the shard and member.
* :func:`crop_resize` (train: window -> size x size, then flip) and :func:`resize_center_crop` (eval: shorter side,
  then center crop) resample each sample on its device with antialiased bicubic interpolation, as torchvision's
  tensor transforms do, into one ``[B,3,S,S]`` batch of integer values (uint8 on the CPU, float32 on CUDA, whose
  bicubic kernels are float-only).
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_jpeg



# ---------------------------------------------------------------------------------------------------- decoding
class UndecodableSample(ValueError):
    """A sample's bytes cannot be decoded to an RGB image; the message names the shard, member and reason."""


def sniff(data: bytes) -> str:
    """The encoding of an image from its first bytes: jpeg | png | gif | webp | unknown."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "unknown"


def _checked(image: torch.Tensor, name: str) -> torch.Tensor:
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] == 0 or image.shape[2] == 0:
        raise UndecodableSample(f"{name}: decoded to shape {tuple(image.shape)}, not a 3-channel image")
    return image


def decode_batch(encoded: Sequence[torch.Tensor], names: Sequence[str], device: torch.device) -> List[torch.Tensor]:
    """Decode 1-d uint8 CPU tensors to uint8 RGB ``[3,H,W]`` tensors on ``device``.

    JPEGs go through one batched ``decode_jpeg(list, mode=RGB, device=device)``; PNG/GIF/WebP through
    ``decode_image`` on the CPU. ``names[i]`` (e.g. ``"train-00000.tar:000000042.jpg"``) names sample i in errors.
    """
    kinds = [sniff(bytes(t[:12].tolist())) for t in encoded]
    out: List[torch.Tensor] = [torch.empty(0)] * len(encoded)
    jpeg = [i for i, k in enumerate(kinds) if k == "jpeg"]
    for i, k in enumerate(kinds):
        if k == "unknown":
            head = bytes(encoded[i][:8].tolist())
            raise UndecodableSample(f"{names[i]}: not an image torchvision can decode (first bytes {head!r}; expected "
                                    f"JPEG, PNG, GIF or WebP)")
        if k != "jpeg":
            try:
                out[i] = _checked(decode_image(encoded[i], mode=ImageReadMode.RGB), names[i]).to(device)
            except RuntimeError as e:
                raise UndecodableSample(f"{names[i]}: corrupt {k.upper()} ({e})") from None
    if jpeg:
        try:
            decoded = decode_jpeg([encoded[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = None
        if decoded is None:  # find the sample that failed, for the message
            for i in jpeg:
                try:
                    decode_jpeg(encoded[i], mode=ImageReadMode.RGB, device=device)
                except RuntimeError as e:
                    raise UndecodableSample(f"{names[i]}: corrupt JPEG ({str(e).splitlines()[-1]})") from None
            raise UndecodableSample(f"{names[jpeg[0]]}..{names[jpeg[-1]]}: batched JPEG decoding failed on {device} "
                                    f"although every sample decodes alone")
        for i, image in zip(jpeg, decoded):
            out[i] = _checked(image, names[i])
    return out


# ---------------------------------------------------------------------------------------------------- resampling
def _resample(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``[3,h,w]`` -> ``[3,height,width]`` resized with antialiased bicubic (torchvision's tensor ``resize``):
    on the CPU torch's uint8 kernel (rounds and saturates itself), elsewhere float32 (rounded by the caller)."""
    if image.shape[1] == height and image.shape[2] == width:
        return image
    x = image.unsqueeze(0)
    if image.device.type != "cpu":
        x = x.float()
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True).squeeze(0)


def _batch_buffer(images: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    device = images[0].device
    dtype = torch.uint8 if device.type == "cpu" else torch.float32
    return torch.empty((len(images), 3, size, size), dtype=dtype, device=device)


def _quantised(out: torch.Tensor) -> torch.Tensor:
    """The float batch of a device rounded to 0..255 integers, like the CPU's uint8 batch (one pass per batch)."""
    return out if out.dtype == torch.uint8 else out.clamp_(0, 255).round_()


def crop_resize(images: Sequence[torch.Tensor], top: np.ndarray, left: np.ndarray, height: np.ndarray,
                width: np.ndarray, flip: np.ndarray, size: int) -> torch.Tensor:
    """Each ``images[i][:, top:top+height, left:left+width]`` resized to ``size x size``, mirrored where ``flip``:
    ``[B,3,size,size]`` of integer values 0..255 on the images' device (uint8 on the CPU, float32 elsewhere)."""
    out = _batch_buffer(images, size)
    for i, image in enumerate(images):
        t, l, h, w = int(top[i]), int(left[i]), int(height[i]), int(width[i])
        out[i] = _resample(image[:, t:t + h, l:l + w], size, size)
    flipped = torch.from_numpy(np.flatnonzero(flip)).to(out.device)
    if flipped.numel():
        out[flipped] = out[flipped].flip(-1)
    return _quantised(out)


def resize_center_crop(images: Sequence[torch.Tensor], resize: int, size: int) -> torch.Tensor:
    """torchvision's ``Resize(resize)`` (shorter side; the longer one ``int(resize * long / short)``) then
    ``CenterCrop(size)``, per sample; ``[B,3,size,size]`` as :func:`crop_resize` returns it."""
    out = _batch_buffer(images, size)
    for i, image in enumerate(images):
        h, w = int(image.shape[1]), int(image.shape[2])
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(resize * long / short)
        nh, nw = (resize, new_long) if h <= w else (new_long, resize)
        if nh < size or nw < size:
            raise ValueError(f"eval resize {resize} of a {h}x{w} image is smaller than the crop {size}")
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        out[i] = _resample(image, nh, nw)[:, top:top + size, left:left + size]
    return _quantised(out)

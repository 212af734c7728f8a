"""Batched JPEG decoding on any torch device: what a backend that hands over encoded bytes runs on the device before
the shared crop (:mod:`fastlivt.data.device_crop`).

* :func:`decode_batch`: JPEG bytes in one batched ``torchvision.io.decode_jpeg`` call on the device (nvJPEG on CUDA,
  libjpeg-turbo on CPU tensors); other encodings torchvision reads (PNG, GIF, WebP) on the CPU, then moved; anything
  else, or a decoder failure, is an :class:`UndecodableSample` naming the shard and member.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
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

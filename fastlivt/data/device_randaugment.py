"""timm's RandAugment (``rand-m9-mstd0.5-inc1`` and the other 'increasing' policies) per sample, on a batch, on any
torch device.

The host draws each sample's parameters (:func:`fastlivt.data.sample_rng.rand_augment_draws`, a pure function of
seed, epoch and position); :func:`device_rand_augment` applies them to a uint8 ``[B,3,H,W]`` batch with a fixed number
of tensor operations whatever B is: for each of the ``layers`` op slots, every op family runs on the whole batch and
each sample keeps its own op's result (``torch.where``), or (the default) on the gathered samples that drew it, whose
indices the host finds from the draws:

* the look-up-table ops (AutoContrast, Equalize, Invert, PosterizeIncreasing, SolarizeIncreasing, SolarizeAdd) and
  the enhance ops (Color/Contrast/Brightness/SharpnessIncreasing): :mod:`fastlivt.data.device_ra_color`;
* the geometric ops (Rotate, ShearX/Y, TranslateXRel/YRel), one affine resampling with per-sample matrices and
  bilinear/bicubic filter, filled with timm's ``img_mean``: :mod:`fastlivt.data.device_ra_geometry`.

Op arguments follow timm's ``LEVEL_TO_ARG`` in float64 (``auto_augment.py``): rotate ``m/10*30`` degrees, shear
``m/10*0.3``, translate ``m/10*0.45`` of the width/height, enhance ``max(0.1, 1 +/- m/10*0.9)``, posterize
``4 - int(m/10*4)`` bits, solarize at ``256 - min(256, int(m/10*256))``, solarize_add ``min(128, int(m/10*110))``;
the sign where timm negates.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fastlivt.config import ConfigError
from fastlivt.data.device_ra_color import enhance_ops, lut_ops
from fastlivt.data.device_ra_geometry import affine_matrices, affine_transform
from fastlivt.data.sample_rng import RandAugmentDraws, rand_augment_draws

# timm's _RAND_INCREASING_TRANSFORMS, in its order (op index = position)
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
       "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
       "TranslateXRel", "TranslateYRel")
# per op: (family, code in the family's function); families: 0 look-up table, 1 enhance, 2 geometric
_FAMILY = np.array([0, 0, 0, 2, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
_CODE = np.array([1, 2, 3, 1, 4, 5, 6, 1, 2, 0, 3, 2, 3, 4, 5])


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A parsed timm ``rand-...`` config: ``layers`` ops per image, each applied with ``prob``, magnitude
    ``magnitude`` +- ``magnitude_std`` clipped to ``[0, magnitude_max]``."""

    layers: int = 2
    prob: float = 0.5
    magnitude: float = 10.0
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0


def parse_policy(config: str) -> RandAugmentPolicy:
    """Parse ``config`` as timm's ``rand_augment_transform`` does; only the increasing op set (``inc1``) exists
    here. Raises ConfigError naming ``data.auto_augment`` otherwise."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise ConfigError(f"data.auto_augment: only RandAugment policies ('rand-...') are supported, got {config!r}")
    fields, increasing = {}, False
    for part in parts[1:]:
        key_val = re.split(r"(\d.*)", part)
        if part.startswith("t") or len(key_val) < 2 or key_val[0] not in ("m", "n", "p", "mstd", "mmax", "inc"):
            raise ConfigError(f"data.auto_augment: unsupported RandAugment setting {part!r} in {config!r}")
        key, val = key_val[:2]
        if key == "inc":
            increasing = bool(int(val))
        else:
            fields[key] = float(val)
    if not increasing:
        raise ConfigError(f"data.auto_augment: the device RandAugment implements timm's increasing op set only; "
                          f"add '-inc1' to {config!r}")
    std = fields.get("mstd", 0.0)
    return RandAugmentPolicy(layers=int(fields.get("n", 2)), prob=fields.get("p", 0.5),
                             magnitude=float(int(fields.get("m", 10))),
                             magnitude_std=float("inf") if std > 100 else std,
                             magnitude_max=float(int(fields.get("mmax", 10)) or 10))  # timm: ``magnitude_max or 10``


def draw(policy: RandAugmentPolicy, keys: np.ndarray, interpolation: str = "bicubic") -> RandAugmentDraws:
    """The samples' draws under ``policy`` (host side, :func:`fastlivt.data.sample_rng.rand_augment_draws`)."""
    return rand_augment_draws(keys, len(OPS), policy.layers, policy.prob, policy.magnitude, policy.magnitude_std,
                              policy.magnitude_max, interpolation)


def img_mean(mean: Sequence[float]) -> Tuple[int, int, int]:
    """timm's fill colour for a normalisation mean in [0, 1]: ``min(255, round(255 * m))`` per channel."""
    return tuple(min(255, round(255 * m)) for m in mean)


@dataclass
class DeviceDraws:
    """:class:`RandAugmentDraws` as tensors on the device: ``ops`` int64, ``applied``/``negate``/``bicubic`` bool,
    ``magnitude`` float64, each ``[B, layers]``; ``members[slot][family]``: int64 indices of the samples whose op in
    that slot is applied and of that family (0 look-up table, 1 enhance, 2 geometric), found on the host from the
    draws, so the device never waits to learn a subset's size."""

    ops: torch.Tensor
    applied: torch.Tensor
    magnitude: torch.Tensor
    negate: torch.Tensor
    bicubic: torch.Tensor
    members: List[List[torch.Tensor]]

    @classmethod
    def from_draws(cls, d: RandAugmentDraws, device: torch.device) -> "DeviceDraws":
        """Copy ``d`` to ``device`` (through pinned memory without waiting, on CUDA)."""
        device = torch.device(device)
        pin = device.type == "cuda"

        def put(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a))
            return t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)

        family = np.where(d.applied, _FAMILY[d.ops], -1)
        members = [[put(np.flatnonzero(family[:, slot] == f)) for f in range(3)] for slot in range(d.ops.shape[1])]
        return cls(put(d.ops), put(d.applied), put(d.magnitude), put(d.negate), put(d.bicubic), members)


def _slot_arguments(op: torch.Tensor, applied: torch.Tensor, mag: torch.Tensor, negate: torch.Tensor,
                    height: int, width: int) -> Tuple[torch.Tensor, ...]:
    """Per sample of one slot: (family, code, integer argument, enhance factor, geometric value), with timm's
    level-to-argument arithmetic in float64; a sample whose op is not applied gets family -1."""
    dev = op.device
    family = torch.where(applied, torch.as_tensor(_FAMILY, device=dev)[op], -1)
    code = torch.as_tensor(_CODE, device=dev)[op]
    level = mag / torch.full_like(mag, 10.0)  # true division (a scalar divisor may become a reciprocal multiply)
    sign = torch.where(negate, -1.0, 1.0)  # read by the ops timm negates only (enhance, geometric)
    posterize_bits = 4 - torch.trunc(level * 4).long()
    solarize_thresh = 256 - torch.trunc(level * 256).long().clamp_max(256)
    solarize_add = torch.trunc(level * 110).long().clamp_max(128)
    int_arg = torch.where(code == 4, posterize_bits, torch.where(code == 5, solarize_thresh, solarize_add))
    factor = (1.0 + sign * (level * 0.9)).clamp_min(0.1)
    size = torch.where(code == 4, float(width), float(height))
    geo_value = sign * torch.where(code == 1, level * 30.0, torch.where(code >= 4, (level * 0.45) * size, level * 0.3))
    return family, code, int_arg, factor, geo_value


def _apply_family(out: torch.Tensor, img: torch.Tensor, mask: torch.Tensor, members: Optional[torch.Tensor],
                  op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``out`` with the samples of ``mask`` replaced by ``op(their images, their indices)``: on the gathered
    ``members`` (the indices where ``mask`` holds) and put back, or, when ``members`` is None, on the whole batch and
    selected with ``torch.where``."""
    if members is not None:
        return out.index_put((members,), op(img.index_select(0, members), members))
    idx = torch.arange(img.shape[0], device=img.device)
    return torch.where(mask.view(-1, 1, 1, 1), op(img, idx), out)


def device_rand_augment(images: torch.Tensor, draws: DeviceDraws, fill: Sequence[int],
                        geometry_dtype: torch.dtype = torch.float64, channels_last: bool = False,
                        compact: bool = True) -> torch.Tensor:
    """timm's RandAugment with each sample's ``draws`` on uint8 images ``[B,3,H,W]`` (``[B,H,W,3]`` when
    ``channels_last``), same layout out; ``fill`` = timm's ``img_mean``.

    ``compact``: each op family runs on the samples that drew it only (``draws.members``: their count sets the
    tensors' sizes, not the number of operations); otherwise every family runs on the whole batch (the same result,
    about ``layers`` x 3 times the work)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[3 if channels_last else 1] != 3:
        raise ValueError(f"device RandAugment expects uint8 RGB images, got {images.dtype} {tuple(images.shape)}")
    img = images if channels_last else images.permute(0, 2, 3, 1)
    img = img.contiguous()
    _, h, w, _ = img.shape
    for slot in range(draws.ops.shape[1]):
        family, code, int_arg, factor, geo_value = _slot_arguments(
            draws.ops[:, slot], draws.applied[:, slot], draws.magnitude[:, slot], draws.negate[:, slot], h, w)
        bicubic = draws.bicubic[:, slot]
        members = draws.members[slot] if compact else [None, None, None]
        if compact:
            out = _apply_family(img, img, family == 0, members[0], lambda sub, i: lut_ops(sub, code[i], int_arg[i]))
        else:  # table 0 is the identity: the samples of the other families pass through
            out = lut_ops(img, torch.where(family == 0, code, 0), int_arg)
        out = _apply_family(out, img, family == 1, members[1], lambda sub, i: enhance_ops(sub, code[i], factor[i]))
        img = _apply_family(out, img, family == 2, members[2], lambda sub, i: affine_transform(
            sub, affine_matrices(code[i], geo_value[i], h, w), bicubic[i], fill, geometry_dtype))
    return img if channels_last else img.permute(0, 3, 1, 2).contiguous()

"""timm's RandAugment (``rand-m9-mstd0.5-inc1`` and the other 'increasing' policies) per sample, on a batch, on any
torch device.

The host draws each sample's parameters (:func:`fastlivt.data.sample_rng.rand_augment_draws`, a pure function of
seed, epoch and position) and splits each of the ``layers`` op slots' applied samples into :data:`GROUPS` (the ops
that share one function, and for a geometric op its filter). :func:`device_rand_augment` applies them to a uint8
``[B,3,H,W]`` batch with a fixed number of tensor operations whatever B is: for each slot, every group's function runs
on the gathered samples of that group (their indices found on the host, so the device never waits to learn a subset's
size), or, with ``compact=False``, on the whole batch, each sample keeping its own group's result (``torch.where``):

* table ops (Invert, PosterizeIncreasing, SolarizeIncreasing, SolarizeAdd, BrightnessIncreasing), histogram ops
  (AutoContrast, Equalize), ContrastIncreasing (one table per sample, from its mean grey level), ColorIncreasing and
  SharpnessIncreasing (per-pixel blends): :mod:`fastlivt.data.device_ra_color`;
* the geometric ops, one affine resampling with per-sample matrices, filled with timm's ``img_mean``, grouped by the
  axes they move (ShearX/TranslateXRel: x; ShearY/TranslateYRel: y; Rotate: both) and filter:
  :mod:`fastlivt.data.device_ra_geometry`.

Op arguments follow timm's ``LEVEL_TO_ARG`` in float64 (``auto_augment.py``): rotate ``m/10*30`` degrees, shear
``m/10*0.3``, translate ``m/10*0.45`` of the width/height, enhance ``max(0.1, 1 +/- m/10*0.9)``, posterize
``4 - int(m/10*4)`` bits, solarize at ``256 - min(256, int(m/10*256))``, solarize_add ``min(128, int(m/10*110))``;
the sign where timm negates.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from fastlivt.config import ConfigError
from fastlivt.data.device_constants import constant
from fastlivt.data import device_ra_color as cops
from fastlivt.data.device_ra_geometry import affine_matrices, resample
from fastlivt.data.sample_rng import RandAugmentDraws, rand_augment_draws

# timm's _RAND_INCREASING_TRANSFORMS, in its order (op index = position)
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
       "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
       "TranslateXRel", "TranslateYRel")
# the groups a slot's applied samples are split into; each runs one function (device_rand_augment's _run_group)
GROUPS = ("table", "histogram", "contrast", "color", "sharpness",
          "x bilinear", "x bicubic", "y bilinear", "y bicubic", "xy bilinear", "xy bicubic")
_FIRST_GEOMETRIC = GROUPS.index("x bilinear")
# the filters each interpolation setting draws from (timm's 'random' = a choice per op)
FILTERS = {"bilinear": ("bilinear",), "bicubic": ("bicubic",), "random": ("bilinear", "bicubic")}
# per op: its group (a geometric op's bilinear one; bicubic is the next) and its code in the group's function (table
# kind, or affine_matrices' kind)
_GROUP = np.array([1, 1, 0, 9, 0, 0, 0, 3, 2, 0, 4, 5, 7, 5, 7])
_CODE = np.array([cops.AUTOCONTRAST, cops.EQUALIZE, cops.INVERT, 1, cops.POSTERIZE, cops.SOLARIZE, cops.SOLARIZE_ADD,
                  0, cops.CONTRAST, cops.BRIGHTNESS, 0, 2, 3, 4, 5])


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


def sample_groups(d: RandAugmentDraws) -> np.ndarray:
    """int64 ``[B, layers]``: each sample's group (index in :data:`GROUPS`) per slot, -1 where its op is not applied."""
    bicubic = (_GROUP[d.ops] >= _FIRST_GEOMETRIC) & d.bicubic
    return np.where(d.applied, _GROUP[d.ops] + bicubic, -1)


@dataclass
class DeviceDraws:
    """:class:`RandAugmentDraws` as tensors on the device: ``ops`` and ``group`` (:func:`sample_groups`) int64,
    ``applied``/``negate`` bool, ``magnitude`` float64, each ``[B, layers]``; ``members[slot][g]``: int64 indices of
    the samples of group ``g`` in that slot, found on the host from the draws, so the device never waits to learn a
    subset's size; ``groups``: the groups the draws' interpolation setting can produce (the others are not run, so
    the number of operations depends on that setting, never on the batch)."""

    ops: torch.Tensor
    applied: torch.Tensor
    magnitude: torch.Tensor
    negate: torch.Tensor
    group: torch.Tensor
    members: List[List[torch.Tensor]]
    groups: Tuple[int, ...] = tuple(range(len(GROUPS)))

    @classmethod
    def from_draws(cls, d: RandAugmentDraws, device: torch.device, interpolation: str = "random") -> "DeviceDraws":
        """Copy ``d`` (drawn with ``interpolation``: 'bilinear', 'bicubic' or 'random') to ``device`` (through pinned
        memory without waiting, on CUDA)."""
        if interpolation not in FILTERS:
            raise ValueError(f"RandAugment interpolation must be one of {sorted(FILTERS)}, got {interpolation!r}")
        groups = tuple(g for g, name in enumerate(GROUPS)
                       if g < _FIRST_GEOMETRIC or name.split()[1] in FILTERS[interpolation])
        device = torch.device(device)
        pin = device.type == "cuda"

        def put(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a))
            return t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)

        group = sample_groups(d)
        stray = np.isin(group, [g for g in range(len(GROUPS)) if g not in groups])
        if stray.any():
            raise ValueError(f"RandAugment draws use the group {GROUPS[group[stray][0]]!r}, which interpolation "
                             f"{interpolation!r} does not draw")
        members = [[put(np.flatnonzero(group[:, slot] == g)) for g in range(len(GROUPS))]
                   for slot in range(d.ops.shape[1])]
        return cls(put(d.ops), put(d.applied), put(d.magnitude), put(d.negate), put(group), members, groups)


@dataclass
class _SlotArguments:
    """Per sample of one slot: code in its group's function, integer argument (posterize bits, solarize threshold,
    solarize_add), enhance factor, affine matrix (:func:`affine_matrices` of the rotation degrees, shear or pixels)."""

    code: torch.Tensor
    int_arg: torch.Tensor
    factor: torch.Tensor
    matrix: torch.Tensor

    def subset(self, index: Optional[torch.Tensor]) -> "_SlotArguments":
        if index is None:
            return self
        return _SlotArguments(*(t.index_select(0, index) for t in (self.code, self.int_arg, self.factor,
                                                                    self.matrix)))


def _slot_arguments(op: torch.Tensor, mag: torch.Tensor, negate: torch.Tensor, height: int,
                    width: int) -> _SlotArguments:
    """timm's level-to-argument arithmetic in float64 for every sample of one slot."""
    dev = op.device
    code = constant(tuple(int(c) for c in _CODE), torch.int64, dev)[op]
    level = mag / torch.full_like(mag, 10.0)  # true division (a scalar divisor may become a reciprocal multiply)
    sign = torch.where(negate, -1.0, 1.0)  # read by the ops timm negates only (enhance, geometric)
    posterize_bits = 4 - torch.trunc(level * 4).long()
    solarize_thresh = 256 - torch.trunc(level * 256).long().clamp_max(256)
    solarize_add = torch.trunc(level * 110).long().clamp_max(128)
    int_arg = torch.where(code == cops.POSTERIZE, posterize_bits,
                          torch.where(code == cops.SOLARIZE, solarize_thresh, solarize_add))
    factor = (1.0 + sign * (level * 0.9)).clamp_min(0.1)
    size = torch.where(code == 4, float(width), float(height))
    geo_value = sign * torch.where(code == 1, level * 30.0, torch.where(code >= 4, (level * 0.45) * size, level * 0.3))
    return _SlotArguments(code, int_arg, factor, affine_matrices(code, geo_value, height, width))


def _run_group(group: int, img: torch.Tensor, a: _SlotArguments, fill: Sequence[int],
               geometry_dtype: torch.dtype) -> torch.Tensor:
    """Group ``group``'s function on uint8 ``[k,H,W,3]`` with its samples' arguments ``a``."""
    name = GROUPS[group]
    if name == "table":
        return cops.apply_tables(img, cops.value_tables(a.code, a.int_arg, a.factor))
    if name == "histogram":
        index = cops.table_index(img)
        return cops.apply_tables(img, cops.histogram_tables(a.code, cops.histograms(index)), index)
    if name == "contrast":
        return cops.apply_tables(img, cops.blend_tables(cops.mean_grey_level(img), a.factor))
    if name == "color":
        return cops.color(img, a.factor)
    if name == "sharpness":
        return cops.sharpness(img, a.factor)
    axes, interpolation = name.split()
    return resample(img, a.matrix, axes, interpolation == "bicubic", fill, geometry_dtype)


def default_geometry_dtype(device: torch.device) -> torch.dtype:
    """The geometric ops' arithmetic when none is asked for: float64 (Pillow's, value for value) on an accelerator;
    float32 on a CPU, where float64 costs more than Pillow itself and float32 moves a value by at most one level."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.float64


def device_rand_augment(images: torch.Tensor, draws: DeviceDraws, fill: Sequence[int],
                        geometry_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
                        compact: bool = True) -> torch.Tensor:
    """timm's RandAugment with each sample's ``draws`` on uint8 images ``[B,3,H,W]`` (``[B,H,W,3]`` when
    ``channels_last``), same layout out; ``fill`` = timm's ``img_mean``; ``geometry_dtype`` None:
    :func:`default_geometry_dtype` of the images' device.

    ``compact``: each group's function runs on the samples of the group only (``draws.members``: their count sets
    the tensors' sizes, not the number of operations); otherwise on the whole batch (the same result, about
    ``layers`` x ``len(GROUPS)`` times the work)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[3 if channels_last else 1] != 3:
        raise ValueError(f"device RandAugment expects uint8 RGB images, got {images.dtype} {tuple(images.shape)}")
    img = (images if channels_last else images.permute(0, 2, 3, 1)).clone(memory_format=torch.contiguous_format)
    geometry_dtype = geometry_dtype or default_geometry_dtype(img.device)
    _, h, w, _ = img.shape
    for slot in range(draws.ops.shape[1]):
        args = _slot_arguments(draws.ops[:, slot], draws.magnitude[:, slot], draws.negate[:, slot], h, w)
        if compact:  # the groups are disjoint: each reads and writes back its own samples of ``img``
            for g in draws.groups:
                members = draws.members[slot][g]
                result = _run_group(g, img.index_select(0, members), args.subset(members), fill, geometry_dtype)
                _as_words(img).index_put_((members,), _as_words(result))
            continue
        out = img
        for g in draws.groups:
            mask = (draws.group[:, slot] == g).view(-1, 1, 1, 1)
            out = torch.where(mask, _run_group(g, img, args, fill, geometry_dtype), out)
        img = out
    return img if channels_last else img.permute(0, 3, 1, 2).contiguous()


def _as_words(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[k, ...]`` viewed as ``[k, bytes / size]`` of the widest integer type whose size divides an image's
    bytes: ``index_put_`` copies element by element, 8 bytes at a time instead of 1."""
    per_image = math.prod(images.shape[1:])
    word = next(dtype for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)
                if per_image % dtype.itemsize == 0)
    return images.view(images.shape[0], per_image).view(word)

"""How close the device RandAugment (:mod:`fastlivt.data.device_randaugment`) is to timm's own PIL code, given the
same draws: the reference runner, the test images, the per-op figures.

:func:`timm_reference` runs timm's ``rand_augment_transform(config, hparams)`` ops on one PIL image with the sample's
draws scripted into timm's module-level ``random`` (the ``prob`` test, ``gauss`` magnitude, ``_randomly_negate``,
``_interpolation``'s choice), so both implementations see identical parameters. :func:`fidelity_table` measures each of
the 15 ops (forced, applied, with the policy's magnitude noise and signs) and the whole policy, over
:func:`fidelity_images`: Fashion-MNIST pictures tinted to RGB and resized (when the dataset is on disk), plus synthetic
gradient/noise/shape images.
"""
from __future__ import annotations

import gzip
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa
from torch.utils._python_dispatch import TorchDispatchMode

from fastlivt.config import ConfigError
from fastlivt.data import device_randaugment as dra
from fastlivt.data.sample_rng import RandAugmentDraws, sample_keys

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
INTEGER_OPS = ("AutoContrast", "Equalize", "Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd")
ENHANCE_OPS = ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def timm_rand_augment(config: str, img_size: int, mean: Sequence[float],
                      interpolation: str = "bicubic") -> timm_aa.RandAugment:
    """timm's RandAugment for ``config`` with the hyper-parameters ``transforms_imagenet_train`` passes it (the
    reference the device implementation is measured against)."""
    from timm.data.transforms import str_to_pil_interp

    if not config.startswith("rand"):
        raise ConfigError(f"data.auto_augment: only RandAugment policies ('rand-...') are supported, got {config!r}")
    hparams = dict(translate_const=int(img_size * 0.45), img_mean=dra.img_mean(mean))
    if interpolation and interpolation != "random":
        hparams["interpolation"] = str_to_pil_interp(interpolation)
    return timm_aa.rand_augment_transform(config, hparams)


class _ScriptedRandom:
    """Stands in for timm's ``random`` during one op: answers its calls from one sample's draws."""

    def __init__(self, applied: bool, magnitude: float, negate: bool, bicubic: bool):
        self._uniform = [0.0 if applied else 1.0, 1.0 if negate else 0.0]  # prob test, then _randomly_negate
        self._magnitude, self._bicubic = float(magnitude), bool(bicubic)

    def random(self) -> float:
        return self._uniform.pop(0)

    def gauss(self, mu: float, sigma: float) -> float:
        return self._magnitude

    def uniform(self, low: float, high: float) -> float:
        return self._magnitude

    def choice(self, seq):
        return seq[1] if self._bicubic else seq[0]  # timm's _RANDOM_INTERPOLATION = (BILINEAR, BICUBIC)


@contextmanager
def _scripted(rng: _ScriptedRandom) -> Iterator[None]:
    saved = timm_aa.random
    timm_aa.random = rng
    try:
        yield
    finally:
        timm_aa.random = saved


def timm_reference(ra: timm_aa.RandAugment, image: np.ndarray, draws: RandAugmentDraws, row: int) -> np.ndarray:
    """timm's ops ``ra.ops[draws.ops[row, k]]`` in order on uint8 HWC ``image``, with the row's draws."""
    pil = Image.fromarray(image)
    for k in range(draws.ops.shape[1]):
        rng = _ScriptedRandom(draws.applied[row, k], draws.magnitude[row, k], draws.negate[row, k],
                              draws.bicubic[row, k])
        with _scripted(rng):
            pil = ra.ops[int(draws.ops[row, k])](pil)
    return np.asarray(pil)


def _synthetic(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    out = []
    for _ in range(n):
        img = rng.uniform(0, 255, 3) * (1 - x[..., None]) * rng.uniform(0.3, 1) + rng.uniform(0, 255, 3) * y[..., None]
        cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
        disc = ((y - cy) ** 2 + (x - cx) ** 2) < r * r
        img[disc] = rng.uniform(0, 255, 3)
        img = img / 2 + rng.normal(0, 12, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def fidelity_images(n: int, size: int, seed: int = 0, real_fraction: float = 0.75) -> np.ndarray:
    """uint8 ``[n,size,size,3]``: ``real_fraction`` of them Fashion-MNIST test images (tinted to RGB,
    bicubic-resized) when the dataset is on disk, the rest synthetic."""
    rng = np.random.default_rng(seed)
    real = 0
    parts: List[np.ndarray] = []
    if FASHION_MNIST.exists():
        real = int(n * real_fraction)
        with gzip.open(FASHION_MNIST, "rb") as f:
            raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
        for k in rng.choice(len(raw), real, replace=False):
            grey = raw[k].astype(np.float64)[..., None] / 255.0
            ink, paper = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            rgb = np.clip(paper * (1 - grey) + ink * grey, 0, 255).astype(np.uint8)
            parts.append(np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))[None])
    if n > real:
        parts.append(_synthetic(n - real, size, rng))
    return np.concatenate(parts)


def diff_figures(ours: np.ndarray, ref: np.ndarray) -> Dict[str, float]:
    """max abs diff, % of values within 1 level, mean abs diff, PSNR (dB; inf when identical)."""
    d = np.abs(ours.astype(np.int64) - ref.astype(np.int64))
    mse = float(np.mean(d.astype(np.float64) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
    return {"max": int(d.max()), "within1": 100.0 * float(np.mean(d <= 1)), "mean": float(d.mean()), "psnr": psnr}


def compare(ra: timm_aa.RandAugment, images: np.ndarray, draws: RandAugmentDraws, fill: Sequence[int],
            **device_kwargs) -> Dict[str, float]:
    """Figures of the device output against timm's for ``images`` (uint8 NHWC) with ``draws``."""
    ours = dra.device_rand_augment(torch.from_numpy(images), dra.DeviceDraws.from_draws(draws, torch.device("cpu")),
                                   fill, channels_last=True, **device_kwargs).numpy()
    ref = np.stack([timm_reference(ra, images[i], draws, i) for i in range(len(images))])
    return diff_figures(ours, ref)


def forced(draws: RandAugmentDraws, op: int) -> RandAugmentDraws:
    """A copy of ``draws`` with op ``op`` applied in the first slot and nothing in the others (magnitudes, signs and
    filters kept)."""
    applied = np.zeros_like(draws.applied)
    applied[:, 0] = True
    return RandAugmentDraws(np.full_like(draws.ops, op), applied, draws.magnitude.copy(), draws.negate.copy(),
                            draws.bicubic.copy())


def fidelity_table(config: str = "rand-m9-mstd0.5-inc1", n: int = 64, size: int = 64, seed: int = 0,
                   mean: Sequence[float] = (0.485, 0.456, 0.406),
                   geometry_dtype: torch.dtype = torch.float64) -> Dict[str, Dict[str, float]]:
    """Per op (and 'pipeline' for the whole policy): :func:`diff_figures` of device vs timm over ``n`` images, with
    the policy's draws and bilinear/bicubic at random."""
    fill = dra.img_mean(mean)
    ra = timm_rand_augment(config, size, mean, "random")
    images = fidelity_images(n, size, seed)
    draws = dra.draw(dra.parse_policy(config), sample_keys(seed, 0, np.arange(n)), "random")
    table = {name: compare(ra, images, forced(draws, k), fill, geometry_dtype=geometry_dtype)
             for k, name in enumerate(dra.OPS)}
    table["pipeline"] = compare(ra, images, draws, fill, geometry_dtype=geometry_dtype)
    return table


def markdown(table: Dict[str, Dict[str, float]]) -> str:
    """The table as Markdown rows: op | max abs diff | % within 1 | mean abs diff | PSNR."""
    lines = ["| op | max abs diff | % values within 1 | mean abs diff | PSNR (dB) |", "|---|---|---|---|---|"]
    for name, f in table.items():
        psnr = "identical" if f["psnr"] == float("inf") else f"{f['psnr']:.1f}"
        lines.append(f"| {name} | {f['max']} | {f['within1']:.3f} | {f['mean']:.4f} | {psnr} |")
    return "\n".join(lines)


class _OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn: Callable[[], object]) -> int:
    """Number of aten operations ``fn()`` dispatches (on CPU tensors: each one a kernel launch on a GPU)."""
    with _OpCounter() as counter:
        fn()
    return counter.count


def count_ops(images: torch.Tensor, draws: dra.DeviceDraws, fill: Sequence[int], **device_kwargs) -> int:
    """Number of aten operations one :func:`~fastlivt.data.device_randaugment.device_rand_augment` call dispatches."""
    return dispatched_ops(lambda: dra.device_rand_augment(images, draws, fill, **device_kwargs))


def time_batch(batch: int, size: int, device: torch.device, repeats: int = 5,
               config: str = "rand-m9-mstd0.5-inc1") -> Dict[str, float]:
    """Best-of-``repeats`` milliseconds of device RandAugment on a ``[batch,3,size,size]`` uint8 batch (host draws
    and their copy included), and its aten operation count."""
    import time

    images = torch.from_numpy(fidelity_images(batch, size)).permute(0, 3, 1, 2).contiguous().to(device)
    keys = sample_keys(0, 0, np.arange(batch))
    policy = dra.parse_policy(config)

    def once() -> dra.DeviceDraws:
        draws = dra.DeviceDraws.from_draws(dra.draw(policy, keys, "bicubic"), device, "bicubic")
        dra.device_rand_augment(images, draws, (124, 116, 104))
        return draws

    draws = once()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        once()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return {"ms_per_batch": 1000 * best, "ops_per_batch": count_ops(images, draws, (124, 116, 104))}

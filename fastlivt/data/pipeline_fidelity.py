"""How close the device pipeline is to torchvision's and timm's PIL pipeline, given the same draws: the crop-resize
(train and eval) and the whole BFT image pipeline (RandomResizedCrop + flip + RandAugment).

The reference for each sample is what timm's ``transforms_imagenet_train`` does to a PIL image with the sample's own
parameters: ``F.resized_crop(img, top, left, height, width, size, BICUBIC)`` (timm's
``RandomResizedCropAndInterpolation``, torchvision's ``RandomResizedCrop``), ``hflip`` when drawn, then timm's
RandAugment ops with the sample's draws (:func:`fastlivt.data.ra_fidelity.timm_reference`); for eval torchvision's
``Resize`` + ``CenterCrop``. The images (:func:`pipeline_images`) are real pictures (Fashion-MNIST, tinted to RGB, when
it is on disk; synthetic ones otherwise), resized to varied shapes so that crops go both up and down in scale.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from fastlivt.data import device_crop as dc
from fastlivt.data import device_randaugment as dra
from fastlivt.data.ra_fidelity import diff_figures, fidelity_images, timm_rand_augment, timm_reference
from fastlivt.data.sample_rng import sample_keys, train_params

MEAN = (0.485, 0.456, 0.406)


def pipeline_images(n: int, seed: int = 0, low: int = 48, high: int = 160) -> List[torch.Tensor]:
    """``n`` uint8 ``[3,H,W]`` images, H and W uniform in ``[low, high]``: real pictures when Fashion-MNIST is on disk."""
    rng = np.random.default_rng(seed)
    base = fidelity_images(n, high, seed, real_fraction=1.0)
    out = []
    for k in range(n):
        h, w = (int(v) for v in rng.integers(low, high + 1, 2))
        out.append(torch.from_numpy(np.array(Image.fromarray(base[k]).resize((w, h), Image.BICUBIC))).permute(2, 0, 1))
    return out


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())


def reference_crops(images: Sequence[torch.Tensor], windows: np.ndarray, flips: np.ndarray,
                    size: int) -> np.ndarray:
    """uint8 ``[B,size,size,3]``: torchvision's PIL ``resized_crop`` (bicubic) of each window, mirrored where drawn."""
    out = []
    for image, (t, l, h, w), f in zip(images, windows.tolist(), flips.tolist()):
        pil = TF.resized_crop(_pil(image), t, l, h, w, [size, size], InterpolationMode.BICUBIC)
        out.append(np.array(TF.hflip(pil) if f else pil))
    return np.stack(out)


def pipeline_table(n: int = 256, size: int = 112, eval_resize: int = 128, config: str = "rand-m9-mstd0.5-inc1",
                   seed: int = 0) -> Dict[str, Dict[str, float]]:
    """:func:`~fastlivt.data.ra_fidelity.diff_figures` of each device path against its PIL reference over ``n``
    images: crop + flip and eval resize + center crop (both ways of applying the weights), and the BFT pipeline."""
    images = pipeline_images(n, seed)
    positions = np.arange(n)
    heights = np.array([im.shape[1] for im in images])
    widths = np.array([im.shape[2] for im in images])
    p = train_params(seed, 0, positions, heights, widths, (0.08, 1.0))
    crops_ref = reference_crops(images, p.windows, p.flip, size)
    table: Dict[str, Dict[str, float]] = {}
    for method in ("matmul", "per_sample"):
        ours = dc.crop_resize(images, p.windows, p.flip, size, method=method)
        table[f"RandomResizedCrop + flip ({method})"] = diff_figures(ours.permute(0, 2, 3, 1).numpy(), crops_ref)
    tf = T.Compose([T.Resize(eval_resize, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(size)])
    eval_ref = np.stack([np.array(tf(_pil(im))) for im in images])
    sizes = np.stack([heights, widths], 1)
    for method in ("matmul", "per_sample"):
        ours = dc.resize_center_crop(images, sizes, eval_resize, size, method=method)
        table[f"eval Resize + CenterCrop ({method})"] = diff_figures(ours.permute(0, 2, 3, 1).numpy(), eval_ref)
    ra = timm_rand_augment(config, size, MEAN, "bicubic")
    draws = dra.draw(dra.parse_policy(config), sample_keys(seed, 0, positions), "bicubic")
    crops = dc.crop_resize(images, p.windows, p.flip, size, method="matmul")
    ours = dra.device_rand_augment(crops.permute(0, 2, 3, 1).contiguous(),
                                   dra.DeviceDraws.from_draws(draws, torch.device("cpu")), dra.img_mean(MEAN),
                                   channels_last=True).numpy()
    ref = np.stack([timm_reference(ra, crops_ref[i], draws, i) for i in range(n)])
    table["BFT pipeline: crop + flip + RandAugment"] = diff_figures(ours, ref)
    return table

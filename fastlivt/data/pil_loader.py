"""PIL decoding + torchvision/timm transforms in ``torch.utils.data.DataLoader`` workers: the reference loader.

Not a ``data.backend``: the correctness reference of the tests and the baseline of ``fastlivt bench data`` — the way
LiVT's and MAE's own code load data (transforms in the workers ending with ``ToTensor`` + ``Normalize``), reading
the encoded images from the webdataset shards by offset (:class:`~fastlivt.data.shards.ShardReader`) in the order
of the same sampler plan as the backends.

* pretrain: ``RandomResizedCrop(scale=data.rrc_scale, bicubic)`` + ``RandomHorizontalFlip``;
* finetune: timm ``create_transform(is_training=True, auto_augment=data.auto_augment, interpolation='bicubic')``
  without its RandomErasing (that runs on the batch, in ``loader.batch_augment``);
* eval: ``Resize(int(img_size / eval_crop_pct), bicubic)`` + ``CenterCrop(img_size)``.
"""
from __future__ import annotations

import io
from typing import Callable, Iterator, List, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from fastlivt.data.base import EpochLoader
from fastlivt.data.shards import ShardReader


class ShardImageDataset(Dataset):
    """Sample i -> (transform(PIL RGB image of shard key i), label i)."""

    def __init__(self, reader: ShardReader, labels: np.ndarray, transform: Callable):
        self.reader, self.labels, self.transform = reader, labels, transform

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        with Image.open(io.BytesIO(self.reader[i].tobytes())) as im:
            image = im.convert("RGB")
        return self.transform(image), int(self.labels[i])


def torch_transform(stage: str, size: int, mean, std, rrc_scale, auto_augment, eval_crop_pct: float) -> Callable:
    """The per-sample PIL -> normalised float CHW tensor transform of ``stage``."""
    bicubic = T.InterpolationMode.BICUBIC
    if stage == "finetune":
        from timm.data import create_transform

        return create_transform(size, is_training=True, scale=tuple(rrc_scale), auto_augment=auto_augment,
                                interpolation="bicubic", mean=tuple(mean), std=tuple(std), re_prob=0.0)
    if stage == "pretrain":
        head = [T.RandomResizedCrop(size, scale=tuple(rrc_scale), interpolation=bicubic), T.RandomHorizontalFlip()]
    else:
        head = [T.Resize(int(size / eval_crop_pct), interpolation=bicubic), T.CenterCrop(size)]
    return T.Compose(head + [T.ToTensor(), T.Normalize(mean, std)])


class PILLoader(EpochLoader):
    """Random choices come from torch's and Python's global generators in the workers, as in MAE's code (not
    reproducible across worker counts); the ``torch`` backend (:mod:`fastlivt.data.torch_loader`) is."""

    backend = "pil"

    def __init__(self, cfg, split, stage, device=None, rank=0, world=1):
        super().__init__(cfg, split, stage, device, rank, world)
        d = cfg.data
        transform = torch_transform(stage, self.img_size, d.mean, d.std, d.rrc_scale, self.auto_augment,
                                    d.eval_crop_pct)
        self.dataset = ShardImageDataset(ShardReader(self.manifest), self.labels, transform)

    def _iterate(self, indices: np.ndarray) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        batches: List[List[int]] = [indices[k:k + self.batch_size].tolist() for k in range(0, indices.size, self.batch_size)]
        workers = self.cfg.data.workers
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=workers,
                            pin_memory=self.device.type == "cuda",
                            prefetch_factor=self.cfg.data.batches_ahead if workers > 0 else None)
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), self._labels_to_device(labels)

"""Test doubles for the engine tests: an in-memory loader with the training loader's interface, a manifest writer,
real Fashion-MNIST images read from Debian's IDX files, and a simulated crash."""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from fastlivt.data_prep.manifest import LABELS_NAME, Manifest

FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


class SimulatedCrash(RuntimeError):
    """Raised by :class:`MemoryLoader` to stand for a killed process."""


def write_manifest(directory: Path, labels: np.ndarray, num_classes: int, split: str = "train") -> Manifest:
    directory.mkdir(parents=True, exist_ok=True)
    counts = np.bincount(labels, minlength=num_classes).tolist()
    m = Manifest(source="memory", split=split, num_classes=num_classes, class_names=[f"c{i}" for i in range(num_classes)],
                 class_counts=counts, num_samples=int(len(labels)), root=str(directory))
    np.save(directory / LABELS_NAME, labels.astype(np.int64))
    m.save(directory)
    m.root = str(directory)
    return m


class MemoryLoader:
    """Batches of in-memory tensors with the training loader's interface (:class:`fastlivt.data.contract.BatchLoader`):
    ``len``, ``set_epoch(epoch)``, ``seek(consumed, end)``, iteration over ``(images, labels)``, ``manifest``,
    ``num_samples``, ``close`` and ``batch_augment`` (applied to each batch with its samples' positions in the epoch's
    order, ``start + rank + world * k``, yielding ``(images, MixTarget)``, as the real loaders do).
    The order of each epoch is a permutation seeded by (seed, epoch); rank r takes every world-th position of it (of
    positions [consumed, end) after a seek). ``crash_after`` raises :class:`SimulatedCrash` when that many batches have
    been handed out by this object (across epochs). ``read`` records the sample indices of every batch handed out."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, manifest: Manifest, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world: int = 1, crash_after: Optional[int] = None,
                 batch_augment=None, drop_last: bool = True):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.manifest, self.seed, self.shuffle, self.rank, self.world = manifest, seed, shuffle, rank, world
        self.crash_after, self.batch_augment, self.drop_last = crash_after, batch_augment, drop_last
        self.epoch, self._seek, self.handed_out = 0, None, 0
        self.read: List[Tuple[int, List[int]]] = []

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch)) \
            if self.shuffle else torch.arange(n)
        start, stop = self._seek or (0, self.per_rank() * self.world)
        part = order.repeat(-(-stop // n))[start:stop]
        per = -(-len(part) // self.world)
        part = part.repeat(-(-per * self.world // max(len(part), 1)))[: per * self.world]
        return part[self.rank::self.world]

    def per_rank(self) -> int:
        return len(self.labels) // self.world

    def __len__(self) -> int:
        n = self.per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def seek(self, consumed: int, end: int) -> None:
        self._seek = (consumed, end)

    def close(self) -> None:
        """Nothing to stop: no threads or workers."""

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        start = self._seek[0] if self._seek else 0
        idx, self._seek = self._indices(), None
        positions = (start + self.rank + self.world * np.arange(len(idx))).astype(np.int64)  # in the epoch's order
        n_batches = len(idx) // self.batch_size if self.drop_last else -(-len(idx) // self.batch_size)
        torch.empty((), dtype=torch.int64).random_()  # as torch's DataLoader draws its workers' base seed
        for b in range(n_batches):
            if self.crash_after is not None and self.handed_out >= self.crash_after:
                raise SimulatedCrash(f"simulated kill after {self.handed_out} batches")
            self.handed_out += 1
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            self.read.append((self.epoch, sel.tolist()))
            images, labels = self.images[sel].clone(), self.labels[sel].clone()
            if self.batch_augment is None:
                yield images, labels
            else:  # as the real loaders: the batch augmentation drawn from (seed, epoch, positions) -> MixTarget
                yield self.batch_augment(images, labels, self.epoch,
                                         positions[b * self.batch_size:b * self.batch_size + len(sel)])


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fmnist_longtail(split: str, per_class: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class[c]`` images of each class of a Fashion-MNIST split as normalized 3x32x32 tensors."""
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    keep = np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(per_class)])
    x = torch.from_numpy(images[keep].astype(np.float32) / 255.0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))  # 28 -> 32
    x = ((x - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(labels[keep])


def tiny_vit(cfg, img: int, decoder_embed_dim: int) -> None:
    """Set ``cfg`` (a TrainConfig) to the engine tests' tiny ViT on Fashion-MNIST-sized inputs: ``img`` px, patch 4,
    width 32, 2 blocks, a one-block decoder of ``decoder_embed_dim``, SDPA, short warmup, lr 1e-3."""
    cfg.data.img_size = cfg.model.img_size = img
    cfg.data.mean, cfg.data.std = (0.2860,) * 3, (0.3530,) * 3
    m = cfg.model
    m.arch, m.patch_size, m.embed_dim, m.depth, m.num_heads = "vit_tiny", 4, 32, 2, 2
    m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads, m.attention = decoder_embed_dim, 1, 2, "sdpa"
    cfg.optim.warmup_epochs, cfg.optim.lr = 0.5, 1e-3

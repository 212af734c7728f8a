"""The loader contract: what training and evaluation use of a loader, written down as a :class:`typing.Protocol`.

Every backend (:class:`fastlivt.data.base.EpochLoader` and its ffcv, dali, torch and PIL subclasses) and every test
double provides it; ``tests/fastlivt/data/test_contract.py`` checks their methods and signatures against it. Nothing else
of a loader is called by the loop (:mod:`fastlivt.engine.loop`) or by evaluation; the fine-tuning task reads the
optional ``batch_augment`` attribute (``None`` or the BatchAugment the loader applies to each batch) only to log it
and to refuse a config asking for augmentation that the loader would not apply.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol, Tuple, Union, runtime_checkable

import torch

from fastlivt.targets import MixTarget


@runtime_checkable
class BatchLoader(Protocol):
    """``len(loader)``: batches per epoch on this rank, the same on every rank. ``set_epoch(epoch)``: the epoch the
    next pass reads (its order a pure function of the run's seed and the epoch). ``seek(consumed, end)``: the next
    pass reads positions [consumed, end) of its epoch's global order, split over the loader's world (exact resume on
    any number of ranks). Iterating: one pass of ``(images, labels)`` batches on the loader's device; with a
    ``batch_augment`` (BFT's RandomErasing and Mixup/CutMix, drawn from (seed, epoch, the batch's global positions)),
    ``(images, MixTarget)``. ``manifest``:
    the split's manifest (classes, class counts, root). ``num_samples``: the split's size (evaluation keeps the first
    ``num_samples`` gathered predictions). ``close()``: stop the loader's threads and workers."""

    manifest: Any
    num_samples: int

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def seek(self, consumed: int, end: int) -> None: ...

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, Union[torch.Tensor, MixTarget]]]: ...

    def close(self) -> None: ...

"""The loader contract: what training and evaluation use of a loader, written down as a :class:`typing.Protocol`.

Every backend (:class:`fastlivt.data.base.EpochLoader` and its ffcv, dali, torch and PIL subclasses) and every test
double provides it; ``tests/fastlivt/data/test_contract.py`` checks their methods and signatures against it. Nothing else
of a loader is called by the loop (:mod:`fastlivt.engine.loop`) or by evaluation, except the optional
``batch_augment`` attribute (``None`` or the BatchAugment the fine-tuning task applies to each batch).
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol, Tuple, runtime_checkable

import torch


@runtime_checkable
class BatchLoader(Protocol):
    """``len(loader)``: batches per epoch on this rank, the same on every rank. ``set_epoch(epoch)``: the epoch the
    next pass reads (its order a pure function of the run's seed and the epoch). ``seek(consumed, end)``: the next
    pass reads positions [consumed, end) of its epoch's global order, split over the loader's world (exact resume on
    any number of ranks). Iterating: one pass of ``(images, labels)`` batches on the loader's device. ``manifest``:
    the split's manifest (classes, class counts, root). ``num_samples``: the split's size (evaluation keeps the first
    ``num_samples`` gathered predictions). ``close()``: stop the loader's threads and workers."""

    manifest: Any
    num_samples: int

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def seek(self, consumed: int, end: int) -> None: ...

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]: ...

    def close(self) -> None: ...

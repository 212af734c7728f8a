"""Long-tail samplers: which sample indices one rank reads in one epoch.

Every strategy draws an epoch of ``N`` indices (``N`` = number of samples of the split) from a generator seeded with
``(seed, epoch)`` alone, so every rank computes the same global order and takes its own slice:

* ``instance``        a random permutation of all samples (natural class frequencies p_c = n_c / N, each sample once);
* ``class_balanced``  class c drawn with p_c = 1 / C, then a sample of that class uniformly (with replacement);
* ``square_root``     p_c proportional to sqrt(n_c) (Mahajan et al. 2018);
* ``progressive``     p_c(t) = (1 - a) n_c / N + a / C with a = t / (T - 1) rising linearly from 0 at the first epoch
                      to 1 at the last of T epochs (Kang et al. 2020's progressively balanced sampling).

Sharding follows torch's ``DistributedSampler``: the epoch's order is padded by wrapping around to a multiple of the
world size W, and rank r takes positions r, r + W, r + 2W, ... Every rank therefore gets ceil(N / W) indices; for
``instance`` the ranks' indices are disjoint and together cover the epoch whenever W divides N (otherwise the first
``ceil(N/W)*W - N`` samples of the epoch's order are read twice, once by a padded rank). ``shuffle=False`` (evaluation)
keeps the written order 0..N-1, padded the same way.

The data position of a run is a *global* quantity: reading batch b on every rank consumes positions
[b B W, (b + 1) B W) of the (padded) epoch order. A run resumed after ``start`` positions, on any world size W', reads
positions [start, stop) of the same order, again split rank-strided (``indices(epoch, rank, W', start, stop)``), so
that within the epoch no sample is read twice and none is skipped whatever the old and new world sizes.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from fastlivt.config import ConfigError


STRATEGIES = ("instance", "class_balanced", "square_root", "progressive")


class LongTailSampler:
    """Deterministic per-epoch index plans over a split whose sample i has label ``labels[i]``.

    ``labels``: int labels of every sample in written order (the manifest's labels.npy); ``num_classes``: C (classes
    with no sample get probability 0 under every strategy); ``total_epochs``: T, required by ``progressive``.
    """

    def __init__(self, labels: np.ndarray, num_classes: int, strategy: str = "instance", seed: int = 0,
                 total_epochs: Optional[int] = None, shuffle: bool = True):
        if strategy not in STRATEGIES:
            raise ConfigError(f"data.sampler: unknown strategy {strategy!r} (choose one of {', '.join(STRATEGIES)})")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"sampler: labels must be a non-empty 1-d array, got shape {labels.shape}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"sampler: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
        if strategy == "progressive" and (total_epochs is None or total_epochs < 1):
            raise ValueError("sampler 'progressive' needs the total number of epochs (run.epochs >= 1)")
        if not shuffle and strategy != "instance":
            raise ValueError(f"sampler: shuffle=False (sequential order) only makes sense for 'instance', got {strategy!r}")
        self.labels = labels
        self.num_classes = int(num_classes)
        self.strategy = strategy
        self.seed = int(seed)
        self.total_epochs = total_epochs
        self.shuffle = shuffle
        self.counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
        # samples grouped by class: members of class c are by_class[starts[c]:starts[c] + counts[c]]
        self.by_class = np.argsort(labels, kind="stable")
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    @property
    def num_samples(self) -> int:
        return int(self.labels.size)

    # -------------------------------------------------------------------------------------------- class frequencies
    def class_probs(self, epoch: int = 0) -> np.ndarray:
        """p_c: the probability that one drawn index belongs to class c in ``epoch`` (float64, sums to 1)."""
        present = (self.counts > 0).astype(np.float64)
        natural = self.counts / self.counts.sum()
        balanced = present / present.sum()
        if self.strategy == "instance":
            return natural
        if self.strategy == "class_balanced":
            return balanced
        if self.strategy == "square_root":
            root = np.sqrt(self.counts.astype(np.float64))
            return root / root.sum()
        return (1.0 - self.progress(epoch)) * natural + self.progress(epoch) * balanced

    def progress(self, epoch: int) -> float:
        """a(t) of the progressive strategy: 0 at epoch 0, 1 at epoch T - 1 (clipped outside)."""
        if self.strategy != "progressive":
            return 0.0
        return float(np.clip(epoch / max(self.total_epochs - 1, 1), 0.0, 1.0))

    # -------------------------------------------------------------------------------------------- index plans
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The whole epoch's N indices (int64) before sharding; a pure function of (seed, epoch)."""
        n = self.num_samples
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng([self.seed, int(epoch)])
        if self.strategy == "instance":
            return rng.permutation(n).astype(np.int64)
        classes = rng.choice(self.num_classes, size=n, p=self.class_probs(epoch))
        within = np.floor(rng.random(n) * self.counts[classes]).astype(np.int64)
        return self.by_class[self.starts[classes] + within]

    def per_rank(self, world: int = 1) -> int:
        """Indices every rank gets per epoch: ceil(N / world)."""
        return -(-self.num_samples // world)

    def indices(self, epoch: int, rank: int = 0, world: int = 1, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Rank ``rank``'s indices (int64) for ``epoch``: positions [start, stop) of the epoch's order (wrapped around
        past N), rank-strided over ``world``. Default: the whole epoch, ceil(N / world) per rank. When stop - start is
        not a multiple of ``world``, the last ranks end with repeats of the range's first positions."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"sampler: need 0 <= rank < world, got rank={rank} world={world}")
        stop = self.per_rank(world) * world if stop is None else int(stop)
        if not 0 <= start <= stop:
            raise ValueError(f"sampler: need 0 <= start <= stop, got start={start} stop={stop}")
        order = self.epoch_order(epoch)
        if stop > order.size:  # wrap around, as torch's DistributedSampler pads
            order = np.resize(order, stop)
        part = order[start:stop]
        padded = -(-part.size // world) * world
        if padded > part.size:
            part = np.resize(part, padded)
        return part[rank::world]


def sampler_from_manifest(manifest, strategy: str, seed: int, total_epochs: Optional[int] = None,
                          shuffle: bool = True) -> LongTailSampler:
    """A sampler over a converted split: labels from its labels.npy, C from its ``num_classes``."""
    return LongTailSampler(manifest.labels(), manifest.num_classes, strategy, seed, total_epochs, shuffle)

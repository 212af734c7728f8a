"""Long-tailed subsets with the exponential profile of the long-tail literature (LDAM-DRW's ``imbalance_cifar.py``).

Class ``c`` of ``C`` keeps ``n_c = int(n_max * (1/G) ** (c / (C - 1)))`` images, where ``G`` is the imbalance factor
and ``n_max`` the size of the largest class (the per-class size of balanced sources such as CIFAR). The images are
chosen exactly as LDAM-DRW (and LiVT, which copies it) chooses them: the legacy global NumPy generator is seeded
once with ``seed``, then for every class in ascending label order the indices of that class are shuffled and the
first ``n_c`` kept. With the default seed 0 this reproduces the CIFAR-10-LT / CIFAR-100-LT subsets of those papers.
"""
from __future__ import annotations

from typing import List

import numpy as np


def profile_counts(n_max: int, num_classes: int, imbalance_factor: float) -> List[int]:
    """``n_c`` for every class: the exponential profile from ``n_max`` (class 0) down to ``n_max / G``."""
    if imbalance_factor < 1:
        raise ValueError(f"imbalance factor must be >= 1, got {imbalance_factor}")
    if num_classes == 1:
        return [int(n_max)]
    ratio = 1.0 / imbalance_factor
    return [int(n_max * ratio ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def select_longtail(labels: np.ndarray, num_classes: int, imbalance_factor: float, seed: int = 0) -> np.ndarray:
    """Indices into ``labels`` of the long-tailed subset, grouped by class in ascending label order.

    ``labels`` holds the class index of every candidate sample. A class with fewer candidates than its ``n_c``
    keeps all of them. The global NumPy generator is reseeded (as in LDAM-DRW); its state is restored afterwards so
    that callers are not affected.
    """
    labels = np.asarray(labels, dtype=np.int64)
    per_class = np.bincount(labels, minlength=num_classes)
    targets = profile_counts(int(per_class.max()) if len(labels) else 0, num_classes, imbalance_factor)
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        kept = []
        for c in range(num_classes):
            idx = np.where(labels == c)[0]
            np.random.shuffle(idx)
            kept.append(idx[: targets[c]])
    finally:
        np.random.set_state(saved)
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)

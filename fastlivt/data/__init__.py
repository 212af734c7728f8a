"""Loading converted splits: ``build_loader(cfg, split, stage, device, rank, world)`` over the ffcv, dali and torch
backends, the long-tail samplers (:mod:`fastlivt.data.sampling`) and BFT's augmentation (:mod:`fastlivt.data.augment`,
:mod:`fastlivt.data.device_randaugment`). See :mod:`fastlivt.data.base` for the loader's contract and
:mod:`fastlivt.data.registry` for the backends by name."""
from fastlivt.data.augment import BatchAugment, Normalize
from fastlivt.data.base import STAGES, EpochLoader
from fastlivt.data.registry import BACKENDS, build_loader
from fastlivt.data.sampling import STRATEGIES, LongTailSampler, sampler_from_manifest

__all__ = ["build_loader", "EpochLoader", "BatchAugment", "Normalize", "LongTailSampler", "sampler_from_manifest",
           "BACKENDS", "STAGES", "STRATEGIES"]

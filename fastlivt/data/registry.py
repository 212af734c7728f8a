"""``build_loader``: one interface over the loader backends, found by name.

Each backend is a subclass of :class:`~fastlivt.data.base.EpochLoader` in a module of its own, registered here under
its ``data.backend`` name as ``"module:Class"``. The module is imported only when its backend is chosen (each pulls in
its own library: ffcv, nvidia.dali, torchvision), so nothing here or in the base imports a backend module statically.
"""
from __future__ import annotations

import importlib
from typing import Dict, Type

from fastlivt.config import ConfigError, TrainConfig
from fastlivt.data.base import EpochLoader
from fastlivt.logs import get_logger

BACKEND_CLASSES: Dict[str, str] = {
    "ffcv": "fastlivt.data.ffcv_loader:FFCVLoader",
    "dali": "fastlivt.data.dali_loader:DALILoader",
    "torch": "fastlivt.data.torch_loader:TorchLoader",
}
BACKENDS = tuple(BACKEND_CLASSES)
log = get_logger(__name__)


def backend_class(name: str) -> Type[EpochLoader]:
    """The loader class registered under ``name``, its module imported now."""
    if name not in BACKEND_CLASSES:
        raise ConfigError(f"data.backend: unknown backend {name!r} (choose one of {', '.join(BACKENDS)})")
    module_name, _, class_name = BACKEND_CLASSES[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, EpochLoader) and cls.backend == name):
        raise TypeError(f"data.backend {name!r} is registered as {BACKEND_CLASSES[name]}, which is not an EpochLoader "
                        f"with backend = {name!r}")
    return cls


def build_loader(cfg: TrainConfig, split: str, stage: str, device=None, rank: int = 0, world: int = 1) -> EpochLoader:
    """The loader of ``cfg.data.backend`` for ``split`` (train | val) at ``stage`` (pretrain | finetune | eval)."""
    cls = backend_class(cfg.data.backend)
    loader = cls(cfg, split, stage, device=device, rank=rank, world=world)
    log.info("%s", loader.describe())
    return loader

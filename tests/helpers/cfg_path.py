"""The path of the training config through ``fastlivt.engine``: which engine modules' functions receive it.

:func:`trace_cfg_path` runs a callable under a profile hook that records, for every Python function called in a module
of ``fastlivt.engine``, whether one of its arguments is a :class:`~fastlivt.config.TrainConfig` or one of its sections
(a new config made by ``dataclasses.replace`` counts as the same config: it is what the run goes on with). The
sequence of those modules, consecutive repeats collapsed, is the config's path; :func:`entries` counts how many times
the path enters each module. ``python3 tests/helpers/cfg_path.py`` prints the path of a resumed tiny BFT run.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import fields, is_dataclass
from typing import Any, Callable, Dict, List, Tuple

from fastlivt.config import TrainConfig

PREFIX = "fastlivt.engine."


def _config_types() -> Tuple[type, ...]:
    return (TrainConfig,) + tuple(f.default_factory for f in fields(TrainConfig)  # type: ignore[misc]
                                  if callable(getattr(f, "default_factory", None)) and is_dataclass(f.default_factory))


def trace_cfg_path(fn: Callable[[], Any]) -> Tuple[Any, List[str]]:
    """(``fn()``'s result, the collapsed sequence of engine modules whose functions received the config)."""
    types = _config_types()
    path: List[str] = []

    def hook(frame, event, arg):
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(PREFIX):
            return
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        if any(isinstance(frame.f_locals.get(n), types) for n in names):
            short = module[len(PREFIX):]
            if not path or path[-1] != short:
                path.append(short)

    old = sys.getprofile()
    sys.setprofile(hook)
    try:
        result = fn()
    finally:
        sys.setprofile(old)
    return result, path


def entries(path: List[str]) -> Dict[str, int]:
    """How many times the path enters each module."""
    return dict(Counter(path))


if __name__ == "__main__":
    import shutil
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from legacy_checkpoint import FIXTURE, fixture_cfg, fixture_loaders
    from fastlivt.engine.finetune import BFTTask
    from fastlivt.engine.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(FIXTURE, tmp / "data")
        (tmp / "run" / "checkpoints").mkdir(parents=True)
        shutil.copyfile(FIXTURE / "last.pt", tmp / "run" / "checkpoints" / "last.pt")
        make = fixture_loaders(tmp / "data", tmp / "val")
        _, path = trace_cfg_path(lambda: train(fixture_cfg(tmp / "run", 0), BFTTask(), resume=True, make_loader=make))
    print("path:", " -> ".join(path))
    print("entries:", entries(path), "stays:", len(path))

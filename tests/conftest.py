"""Test-wide settings. TRITON_INTERPRET must be set before anything imports triton (torch's helpers do too).

Triton's interpreter is switched on only where no CUDA device is visible: on a GPU the kernel's CUDA tests run the
compiled kernel (fast-math path included). ``torch.cuda.is_available()`` does not import triton, so it can decide.
A TRITON_INTERPRET already in the environment is kept.

Layout: the tests mirror the packages (``tests/fastlivt/<subpackage>/test_<module>.py``, ``tests/kernels/``,
``tests/data_prep/``), whole-project checks (command line end to end, demo, import layers, dependencies, config keys,
optional engines) sit in ``tests/project/``. The shared test doubles and the subprocess workers sit in
``tests/helpers/``, imported by their bare module names (``from engine_doubles import ...``): that folder goes on
``sys.path`` here, and a worker run by path has it as its own first entry.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("PYTHONHASHSEED", "0")


def _set_triton_interpreter() -> None:
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if torch.cuda.is_available():
        return
    if "triton" in sys.modules:  # too late: triton read the variable when it was imported
        raise RuntimeError("no CUDA device and triton was imported before tests/conftest.py could set "
                           "TRITON_INTERPRET=1: export TRITON_INTERPRET=1 before running pytest")
    os.environ["TRITON_INTERPRET"] = "1"


_set_triton_interpreter()

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine); run on a GPU node")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

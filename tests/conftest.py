"""Test-wide settings. TRITON_INTERPRET must be set before anything imports triton (torch's helpers do too)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("PYTHONHASHSEED", "0")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine); run on a GPU node")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

"""Every loader backend and every test double against the written loader contract,
:class:`fastlivt.data.contract.BatchLoader`: its methods are there with the contract's parameters (inspect), its
attributes are there on an instance, and ``isinstance`` agrees."""
from __future__ import annotations

import inspect

import pytest
import torch

from fastlivt.data.contract import BatchLoader
from engine_doubles import MemoryLoader, write_manifest

METHODS = ("__len__", "set_epoch", "seek", "__iter__", "close")
ATTRIBUTES = ("manifest", "num_samples")


def backend_classes():
    from fastlivt.data.base import EpochLoader
    from fastlivt.data.dali_loader import DALILoader
    from fastlivt.data.ffcv_loader import FFCVLoader
    from fastlivt.data.pil_loader import PILLoader
    from fastlivt.data.torch_loader import TorchLoader

    return [EpochLoader, FFCVLoader, DALILoader, TorchLoader, PILLoader, MemoryLoader]


def contract_mismatches(cls) -> list:
    """What of the contract's methods ``cls`` lacks or takes differently: each method must take the contract's
    parameters, by the same names, kinds and order; any extra parameter needs a default."""
    out = []
    for name in METHODS:
        method = getattr(cls, name, None)
        if not callable(method):
            out.append(f"{cls.__name__}.{name} missing")
            continue
        want = list(inspect.signature(getattr(BatchLoader, name)).parameters.values())
        have = list(inspect.signature(method).parameters.values())
        if [(p.name, p.kind) for p in have[: len(want)]] != [(p.name, p.kind) for p in want]:
            out.append(f"{cls.__name__}.{name}{inspect.signature(method)} != {name}{inspect.signature(getattr(BatchLoader, name))}")
        elif any(p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                 for p in have[len(want):]):
            out.append(f"{cls.__name__}.{name} needs more arguments than the contract gives")
    return out


@pytest.mark.parametrize("cls", backend_classes(), ids=lambda c: c.__name__)
def test_every_backend_and_double_has_the_contract_methods(cls):
    assert contract_mismatches(cls) == []


def test_the_signature_check_catches_a_wrong_loader():
    class Stale(MemoryLoader):
        def seek(self, n_batches):  # the old skip(n) shape under the contract's name
            pass

    class Unclosable:
        def __len__(self):
            return 0

    (stale,) = contract_mismatches(Stale)
    assert stale.startswith("Stale.seek(self, n_batches) != seek(self, consumed")
    assert [m for m in contract_mismatches(Unclosable) if m.endswith("missing")] == [
        "Unclosable.set_epoch missing", "Unclosable.seek missing", "Unclosable.__iter__ missing",
        "Unclosable.close missing"]
    assert not isinstance(Unclosable(), BatchLoader)


def test_instances_carry_the_contract_attributes(tmp_path):
    import numpy as np

    from fastlivt.config import TrainConfig
    from fastlivt.data.base import EpochLoader

    labels = np.repeat(np.arange(3), [6, 3, 1])
    manifest = write_manifest(tmp_path / "train", labels, 3)
    cfg = TrainConfig()
    cfg.data.train, cfg.data.batch_size = str(tmp_path / "train"), 2
    memory = MemoryLoader(torch.zeros(10, 3, 4, 4), torch.as_tensor(labels), 2, manifest)
    with EpochLoader(cfg, "train", "pretrain", device="cpu") as base:
        for loader in (base, memory):
            assert isinstance(loader, BatchLoader)
            assert all(hasattr(loader, a) for a in ATTRIBUTES) and loader.num_samples == 10
            assert loader.manifest.num_classes == 3
    memory.close()


def test_no_loader_keeps_methods_training_never_calls():
    # resumption goes through seek(consumed, end) alone: the old skip(n_batches) is gone from every loader
    assert [cls.__name__ for cls in backend_classes() if hasattr(cls, "skip")] == []

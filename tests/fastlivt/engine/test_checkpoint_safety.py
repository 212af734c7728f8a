"""Loading a checkpoint never runs code: a pickle whose ``__reduce__`` would write a marker file is refused, naming the
file, by every reader (evaluate, both runtimes' resume, ``fastlivt checkpoint``); the RNG states of the meta survive
``weights_only`` loading."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastlivt.engine import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[3]


class Payload:
    """Unpickling this calls ``Path(marker).touch()``: code a checkpoint must never get to run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted(path: Path, marker: Path) -> Path:
    state = {"model": {"w": torch.zeros(2)}, "optimizer": {}, "runtime": {"global_steps": 0},
             "meta": {"config": {"run": {"stage": "finetune"}}, "extra": Payload(marker)}}
    torch.save(state, path)
    return path


def test_torch_load_of_the_payload_really_runs_code(tmp_path):
    """The guard of the tests below: without weights_only the file does execute its payload."""
    marker = tmp_path / "ran"
    torch.load(crafted(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


def test_evaluate_and_resume_refuse_a_checkpoint_that_runs_code(tmp_path):
    from fastlivt.config import TrainConfig
    from fastlivt.engine.evaluate import read_classifier
    from fastlivt.engine.torch_runtime import TorchRuntime

    marker = tmp_path / "ran"
    path = crafted(tmp_path / "last.pt", marker)
    with pytest.raises(ckpt.UnsafeCheckpointError, match=f"{path}: refused to load: it refers to (getattr|pathlib.Path)"):
        read_classifier(path)
    cfg = TrainConfig()
    cfg.run.device = "cpu"
    rt = TorchRuntime(cfg)
    model = torch.nn.Linear(2, 1)
    rt.prepare(model, [{"params": list(model.parameters())}], 1e-3, (0.9, 0.95), 0.0)
    with pytest.raises(ckpt.UnsafeCheckpointError, match=str(path)):
        rt.load(str(tmp_path), "last")
    with pytest.raises(ckpt.UnsafeCheckpointError, match=str(path)):
        ckpt.peek_meta(tmp_path, "last")  # the --resume path reads the meta first
    assert not marker.exists()


def test_deepspeed_checkpoint_files_are_checked_before_deepspeed_unpickles_them(tmp_path):
    from fastlivt.engine.ds_checkpoint import scan_safe

    marker = tmp_path / "ran"
    tag = tmp_path / "checkpoints" / "last"
    tag.mkdir(parents=True)
    torch.save({"epoch": 0}, tag / ckpt.META_FILE.format(rank=0))
    bad = crafted(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(ckpt.UnsafeCheckpointError, match=str(bad)):
        scan_safe(tag)
    proc = subprocess.run([sys.executable, "-m", "fastlivt", "checkpoint", "export", str(tag), str(tmp_path / "o.safetensors")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and str(bad) in proc.stderr and "refused" in proc.stderr
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


def test_rng_states_survive_weights_only_loading(tmp_path):
    ckpt.seed_everything(3)
    state = ckpt.capture_rng()
    want = (random.random(), float(np.random.rand()), float(torch.rand(())))
    torch.save({"rng": state}, tmp_path / "r.pt")
    ckpt.seed_everything(99)
    ckpt.restore_rng(ckpt.safe_load(tmp_path / "r.pt")["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == want


class _Colour(__import__("enum").Enum):
    RED = 1


class _ByGetattr:
    """Pickles as ``getattr(target, name)``: how Python 3.11.2 (Debian 12's) pickles enum members."""

    def __init__(self, target, name):
        self.target, self.name = target, name

    def __reduce__(self):
        return getattr, (self.target, self.name)


def test_enum_members_pickled_by_getattr_load_and_other_getattrs_are_refused(tmp_path):
    from fastlivt.engine.checkpoint import UnsafeCheckpointError, safe_load

    good = tmp_path / "enum.pt"
    torch.save({"stage": _ByGetattr(_Colour, "RED")}, good)
    with torch.serialization.safe_globals([_Colour]):
        assert safe_load(good) == {"stage": _Colour.RED}
    for target, name in ((_Colour, "__class__"), (torch.Tensor, "add_")):
        bad = tmp_path / f"bad_{name}.pt"
        torch.save({"x": _ByGetattr(target, name)}, bad)
        with torch.serialization.safe_globals([_Colour]), pytest.raises(UnsafeCheckpointError, match=str(bad.name)):
            safe_load(bad)

"""Resume bit for bit through the command line with the real loaders: ``python -m fastlivt finetune|pretrain``
killed with SIGKILL mid-epoch and resumed with ``--resume`` ends with the exported weights of an uninterrupted run
(CPU, tiny model, a few seconds of training).

One fixed-step case per backend: ffcv and torch with BFT (RandAugment, RandomErasing, Mixup/CutMix and smoothing
on), dali with MGP. The other stage x backend x kill-step combinations are guarded one layer down, in process: every
stage and crash step by tests/fastlivt/engine/test_loop.py (MGP and BFT, mid-epoch and after an epoch boundary),
every backend x stage's batches across a resume by tests/fastlivt/data/test_registry_reproducible.py."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from convert_testdata import convert_imagefolder
from image_folders import noise_jpegs

REPO = Path(__file__).resolve().parents[2]
STEPS = 12  # 26 training images, batch 4, drop_last: 6 steps per epoch, 2 epochs
KILL_AFTER = 4  # logged steps before the kill: inside the first epoch, with its checkpoints written every step
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    noise_jpegs(root / "src", [12, 8, 6], (14, 24), seed=2)
    return convert_imagefolder(root / "src", root / "data")


def _command(stage: str, backend: str, data: Path, out: Path, resume: bool = False):
    config = REPO / "configs" / "fmnist_lt" / ("mgp.yaml" if stage == "pretrain" else "bft.yaml")
    over = [f"data.train={data}", f"data.val={data}", f"data.backend={backend}", "data.img_size=16",
            "model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "data.batch_size=4",
            "data.workers=2", "data.dali_device=cpu", "run.epochs=2", "run.device=cpu", "run.ckpt_every_steps=1",
            "run.log_every=1", "run.progress=false", "run.tensorboard=false", "run.vis_every=0", "run.seed=5",
            f"run.out={out}", "optim.warmup_epochs=1"]
    if stage == "pretrain":
        over += ["model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2"]
    else:  # RandAugment, RandomErasing, Mixup/CutMix, smoothing: position-keyed draws and global generators (drop path)
        over += ["model.init=", "data.auto_augment=rand-m9-mstd0.5-inc1", "data.mixup=0.8", "data.cutmix=1.0",
                 "run.eval_every=2", "loss.fused=torch"]
    return [sys.executable, "-m", "fastlivt", stage, "--config", str(config), *(["--resume"] if resume else []), *over]


def _env():
    # numba compiles FFCV's pipeline in every new process (minutes on a loaded 2-core machine); without the JIT the
    # same operations run as Python around the same C decoder and resizer, with the same pixels
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                NUMBA_DISABLE_JIT="1")


def _rows(csv: Path) -> int:
    return max(0, len(csv.read_text().splitlines()) - 1) if csv.is_file() else 0


def _weights(out: Path, stage: str):
    return load_file(out / ("encoder.safetensors" if stage == "pretrain" else "model.safetensors"))


@pytest.mark.parametrize("backend,stage", [("ffcv", "finetune"), ("dali", "pretrain"), ("torch", "finetune")])
def test_sigkill_and_resume_equals_uninterrupted(split, tmp_path, stage, backend):
    kill_after = KILL_AFTER
    full = subprocess.Popen(_command(stage, backend, split, tmp_path / "full"), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_out = tmp_path / "killed"
    killed = subprocess.Popen(_command(stage, backend, split, killed_out), cwd=REPO, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 1200
        while _rows(killed_out / "train.csv") < kill_after and killed.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert killed.poll() is None, f"the run ended before step {kill_after}: {killed.stderr.read()[-3000:]}"
        os.killpg(killed.pid, signal.SIGKILL)
    finally:
        killed.wait(timeout=60)
    assert _rows(killed_out / "train.csv") < STEPS
    resumed = subprocess.run(_command(stage, backend, split, killed_out, resume=True), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, err = full.communicate(timeout=1200)
    assert full.returncode == 0, err[-3000:]
    a, b = _weights(tmp_path / "full", stage), _weights(killed_out, stage)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"killed after step {kill_after}: {len(differ)} tensors differ, e.g. {differ[:3]}"

"""Probes for the every-key test: each builds one component the way the commands do (from the whole config) and
returns a plain, comparable fingerprint of it. An exception is part of the fingerprint (a key whose value makes the
build fail has been read)."""
from __future__ import annotations

import dataclasses
import random
import shutil
import types
from pathlib import Path
from typing import Any, Callable, Dict, List
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torch import nn

from engine_doubles import MemoryLoader, write_manifest
from fastlivt.data_prep.config import ConvertConfig
from fastlivt.config import TrainConfig, from_dict, to_dict

CLASSES, COUNTS = 4, [8, 4, 2, 2]  # the tiny training set: 16 images, long-tailed


def describe(obj: Any, depth: int = 4, seen=None) -> Any:
    """Every plain value reachable from ``obj`` (attributes of objects and modules, tensors as shape + sum)."""
    seen = set() if seen is None else seen
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.ndarray) and (obj.dtype.fields or obj.dtype == object):
        return (obj.shape, str(obj.dtype))
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(obj)
        return (tuple(t.shape), str(t.dtype), round(float(t.double().sum()), 5) if t.numel() else 0)
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    if type(obj).__module__ in ("fastlivt.config", "fastlivt.data_prep.config"):  # a component must show what it made of its config, not hold it
        return "config"
    if depth == 0 or id(obj) in seen:
        return type(obj).__name__
    seen.add(id(obj))  # (only objects that stay alive: a temporary's id is reused)
    if isinstance(obj, (list, tuple)):
        return [describe(v, depth - 1, seen) for v in obj[:64]]
    if isinstance(obj, dict):
        return {str(k): describe(v, depth - 1, seen) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (types.FunctionType, types.MethodType, type)):
        return getattr(obj, "__qualname__", type(obj).__name__)
    if not hasattr(obj, "__dict__"):
        return type(obj).__name__
    own = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    if isinstance(obj, nn.Module):
        own.update(obj.named_children())
    return {type(obj).__name__: {k: describe(v, depth - 1, seen) for k, v in sorted(own.items())}}


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    def probe(*args):
        torch.manual_seed(0), random.seed(0), np.random.seed(0)
        try:
            return fn(*args)
        except Exception as e:  # the key was read and refused the value
            return ("error", type(e).__name__, str(e))
    probe.__name__ = fn.__name__
    return probe


def weights(model: nn.Module) -> Dict[str, Any]:
    return {k: describe(v) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ data on disk
def image_folder(root: Path, counts=(6, 4, 2)) -> Path:
    """A tiny ImageFolder (class c has counts[c] 24x20 PNGs) plus one corrupt file."""
    rng = np.random.default_rng(0)
    for c, n in enumerate(counts):
        for i in range(n):
            (root / f"class{c}").mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    (root / "class0" / "broken.png").write_bytes(b"not an image")
    return root


@guarded
def convert_probe(cfg: ConvertConfig) -> Any:
    from fastlivt.data_prep.convert import convert

    out = Path(cfg.out)
    shutil.rmtree(out, ignore_errors=True)
    manifest = convert(cfg, progress=False)
    record = dataclasses.asdict(manifest) if dataclasses.is_dataclass(manifest) else describe(manifest)
    record.pop("created", None)
    files = sorted((str(p.relative_to(out)), p.stat().st_size) for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "manifest": describe(record), "files": files}


# ------------------------------------------------------------------------------------------------ training components
@guarded
def model_probe(cfg: TrainConfig, manifest: Any) -> Any:
    """The classifier (BFT) and the masked autoencoder (MGP) as the tasks build them."""
    from fastlivt.engine.finetune import BFTTask
    from fastlivt.engine.pretrain import MGPTask

    out = {}
    for task in (BFTTask(), MGPTask()):
        torch.manual_seed(0)
        model = task.build_model(cfg, manifest)
        out[task.name] = (describe(model, depth=40), weights(model))
    return out


@guarded
def task_probe(cfg: TrainConfig, manifest: Any) -> Any:
    """BFT's setup on a stand-in run: the loss it builds (and the EMA model)."""
    from fastlivt.engine.finetune import BFTTask

    task = BFTTask()
    net = nn.Linear(2, CLASSES)
    run = types.SimpleNamespace(cfg=cfg, loader=types.SimpleNamespace(manifest=manifest, batch_augment=None),
                                runtime=types.SimpleNamespace(device=torch.device("cpu"), unwrap=lambda: net, compile=None,
                                                              partitions_parameters=False,
                                                              accum_steps=cfg.optim.accum_iter),
                                make_loader=None)
    task.setup(run)
    logits, labels = torch.linspace(-2, 2, 3 * CLASSES).view(3, CLASSES), torch.tensor([0, 1, 3])
    return {"loss": describe(task.criterion), "value": float(task.criterion(logits, labels)), "ema": task.ema is not None}


@guarded
def loader_probe(cfg: TrainConfig, manifest: Any) -> Any:
    """The training loader (finetune stage) and, when data.val is set, the evaluation loader, as built."""
    from fastlivt.data import build_loader

    out = {}
    for split, stage in (("train", "finetune"), ("val", "eval")):
        if getattr(cfg.data, split):
            loader = build_loader(cfg, split, stage)
            out[split] = [describe(loader, depth=6), loader.plan(0).tolist(), loader.describe(), loader.manifest.root]
            if cfg.data.backend == "ffcv":  # FFCV's own Loader: workers, OS cache or process cache, batches ahead
                out[split].append({k: describe(v, 1) for k, v in vars(loader.loader).items()})
            if cfg.data.backend == "torch":  # cheap to read: one batch (batch augmentation applied when set)
                images, labels = next(iter(loader))
                target = labels.tolist() if isinstance(labels, torch.Tensor) else describe(labels)
                out[split].append((describe(images), target))
    return out


@guarded
def runtime_probe(cfg: TrainConfig, manifest: Any) -> Any:
    """Which runtime the loop builds (DeepSpeed's constructor is replaced: its JSON is DeepSpeed's own config)."""
    from fastlivt.engine import ds_runtime
    from fastlivt.engine.build import build_runtime

    with mock.patch.object(ds_runtime.DeepSpeedRuntime, "__init__", lambda self, cfg: None):
        return type(build_runtime(cfg)).__name__


@guarded
def run_probe(cfg: TrainConfig, manifest: Any) -> Any:
    """A tiny training run (MGP or BFT as run.stage says) on in-memory images: what it wrote, its schedule, the
    optimizer's hyper-parameters, the checkpoints it took and the weights it ended with."""
    from fastlivt.data.augment import BatchAugment
    from fastlivt.engine.finetune import BFTTask
    from fastlivt.engine.checkpointer import Checkpointer
    from fastlivt.engine.loop import train
    from fastlivt.engine.pretrain import MGPTask

    g = torch.Generator().manual_seed(1)
    size = cfg.data.img_size
    images, labels = torch.randn(sum(COUNTS), 3, size, size, generator=g), torch.tensor(
        [c for c, n in enumerate(COUNTS) for _ in range(n)])

    def make(c: TrainConfig, split: str, stage: str, runtime: Any) -> MemoryLoader:
        if split == "val":
            return MemoryLoader(images, labels, 4, manifest, shuffle=False, drop_last=False)
        aug = BatchAugment(CLASSES, c.data.mixup, c.data.cutmix, c.data.smoothing, c.data.reprob, seed=c.run.seed) \
            if stage == "finetune" else None
        return MemoryLoader(images, labels, c.data.batch_size, manifest, seed=c.run.seed, batch_augment=aug)

    saves: List[Any] = []
    original = Checkpointer.save

    def save(self, tag):
        saves.append((tag, self.state.epoch, self.state.consumed, self.state.step))
        original(self, tag)

    out = Path(cfg.run.out)
    shutil.rmtree(out, ignore_errors=True)
    with mock.patch.object(Checkpointer, "save", save):
        run = train(cfg, MGPTask() if cfg.run.stage == "pretrain" else BFTTask(), make_loader=make)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    rows = {f: len((out / f).read_text().splitlines()) for f in files if f.endswith(".csv")}
    groups = [{k: describe(v) for k, v in grp.items() if k != "params"} for grp in run.runtime.optimizer.param_groups]
    return {"out": str(out), "files": files, "rows": rows, "step": run.step, "schedule": run.schedule.state_dict(),
            "groups": groups, "saves": saves, "weights": weights(run.runtime.unwrap()),
            "runtime": {k: describe(v, 1) for k, v in vars(run.runtime).items() if isinstance(v, (bool, int, float, str))}}


def tiny_train_config(tmp: Path, train_dir: str) -> TrainConfig:
    cfg = from_dict(TrainConfig, {
        "data": {"train": "", "batch_size": 4, "img_size": 8, "workers": 1, "backend": "ffcv"},
        "model": {"arch": "vit_tiny", "embed_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 4, "img_size": 8,
                  "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2, "attention": "sdpa"},
        "optim": {"warmup_epochs": 1.0},
        "loss": {"fused": "auto"},
        "run": {"epochs": 2, "out": str(tmp / "run"), "device": "cpu", "progress": False, "tensorboard": False,
                "stage": "finetune"},
    })
    return cfg


def with_keys(cfg: Any, values: Dict[str, Any]) -> Any:
    """A copy of ``cfg`` with dotted keys set, checked as the config loader checks them."""
    data = to_dict(cfg)
    for key, value in values.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return from_dict(type(cfg), data)


@guarded
def compile_probe(cfg: TrainConfig, manifest: Any) -> Any:
    """What the plain runtime compiles of the task's model: the resolved choice (enabled, Inductor mode) and the
    regions it wrapped (torch.compile is lazy: nothing is compiled until called)."""
    from fastlivt.engine.finetune import BFTTask
    from fastlivt.engine.optim import param_groups
    from fastlivt.engine.torch_runtime import TorchRuntime

    runtime = TorchRuntime(cfg)
    model = BFTTask().build_model(cfg, manifest)
    runtime.prepare(model, param_groups(model, 0.05, None), 1e-3, (0.9, 0.99), 0.05)
    return {"enabled": runtime.compile.enabled, "mode": runtime.compile.mode, "regions": list(runtime.compile.regions)}


def outcome_probe(cfg: TrainConfig, manifest: Any) -> Any:
    """:func:`run_probe` where the baseline itself is refused: a stop on a non-finite value (the message names the
    step and the policy) or a refused data.val is the outcome compared, not a refused value of the key."""
    result = run_probe(cfg, manifest)
    if isinstance(result, tuple) and result[0] == "error" and result[1] in ("NonFiniteError", "ConfigError"):
        return {"stopped": result[1:]}
    return result

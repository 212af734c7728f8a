"""One process of the elastic-resume checks (run by tests/fastlivt/engine/test_elastic.py under torchrun, gloo on CPU).

Cases (``--cases``): ``torch_mgp``, ``torch_bft`` (plain engine, DDP), ``z2_mgp`` (DeepSpeed ZeRO-2), ``z3_bft`` (ZeRO-3):
the real training loop on 96 long-tailed Fashion-MNIST images at 16 px, micro-batch 8, effective batch 32, 2 epochs.

``--phases`` lists ``phase:folder`` steps run in order by one launch:

- ``crash``: each case is killed after 4 batches per rank (a checkpoint every optimizer step, so mid-epoch).
  Written per case: ``crash.json`` (the samples each rank read per epoch, the checkpoint's meta position) and
  ``ref.safetensors`` (the gathered weights when the last checkpoint was taken).
- ``resume``: each case continues from its checkpoint on this launch's world size. Written: ``resume.json``
  (reads, step, the runtime's accumulation) and ``loaded.safetensors`` (weights and Adam moments gathered right after
  the checkpoint was loaded) and ``universal.safetensors`` (DeepSpeed: the gathered moments of the universal checkpoint
  the load went through).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_doubles import MemoryLoader, SimulatedCrash, fmnist_longtail, tiny_vit, write_manifest  # noqa: E402
from fastlivt.config import TrainConfig  # noqa: E402

LT = [60, 40, 25, 15, 10, 8, 6, 5, 4, 3]
MICRO, EFFECTIVE, CRASH_AFTER = 8, 32, 4


def case_cfg(out: Path, case: str, world: int) -> TrainConfig:
    engine, stage = case.split("_")
    cfg = TrainConfig()
    if engine != "torch":
        cfg.deepspeed = {"zero_optimization": {"stage": int(engine[1])}}
    cfg.run.stage = "pretrain" if stage == "mgp" else "finetune"
    cfg.run.out, cfg.run.epochs, cfg.run.device, cfg.run.amp = str(out), 2, "cpu", "fp32"
    cfg.run.log_every, cfg.run.progress, cfg.run.vis_every, cfg.run.tensorboard = 1, False, 100, False
    cfg.run.ckpt_every_steps = 1
    tiny_vit(cfg, 16, decoder_embed_dim=16)
    cfg.data.batch_size, cfg.optim.accum_iter, cfg.optim.clip_grad = MICRO, EFFECTIVE // (MICRO * world), 1.0
    m = cfg.model
    if stage == "bft":
        cfg.optim.layer_decay, cfg.optim.min_lr = 0.75, 1e-6
        m.drop_path, cfg.loss.name, cfg.loss.fused = 0.1, "bal_bce", "torch"
        cfg.data.mixup, cfg.data.smoothing = 0.8, 0.1
        cfg.data.val, cfg.run.eval_every = "memory", 1
    return cfg


def loader_factory(made: list, crash_after=None):
    from fastlivt.data.augment import BatchAugment

    x, y = fmnist_longtail("train", LT)
    xt, yt = fmnist_longtail("test", [4] * 10)
    x, xt = torch.nn.functional.avg_pool2d(x, 2), torch.nn.functional.avg_pool2d(xt, 2)
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:96]

    def make(cfg, split, stage, runtime):
        root = Path(cfg.run.out) / "manifests"
        if split == "val":
            m = write_manifest(root / f"val{runtime.rank}", yt.numpy(), 10, split="val")
            return MemoryLoader(xt, yt, 8, m, shuffle=False, drop_last=False, rank=runtime.rank, world=runtime.world)
        m = write_manifest(root / f"train{runtime.rank}", y.numpy(), 10)
        aug = BatchAugment(10, cfg.data.mixup, 0.0, cfg.data.smoothing, 0.0, seed=cfg.run.seed) \
            if stage == "finetune" else None
        loader = MemoryLoader(x[keep], y[keep], cfg.data.batch_size, m, seed=cfg.run.seed, crash_after=crash_after,
                              batch_augment=aug, rank=runtime.rank, world=runtime.world)
        made.append(loader)
        return loader
    return make


def gather(obj):
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def moments(rt) -> dict:
    """Adam's exp_avg / exp_avg_sq per parameter name, gathered whole (collective under DeepSpeed)."""
    from fastlivt.engine.torch_runtime import TorchRuntime

    out = {}
    named = list(rt.unwrap().named_parameters())
    for name, p in named:
        if not p.requires_grad:  # fixed sin-cos position embeddings: no optimizer state
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if isinstance(rt, TorchRuntime):
                value = rt.optimizer.state[p][key]
            else:
                from deepspeed.utils import safe_get_full_optimizer_state

                value = safe_get_full_optimizer_state(p, key)
            out[f"{name}::{key}"] = value.detach().float().cpu().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape).clone()
    return out


def universal_moments(directory: Path) -> dict:
    from fastlivt.engine.checkpoint import safe_load

    out = {}
    for f in sorted((directory / "zero").glob("*/exp_avg*.pt")):
        state = safe_load(f)  # {"param": tensor} (ZeRO-1/2 conversion) or the tensor itself (ZeRO-3)
        out[f"{f.parent.name}::{f.stem}"] = (state["param"] if isinstance(state, dict) else state).float().clone()
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--phases", required=True, help="phase:folder list, e.g. resume:2to1,crash:1to2")
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default="torch_mgp,torch_bft,z2_mgp,z3_bft")
    args = p.parse_args()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    for item in args.phases.split(","):
        phase, tag = item.split(":")
        run_phase(phase, tag, args.cases.split(","), Path(args.out))
    torch.distributed.destroy_process_group()
    return 0


def run_phase(phase: str, tag: str, cases: list, root: Path) -> None:
    from safetensors.torch import save_file

    from fastlivt.engine import ds_checkpoint, loop
    from fastlivt.engine.checkpointer import Checkpointer
    from fastlivt.engine.finetune import BFTTask
    from fastlivt.engine.pretrain import MGPTask
    from fastlivt.engine.torch_runtime import TorchRuntime

    from fastlivt.engine.checkpoint_cli import info

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = torch.distributed.get_rank()
    for case in cases:
        out = root / tag / case
        task = MGPTask() if case.endswith("mgp") else BFTTask()
        made: list = []
        captured: dict = {}
        if phase == "crash":
            original = Checkpointer.save

            def save(self, *a, _orig=original, **kw):
                _orig(self, *a, **kw)
                captured["ref"] = self.runtime.full_state_dict()
                if isinstance(self.runtime, TorchRuntime):  # (DeepSpeed's gathered moments: see universal_moments)
                    captured["ref"].update(moments(self.runtime))
            Checkpointer.save = save
            try:
                loop.train(case_cfg(out, case, world), task, make_loader=loader_factory(made, CRASH_AFTER))
                raise AssertionError("the simulated kill did not happen")
            except SimulatedCrash:
                pass
            finally:
                Checkpointer.save = original
            report = {"reads": gather(made[0].read), "world": world, "info": info(out) if rank == 0 else None}
            if rank == 0:
                save_file({k: v.contiguous() for k, v in captured["ref"].items()}, str(out / "ref.safetensors"))
        else:
            orig_torch, orig_ds = TorchRuntime.load, ds_checkpoint.load

            def after_load(rt, directory, tag, meta):
                captured["loaded"] = {**rt.full_state_dict(), **moments(rt)}
                universal = Path(directory) / f"{tag}{ds_checkpoint.UNIVERSAL_SUFFIX}"
                if universal.is_dir():
                    captured["universal"] = universal_moments(universal)
                return meta

            TorchRuntime.load = lambda rt, d, t: after_load(rt, d, t, orig_torch(rt, d, t))
            ds_checkpoint.load = lambda rt, d, t: after_load(rt, d, t, orig_ds(rt, d, t))
            try:
                run = loop.train(case_cfg(out, case, world), task, resume=True, make_loader=loader_factory(made))
            finally:
                TorchRuntime.load, ds_checkpoint.load = orig_torch, orig_ds
            report = {"reads": gather(made[0].read), "world": world, "step": run.step,
                      "accum": run.runtime.accum_steps, "lr_scales": [g.get("lr_scale") for g in run.runtime.optimizer.param_groups]}
            final = run.runtime.full_state_dict()
            if rank == 0:
                save_file({k: v.contiguous() for k, v in captured["loaded"].items()}, str(out / "loaded.safetensors"))
                save_file({k: v.contiguous() for k, v in final.items()}, str(out / "final.safetensors"))
                if "universal" in captured:
                    save_file(captured["universal"], str(out / "universal.safetensors"))
        if rank == 0:
            (out / f"{phase}.json").write_text(json.dumps(report))
        torch.distributed.barrier()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown (see tests/helpers/ds_worker.py)

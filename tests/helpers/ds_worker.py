"""One process of the 2-process DeepSpeed checks (run by tests/fastlivt/engine/test_ds_runtime.py under torchrun or deepspeed).

Jobs (``--jobs``, comma-separated):

- ``unit:<stage>:<zero>`` (stage mgp | bft): the runtime driven directly — a tiny MAE or classifier ViT trained for
  ``--steps`` optimizer steps of ``--accum`` micro-batches on a fixed synthetic set, checkpointed after step
  ``--save-at`` (with ``--resume``: continued from there). Records the losses, per-rank weight checksums, the lrs in
  DeepSpeed's optimizer and the lr each group's first AdamW update really applied; writes ``full|resumed.safetensors``.
- ``loop:<stage>:<zero>``: the real training loop (``fastlivt.engine.loop.train`` with the MGP/BFT task) on
  long-tailed Fashion-MNIST: run ``a`` uninterrupted and run ``b`` killed mid-training; with ``--resume`` run ``b``
  continues from its last checkpoint. BFT starts from the MGP loop run's encoder export.

Rank 0 writes ``<out>/<kind>_<stage>_zero<z>/*.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

DEVICE = "cuda" if "--device=cuda" in sys.argv else "cpu"  # read before DeepSpeed picks its accelerator
if DEVICE == "cpu":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
AMP = "bf16" if DEVICE == "cuda" else "fp32"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the engine's test doubles (tests/helpers/engine_doubles.py)
from fastlivt.config import TrainConfig  # noqa: E402
from fastlivt.engine.ds_runtime import DeepSpeedRuntime  # noqa: E402

MICRO, IMG, CLASSES, SET = 4, 16, 5, 3  # micro-batch, image size, classes, batches in the synthetic set
BASE_LR, WD, LAYER_DECAY = 2e-3, 0.05, 0.75


def tiny_vit_kwargs() -> dict:
    return dict(img_size=IMG, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def build(stage: str) -> torch.nn.Module:
    """The project's tiny MAE (MGP) or classifier ViT (BFT), identically initialized on every rank."""
    torch.manual_seed(0)
    from fastlivt.models import mae, vit

    if stage == "mgp":
        return mae.MaskedAutoencoderViT(**tiny_vit_kwargs(), decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                        norm_pix_loss=True)
    return vit.build_vit("vit_tiny", **tiny_vit_kwargs(), num_classes=CLASSES, drop_path=0.1)


def param_groups(model: torch.nn.Module, stage: str):
    """(groups, names per group): layer-decay groups (BFT) or decay/no-decay groups (MGP), via timm."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    if stage == "bft":
        groups = param_groups_layer_decay(model, weight_decay=WD, layer_decay=LAYER_DECAY)
    else:
        groups = param_groups_weight_decay(model, weight_decay=WD)
    names = {id(p): n for n, p in model.named_parameters()}
    return groups, [[names[id(p)] for p in g["params"]] for g in groups]


def batch(step: int, micro: int, rank: int, world: int, accum: int):
    """Micro-batch (images, labels) number ``(step*accum + micro)*world + rank`` of a fixed set of SET batches."""
    g = torch.Generator().manual_seed(((step * accum + micro) * world + rank) % SET)
    labels = torch.randint(0, CLASSES, (MICRO,), generator=g)
    images = torch.randn(MICRO, 3, IMG, IMG, generator=g) * 0.5 + labels.view(-1, 1, 1, 1).float() / CLASSES
    return images, labels


def lr_at(step: int, steps: int) -> float:
    return BASE_LR * (1.0 - 0.5 * step / steps)  # a per-iteration schedule the runtime must follow


def loss_of(engine, stage: str, images, labels):
    if stage == "mgp":
        out = engine(images)
        return out[0] if isinstance(out, (tuple, list)) else out
    return torch.nn.functional.cross_entropy(engine(images), labels)


def checksum(sd) -> torch.Tensor:
    return torch.tensor([sum(float(v.double().sum()) + float((v.double() ** 2).sum()) for v in sd.values())],
                        dtype=torch.float64)


def run_job(stage: str, zero: int, args) -> None:
    cfg = TrainConfig()
    cfg.deepspeed = {"zero_optimization": {"stage": zero}}
    cfg.data.batch_size, cfg.optim.accum_iter, cfg.optim.clip_grad = MICRO, args.accum, 1.0
    cfg.run.device, cfg.run.amp = DEVICE, AMP
    rt = DeepSpeedRuntime(cfg)
    model = build(stage)
    groups, names = param_groups(model, stage)
    scales = [g.get("lr_scale", 1.0) for g in groups]
    lr_scale_keys = [g.get("lr_scale") for g in groups]
    wds = [g.get("weight_decay", WD) for g in groups]
    engine = rt.prepare(model, groups, BASE_LR, (0.9, 0.95), WD)
    out = Path(args.out) / f"unit_{stage}_zero{zero}"
    ckpt = out / "ckpt"
    report = {"losses": [], "lrs": [], "applied": [], "expected_applied": [], "scales": scales,
              "lr_scale_keys": lr_scale_keys}
    start = 0
    if args.resume:
        meta = rt.load(str(ckpt), f"step{args.save_at}")
        start = meta["step"] + 1
        report["resumed_meta"] = meta
    before = rt.full_state_dict() if start == 0 else None
    for step in range(start, args.steps):
        torch.manual_seed(10_000 + 100 * step + rt.rank)  # drop path draws: a function of (step, rank) alone
        rt.set_lr(lr_at(step, args.steps))
        report["lrs"].append(rt.lrs())
        total = 0.0
        for micro in range(args.accum):
            images, labels = (t.to(rt.device) for t in batch(step, micro, rt.rank, rt.world, args.accum))
            with rt.autocast():
                loss = loss_of(engine, stage, images, labels)
            rt.backward(loss)
            total += float(loss.detach())
            boundary = rt.step()
            assert boundary == (micro == args.accum - 1), (step, micro, boundary)
        report["losses"].append(rt.all_reduce_mean(total / args.accum))
        if before is not None:  # first AdamW update: |w1 - w0 (1 - lr wd)| = lr |g| / (|g| + eps): its max over a group is lr_group
            after = rt.full_state_dict()
            for gi, group_names in enumerate(names):
                lr_g = lr_at(step, args.steps) * scales[gi]
                ratios = []
                for n in group_names:
                    step_size = (after[n].double() - before[n].double() * (1 - lr_g * wds[gi])).abs()
                    ratios.append(step_size[step_size > 0].flatten())
                report["applied"].append(float(torch.cat(ratios).max()))
                report["expected_applied"].append(lr_g)
            before = None
        if step == args.save_at and not args.resume:
            rt.save(str(ckpt), f"step{step}", {"step": step, "stage": stage})
    sd = rt.full_state_dict()
    sums = [torch.zeros(1, dtype=torch.float64, device=rt.device) for _ in range(rt.world)]
    torch.distributed.all_gather(sums, checksum(sd).to(rt.device))
    report["checksums"] = [float(s.cpu()) for s in sums]
    report["group_lr_scale_in_optimizer"] = [g.get("lr_scale") for g in rt.optimizer.param_groups]
    report["zero_stage"] = rt.zero_stage
    if rt.is_main:
        from safetensors.torch import save_file

        tag = "resumed" if args.resume else "full"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / f"{tag}.safetensors"))
        (out / f"{tag}.json").write_text(json.dumps(report))
    rt.barrier()


# --------------------------------------------------------------------------------------------------- the real loop
LT = [60, 40, 25, 15, 10, 8, 6, 5, 4, 3]  # long-tailed Fashion-MNIST class sizes (176 images; 96 used for training)
CRASH_AFTER = {"mgp": 10, "bft": 7}  # batches handed out before the simulated kill (see run_loop_job)


def loop_cfg(out: Path, stage: str, zero: int, init: str = None) -> TrainConfig:
    """2 epochs x 3 optimizer steps (96 images over 2 ranks, micro-batch 8, accumulation 2) at 16 px."""
    cfg = TrainConfig()
    cfg.deepspeed = {"zero_optimization": {"stage": zero}}
    cfg.run.stage = "pretrain" if stage == "mgp" else "finetune"
    cfg.run.out, cfg.run.epochs, cfg.run.device, cfg.run.amp = str(out), 2, DEVICE, AMP
    cfg.run.log_every, cfg.run.progress, cfg.run.vis_every, cfg.run.tensorboard = 1, False, 1, False
    cfg.run.ckpt_every_steps = 2
    from engine_doubles import tiny_vit

    tiny_vit(cfg, IMG, decoder_embed_dim=16)
    cfg.data.batch_size, cfg.optim.accum_iter, cfg.optim.clip_grad = 8, 2, 1.0
    m = cfg.model
    if stage == "bft":
        cfg.optim.betas, cfg.optim.layer_decay, cfg.optim.min_lr = (0.9, 0.99), 0.75, 1e-6
        m.drop_path, m.init, cfg.loss.name, cfg.loss.fused = 0.1, init, "bal_bce", "torch"
        cfg.data.mixup, cfg.data.cutmix, cfg.data.reprob, cfg.data.smoothing = 0.8, 1.0, 0.25, 0.1
        cfg.data.val, cfg.run.eval_every = "memory", 1
    return cfg


def loop_loaders(crash_after=None):
    """Loader factory: in-memory Fashion-MNIST-LT at 16 px, sharded over the ranks (the test double of the engine)."""
    from engine_doubles import MemoryLoader, fmnist_longtail, write_manifest
    from fastlivt.data.augment import BatchAugment

    x, y = fmnist_longtail("train", LT)
    xt, yt = fmnist_longtail("test", [10] * 10)
    x, xt = torch.nn.functional.avg_pool2d(x, 2), torch.nn.functional.avg_pool2d(xt, 2)
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:96]

    class OnDevice(MemoryLoader):
        def __iter__(self):
            for images, labels in super().__iter__():
                yield images.to(DEVICE), labels.to(DEVICE)

    MemoryLoader_ = OnDevice if DEVICE == "cuda" else MemoryLoader

    def make(cfg, split, stage, runtime):
        root = Path(cfg.run.out) / "manifests"
        if split == "val":
            m = write_manifest(root / f"val{runtime.rank}", yt.numpy(), 10, split="val")
            return MemoryLoader_(xt, yt, 16, m, shuffle=False, drop_last=False, rank=runtime.rank, world=runtime.world)
        m = write_manifest(root / f"train{runtime.rank}", y.numpy(), 10)
        m.class_counts = list(LT)
        aug = None
        if stage == "finetune":
            aug = BatchAugment(10, cfg.data.mixup, cfg.data.cutmix, cfg.data.smoothing, cfg.data.reprob,
                               seed=cfg.run.seed)
        return MemoryLoader_(x[keep], y[keep], cfg.data.batch_size, m, seed=cfg.run.seed, crash_after=crash_after,
                            batch_augment=aug, rank=runtime.rank, world=runtime.world)
    return make


def run_loop_job(stage: str, zero: int, args) -> None:
    """Run ``a`` (uninterrupted) and ``b`` (killed after CRASH_AFTER batches), or with ``--resume`` finish ``b``."""
    from engine_doubles import SimulatedCrash
    from fastlivt.engine.finetune import BFTTask
    from fastlivt.engine.loop import train
    from fastlivt.engine.pretrain import MGPTask

    out = Path(args.out) / f"loop_{stage}_zero{zero}"
    init = str(Path(args.out) / "loop_mgp_zero2" / "a" / "encoder.safetensors") if stage == "bft" else None
    task_cls = MGPTask if stage == "mgp" else BFTTask
    runs = {}
    if not args.resume:
        runs["a"] = train(loop_cfg(out / "a", stage, zero, init), task_cls(), make_loader=loop_loaders())
        try:
            train(loop_cfg(out / "b", stage, zero, init), task_cls(), make_loader=loop_loaders(CRASH_AFTER[stage]))
            raise AssertionError("the simulated kill did not happen")
        except SimulatedCrash:
            pass
    else:
        runs["b"] = train(loop_cfg(out / "b", stage, zero, init), task_cls(), resume=True, make_loader=loop_loaders())
    for name, run in runs.items():
        rt = run.runtime
        sd = rt.full_state_dict()
        local = {n: p.detach().clone() for n, p in rt.unwrap().named_parameters() if zero < 3}
        mine = torch.cat([checksum(sd), checksum(local) if local else torch.zeros(1, dtype=torch.float64)])
        sums = [torch.zeros(2, dtype=torch.float64, device=rt.device) for _ in range(rt.world)]
        torch.distributed.all_gather(sums, mine.to(rt.device))
        if rt.is_main:
            report = {"step": run.step, "summary": {k: v for k, v in run.summary.items() if k != "last_eval"},
                      "last_eval": run.summary.get("last_eval"), "checksums": [s.cpu().tolist() for s in sums],
                      "zero_stage": rt.zero_stage, "lr_scales": [g.get("lr_scale") for g in rt.optimizer.param_groups]}
            (out / f"{name}.json").write_text(json.dumps(report, default=str))
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in sd.items()}, str(out / f"{name}_state.safetensors"))
        rt.barrier()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", default="unit:mgp:2,unit:bft:3,loop:mgp:2,loop:bft:3")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-at", type=int, default=2)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: bf16, one process per GPU")
    args = p.parse_args()
    t0 = time.time()
    for job in args.jobs.split(","):
        kind, stage, zero = job.split(":")
        (run_job if kind == "unit" else run_loop_job)(stage, int(zero), args)
    if torch.distributed.get_rank() == 0:
        print(f"ds_worker: {args.jobs} done in {time.time() - t0:.1f}s", flush=True)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without interpreter teardown: a loader's native worker thread still joinable at exit can abort the
    # process ("terminate called without an active exception") after every result was written and checked.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

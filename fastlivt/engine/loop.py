"""The one training loop of both stages (MGP and BFT), under either runtime (plain PyTorch/DDP or DeepSpeed).

Read top to bottom: build the runtime, the data, the model and its parameter groups, the schedule; maybe resume;
then for each epoch and each micro-batch: set the lr (at the start of an accumulation cycle), forward under the
runtime's autocast, backward, step; log; checkpoint every ``run.ckpt_every_steps`` optimizer steps and at each epoch
end; call the task's epoch-end hook (evaluation, reconstructions); finally the task's exports.

What differs between MGP and BFT is a :class:`Task` (``fastlivt.engine.pretrain.MGPTask``,
``fastlivt.engine.finetune.BFTTask``). The loader is ``fastlivt.data.build_loader`` unless a test injects another
object with the same interface: ``len(loader)`` batches per epoch on this rank, ``loader.set_epoch(epoch)`` (the
order re-created from (seed, epoch)), ``loader.skip(n)`` (the next pass leaves out its first n batches), iteration
over ``(images, labels)`` on the device, ``loader.manifest`` and ``loader.batch_augment``.

Exact resume: a checkpoint is taken at an accumulation boundary and records (epoch, micro-batches consumed in that
epoch, optimizer step) and the RNG states; on ``--resume`` the same epoch's order is rebuilt, the consumed batches
are skipped, the weights/optimizer/RNG restored — on CPU the continued run equals the uninterrupted one bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Protocol

import torch
from torch import nn

from fastlivt.config import TrainConfig, save_config, to_dict
from fastlivt.engine import checkpoint as ckpt
from fastlivt.engine.logger import TrainLogger, mfu_reference
from fastlivt.engine.optim import param_groups, peak_lr
from fastlivt.engine.runtime import Runtime
from fastlivt.engine.schedule import WarmupCosine
from fastlivt.logs import get_logger
from fastlivt.manifest import MANIFEST_NAME, sha256_file

log = get_logger(__name__)


class Task(Protocol):
    """What a stage adds to the loop. ``name`` is ``mgp`` or ``bft``, ``stage`` the loader's stage (``pretrain`` or
    ``finetune``); the hooks get the :class:`Run`."""

    name: str
    stage: str

    def build_model(self, cfg: TrainConfig, manifest: Any) -> nn.Module: ...

    def setup(self, run: "Run") -> None: ...  # after prepare(): losses, EMA, eval loader

    def forward(self, run: "Run", images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Dict[str, float]]: ...

    def after_step(self, run: "Run") -> None: ...  # after each optimizer step (EMA update)

    def end_of_epoch(self, run: "Run", epoch: int) -> None: ...  # evaluation, best checkpoint, reconstructions

    def state_dict(self) -> Dict[str, Any]: ...  # goes into checkpoint meta["extra"]

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...

    def finish(self, run: "Run") -> None: ...  # exports


@dataclass
class Run:
    """The state of one training run that the task hooks may read: config, runtime, the model as returned by
    ``runtime.prepare`` (maybe wrapped), the training loader, the schedule, the logger, the output directory, the
    loader factory (for evaluation loaders), the progress (optimizer ``step``, ``epoch``) and a ``summary`` of
    results (exports, last evaluation)."""

    cfg: TrainConfig
    runtime: Runtime
    model: nn.Module
    loader: Any
    schedule: WarmupCosine
    logger: TrainLogger
    out: Path
    manifest_sha256: str
    make_loader: "LoaderFactory"
    step: int = 0
    epoch: int = 0
    summary: Dict[str, Any] = field(default_factory=dict)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / ckpt.CKPT_DIR

    def save(self, tag: str, epoch: int, batch_in_epoch: int, task: Task) -> None:
        """Checkpoint ``tag`` (every rank calls it): weights + optimizer by the runtime, the rest in ``meta``."""
        meta = ckpt.build_meta(
            epoch=epoch, batch_in_epoch=batch_in_epoch, step=self.step,
            sampler={"kind": self.cfg.data.sampler, "seed": self.cfg.run.seed, "epoch": epoch,
                     "batches_consumed": batch_in_epoch, "world": self.runtime.world},
            schedule=self.schedule.state_dict(), config=to_dict(self.cfg), manifest_sha256=self.manifest_sha256,
            extra=task.state_dict())
        self.runtime.save(str(self.ckpt_dir), tag, meta)


def build_runtime(cfg: TrainConfig) -> Runtime:
    """DeepSpeed when the config has a ``deepspeed`` section, plain PyTorch (single process or DDP) otherwise."""
    if cfg.deepspeed is not None:
        from fastlivt.engine.ds_runtime import DeepSpeedRuntime

        return DeepSpeedRuntime(cfg)
    from fastlivt.engine.torch_runtime import TorchRuntime

    return TorchRuntime(cfg)


def default_loader(cfg: TrainConfig, split: str, stage: str, runtime: Runtime) -> Any:
    from fastlivt.data import build_loader

    return build_loader(cfg, split, stage, device=runtime.device, rank=runtime.rank, world=runtime.world)


LoaderFactory = Callable[[TrainConfig, str, str, Runtime], Any]


def train(cfg: TrainConfig, task: Task, resume: bool = False, make_loader: LoaderFactory = default_loader) -> Run:
    """Train ``task`` as ``cfg`` says; ``resume`` continues from ``<run.out>/checkpoints/last``. Returns the :class:`Run`."""
    # ---- runtime, seeds, data
    runtime = build_runtime(cfg)
    ckpt.seed_everything(cfg.run.seed)  # same initial weights on every rank
    out = Path(cfg.run.out)
    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    loader = make_loader(cfg, "train", task.stage, runtime)
    manifest = loader.manifest
    manifest_sha256 = sha256_file(Path(manifest.root) / MANIFEST_NAME)
    accum = runtime.accum_steps
    steps_per_epoch = len(loader) // accum
    micro_per_epoch = steps_per_epoch * accum
    if len(loader) % accum:
        log.info("%d batches per epoch, accumulation %d: the last %d batch(es) of each epoch are left out",
                 len(loader), accum, len(loader) % accum)

    # ---- model, optimizer, schedule
    model = task.build_model(cfg, manifest)
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    lr = peak_lr(cfg.optim.blr, cfg.optim.lr, cfg.data.batch_size, accum, runtime.world)
    effective = cfg.data.batch_size * accum * runtime.world
    log.info("effective batch %d = %d x accum %d x world %d; peak lr %.3g", effective, cfg.data.batch_size, accum,
             runtime.world, lr)
    model = runtime.prepare(model, groups, lr, cfg.optim.betas, cfg.optim.weight_decay)
    schedule = WarmupCosine(lr, cfg.optim.min_lr, cfg.optim.warmup_epochs, cfg.run.epochs, steps_per_epoch)
    ckpt.seed_everything(cfg.run.seed + runtime.rank)  # masks, drop path and mixup differ across ranks

    logger_args = dict(enabled=runtime.is_main, total_steps=schedule.total_steps, desc=task.name.upper(),
                       progress=cfg.run.progress, tensorboard=cfg.run.tensorboard, world=runtime.world,
                       **mfu_reference(cfg, task.name, manifest.num_classes, runtime.device,
                                       bool(getattr(runtime, "bf16", False)), runtime.is_main))
    run = Run(cfg, runtime, model, loader, schedule, None, out, manifest_sha256, make_loader)  # type: ignore[arg-type]
    task.setup(run)

    # ---- resume
    start_epoch, skip = 0, 0
    if resume:
        if not ckpt.has_checkpoint(run.ckpt_dir, "last"):
            raise FileNotFoundError(f"--resume: no checkpoint 'last' in {run.ckpt_dir}")
        meta = runtime.load(str(run.ckpt_dir), "last")
        ckpt.check_meta(meta, str(run.ckpt_dir / "last"), manifest_sha256)
        schedule.check_resumable(meta["schedule"])
        task.load_state_dict(meta["extra"])
        start_epoch, skip, run.step = meta["epoch"], meta["batch_in_epoch"], meta["step"]
        log.info("resumed from %s: epoch %d, batch %d, step %d", run.ckpt_dir / "last", start_epoch, skip, run.step)
    run.logger = TrainLogger(out, start_step=run.step, resume=resume, **logger_args)
    # The checkpoint's RNG states are restored at the point of the timeline where they were captured: before the
    # epoch's iterator is created for an epoch-boundary checkpoint, after it has produced its first batch for a
    # mid-epoch one (creating an iterator, e.g. a DataLoader's, may draw random numbers).
    pending_rng = meta["rng"] if resume else None

    # ---- the loop
    max_steps = cfg.run.max_steps or schedule.total_steps
    sums: Dict[str, torch.Tensor] = {}  # per-micro-batch scalars summed on the device until the next log line
    n_sum = 0
    done = run.step >= max_steps
    for epoch in range(start_epoch, cfg.run.epochs):
        if done:
            break
        run.epoch = epoch
        model.train()
        loader.set_epoch(epoch)
        if skip:
            loader.skip(skip)
        i = skip  # micro-batches of this epoch consumed so far
        if pending_rng is not None and skip == 0:
            ckpt.restore_rng(pending_rng)
            pending_rng = None
        for images, labels in run.logger.timed(loader):  # times the wait for each batch (train.csv data_wait)
            if pending_rng is not None:
                ckpt.restore_rng(pending_rng)
                pending_rng = None
            if i >= micro_per_epoch:
                break
            if i % accum == 0:
                runtime.set_lr(schedule(run.step))
            with runtime.autocast():
                loss, scalars = task.forward(run, images, labels)
            runtime.backward(loss)
            i += 1
            run.logger.count(images.shape[0] * runtime.world)
            for k, v in {"loss": loss, **scalars}.items():
                v = torch.as_tensor(v).detach().float()
                sums[k] = sums[k] + v if k in sums else v
            n_sum += 1
            if not runtime.step():
                continue
            run.step += 1
            task.after_step(run)
            write = run.step % cfg.run.log_every == 0 or run.step == max_steps
            row: Dict[str, float] = {}
            if write:
                row = {k: runtime.all_reduce_mean(float(v) / n_sum) for k, v in sums.items()}
                if not all(map(math.isfinite, row.values())):
                    raise FloatingPointError(f"non-finite training scalars at step {run.step} (epoch {epoch}): {row}")
                row["lr"] = schedule(run.step - 1)
                sums, n_sum = {}, 0
            run.logger.step(run.step, row, write)
            if cfg.run.ckpt_every_steps and run.step % cfg.run.ckpt_every_steps == 0:
                run.save("last", epoch, i, task)
            if run.step >= max_steps:
                done = True
                break
        skip = 0
        if pending_rng is not None:  # resumed at the very end of an epoch: no batch was left to read
            ckpt.restore_rng(pending_rng)
            pending_rng = None
        if done and i < micro_per_epoch:  # stopped by run.max_steps inside an epoch
            run.save("last", epoch, i, task)
            break
        task.end_of_epoch(run, epoch)
        run.save("last", epoch + 1, 0, task)
        run.logger.note(f"epoch {epoch} done (step {run.step}/{schedule.total_steps})")

    task.finish(run)
    run.logger.close()
    runtime.barrier()
    return run

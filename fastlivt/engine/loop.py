"""The one training loop of both stages (MGP and BFT), under either runtime (plain PyTorch/DDP or DeepSpeed).

Read top to bottom: build the runtime, the data, the model and its parameter groups, the schedule; maybe resume;
then for each epoch and each micro-batch: set the lr (at the start of an accumulation cycle), forward under the
runtime's autocast, backward, step; log; checkpoint every ``run.ckpt_every_steps`` optimizer steps and at each epoch
end; call the task's epoch-end hook (evaluation, reconstructions); finally the task's exports.

What differs between MGP and BFT is a :class:`Task` (``fastlivt.engine.pretrain.MGPTask``,
``fastlivt.engine.finetune.BFTTask``). The loader is ``fastlivt.data.build_loader`` unless a test injects another
object with the same interface: ``len(loader)`` batches per epoch on this rank, ``loader.set_epoch(epoch)`` (the
order re-created from (seed, epoch)), ``loader.seek(consumed, end)`` (the next pass reads positions [consumed, end)
of the epoch's global order, split over the ranks), iteration
over ``(images, labels)`` on the device, ``loader.manifest`` and ``loader.batch_augment``.

Exact resume: a checkpoint is taken at an accumulation boundary and records (epoch, samples of the epoch's global
order consumed, optimizer step) and the RNG states; on ``--resume`` the same epoch's order is rebuilt, the loader
seeks past the consumed samples, the weights/optimizer/RNG are restored — on CPU the continued run equals the
uninterrupted one bit for bit. On another number of processes the rest of the epoch's order is split over the new
ranks and the accumulation adapts (:mod:`fastlivt.engine.resume`, :mod:`fastlivt.engine.elastic`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from data_prep.manifest import MANIFEST_NAME, sha256_file
from fastlivt.config import TrainConfig, check_combinations, save_config
from fastlivt.engine import checkpoint as ckpt
from fastlivt.engine.logger import TrainLogger, mfu_reference
from fastlivt.engine.nonfinite import NonFiniteMonitor
from fastlivt.engine.optim import param_groups, peak_lr
from fastlivt.engine.resume import Position, read_last_checkpoint, restore, restoring_rng, resume_position
from fastlivt.engine.run import LoaderFactory, Run, Task
from fastlivt.engine.run_lock import acquire_for_ranks
from fastlivt.engine.runtime import Runtime
from fastlivt.engine.schedule import WarmupCosine
from fastlivt.logs import get_logger

log = get_logger(__name__)


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


def train(cfg: TrainConfig, task: Task, resume: bool = False, make_loader: LoaderFactory = default_loader) -> Run:
    """Train ``task`` as ``cfg`` says; ``resume`` continues from ``<run.out>/checkpoints/last``. Returns the :class:`Run`.
    The run directory is locked for the run's life (:mod:`fastlivt.engine.run_lock`); non-finite values are handled
    as ``run.nonfinite`` says (:mod:`fastlivt.engine.nonfinite`)."""
    check_combinations(cfg)
    saved = read_last_checkpoint(cfg) if resume else None  # before the runtime: accumulation follows the old world
    run, start = build_run(cfg, task, make_loader, saved)
    try:
        task.setup(run)
        if saved is not None:
            restore(run, task, start)
            run.last_good = (str(run.ckpt_dir / "last"), run.step)
        epoch = start.epoch
        while epoch < cfg.run.epochs and run_epoch(run, task, epoch, start if epoch == start.epoch else Position(epoch)):
            epoch += 1
        run.check_finite()  # before the exports
        task.finish(run)
        run.runtime.barrier()
    finally:
        run.logger.close()
        if run.lock is not None:
            run.lock.release()
    return run


def build_run(cfg: TrainConfig, task: Task, make_loader: LoaderFactory, saved: Optional[Dict[str, Any]]):
    """The runtime, the data, the model under the runtime with its optimizer, the schedule and the logger, as a
    complete :class:`Run`; and the :class:`Position` to start from (``saved``: the checkpoint's meta to resume)."""
    runtime = build_runtime(cfg)
    out = Path(cfg.run.out)
    lock = acquire_for_ranks(out, runtime)  # before anything is written under run.out
    try:
        return _build_run(cfg, task, make_loader, saved, runtime, out, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build_run(cfg: TrainConfig, task: Task, make_loader: LoaderFactory, saved: Optional[Dict[str, Any]],
               runtime: Runtime, out: Path, lock: Any):
    ckpt.seed_everything(cfg.run.seed)  # same initial weights on every rank
    if runtime.is_main:
        save_config(cfg, out / "config.yaml")
    loader = make_loader(cfg, "train", task.stage, runtime)
    manifest = loader.manifest
    accum = runtime.accum_steps
    steps_per_epoch = len(loader) // accum
    if len(loader) % accum:
        log.info("%d batches per epoch, accumulation %d: the last %d batch(es) of each epoch are left out",
                 len(loader), accum, len(loader) % accum)

    model = task.build_model(cfg, manifest)
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    lr = peak_lr(cfg.optim.blr, cfg.optim.lr, cfg.data.batch_size, accum, runtime.world)
    log.info("effective batch %d = %d x accum %d x world %d; peak lr %.3g", cfg.data.batch_size * accum * runtime.world,
             cfg.data.batch_size, accum, runtime.world, lr)
    model = runtime.prepare(model, groups, lr, cfg.optim.betas, cfg.optim.weight_decay)
    runtime.nonfinite = NonFiniteMonitor(cfg.run.nonfinite, cfg.run.nonfinite_max_skips, runtime.device, runtime.world)
    schedule = WarmupCosine(lr, cfg.optim.min_lr, cfg.optim.warmup_epochs, cfg.run.epochs, steps_per_epoch)
    ckpt.seed_everything(cfg.run.seed + runtime.rank)  # masks, drop path and mixup differ across ranks

    per_micro = cfg.data.batch_size * runtime.world
    start = Position() if saved is None else resume_position(saved, cfg, steps_per_epoch, accum, per_micro)
    logger = TrainLogger(out, start_step=start.step, resume=saved is not None, enabled=runtime.is_main,
                         total_steps=schedule.total_steps, desc=task.name.upper(), progress=cfg.run.progress,
                         tensorboard=cfg.run.tensorboard, world=runtime.world,
                         **mfu_reference(cfg, task.name, manifest.num_classes, runtime.device, runtime.bf16,
                                         runtime.is_main))
    run = Run(cfg, runtime, model, loader, schedule, logger, out, sha256_file(Path(manifest.root) / MANIFEST_NAME),
              make_loader, micro_per_epoch=steps_per_epoch * accum, per_micro=per_micro, step=start.step, lock=lock)
    return run, start


def run_epoch(run: Run, task: Task, epoch: int, at: Position) -> bool:
    """Epoch ``epoch`` from position ``at``: for each micro-batch set the lr (at the start of an accumulation cycle),
    forward under the runtime's autocast, backward, step; log; checkpoint every ``run.ckpt_every_steps`` steps; then
    the task's epoch-end hook and the epoch-end checkpoint. False when ``run.max_steps`` has stopped the run."""
    cfg, runtime, loader = run.cfg, run.runtime, run.loader
    max_steps = cfg.run.max_steps or run.schedule.total_steps
    if run.step >= max_steps:
        return False
    accum, per_micro = runtime.accum_steps, run.per_micro
    run.epoch = epoch
    run.model.train()
    loader.set_epoch(epoch)
    pos, end = at.consumed, (at.end if at.consumed else run.micro_per_epoch * per_micro)
    if at.consumed:
        loader.seek(at.consumed, end)
    micro_left = (end - pos) // (per_micro * accum) * accum  # whole accumulation cycles of what is left of the plan
    if at.consumed and (end - pos) > micro_left * per_micro:
        log.info("the last %d sample(s) of epoch %d's plan make no whole step on %d process(es); left out",
                 end - pos - micro_left * per_micro, epoch, runtime.world)
    i, stopped = 0, False  # micro-batches of this pass; whether run.max_steps was reached
    for images, labels in run.logger.timed(restoring_rng(loader, at.rng, mid_epoch=at.consumed > 0)):
        if i >= micro_left:
            break
        if i % accum == 0:
            runtime.set_lr(run.schedule(run.step))
            runtime.nonfinite.step_number = run.step + 1
        with runtime.autocast():
            loss, scalars = task.forward(run, images, labels)
        runtime.backward(loss)
        i += 1
        pos += per_micro
        run.logger.count(images.shape[0] * runtime.world)
        for k, v in {"loss": loss, **scalars}.items():  # means over the finite values (skipped steps left out)
            v = torch.as_tensor(v).detach().float()
            ok = torch.isfinite(v)
            v, ok = torch.where(ok, v, 0.0), ok.float()
            run.scalar_sums[k] = run.scalar_sums[k] + v if k in run.scalar_sums else v
            run.scalar_counts[k] = run.scalar_counts[k] + ok if k in run.scalar_counts else ok
        if not runtime.step():
            continue
        run.step += 1
        task.after_step(run)
        log_step(run, epoch, write=run.step % cfg.run.log_every == 0 or run.step == max_steps)
        if cfg.run.ckpt_every_steps and run.step % cfg.run.ckpt_every_steps == 0:
            run.save("last", epoch, pos, task, end)
        if run.step >= max_steps:
            stopped = True
            break
    if stopped and i < micro_left:  # stopped inside the epoch
        run.save("last", epoch, pos, task, end)
        return False
    run.check_finite()  # before the evaluation and its 'best' export
    task.end_of_epoch(run, epoch)
    run.save("last", epoch + 1, 0, task, run.micro_per_epoch * per_micro)
    run.logger.note(f"epoch {epoch} done (step {run.step}/{run.schedule.total_steps})")
    return not stopped


def log_step(run: Run, epoch: int, write: bool) -> None:
    """The logger's step; with ``write``, the non-finite check (:meth:`Run.check_finite`) and the mean of each
    scalar's finite values since the last row over micro-batches and ranks (NaN when a window had none)."""
    row: Dict[str, float] = {}
    if write:
        run.check_finite()
        row = {}
        for k, v in run.scalar_sums.items():
            n = float(run.scalar_counts[k])
            row[k] = run.runtime.all_reduce_mean(float(v) / n if n else math.nan)
        row["lr"] = run.schedule(run.step - 1)
        run.scalar_sums, run.scalar_counts = {}, {}
    run.logger.step(run.step, row, write)

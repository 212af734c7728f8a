"""The one training loop of both stages (MGP and BFT), under either runtime (plain PyTorch/DDP or DeepSpeed).

Read top to bottom: maybe plan a resume, build the run (:mod:`fastlivt.engine.build`), restore its parts from the
checkpoint; then for each epoch and each micro-batch: set the lr (at the start of an accumulation cycle), forward under
the runtime's autocast, backward, step; log; checkpoint every ``run.ckpt_every_steps`` optimizer steps and at each
epoch end; call the task's epoch-end hook (evaluation, reconstructions); finally the task's exports.

What differs between MGP and BFT is a :class:`Task` (``fastlivt.engine.pretrain.MGPTask``,
``fastlivt.engine.finetune.BFTTask``). The loader is ``fastlivt.data.build_loader`` unless a test injects another
object meeting :class:`fastlivt.data.contract.BatchLoader` (``len``, ``set_epoch``, ``seek(consumed, end)``: the next
pass reads positions [consumed, end) of the epoch's global order split over the ranks, iteration over
``(images, labels)`` on the device — labels a MixTarget when the loader applies BFT's batch augmentation —
``manifest``, ``batch_augment``).

Exact resume: the run's state is parts that save and load themselves (:mod:`fastlivt.engine.checkpointer`): the
:class:`~fastlivt.engine.train_state.TrainState` (epoch, step, samples of the epoch's global order consumed, where the
pass ends), the loader position, the random streams, the task, the model and optimizer through the runtime. A
checkpoint is taken at an accumulation boundary; on ``--resume`` the same epoch's order is rebuilt, the loader seeks
past the consumed samples, the weights/optimizer/RNG are restored — on CPU the continued run equals the uninterrupted
one bit for bit. On another number of processes the rest of the epoch's order is split over the new ranks and the
accumulation adapts (:mod:`fastlivt.engine.resume`, :mod:`fastlivt.engine.elastic`).
"""
from __future__ import annotations

import math
from typing import Dict

import torch

from fastlivt.config import TrainConfig, check_combinations
from fastlivt.engine.build import build_run, build_runtime, default_loader
from fastlivt.engine.resume import read_resume
from fastlivt.engine.run import LoaderFactory, Run, Task
from fastlivt.logs import get_logger

log = get_logger(__name__)

__all__ = ["build_runtime", "log_step", "Run", "run_epoch", "Task", "train"]


def train(cfg: TrainConfig, task: Task, resume: bool = False, make_loader: LoaderFactory = default_loader) -> Run:
    """Train ``task`` as ``cfg`` says; ``resume`` continues from ``<run.out>/checkpoints/last``. Returns the :class:`Run`
    (``run.cfg``: the config the run went on with). The run directory is locked for the run's life
    (:mod:`fastlivt.engine.run_lock`); non-finite values are handled as ``run.nonfinite`` says
    (:mod:`fastlivt.engine.nonfinite`)."""
    check_combinations(cfg)
    cfg, plan = read_resume(cfg) if resume else (cfg, None)  # before the runtime: accumulation follows the old world
    run = build_run(cfg, task, make_loader, plan)
    try:
        task.setup(run)
        if plan is not None:
            run.checkpointer.load("last", plan.reshard, cfg.run.seed)
        while run.state.epoch < cfg.run.epochs and run_epoch(run, task):
            pass
        run.check_finite()  # before the exports
        task.finish(run)
        run.runtime.barrier()
    finally:
        run.logger.close()
        if run.lock is not None:
            run.lock.release()
    return run


def run_epoch(run: Run, task: Task) -> bool:
    """The rest of epoch ``run.state.epoch``: for each micro-batch set the lr (at the start of an accumulation cycle),
    forward under the runtime's autocast, backward, step; log; checkpoint every ``run.ckpt_every_steps`` steps; then
    the task's epoch-end hook and the epoch-end checkpoint. False when ``run.max_steps`` has stopped the run."""
    cfg, runtime, state, geometry, checkpointer = run.cfg, run.runtime, run.state, run.geometry, run.checkpointer
    max_steps = cfg.run.max_steps or run.schedule.total_steps
    if state.step >= max_steps:
        return False
    run.epoch = epoch = state.epoch
    run.model.train()
    micro_left = state.begin_pass(geometry)  # whole accumulation cycles of what is left of the epoch's plan
    checkpointer.position.apply()
    if state.mid_epoch and state.left_out(geometry, micro_left):
        log.info("the last %d sample(s) of epoch %d's plan make no whole step on %d process(es); left out",
                 state.left_out(geometry, micro_left), epoch, runtime.world)
    i = 0  # micro-batches of this pass
    batches = checkpointer.streams.around(run.loader, mid_epoch=state.mid_epoch)
    for images, labels in run.logger.timed(batches):
        if i >= micro_left:
            break
        if i % geometry.accum == 0:
            runtime.set_lr(run.schedule(state.step))
            runtime.nonfinite.step_number = state.step + 1
        with runtime.autocast():
            loss, scalars = task.forward(run, images, labels)
        runtime.backward(loss)
        i += 1
        state.advance(geometry)
        run.logger.count(images.shape[0] * runtime.world)
        add_scalars(run, {"loss": loss, **scalars})
        if not runtime.step():
            continue
        state.step += 1
        task.after_step(run)
        log_step(run, epoch, write=state.step % cfg.run.log_every == 0 or state.step == max_steps)
        if cfg.run.ckpt_every_steps and state.step % cfg.run.ckpt_every_steps == 0:
            checkpointer.save("last")
        if state.step >= max_steps:
            break
    stopped = state.step >= max_steps
    if stopped and i < micro_left:  # stopped inside the epoch
        checkpointer.save("last")
        return False
    run.check_finite()  # before the evaluation and its 'best' export
    state.end_epoch(geometry)
    task.end_of_epoch(run, epoch)
    checkpointer.save("last")
    run.logger.note(f"epoch {epoch} done (step {state.step}/{run.schedule.total_steps})")
    return not stopped


def add_scalars(run: Run, values: Dict[str, object]) -> None:
    """Add a micro-batch's scalars to the sums logged next, finite values only (skipped steps left out)."""
    for k, v in values.items():
        v = torch.as_tensor(v).detach().float()
        ok = torch.isfinite(v)
        v, ok = torch.where(ok, v, 0.0), ok.float()
        run.scalar_sums[k] = run.scalar_sums[k] + v if k in run.scalar_sums else v
        run.scalar_counts[k] = run.scalar_counts[k] + ok if k in run.scalar_counts else ok


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

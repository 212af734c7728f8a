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
ranks and the accumulation adapts (:mod:`fastlivt.engine.elastic`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Protocol

import torch
from torch import nn

from data_prep.manifest import MANIFEST_NAME, sha256_file
from fastlivt.config import TrainConfig, save_config, to_dict
from fastlivt.engine import checkpoint as ckpt
from fastlivt.engine import elastic
from fastlivt.engine.logger import TrainLogger, mfu_reference
from fastlivt.engine.optim import param_groups, peak_lr
from fastlivt.engine.runtime import Runtime
from fastlivt.engine.schedule import WarmupCosine
from fastlivt.logs import get_logger

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

    def save(self, tag: str, epoch: int, consumed: int, task: Task, epoch_samples: int = 0) -> None:
        """Checkpoint ``tag`` (every rank calls it): weights + optimizer by the runtime, the rest in ``meta``.
        ``consumed``: positions of ``epoch``'s global order read so far; ``epoch_samples``: where its plan ends."""
        world, batch = self.runtime.world, self.cfg.data.batch_size
        meta = ckpt.build_meta(
            epoch=epoch, batch_in_epoch=consumed // (batch * world), step=self.step,
            sampler={"kind": self.cfg.data.sampler, "seed": self.cfg.run.seed, "epoch": epoch,
                     "samples_consumed": consumed, "epoch_samples": epoch_samples, "world": world,
                     "accum": self.runtime.accum_steps, "batch_size": batch},
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
    # ---- resume plan (before the runtime: the accumulation depends on the checkpoint's world size)
    ckpt_dir = Path(cfg.run.out) / ckpt.CKPT_DIR
    saved: Dict[str, Any] = {}
    if resume:
        if not ckpt.has_checkpoint(ckpt_dir, "last"):
            raise FileNotFoundError(f"--resume: no checkpoint 'last' in {ckpt_dir}")
        saved = ckpt.peek_meta(ckpt_dir, "last")
        reshard = elastic.plan_resume(saved, cfg, elastic.launched_world())

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
    per_micro = cfg.data.batch_size * runtime.world  # positions of the epoch's global order per micro-batch
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
    start_epoch, consumed, epoch_end = 0, 0, 0
    pending_rng = None
    if resume:
        if runtime.world != reshard.world:
            raise RuntimeError(f"WORLD_SIZE said {reshard.world} processes, the runtime has {runtime.world}")
        meta = runtime.load(str(run.ckpt_dir), "last")
        ckpt.check_meta(meta, str(run.ckpt_dir / "last"), manifest_sha256)
        task.load_state_dict(meta["extra"])
        start_epoch, run.step = meta["epoch"], meta["step"]
        sampler = meta["sampler"]
        old_per_micro = cfg.data.batch_size * reshard.old_world
        consumed = int(sampler.get("samples_consumed", meta["batch_in_epoch"] * old_per_micro))
        epoch_end = int(sampler.get("epoch_samples", micro_per_epoch * old_per_micro)) if consumed else 0
        if reshard.changed:
            saved_schedule = dict(meta["schedule"])
            if saved_schedule["steps_per_epoch"] != steps_per_epoch:
                run.step = elastic.rescaled_step(start_epoch, consumed, steps_per_epoch, per_micro * accum)
                log.warning("steps per epoch %d -> %d: optimizer step %d continues as step %d of the new schedule",
                            saved_schedule["steps_per_epoch"], steps_per_epoch, meta["step"], run.step)
            if not reshard.kept:
                saved_schedule["peak_lr"] = schedule.peak_lr
            saved_schedule["steps_per_epoch"] = steps_per_epoch
            schedule.check_resumable(saved_schedule)
            seed = elastic.reseed_for(cfg.run.seed, run.step, runtime.rank)
            ckpt.seed_everything(seed)
            log.info("random streams re-seeded from (seed, step %d, rank %d): no bit-exact continuation across world "
                     "sizes", run.step, runtime.rank)
        else:
            schedule.check_resumable(meta["schedule"])
            # The checkpoint's RNG states are restored at the point of the timeline where they were captured: before
            # the epoch's iterator is created for an epoch-boundary checkpoint, after it has produced its first batch
            # for a mid-epoch one (creating an iterator, e.g. a DataLoader's, may draw random numbers).
            pending_rng = meta["rng"]
        log.info("resumed from %s: epoch %d, sample %d of %d, step %d", run.ckpt_dir / "last", start_epoch, consumed,
                 epoch_end, run.step)
    run.logger = TrainLogger(out, start_step=run.step, resume=resume, **logger_args)

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
        pos, end = consumed, (epoch_end if consumed else micro_per_epoch * per_micro)
        if consumed:
            loader.seek(consumed, end)
        # micro-batches this pass reads: whole accumulation cycles of what is left of the epoch's plan
        micro_left = (end - pos) // (per_micro * accum) * accum
        if consumed and (end - pos) > micro_left * per_micro:
            log.info("the last %d sample(s) of epoch %d's plan make no whole step on %d process(es); left out",
                     end - pos - micro_left * per_micro, epoch, runtime.world)
        i = 0  # micro-batches of this pass
        if pending_rng is not None and consumed == 0:
            ckpt.restore_rng(pending_rng)
            pending_rng = None
        for images, labels in run.logger.timed(loader):  # times the wait for each batch (train.csv data_wait)
            if pending_rng is not None:
                ckpt.restore_rng(pending_rng)
                pending_rng = None
            if i >= micro_left:
                break
            if i % accum == 0:
                runtime.set_lr(schedule(run.step))
            with runtime.autocast():
                loss, scalars = task.forward(run, images, labels)
            runtime.backward(loss)
            i += 1
            pos += per_micro
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
                run.save("last", epoch, pos, task, end)
            if run.step >= max_steps:
                done = True
                break
        consumed = 0
        if pending_rng is not None:  # resumed at the very end of an epoch: no batch was left to read
            ckpt.restore_rng(pending_rng)
            pending_rng = None
        if done and i < micro_left:  # stopped by run.max_steps inside an epoch
            run.save("last", epoch, pos, task, end)
            break
        task.end_of_epoch(run, epoch)
        run.save("last", epoch + 1, 0, task, micro_per_epoch * per_micro)
        run.logger.note(f"epoch {epoch} done (step {run.step}/{schedule.total_steps})")

    task.finish(run)
    run.logger.close()
    runtime.barrier()
    return run

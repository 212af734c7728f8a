"""Building a complete :class:`~fastlivt.engine.run.Run` from a config: the runtime, the data, the model under the
runtime with its optimizer, the schedule, the logger, the train state and the checkpointer of its parts."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from fastlivt.data_prep.manifest import MANIFEST_NAME, sha256_file
from fastlivt.config import TrainConfig, save_config, to_dict
from fastlivt.engine import checkpoint as ckpt
from fastlivt.engine.checkpointer import Checkpointer, RandomStreams
from fastlivt.engine.logger import TrainLogger, mfu_reference
from fastlivt.engine.nonfinite import NonFiniteMonitor
from fastlivt.engine.optim import param_groups, peak_lr
from fastlivt.engine.resume import Resume
from fastlivt.engine.run import LoaderFactory, Run, Task
from fastlivt.engine.run_lock import acquire_for_ranks
from fastlivt.engine.runtime import Runtime
from fastlivt.engine.schedule import WarmupCosine
from fastlivt.engine.train_state import Geometry, LoaderPosition, TrainState
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


def build_run(cfg: TrainConfig, task: Task, make_loader: LoaderFactory, resume: Optional[Resume]) -> Run:
    """The run of ``task`` as ``cfg`` says, at the start or where ``resume`` continues. The run directory is locked
    (:mod:`fastlivt.engine.run_lock`) before anything is written under it, and released if the build fails."""
    runtime = build_runtime(cfg)
    out = Path(cfg.run.out)
    lock = acquire_for_ranks(out, runtime)
    try:
        ckpt.seed_everything(cfg.run.seed)  # same initial weights on every rank
        if runtime.is_main:
            save_config(cfg, out / "config.yaml")
        loader = make_loader(cfg, "train", task.stage, runtime)
        manifest, accum = loader.manifest, runtime.accum_steps
        steps_per_epoch = len(loader) // accum
        if len(loader) % accum:
            log.info("%d batches per epoch, accumulation %d: the last %d batch(es) of each epoch are left out",
                     len(loader), accum, len(loader) % accum)
        geometry = Geometry(cfg.data.batch_size * runtime.world, accum, steps_per_epoch * accum)

        model = task.build_model(cfg, manifest)
        groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
        lr = peak_lr(cfg.optim.blr, cfg.optim.lr, cfg.data.batch_size, accum, runtime.world)
        log.info("effective batch %d = %d x accum %d x world %d; peak lr %.3g", geometry.per_step, cfg.data.batch_size,
                 accum, runtime.world, lr)
        model = runtime.prepare(model, groups, lr, cfg.optim.betas, cfg.optim.weight_decay)
        runtime.nonfinite = NonFiniteMonitor(cfg.run.nonfinite, cfg.run.nonfinite_max_skips, runtime.device,
                                             runtime.world)
        schedule = WarmupCosine(lr, cfg.optim.min_lr, cfg.optim.warmup_epochs, cfg.run.epochs, steps_per_epoch)
        ckpt.seed_everything(cfg.run.seed + runtime.rank)  # masks and drop path differ across ranks

        state = TrainState() if resume is None else resume.state(geometry, steps_per_epoch)
        logger = TrainLogger(out, start_step=state.step, resume=resume is not None, enabled=runtime.is_main,
                             total_steps=schedule.total_steps, desc=task.name.upper(), progress=cfg.run.progress,
                             tensorboard=cfg.run.tensorboard, world=runtime.world,
                             **mfu_reference(cfg, task.name, manifest.num_classes, runtime.device, runtime.bf16,
                                             runtime.is_main))
        run = Run(cfg, runtime, model, loader, schedule, logger, out, make_loader, state, geometry, lock=lock)
        position = LoaderPosition(loader, state, cfg.data.sampler, cfg.run.seed, runtime.world, accum,
                                  cfg.data.batch_size)
        run.checkpointer = Checkpointer(run.ckpt_dir, runtime, task, state, geometry, position, RandomStreams(),
                                        schedule, to_dict(cfg), sha256_file(Path(manifest.root) / MANIFEST_NAME),
                                        before_save=run.check_finite)
        return run
    except BaseException:
        if lock is not None:
            lock.release()
        raise

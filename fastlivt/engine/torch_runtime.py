"""Plain PyTorch runtime: one process, or ``torchrun`` DDP (nccl on CUDA, gloo on CPU), with DeepSpeed's semantics.

The loop calls, per micro-batch: ``with rt.autocast(): loss = f(model, batch)``, ``rt.backward(loss)``, ``rt.step()``.
Like DeepSpeed's engine, the runtime divides the loss by the accumulation steps itself, and ``step`` only clips,
steps AdamW and zeroes the gradients at an accumulation boundary (returning True then). Under DDP, micro-batches that
do not end a cycle run under ``no_sync()`` — entered in :meth:`autocast`, because DDP decides at forward time whether
the following backward all-reduces.

Checkpoints are one file ``directory/<tag>.pt`` holding model, optimizer, the runtime's counters and ``meta``, written
to a temporary name and renamed by rank 0 only. Model and optimizer state are whole (DDP replicates them), so a
checkpoint loads on any number of processes; it is read with ``weights_only=True`` (:func:`~fastlivt.engine.checkpoint.safe_load`).
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastlivt.data_prep.atomic import atomic_path
from fastlivt.config import ConfigError, TrainConfig
from fastlivt.engine.checkpoint import safe_load
from fastlivt.engine.nonfinite import refuse_nonfinite
from fastlivt.engine.optim import build_adamw
from fastlivt.engine.runtime import Runtime, bf16_autocast, resolve_device
from fastlivt.logs import get_logger
from fastlivt.models.compile import CompileChoice, compile_model, resolve_compile

log = get_logger(__name__)


def checkpoint_file(directory: str | Path, tag: str) -> Path:
    """Where :class:`TorchRuntime` keeps checkpoint ``tag``."""
    return Path(directory) / f"{tag}.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary beside ``path``, flush to disk, then rename: ``path`` is either the old or the
    new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


class TorchRuntime(Runtime):
    """Holds ``model`` (maybe DDP-wrapped), the AdamW ``optimizer``, the device, and the counters ``micro_steps``
    (backward calls so far) and ``global_steps`` (optimizer steps so far)."""

    def __init__(self, cfg: TrainConfig):
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(cfg.run.device, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=30))
            log.info("DDP: rank %d/%d, backend %s", self.rank, self.world, backend)
        self.bf16 = bf16_autocast(cfg.run, self.device)
        if cfg.optim.accum_iter < 1:
            raise ConfigError(f"optim.accum_iter must be >= 1, got {cfg.optim.accum_iter}")
        self.accum_steps = cfg.optim.accum_iter
        self.clip_grad: Optional[float] = cfg.optim.clip_grad
        self.compile: CompileChoice = resolve_compile(cfg.run.compile, cfg.run.compile_mode, self.device, error=ConfigError)
        self.model: Optional[nn.Module] = None
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self.micro_steps = 0
        self.global_steps = 0
        self.last_grad_norm: Optional[torch.Tensor] = None  # on the device: reading it would synchronise

    # ----------------------------------------------------------------------------------------------- training
    def prepare(self, model: nn.Module, param_groups: List[Dict[str, Any]], lr: float, betas, weight_decay: float) -> nn.Module:
        model.to(self.device)
        compile_model(model, self.compile)  # in place, per block: DDP below wraps the compiled model as usual
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        self.model = model
        self._optimizer = build_adamw(param_groups, lr, betas, weight_decay, self.device)
        return model

    def _ends_cycle(self) -> bool:
        """Whether the micro-batch about to run (or just run, before :meth:`step`) ends an accumulation cycle."""
        return (self.micro_steps + 1) % self.accum_steps == 0

    def autocast(self) -> ContextManager:
        """The forward context of one micro-batch: bf16 autocast (see ``run.amp``), and DDP ``no_sync`` inside a cycle."""
        stack = contextlib.ExitStack()
        if self.bf16:
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=torch.bfloat16))
        if isinstance(self.model, DistributedDataParallel) and not self._ends_cycle():
            stack.enter_context(self.model.no_sync())
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        sync = contextlib.nullcontext()
        if isinstance(self.model, DistributedDataParallel) and not self._ends_cycle():
            sync = self.model.no_sync()
        if self.nonfinite is not None:
            self.nonfinite.note_loss(loss)
        with sync:
            (loss / self.accum_steps).backward()

    def step(self) -> bool:
        boundary = self._ends_cycle()
        self.micro_steps += 1
        if not boundary:
            return False
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.clip_grad is not None:  # the total norm before clipping (a NaN one leaves every gradient NaN)
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        elif self.nonfinite is not None:
            grads = [p.grad for p in params if p.grad is not None]
            self.last_grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None
        if self.nonfinite is None:
            self.optimizer.step()
        else:
            self._guarded_step(self.nonfinite.end_step(self.nonfinite.step_number, self.last_grad_norm))
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1
        return True

    def _guarded_step(self, found_inf: torch.Tensor) -> None:
        """The optimizer step, dropped where ``found_inf`` is 1: on the device through fused AdamW's ``found_inf``
        (as torch.amp's GradScaler does: parameters, moments and step count stay as they were); a foreach AdamW has
        no such input, so there ``run.nonfinite=skip`` reads the flag (one sync per step) and ``stop`` steps anyway
        (the check before every save refuses what follows)."""
        opt = self.optimizer
        if opt.defaults.get("fused"):
            opt.found_inf = found_inf
            try:
                opt.step()
            finally:
                del opt.found_inf
        elif self.nonfinite.policy == "stop" or not bool(found_inf.item()):
            opt.step()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            raise RuntimeError("TorchRuntime.prepare() has not been called")
        return self._optimizer

    def unwrap(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("TorchRuntime.prepare() has not been called")
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    # ----------------------------------------------------------------------------------------------- checkpoints
    def save(self, directory: str, tag: str, meta: Dict[str, Any]) -> None:
        """Rank 0 writes ``directory/<tag>.pt`` atomically; every rank must call it (it ends in a barrier)."""
        if self.micro_steps % self.accum_steps != 0:
            raise RuntimeError(f"checkpoint requested inside an accumulation cycle (micro step {self.micro_steps}, "
                               f"accumulation {self.accum_steps}): gradients in flight would be lost")
        rngs = [meta.get("rng")]
        if self.world > 1:  # every rank's random streams (masks, drop path differ across ranks)
            rngs = [None] * self.world
            dist.all_gather_object(rngs, meta.get("rng"))
        path = checkpoint_file(directory, tag)
        # every rank checks (the state is replicated), so all stop together instead of waiting at the barrier
        refuse_nonfinite({"model": self.unwrap().state_dict(), "optimizer": self.optimizer.state_dict()["state"],
                          "extra": meta.get("extra", {})}, f"checkpoint {path}")
        if self.is_main:
            state = {
                "model": self.unwrap().state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "runtime": {"micro_steps": self.micro_steps, "global_steps": self.global_steps, "world": self.world,
                            "rng_per_rank": rngs},
                "meta": meta,
            }
            atomic_torch_save(state, path)
        self.barrier()

    def load(self, directory: str, tag: str) -> Dict[str, Any]:
        path = checkpoint_file(directory, tag)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        state = safe_load(path)
        for key in ("model", "optimizer", "runtime", "meta"):
            if not isinstance(state, dict) or key not in state:
                raise ValueError(f"{path}: not a fastlivt checkpoint (no {key!r} entry)")
        self.unwrap().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_steps = int(state["runtime"]["global_steps"])
        # taken at an accumulation boundary: restart the micro-step counter in phase (the accumulation may have
        # changed with the world size, see fastlivt.engine.elastic)
        self.micro_steps = self.global_steps * self.accum_steps
        meta = state["meta"]
        rngs = state["runtime"].get("rng_per_rank")
        if rngs and len(rngs) == self.world and rngs[self.rank] is not None:
            meta["rng"] = rngs[self.rank]  # this rank's own streams (same world size)
        return meta

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The bare model's state on CPU, floating tensors in fp32 (every rank gets it; no communication needed)."""
        out = {}
        for k, v in self.unwrap().state_dict().items():
            v = v.detach().cpu()
            out[k] = (v.float() if v.is_floating_point() else v).clone()
        return out

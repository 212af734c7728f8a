"""The one interface between the training loop and how it is distributed (one small interface per backend).

Implementations: :class:`fastlivt.engine.torch_runtime.TorchRuntime` (single process or torchrun DDP) and
:class:`fastlivt.engine.ds_runtime.DeepSpeedRuntime` (``deepspeed.initialize``, ZeRO-1/2/3). The semantics follow
DeepSpeed's engine so that one loop drives both:

- ``backward(loss)`` is called on every micro-batch; the runtime divides by the accumulation steps itself.
- ``step()`` is called after every micro-batch; it only clips, steps the optimizer and zeroes the gradients at an
  accumulation boundary, and returns True then (False otherwise).
- ``set_lr(lr)`` sets every parameter group's lr to ``lr * group.get("lr_scale", 1.0)`` (layer-wise decay) on the
  optimizer that really steps, before the boundary step.

What callers may ask of any runtime instead of probing its type: ``bf16`` (forward under bf16 autocast),
``compile`` (the resolved ``run.compile`` choice), ``partitions_parameters`` (ZeRO-3: a rank holds a shard of each
parameter) and ``gathered(module)`` (a context in which the module's parameters are whole on every rank).
The device and the autocast decision are made here once (:func:`resolve_device`, :func:`bf16_autocast`).
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, ContextManager, Dict, List, Optional

import torch
from torch import nn

from fastlivt.config import ConfigError, RunConfig
from fastlivt.logs import get_logger

log = get_logger(__name__)


def resolve_device(want: str, local_rank: int) -> torch.device:
    """``run.device`` (auto | cpu | cuda) as a device; asking for CUDA without one is an error."""
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but torch sees no CUDA device")
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def bf16_autocast(run: RunConfig, device: torch.device, cpu_allowed: bool = True) -> bool:
    """Whether the forward runs under bf16 autocast: ``run.amp=bf16`` on CUDA, on CPU only with ``run.cpu_bf16``
    (and only where the engine supports it: ``cpu_allowed``). The decision is logged."""
    if run.cpu_bf16 and not cpu_allowed:
        raise ConfigError("run.cpu_bf16: CPU autocast is for the plain engine; drop it or the deepspeed entry")
    bf16 = run.amp == "bf16" and (device.type == "cuda" or run.cpu_bf16)
    if run.amp == "bf16" and not bf16:
        hint = " (on CPU with run.cpu_bf16=true)" if cpu_allowed else ""
        log.info("bf16 autocast off: run.amp=bf16 applies on CUDA%s; training in fp32 on %s", hint, device)
    elif bf16 and device.type == "cpu":
        log.info("bf16 autocast on CPU (run.cpu_bf16=true)")
    return bf16


class Runtime(ABC):
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    accum_steps: int = 1
    bf16: bool = False
    compile: Optional[Any] = None  # fastlivt.models.compile.CompileChoice once resolved
    nonfinite: Optional[Any] = None  # fastlivt.engine.nonfinite.NonFiniteMonitor, set by the loop after prepare()

    @property
    def partitions_parameters(self) -> bool:
        """Whether each rank holds only a shard of every parameter (ZeRO-3); EMA and similar need whole ones."""
        return False

    def gathered(self, module: nn.Module) -> ContextManager:
        """A context in which ``module``'s parameters are whole on every rank; every rank must enter it."""
        return contextlib.nullcontext()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @abstractmethod
    def prepare(self, model: nn.Module, param_groups: List[Dict[str, Any]], lr: float, betas, weight_decay: float) -> nn.Module:
        """Move/wrap the model, build AdamW over ``param_groups``; return the module to call in the loop."""

    def autocast(self) -> ContextManager:
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> bool: ...

    @property
    @abstractmethod
    def optimizer(self) -> torch.optim.Optimizer: ...

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def lrs(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    @abstractmethod
    def unwrap(self) -> nn.Module:
        """The bare model (no DDP/DeepSpeed wrapper)."""

    @abstractmethod
    def save(self, directory: str, tag: str, meta: Dict[str, Any]) -> None:
        """Write model + optimizer (+ engine state) and ``meta`` under ``directory/tag``, atomically."""

    @abstractmethod
    def load(self, directory: str, tag: str) -> Dict[str, Any]:
        """Restore what :meth:`save` wrote; return ``meta``."""

    @abstractmethod
    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The consolidated model state (fp32, on CPU) on rank 0 — gathered across ZeRO-3 shards if needed."""

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_reduce_mean(self, value: float) -> float:
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

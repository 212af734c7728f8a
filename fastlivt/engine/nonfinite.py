"""Non-finite loss or gradients: found on every optimizer step without a host synchronisation, acted on at the next
read, and never saved.

Per micro-batch the loss's finiteness, and per optimizer step the gradient norm's, go into a few device tensors
(:class:`NonFiniteMonitor`); nothing is read back to the host there. What the step does with a bad value is the
device's business too, as in torch.amp's ``GradScaler``: the 0/1 ``found_inf`` tensor is handed to torch's fused
AdamW (the ``found_inf`` attribute the optimizer reads in ``step``), whose kernel then leaves the parameters, the
moments and the step count as they were. The flags are read (one small copy) at each logging step, before every
checkpoint and export, and at the end; then ``run.nonfinite`` decides:

- ``stop``: the run ends with :class:`NonFiniteError` — one line naming the first bad step, the quantity (loss or
  gradient) and the last good checkpoint, from which ``--resume`` continues;
- ``skip``: the bad steps' updates were dropped (counted in the summary); the run stops the same way only when
  ``run.nonfinite_max_skips`` steps in a row were bad.

Whatever the flags say, the checkpoint and export writers refuse a state holding a non-finite tensor
(:func:`first_nonfinite`), naming it: the previous good file stays in place.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from fastlivt.logs import get_logger

log = get_logger(__name__)
QUANTITIES = {1.0: "loss", 2.0: "gradient norm"}


class NonFiniteError(RuntimeError):
    """A run stopped on a non-finite value, or a save refused because a tensor is non-finite (one line)."""


def first_nonfinite(tensors: Iterable[Tuple[str, Any]]) -> Optional[str]:
    """The name of the first floating tensor in ``(name, value)`` pairs (nested dicts/lists searched) that holds a
    NaN or an infinity; None when all are finite."""
    for name, value in tensors:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
                return name
        elif isinstance(value, dict):
            found = first_nonfinite((f"{name}.{k}" if name else str(k), v) for k, v in value.items())
            if found:
                return found
        elif isinstance(value, (list, tuple)):
            found = first_nonfinite((f"{name}[{i}]", v) for i, v in enumerate(value))
            if found:
                return found
    return None


def refuse_nonfinite(state: Dict[str, Any], what: str) -> None:
    """Raise :class:`NonFiniteError` when ``state`` (a state dict, maybe nested) holds a non-finite tensor."""
    bad = first_nonfinite(state.items())
    if bad is not None:
        raise NonFiniteError(f"not writing {what}: tensor {bad} is not finite (NaN or infinity); the previous file "
                             f"stays as it was")


class NonFiniteMonitor:
    """Device-side record of non-finite values: ``state`` = [first bad step (-1: none), its quantity (1 loss,
    2 gradient), bad steps in a row now, most in a row, bad steps in all]; ``loss_bad`` for the micro-batches of the
    step in progress."""

    def __init__(self, policy: str, max_skips: int, device: torch.device, world: int = 1):
        self.policy, self.max_skips, self.device, self.world = policy, max_skips, device, world
        self.state = torch.tensor([-1.0, 0.0, 0.0, 0.0, 0.0], device=device)
        self.loss_bad = torch.zeros(1, device=device)
        self.reported_skips = 0
        self.step_number = 0  # the optimizer step in progress (1-based), set by the loop

    def note_loss(self, loss: torch.Tensor) -> None:
        """After each micro-batch's forward: remember whether its loss is finite (no sync)."""
        bad = (~torch.isfinite(loss.detach().float())).any().float().reshape(1)
        torch.maximum(self.loss_bad, bad, out=self.loss_bad)

    def end_step(self, step: int, grad_norm: Optional[torch.Tensor]) -> torch.Tensor:
        """At an optimizer step (``step``: its 1-based number) with the gradients' total norm (None: not computed):
        record it; return ``found_inf`` (a float32 scalar on the device, 1.0 when the step must not update)."""
        grad_bad = torch.zeros(1, device=self.device) if grad_norm is None else \
            (~torch.isfinite(grad_norm.detach().float())).float().reshape(1).to(self.device)
        bad = torch.maximum(self.loss_bad, grad_bad)
        # Under DDP the gradients (so their norm) are the same on every rank after the all-reduce, the losses are not:
        # the skip follows the gradient there, so that every replica takes the same step without a collective.
        found = bad if self.world == 1 or grad_norm is None else grad_bad
        kind = torch.where(self.loss_bad > 0, 1.0, 2.0)
        s = self.state
        first_unset = (s[0:1] < 0) & (bad > 0)
        s[0:1] = torch.where(first_unset, float(step), s[0:1])
        s[1:2] = torch.where(first_unset, kind, s[1:2])
        s[2:3] = (s[2:3] + 1.0) * bad
        s[3:4] = torch.maximum(s[3:4], s[2:3])
        s[4:5] += bad
        self.loss_bad.zero_()
        return found.reshape(())

    def read(self, world: int = 1) -> Tuple[int, str, int, int]:
        """(first bad step or -1, its quantity, most bad steps in a row, bad steps in all), over all ranks."""
        s = self.state.clone()
        if world > 1:  # the losses differ per rank: every rank must take the same decision
            bad = s[0:1].clone()
            bad[bad < 0] = float("inf")
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
            torch.distributed.all_reduce(s[1:], op=torch.distributed.ReduceOp.MAX)
            s[0:1] = torch.where(torch.isinf(bad), -1.0, bad)
        first, kind, _, most, total = s.tolist()
        return int(first), QUANTITIES.get(kind, "loss"), int(most), int(total)

    def check(self, world: int, last_good: str) -> int:
        """Act on what was recorded: raise :class:`NonFiniteError` as ``run.nonfinite`` says; return the bad steps
        skipped so far (``skip``). ``last_good``: the last good checkpoint, for the message."""
        first, quantity, most, total = self.read(world)
        if first < 0:
            return 0
        if self.policy == "stop" or most >= self.max_skips:
            why = ("run.nonfinite=stop" if self.policy == "stop" else
                   f"{most} steps in a row, run.nonfinite_max_skips={self.max_skips}")
            raise NonFiniteError(f"non-finite {quantity} at step {first} ({total} bad step(s); {why}): training "
                                 f"stopped and nothing more saved; the last good checkpoint is {last_good}")
        if total > self.reported_skips:
            log.warning("non-finite loss or gradient: %d optimizer step(s) skipped so far, the first at step %d "
                        "(run.nonfinite=skip)", total, first)
            self.reported_skips = total
        return total

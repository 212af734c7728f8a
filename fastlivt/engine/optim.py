"""Parameter groups and the peak learning rate (paper Table 10; MAE's ``param_groups_lrd`` / ``add_weight_decay``).

- Weight decay applies to weight matrices only: biases, norm weights (every 1-D tensor), position embeddings and
  tokens (class, mask, register) get none. The names come from the model's ``no_weight_decay()`` when it has one, plus
  :data:`NO_DECAY_PATTERNS`, matched by timm's fnmatch rule.
- Layer-wise lr decay (BFT) uses timm's ``param_groups_layer_decay`` over the model's ``group_matcher``: patch/pos
  embeddings and the class token are layer 0, ``blocks.i`` is layer i+1, the head (fc_norm, head) is layer L+1, and a
  group's ``lr_scale`` is ``layer_decay ** (L + 1 - layer)`` — exactly MAE's ``param_groups_lrd``.
- Every group carries ``lr_scale`` (1.0 without layer decay): :meth:`Runtime.set_lr` multiplies the schedule by it.
- :func:`build_adamw` is the one AdamW both runtimes train with: torch's fused kernel (one launch for all tensors)
  wherever this torch has it for the device — CUDA, and CPU since torch 2.4 — probed once; else the foreach path,
  with the reason logged. (Under DeepSpeed it is this torch optimizer, never DeepSpeed's compiled FusedAdam op.)
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch

from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from fastlivt.config import ConfigError
from fastlivt.logs import get_logger

log = get_logger(__name__)

# Parameter names (fnmatch patterns) that never get weight decay, whatever the model declares.
NO_DECAY_PATTERNS = ("*pos_embed*", "*cls_token", "*mask_token", "*reg_token", "*dist_token")


def peak_lr(blr: float, lr: Optional[float], batch_size: int, accum_iter: int, world: int) -> float:
    """``lr`` when given, else ``blr * effective_batch / 256`` with effective batch = micro x accumulation x world."""
    if lr is not None:
        return float(lr)
    effective = batch_size * accum_iter * world
    return blr * effective / 256.0


def no_weight_decay_names(model: nn.Module) -> Set[str]:
    """Names/patterns excluded from weight decay: the model's own list plus the project-wide patterns."""
    names: Set[str] = set(NO_DECAY_PATTERNS)
    if hasattr(model, "no_weight_decay"):
        names |= set(model.no_weight_decay())
    return names


def param_groups(model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None,
                 extra_no_decay: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """AdamW parameter groups: dicts with ``params``, ``weight_decay`` and ``lr_scale`` (see the module docstring)."""
    skip = no_weight_decay_names(model) | set(extra_no_decay)
    if layer_decay is None:
        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)
        for g in groups:
            g["lr_scale"] = 1.0
    else:
        if not 0.0 < layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay must lie in (0, 1], got {layer_decay}")
        if not hasattr(model, "group_matcher"):
            raise ConfigError(f"optim.layer_decay={layer_decay} needs a model with group_matcher() (a timm ViT); "
                             f"{type(model).__name__} has none")
        groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    n_decay = sum(p.numel() for g in groups if g["weight_decay"] > 0 for p in g["params"])
    n_all = sum(p.numel() for g in groups for p in g["params"])
    log.info("%d parameter groups, %.2fM parameters (%.2fM with weight decay %g)%s", len(groups), n_all / 1e6,
             n_decay / 1e6, weight_decay, f", layer decay {layer_decay}" if layer_decay is not None else "")
    return groups


@functools.lru_cache(maxsize=None)
def fused_adamw_status(device_type: str) -> Tuple[bool, str]:
    """(usable, reason): whether ``torch.optim.AdamW(fused=True)`` steps on ``device_type`` (probed once)."""
    try:
        p = torch.zeros(4, device=device_type, requires_grad=True)
        p.grad = torch.ones_like(p)
        torch.optim.AdamW([p], lr=1e-3, fused=True).step()
    except Exception as e:  # RuntimeError/NotImplementedError from a torch without the kernel for this device
        first = str(e).splitlines()[0] if str(e) else ""
        return False, f"torch {torch.__version__} has no fused AdamW on {device_type} ({type(e).__name__}: {first})"
    return True, f"torch {torch.__version__} fused AdamW on {device_type}"


def build_adamw(groups: List[Dict[str, Any]], lr: float, betas: Sequence[float], weight_decay: float,
                device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``groups`` for parameters that train on ``device``: fused where torch has it, else foreach."""
    ok, why = fused_adamw_status(torch.device(device).type)
    kind = {"fused": True} if ok else {"foreach": True}
    log.info("optimizer: AdamW (%s): %s", "fused" if ok else "foreach", why)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **kind)

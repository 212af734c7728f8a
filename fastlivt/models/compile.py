"""torch.compile of the training step, region by region (``run.compile`` / ``run.compile_mode``).

The pattern is torchtitan's: every transformer block is compiled on its own with ``fullgraph=True`` (identical blocks
share one compiled graph, so compile time does not grow with depth), and so are the pieces around them — the patch
embedding, the head (MGP: ``decoder_norm``/``decoder_pred``; BFT: ``norm``/``fc_norm``/``head``) and the loss (MGP: the
model's ``loss`` module, targets included; BFT: the criterion, :func:`compile_criterion`). What
stays eager between the regions is glue: MAE's random masking (argsort/gather), position adds, class-token concat.
Each region is compiled in place with :meth:`torch.nn.Module.compile`, so parameter names, state dicts, checkpoints
and ``copy.deepcopy`` (EMA) are unchanged; DDP and DeepSpeed ZeRO-1/2 wrap the model as usual.

``run.compile``: ``on`` | ``off`` | ``auto``. ``auto`` compiles on CUDA; on CPU it stays eager: measured on 2 cores,
the compiled demo step ran 0.89-1.02x eager (Inductor's CPU GEMMs are the same extern kernels), so the compile time
(tens of seconds) would never be won back. ZeRO-3 gathers parameters in module hooks, which cannot sit inside a
compiled block: ``on`` with ZeRO-3 is a :class:`~fastlivt.config.ConfigError`, ``auto`` stays eager there.
``run.compile_mode`` is Inductor's mode (``default``, ``reduce-overhead`` for CUDA graphs, ``max-autotune``, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple, Union

import torch
from torch import nn

from fastlivt.logs import get_logger

log = get_logger(__name__)
COMPILE_CHOICES = ("auto", "on", "off")
BACKEND = "inductor"  # torch.compile backend of every region (tests that count graph breaks may use "aot_eager")
CPU_REASON = ("auto -> off on CPU: compiled ran 0.89-1.02x eager for the demo ViT on this kind of machine (the GEMMs "
              "are the same extern kernels), not worth the compile time; run.compile=on forces it")


class CompileConfigError(ValueError):
    """``run.compile``/``run.compile_mode`` hold a value that cannot work (raised as the config's error type)."""


@dataclass
class CompileChoice:
    """What ``run.compile`` resolved to: ``enabled``, the Inductor ``mode`` (None = default), the ``reason`` logged,
    and the ``regions`` compiled so far (module paths, plus ``criterion``)."""

    enabled: bool
    mode: Optional[str]
    reason: str
    regions: List[str] = field(default_factory=list)


def compile_modes() -> Tuple[str, ...]:
    from torch._inductor import list_mode_options

    return tuple(list_mode_options())


def resolve_compile(setting: Union[str, bool], mode: str, device: torch.device, zero_stage: int = 0,
                    error: type = CompileConfigError) -> CompileChoice:
    """``run.compile`` (auto | on | off) and ``run.compile_mode`` on ``device`` as a logged :class:`CompileChoice`.

    ``error`` is the exception class raised for a bad value or an impossible combination (the config's ConfigError).
    """
    if isinstance(setting, bool):  # YAML 1.1 reads a bare on/off as true/false
        setting = "on" if setting else "off"
    if setting not in COMPILE_CHOICES:
        raise error(f"run.compile: expected one of {', '.join(COMPILE_CHOICES)}, got {setting!r}")
    modes = compile_modes()
    if mode not in modes:
        raise error(f"run.compile_mode: expected one of {', '.join(modes)}, got {mode!r}")
    inductor_mode = None if mode == "default" else mode
    if mode.startswith("reduce-overhead") and device.type != "cuda" and setting != "off":
        log.info("run.compile_mode=%s: CUDA graphs need CUDA; on %s it compiles as 'default'", mode, device.type)
    if zero_stage == 3 and setting != "off":
        why = ("ZeRO-3 gathers and releases parameters in module hooks around each block, which a fullgraph-compiled "
               "block cannot contain")
        if setting == "on":
            raise error(f"run.compile=on with DeepSpeed ZeRO-3: {why}; use ZeRO-2 (configs/deepspeed/zero2.json) or "
                        f"run.compile=off")
        choice = CompileChoice(False, inductor_mode, f"auto -> off under ZeRO-3: {why}")
    elif setting == "off":
        choice = CompileChoice(False, inductor_mode, "run.compile=off")
    elif setting == "on":
        choice = CompileChoice(True, inductor_mode, f"run.compile=on on {device.type}")
    elif device.type == "cuda":
        choice = CompileChoice(True, inductor_mode, "auto -> on on CUDA (per-block fullgraph torch.compile)")
    else:
        choice = CompileChoice(False, inductor_mode, CPU_REASON)
    log.info("torch.compile %s (mode %s): %s", "on" if choice.enabled else "off", mode, choice.reason)
    return choice


def region_paths(model: nn.Module) -> List[str]:
    """Module paths of the regions :func:`compile_model` compiles in ``model`` (MGP or BFT)."""
    paths: List[str] = []
    for seq in ("blocks", "decoder_blocks"):
        blocks = getattr(model, seq, None)
        if isinstance(blocks, nn.Sequential):
            paths += [f"{seq}.{i}" for i in range(len(blocks))]
    for name in ("patch_embed", "norm", "fc_norm", "head", "decoder_norm", "decoder_pred", "loss"):
        m = getattr(model, name, None)
        if isinstance(m, nn.Module) and not isinstance(m, nn.Identity):
            paths.append(name)
    return paths


def _options(choice: CompileChoice) -> dict:
    return {"backend": BACKEND, "mode": choice.mode} if BACKEND == "inductor" else {"backend": BACKEND}


def compile_model(model: nn.Module, choice: CompileChoice) -> List[str]:
    """Compile ``model``'s regions in place when ``choice.enabled``; returns (and records) the compiled paths."""
    if not choice.enabled:
        return []
    paths = region_paths(model)
    if not any(p.startswith("blocks.") for p in paths):
        raise TypeError(f"run.compile: {type(model).__name__} has no `blocks` to compile")
    for path in paths:
        model.get_submodule(path).compile(fullgraph=True, **_options(choice))
    choice.regions += paths
    log.info("torch.compile: %d regions of %s (%s ... %s)", len(paths), type(model).__name__, paths[0], paths[-1])
    return paths


def compile_criterion(criterion: Any, choice: Optional[CompileChoice]) -> Any:
    """The loss module, compiled when ``choice`` says so (its backend choice logged first: a log call inside the
    compiled region would break the graph). Not ``fullgraph``, so that a loss without such care still runs;
    :func:`graph_breaks` counts any break."""
    if choice is None or not choice.enabled or not isinstance(criterion, nn.Module):
        return criterion
    if hasattr(criterion, "note_backend") and hasattr(criterion, "bias"):
        criterion.note_backend(criterion.bias.device)
    criterion.compile(**_options(choice))
    choice.regions.append("criterion")
    return criterion


def graph_breaks() -> int:
    """Graph breaks dynamo has recorded in this process so far (``torch._dynamo.utils.counters``)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


__all__ = ["COMPILE_CHOICES", "CompileChoice", "CompileConfigError", "compile_criterion", "compile_model",
           "graph_breaks", "is_compiled", "region_paths", "resolve_compile"]

"""torch.compile of the training step, region by region (``run.compile`` / ``run.compile_mode``).

The pattern is torchtitan's: every transformer block is compiled on its own with ``fullgraph=True`` (identical blocks
share one compiled graph, so compile time does not grow with depth), and so are the pieces around them — the patch
embedding, the head (MGP: ``decoder_norm``/``decoder_pred``; BFT: ``norm``/``fc_norm``/``head``) and the loss (MGP: the
model's ``loss`` module, targets included; BFT: the criterion, :func:`compile_criterion`). What
stays eager between the regions is glue: MAE's random masking (argsort/gather), position adds, class-token concat.
Each region is compiled in place with :meth:`torch.nn.Module.compile`, so parameter names, state dicts, checkpoints
and ``copy.deepcopy`` (EMA) are unchanged; DDP and DeepSpeed ZeRO-1/2 wrap the model as usual.

``run.compile``: ``on`` | ``off`` | ``auto``. ``auto`` compiles on CUDA; on CPU it stays eager: Inductor's CPU GEMMs
are the same extern kernels eager calls, so a compiled step runs at eager's pace (README, "the compiled step") and the
compile time (tens of seconds) would never be won back. ZeRO-3 gathers parameters in module hooks, which cannot sit inside a
compiled block: ``on`` with ZeRO-3 is a :class:`~fastlivt.config.ConfigError`, ``auto`` stays eager there.
``run.compile_mode`` is Inductor's mode (``default``, ``max-autotune-no-cudagraphs``, ...). The modes that capture
CUDA graphs (``reduce-overhead``, ``max-autotune``: Inductor's ``triton.cudagraphs``) are refused until they have been
measured on a GPU with this loop: it keeps a graph output (the step's loss) past the next replay, which overwrites it,
and the Bal-BCE kernel allocates its device counter and bias table on first use, inside the captured region.

Stochastic depth: timm's ``DropPath`` keeps its rate as a Python float, which dynamo guards by value, so blocks with
different rates (BFT's linearly increasing drop path) would each compile again, and past dynamo's recompile limit (8)
the remaining blocks would run eager. Before compiling, each block's ``DropPath`` is swapped for
:class:`TensorRateDropPath` (the same computation, the rate in a non-persistent buffer: the blocks share one graph
again; state dicts are unchanged; its mask comes from the compiled graph's RNG, as every random op's does there).

xformers inside a ``fullgraph=True`` block has never been traced (its dispatcher is Python that dynamo would have to
follow, and it runs on CUDA only). A block whose attention resolves to xformers is therefore compiled piece by piece
(its norms, the qkv/proj projections, the MLP), the attention core between them staying eager; this is logged.
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
CPU_REASON = ("auto -> off on CPU: the compiled step's GEMMs are the same extern kernels as eager's, so it runs at "
              "eager's pace and the compile time is not won back; run.compile=on forces it")


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


def compile_mode_options(mode: str) -> dict:
    """Inductor's option overrides of ``mode`` (``{}`` for an unknown one)."""
    from torch._inductor import list_mode_options

    return dict(list_mode_options().get(mode, {}))


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
    if compile_mode_options(mode).get("triton.cudagraphs"):
        raise error(f"run.compile_mode={mode} captures CUDA graphs, which are not yet measured on a GPU with this "
                    f"training loop (a step's loss is kept past the next replay; the kernel allocates inside the "
                    f"capture); use default or max-autotune-no-cudagraphs")
    inductor_mode = None if mode == "default" else mode
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
    compiled, eager_attention = [], []
    for path in paths:
        module = model.get_submodule(path)
        _rate_as_buffer(module)
        if _attention_is_xformers(module):
            eager_attention.append(path)
            pieces = [f"{path}.{name}" for name in BLOCK_PIECES if _compilable(module, name)]
        else:
            pieces = [path]
        for piece in pieces:
            model.get_submodule(piece).compile(fullgraph=True, **_options(choice))
        compiled += pieces
    choice.regions += compiled
    if eager_attention:
        log.info("torch.compile: the attention of %d blocks (%s ...) runs eager between compiled pieces: xformers' "
                 "memory_efficient_attention inside a fullgraph-compiled block has not been traced on a GPU",
                 len(eager_attention), eager_attention[0])
    log.info("torch.compile: %d regions of %s (%s ... %s)", len(compiled), type(model).__name__, compiled[0],
             compiled[-1])
    return compiled


class TensorRateDropPath(nn.Module):
    """timm's ``DropPath`` (per-sample stochastic depth, scaled by 1/keep) with its rate in a buffer, not a float."""

    def __init__(self, drop_prob: float, scale_by_keep: bool = True):
        super().__init__()
        self.register_buffer("drop_prob", torch.tensor(float(drop_prob)), persistent=False)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.drop_prob.to(x.dtype)
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if self.scale_by_keep:
            mask = mask / keep.clamp(min=torch.finfo(x.dtype).tiny)  # keep = 0 drops the path (mask 0), as timm
        return x * mask


def _rate_as_buffer(block: nn.Module) -> None:
    from timm.layers import DropPath

    for name, child in list(block.named_children()):
        if isinstance(child, DropPath) and child.drop_prob > 0.0:
            new = TensorRateDropPath(child.drop_prob, child.scale_by_keep).to(next(block.parameters()).device)
            new.train(child.training)
            setattr(block, name, new)


# The layers of a timm ViT block around its attention core (absent or Identity ones are skipped).
BLOCK_PIECES = ("norm1", "attn.qkv", "attn.q_norm", "attn.k_norm", "attn.norm", "attn.proj", "ls1", "norm2", "mlp",
                "ls2")


def _compilable(block: nn.Module, name: str) -> bool:
    try:
        piece = block.get_submodule(name)
    except AttributeError:
        return False
    return not isinstance(piece, nn.Identity) and any(True for _ in piece.parameters())


def _attention_is_xformers(module: nn.Module) -> bool:
    """Whether ``module`` is a block whose attention resolves to xformers on its parameters' device."""
    from fastlivt.models.attention import Attention, AttentionBackendError, resolve_backend

    attn = getattr(module, "attn", None)
    if not isinstance(attn, Attention):
        return False
    device = next(module.parameters()).device
    try:
        return resolve_backend(attn.backend, device) == "xformers"
    except AttentionBackendError:  # raised again, with its reason, when the block first runs
        return False


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


__all__ = ["COMPILE_CHOICES", "CompileChoice", "CompileConfigError", "compile_criterion", "compile_mode_options",
           "compile_model", "graph_breaks", "TensorRateDropPath", "is_compiled", "region_paths", "resolve_compile"]

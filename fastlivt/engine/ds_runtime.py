"""DeepSpeed runtime: the training loop's :class:`~fastlivt.engine.runtime.Runtime` on ``deepspeed.initialize`` (ZeRO-0..3).

The DeepSpeed JSON (``cfg.deepspeed``: a path or an inline mapping) says *how* to shard (ZeRO stage, buckets, offload);
the YAML says *what* to train. Batch sizes are therefore derived, never written by hand:

    train_micro_batch_size_per_gpu = data.batch_size
    gradient_accumulation_steps    = optim.accum_iter
    train_batch_size               = micro x accumulation x world   (the effective batch of Table 10)

``"auto"`` placeholders (filled in only by Hugging Face's Trainer) are rejected, naming the key. The optimizer is a torch
AdamW over the loop's parameter groups (layer-wise ``lr_scale`` kept), so nothing is compiled and no DeepSpeed scheduler
runs: the loop sets the lr every iteration through :meth:`Runtime.set_lr` on the optimizer that really steps.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
from pathlib import Path
from typing import Any, ContextManager, Dict, List, Union

import torch
from torch import nn

from fastlivt.config import ConfigError, TrainConfig
from fastlivt.engine.optim import build_adamw
from fastlivt.engine.runtime import Runtime, bf16_autocast, resolve_device
from fastlivt.logs import get_logger
from fastlivt.models.compile import CompileChoice, compile_model, resolve_compile

log = get_logger(__name__)

BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
# Keys the YAML owns: a DeepSpeed JSON that sets them would make a second, conflicting source of truth.
FORBIDDEN_KEYS = {
    "optimizer": "the optimizer is a torch AdamW over the layer-decay groups (optim.* in the YAML)",
    "scheduler": "the lr schedule is set per iteration by the training loop (optim.* in the YAML)",
    "fp16": "fp16 is not supported; use run.amp=bf16 (bf16 on CUDA) or run.amp=fp32",
}


# --------------------------------------------------------------------------------------------------- configuration
def resolve_json_path(spec: str) -> Path:
    """``spec`` as given (absolute, or relative to the working directory), else relative to the project root — so
    ``deepspeed: configs/deepspeed/zero3.json`` in a shipped YAML works from any directory."""
    path = Path(spec)
    if path.is_file():
        return path
    project = Path(__file__).resolve().parents[2] / spec
    if not path.is_absolute() and project.is_file():
        log.info("deepspeed: %s is not in the working directory; using %s", spec, project)
        return project
    raise ConfigError(f"deepspeed: config file not found: {path} (nor {project})")


def read_deepspeed_json(spec: Union[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The DeepSpeed config as a dict: ``spec`` is a path to a JSON file or the mapping itself."""
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    path = resolve_json_path(spec)
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed: {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed: {path}: top level must be a JSON object")
    return data


def find_auto(node: Any, prefix: str = "") -> List[str]:
    """Dotted keys whose value is the placeholder ``"auto"``."""
    found: List[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            found += find_auto(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += find_auto(v, f"{prefix}{i}.")
    elif isinstance(node, str) and node.strip().lower() == "auto":
        found.append(prefix.rstrip("."))
    return found


def build_deepspeed_config(cfg: TrainConfig, world: int, use_cuda: bool) -> Dict[str, Any]:
    """The DeepSpeed config for ``cfg`` on ``world`` processes (see the module docstring for what is derived)."""
    if cfg.deepspeed is None:
        raise ConfigError("deepspeed: not set (a path to a DeepSpeed JSON or an inline mapping is needed)")
    where = cfg.deepspeed if isinstance(cfg.deepspeed, str) else "deepspeed (inline)"
    ds = read_deepspeed_json(cfg.deepspeed)
    autos = find_auto(ds)
    if autos:
        raise ConfigError(f"{where}: {autos[0]} is \"auto\"; raw DeepSpeed does not resolve \"auto\" — remove the key "
                          f"(batch sizes are derived from data.batch_size, optim.accum_iter and the world size) or "
                          f"give a number")
    for key, why in FORBIDDEN_KEYS.items():
        if key in ds and not (key == "fp16" and not ds[key].get("enabled", False)):
            raise ConfigError(f"{where}: key {key!r} is not allowed: {why}")
    if cfg.data.batch_size < 1 or cfg.optim.accum_iter < 1:
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) and optim.accum_iter ({cfg.optim.accum_iter}) must be >= 1")
    derived = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.accum_iter,
        "train_batch_size": cfg.data.batch_size * cfg.optim.accum_iter * world,
    }
    for key in BATCH_KEYS:
        if key in ds and ds[key] != derived[key]:
            raise ConfigError(f"{where}: {key}={ds[key]!r} disagrees with the YAML-derived {derived[key]} (micro "
                              f"data.batch_size={cfg.data.batch_size} x optim.accum_iter={cfg.optim.accum_iter} x "
                              f"world={world}); remove it from the JSON")
    ds.update(derived)

    if cfg.optim.clip_grad is not None:
        ds["gradient_clipping"] = float(cfg.optim.clip_grad)
    elif "gradient_clipping" in ds:
        log.info("gradient_clipping %s from %s (optim.clip_grad is unset)", ds["gradient_clipping"], where)
    # bf16 = torch autocast inside the engine (fp32 weights and master copy, bf16 matmuls and bf16 ZeRO traffic for
    # Linear/Conv weights): the plain engine's numerics, and fp32 inputs need no cast. DeepSpeed's other bf16 mode
    # (``"bf16": {"enabled": true}``, bf16 weights) is mapped onto it.
    bf16 = bf16_autocast(cfg.run, torch.device("cuda" if use_cuda else "cpu"), cpu_allowed=False)
    if ds.get("bf16", {}).get("enabled", False):
        log.info("%s: \"bf16\" runs as \"torch_autocast\" bfloat16 (fp32 weights, bf16 compute)", where)
    ds["bf16"] = {"enabled": False}
    ds["torch_autocast"] = {**ds.get("torch_autocast", {}), "enabled": bf16}
    if bf16:
        ds["torch_autocast"]["dtype"] = "bfloat16"
    ds.setdefault("steps_per_print", 10**9)  # the loop logs; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _innermost_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer that DeepSpeed's ZeRO/bf16 wrappers hold (the one whose param groups really step)."""
    seen = 0
    while not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)
        seen += 1
        if opt is None or seen > 8:
            raise RuntimeError("could not find the torch optimizer inside DeepSpeed's optimizer wrapper")
    return opt


# --------------------------------------------------------------------------------------------------- runtime
class DeepSpeedRuntime(Runtime):
    """One process of a DeepSpeed run (launched by ``deepspeed``/``torchrun``, or alone as world 1).

    Holds: ``engine`` (the ``DeepSpeedEngine`` after :meth:`prepare`), ``ds_config`` (the resolved DeepSpeed config),
    ``zero_stage``, ``bf16``.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        want = cfg.run.device
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(want, local_rank)
        use_cuda = self.device.type == "cuda"
        if not use_cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if (get_accelerator().device_name() == "cuda") != use_cuda:
            raise RuntimeError(f"DeepSpeed's accelerator is {get_accelerator().device_name()!r} but run.device={want!r}; "
                               f"set DS_ACCELERATOR before DeepSpeed is first imported")
        for var, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(var, default)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if not use_cuda:
            # init_distributed would otherwise build the shared-memory comm op (a minutes-long C++ compile on CPU).
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.local_rank = local_rank
        if use_cuda:
            torch.cuda.set_device(self.device)  # before NCCL starts, so that it knows its device
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                       auto_mpi_discovery=False, verbose=False)
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.ds_config = build_deepspeed_config(cfg, self.world, use_cuda)
        self.accum_steps = self.ds_config["gradient_accumulation_steps"]
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.bf16 = bool(self.ds_config["torch_autocast"]["enabled"])
        self.compile: CompileChoice = resolve_compile(cfg.run.compile, cfg.run.compile_mode, self.device,
                                                      self.zero_stage, error=ConfigError)
        self.engine: Any = None
        log.info("DeepSpeed runtime: rank %d/%d on %s, ZeRO-%d, %s, micro %d x accum %d x world %d = %d",
                 self.rank, self.world, self.device, self.zero_stage, "bf16" if self.bf16 else "fp32",
                 self.ds_config["train_micro_batch_size_per_gpu"], self.accum_steps, self.world,
                 self.ds_config["train_batch_size"])

    # ----------------------------------------------------------------------------------------------- training
    def prepare(self, model: nn.Module, param_groups: List[Dict[str, Any]], lr: float, betas, weight_decay: float) -> nn.Module:
        """``deepspeed.initialize`` with a torch AdamW over ``param_groups`` (their ``lr_scale`` kept; fused where torch has
        it for the device), the model's blocks compiled first when ``run.compile`` says so; returns the engine."""
        import deepspeed

        compile_model(model, self.compile)  # per block, in place (ZeRO-3 was refused in resolve_compile)
        optimizer = build_adamw(param_groups, lr, betas, weight_decay, self.device)  # torch's, fused where it can
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config,
                                                    dist_init_required=False)
        return self.engine

    def autocast(self) -> ContextManager:
        """bf16 autocast on CUDA (for what runs outside the engine, e.g. the loss; the engine's forward autocasts itself)."""
        if self.bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        if self.nonfinite is not None:
            self.nonfinite.note_loss(loss)
        self.engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself

    def step(self) -> bool:
        """DeepSpeed's step. A non-finite loss is recorded (run.nonfinite=stop, read before every save); a
        non-finite gradient shows in the parameters, which the checkpoint writer checks."""
        boundary = bool(self.engine.is_gradient_accumulation_boundary())
        self.engine.step()
        if boundary and self.nonfinite is not None:
            self.nonfinite.end_step(self.nonfinite.step_number, None)
        return boundary

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW inside DeepSpeed's ZeRO wrapper: its param groups (with ``lr_scale``) are what steps."""
        return _innermost_optimizer(self.engine.optimizer)

    def unwrap(self) -> nn.Module:
        return self.engine.module

    @property
    def partitions_parameters(self) -> bool:
        return self.zero_stage == 3

    def gathered(self, module: nn.Module) -> ContextManager:
        """Under ZeRO-3, DeepSpeed's ``GatheredParameters`` over ``module`` (read-only); a no-op otherwise."""
        if not self.partitions_parameters:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def save(self, directory: str, tag: str, meta: Dict[str, Any]) -> None:
        """DeepSpeed's sharded checkpoint + per-rank meta under ``directory/tag``, atomically (every rank calls it)."""
        from fastlivt.engine import ds_checkpoint

        ds_checkpoint.save(self, directory, tag, meta)

    def load(self, directory: str, tag: str) -> Dict[str, Any]:
        """Restore ``directory/tag`` (resharded through a universal checkpoint when written on another world size)."""
        from fastlivt.engine import ds_checkpoint

        return ds_checkpoint.load(self, directory, tag)

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The whole model's state (fp32 master weights, on CPU), gathered across ZeRO shards.

        Collective: every rank must call it (each gets the full dict). Trainable parameters come from the optimizer's
        fp32 master copy (``safe_get_full_fp32_param``); frozen parameters and buffers from the (gathered) module.
        """
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        keys = set(module.state_dict(keep_vars=True).keys())
        out: Dict[str, torch.Tensor] = {}
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:
                ctx = deepspeed.zero.GatheredParameters([p]) if hasattr(p, "ds_id") else contextlib.nullcontext()
                with ctx:
                    full = p.detach().clone()
            out[name] = full.detach().float().cpu().reshape(getattr(p, "ds_shape", p.shape)).clone()
        for name, b in module.named_buffers():
            if name in keys:
                b = b.detach().cpu().clone()
                out[name] = b.float() if b.is_floating_point() else b
        missing = keys - set(out)
        if missing:
            raise RuntimeError(f"full_state_dict: no value for {sorted(missing)[:5]}")
        return out

"""Typed configuration: dataclasses loaded from YAML, with ``key=value`` overrides.

Every section is a dataclass; an unknown key or a value of the wrong type is a :class:`ConfigError` that names the
dotted key (``optim.lr: expected float, got 'fast'``). YAML files may ``_base_: other.yaml`` (a path relative to the
file) to inherit and override another file.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type."""


# --------------------------------------------------------------------------------------------------- conversion
@dataclass
class ConvertConfig:
    """One-time conversion of a raw dataset to FFCV and DALI formats (``fastlivt convert``)."""

    source: str = "fmnist"  # imagefolder | list | inat | cifar10 | cifar100 | fmnist
    root: str = "/usr/share/datasets/fashion-mnist"
    list: Optional[str] = None  # list file (`relpath label` lines) or iNat JSON
    split: str = "train"  # train | val | test
    imbalance_factor: Optional[float] = None  # G; None keeps every image
    seed: int = 0
    formats: List[str] = field(default_factory=lambda: ["ffcv", "dali"])
    out: str = "data/fmnist_lt"
    on_error: str = "skip"  # skip | fail
    max_resolution: Optional[int] = None  # longest side after resizing; None keeps the size
    jpeg_quality: int = 90
    write_mode: str = "jpg"  # FFCV RGBImageField write mode: jpg | raw | proportion
    compress_probability: float = 0.5  # FFCV 'proportion' mode
    shard_size: int = 10000  # samples per DALI webdataset shard
    workers: int = 2  # decode/encode processes (0: decode in the main process)
    num_classes: Optional[int] = None  # list/inat/imagefolder: expected number of classes (list: None = max label + 1)


# --------------------------------------------------------------------------------------------------- training
@dataclass
class DataConfig:
    """Where the converted data is and how it is loaded."""

    train: str = ""  # directory holding manifest.json (+ .beton / shards) of the training split
    val: str = ""  # directory of the evaluation split
    backend: str = "ffcv"  # ffcv | dali | torch
    dali_device: str = "auto"  # auto | cpu | gpu  (gpu = nvJPEG 'mixed' decoding; an error without CUDA)
    sampler: str = "instance"  # instance | class_balanced | square_root | progressive
    img_size: int = 224
    batch_size: int = 64  # per device (micro-batch)
    workers: int = 2
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    rrc_scale: Tuple[float, float] = (0.2, 1.0)  # MGP uses (0.2, 1); BFT uses timm's (0.08, 1)
    auto_augment: Optional[str] = None  # e.g. rand-m9-mstd0.5-inc1 (BFT)
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.0
    reprob: float = 0.0
    eval_crop_pct: float = 0.875
    os_cache: bool = True
    batches_ahead: int = 3
    drop_last: bool = True


@dataclass
class ModelConfig:
    arch: str = "vit_base"  # vit_tiny | vit_small | vit_base | vit_large
    embed_dim: int = 0  # 0 = the arch's width; non-zero overrides it (small CPU demos)
    depth: int = 0  # 0 = the arch's number of blocks
    num_heads: int = 0  # 0 = the arch's number of heads
    in_chans: int = 3
    patch_size: int = 16
    img_size: int = 224
    attention: str = "auto"  # auto | xformers | sdpa | math
    drop_path: float = 0.0
    global_pool: str = "avg"  # avg (fc_norm) | token
    # MGP
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    # BFT
    num_classes: int = 0  # 0 = take it from the manifest
    init: Optional[str] = None  # MGP encoder export (.safetensors) to start BFT from
    grad_checkpointing: bool = False


@dataclass
class OptimConfig:
    blr: float = 1.5e-4  # base lr; lr = blr * effective_batch / 256
    lr: Optional[float] = None  # absolute lr (overrides blr)
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.95)
    layer_decay: Optional[float] = None  # BFT: 0.75
    warmup_epochs: float = 40.0
    clip_grad: Optional[float] = None
    accum_iter: int = 1


@dataclass
class LossConfig:
    name: str = "bal_bce"  # ce | bce | bal_ce | bal_bce
    form: str = "paper"  # paper | official  (Bal-BCE bias form)
    tau: float = 1.0
    fused: str = "auto"  # auto | triton | torch
    add_log_c: bool = False  # Bal-CE: bias log(pi) + log(C) instead of log(pi)
    test_prior: Optional[List[float]] = None  # per-class test counts/probabilities (Thm 3); None = uniform


@dataclass
class RunConfig:
    stage: str = "pretrain"  # pretrain | finetune
    epochs: int = 800
    out: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "bf16"  # bf16 | fp32  (bf16 autocast on CUDA; on CPU only with cpu_bf16)
    cpu_bf16: bool = False  # with amp=bf16, autocast on CPU too (plain engine; fast on CPUs with AVX512-BF16 or AMX)
    compile: Union[str, bool] = "auto"  # auto | on | off (YAML reads on/off as true/false: both accepted); torch.compile
    # per block + patch embed/head/loss; auto = on CUDA only
    compile_mode: str = "default"  # Inductor mode: default | reduce-overhead (CUDA graphs) | max-autotune | ...
    ckpt_every_steps: int = 0  # 0 = only at each epoch end
    eval_every: int = 1  # epochs
    vis_every: int = 20  # epochs between reconstruction grids (MGP)
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit; tests and benchmarks)
    ema: Optional[float] = None  # EMA decay (BFT), e.g. 0.9999
    log_every: int = 20  # optimizer steps between CSV/TensorBoard rows
    progress: bool = True  # tqdm bar
    tensorboard: bool = True  # <run.out>/tb (an error if asked for and TensorBoard is missing)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: Optional[Union[str, Dict[str, Any]]] = None  # path to a DeepSpeed JSON, or the JSON inline


# --------------------------------------------------------------------------------------------------- machinery
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in that type (lists -> tuples etc.)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, key + ".")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {len(args)}, got {value!r}")
        if args and args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r})")
        elem = (lambda i: args[0]) if args and args[-1] is Ellipsis else (lambda i: args[i] if args else Any)
        return tuple(_coerce(v, elem(i), f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _build(cls: type, data: Dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (section {cls.__name__} has: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(cls: type, data: Dict[str, Any]):
    """Build ``cls`` from a plain dict (e.g. the config stored in a checkpoint), with the same checks as YAML."""
    return _build(cls, data)


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A plain (JSON/YAML-serialisable) dict of a config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a YAML config, resolving ``_base_`` inheritance."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("_base_", None)
    if base is not None:
        data = _merge(read_yaml(path.parent / base), data)
    return data


def parse_override(item: str) -> Tuple[List[str], Any]:
    """``a.b=value`` -> (['a', 'b'], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def load_config(cls: type, path: Optional[Union[str, Path]] = None, overrides: Optional[List[str]] = None):
    """Build ``cls`` from defaults, then the YAML at ``path``, then ``key=value`` overrides."""
    data: Dict[str, Any] = read_yaml(path) if path else {}
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
            node = nxt
        node[keys[-1]] = value
    return _build(cls, data)


def save_config(cfg: Any, path: Union[str, Path]) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)

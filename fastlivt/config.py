"""Typed configuration: dataclasses loaded from YAML, with ``key=value`` overrides.

Every section is a dataclass; an unknown key, a value of the wrong type or a choice outside its ``Literal`` is a
:class:`ConfigError` that names the dotted key (``optim.lr: expected float, got 'fast'``; ``loss.name: expected one
of ce, bce, bal_ce, bal_bce, got 'focal'``), raised when the config is loaded, before any data is touched. The
checking and conversion is pydantic's. YAML files may ``_base_: other.yaml`` (a path relative to the file) to inherit
and override another file.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass


class ConfigError(ValueError):
    """A configuration key is unknown, its value has the wrong type or lies outside its choices."""


def section(cls: type) -> type:
    """A config section: a pydantic dataclass (the dataclass API: attributes, dataclasses.fields/asdict/replace) whose
    values are checked and converted when it is built (YAML lists -> tuples, ints -> floats, '1e-3' -> float); an
    unknown key or a bad value is a :class:`ConfigError` also when the class is called or ``dataclasses.replace``d."""
    cls = dataclass(config=ConfigDict(extra="forbid"))(cls)
    init = cls.__init__

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as e:
            raise ConfigError(_explain(type(self), e)) from None

    cls.__init__ = checked_init
    return cls


# --------------------------------------------------------------------------------------------------- conversion
@section
class ConvertConfig:
    """One-time conversion of a raw dataset to FFCV and DALI formats (``fastlivt convert``)."""

    source: Literal["imagefolder", "list", "inat", "cifar10", "cifar100", "fmnist"] = "fmnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    list: Optional[str] = None  # list file (`relpath label` lines) or iNat JSON
    split: Literal["train", "val", "test"] = "train"
    imbalance_factor: Optional[float] = None  # G; None keeps every image
    seed: int = 0
    formats: List[Literal["ffcv", "dali"]] = field(default_factory=lambda: ["ffcv", "dali"])
    out: str = "data/fmnist_lt"
    on_error: Literal["skip", "fail"] = "skip"
    max_resolution: Optional[int] = None  # longest side after resizing; None keeps the size
    jpeg_quality: int = 90
    write_mode: Literal["jpg", "raw", "proportion"] = "jpg"  # FFCV RGBImageField write mode
    compress_probability: float = 0.5  # FFCV 'proportion' mode
    shard_size: int = 10000  # samples per DALI webdataset shard
    workers: int = 2  # decode/encode processes (0: decode in the main process)
    num_classes: Optional[int] = None  # list/inat/imagefolder: expected number of classes (list: None = max label + 1)


# --------------------------------------------------------------------------------------------------- training
@section
class DataConfig:
    """Where the converted data is and how it is loaded."""

    train: str = ""  # directory holding manifest.json (+ .beton / shards) of the training split
    val: str = ""  # directory of the evaluation split
    backend: Literal["ffcv", "dali", "torch"] = "ffcv"
    dali_device: Literal["auto", "cpu", "gpu"] = "auto"  # (gpu = nvJPEG 'mixed' decoding; an error without CUDA)
    sampler: Literal["instance", "class_balanced", "square_root", "progressive"] = "instance"
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


@section
class ModelConfig:
    arch: Literal["vit_tiny", "vit_small", "vit_base", "vit_large"] = "vit_base"
    embed_dim: int = 0  # 0 = the arch's width; non-zero overrides it (small CPU demos)
    depth: int = 0  # 0 = the arch's number of blocks
    num_heads: int = 0  # 0 = the arch's number of heads
    in_chans: int = 3
    patch_size: int = 16
    img_size: int = 224
    attention: Literal["auto", "xformers", "sdpa", "math"] = "auto"
    drop_path: float = 0.0
    global_pool: Literal["avg", "token"] = "avg"  # avg: mean of patch tokens + fc_norm
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


@section
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


@section
class LossConfig:
    name: Literal["ce", "bce", "bal_ce", "bal_bce"] = "bal_bce"
    form: Literal["paper", "official"] = "paper"  # Bal-BCE bias form
    tau: float = 1.0
    fused: Literal["auto", "triton", "torch"] = "auto"
    add_log_c: bool = False  # Bal-CE: bias log(pi) + log(C) instead of log(pi)
    test_prior: Optional[List[float]] = None  # per-class test counts/probabilities (Thm 3); None = uniform


@section
class RunConfig:
    stage: Literal["pretrain", "finetune"] = "pretrain"
    epochs: int = 800
    out: str = "runs/default"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["bf16", "fp32"] = "bf16"  # (bf16 autocast on CUDA; on CPU only with cpu_bf16)
    cpu_bf16: bool = False  # with amp=bf16, autocast on CPU too (plain engine; fast on CPUs with AVX512-BF16 or AMX)
    compile: Union[Literal["auto", "on", "off"], bool] = "auto"  # auto | on | off (YAML reads on/off as true/false: both accepted); torch.compile
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


@section
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: Optional[Union[str, Dict[str, Any]]] = None  # path to a DeepSpeed JSON, or the JSON inline


# --------------------------------------------------------------------------------------------------- machinery
_EXPECTED = {"int": "int", "float": "float", "bool": "bool (true/false)", "string": "str", "list": "a list",
             "tuple": "a list", "dict": "a mapping", "dataclass": "a mapping", "none": "null"}


def _key(loc: Tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _field_path(cls: type, loc: Tuple[Any, ...], unknown: bool) -> Tuple[Tuple[Any, ...], type, Any]:
    """The part of pydantic's ``loc`` that names config keys (union member tags dropped), the innermost section and
    the annotation of the last key."""
    path: List[Any] = []
    tp: Any = cls
    for part in loc:
        names = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if isinstance(part, int):
            path.append(part)
        elif part in names:
            path.append(part)
            tp = names[part]
            if dataclasses.is_dataclass(tp):
                cls = tp
        elif unknown and names:  # the unknown key itself
            path.append(part)
            break
        else:  # a union member's tag
            break
    return tuple(path), cls, tp


def _problem(cls: type, err: Dict[str, Any]) -> Tuple[str, str]:
    """(dotted key, what is wrong) of one pydantic error."""
    kind, value = err["type"], err.get("input")
    path, section, tp = _field_path(cls, err["loc"], kind == "unexpected_keyword_argument")
    if kind == "unexpected_keyword_argument":
        return _key(path), f"unknown key (section {section.__name__} has: {', '.join(f.name for f in dataclasses.fields(section))})"
    if kind == "literal_error":
        return _key(path), "expected one of " + ", ".join(re.findall(r"'([^']*)'", err["ctx"]["expected"]))
    if kind in ("too_short", "too_long") or (kind == "missing" and path and isinstance(path[-1], int)):
        if kind == "missing":
            path = path[:-1]
        n = len([a for a in typing.get_args(tp) if a is not Ellipsis]) or "more"
        return _key(path), f"expected {n} values"
    what = _EXPECTED.get(kind.split("_")[0])
    return _key(path), f"expected {what}" if what else err["msg"].lower()


def _build(cls: type, data: Any):
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as e:
        raise ConfigError(_explain(cls, e)) from None


def _explain(cls: type, e: ValidationError) -> str:
    """pydantic's errors as one line per key: ``optim.lr: expected float, got 'fast'``."""
    problems: Dict[str, Tuple[List[str], Any]] = {}
    for err in e.errors(include_url=False):
        key, what = _problem(cls, err)
        whats = problems.setdefault(key, ([], err.get("input")))[0]
        if what not in whats:  # a union reports each member: "expected str or a mapping"
            whats.append(what)
    lines = []
    for key, (whats, value) in problems.items():
        if whats[0].startswith("unknown key"):
            lines.append(f"unknown key {key} ({whats[0].split('(', 1)[1]}")
        else:
            expected = " or ".join(w.replace("expected ", "", i > 0) for i, w in enumerate(whats))
            lines.append(f"{key}: {expected}, got {value!r}")
    return "; ".join(lines)


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

"""Typed configuration machinery: dataclasses loaded from YAML, with ``key=value`` overrides; and the conversion's
config, :class:`ConvertConfig`.

Every section is a dataclass made with :func:`section`; an unknown key, a value of the wrong type or a choice outside
its ``Literal`` is a :class:`ConfigError` that names the dotted key (``optim.lr: expected float, got 'fast'``;
``loss.name: expected one of ce, bce, bal_ce, bal_bce, got 'focal'``), raised when the config is loaded, before any
data is touched. The checking and conversion is pydantic's. YAML files may ``_base_: other.yaml`` (a path relative to
the file) to inherit and override another file. The training sections are in :mod:`fastlivt.config`.
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
    kind = err["type"]
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

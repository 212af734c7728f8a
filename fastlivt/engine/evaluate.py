"""``fastlivt evaluate --checkpoint FILE --data DIR [--train-manifest DIR] [--out DIR]``: long-tail metrics of a
fine-tuned classifier on a converted split, from its raw logits (the training-time logit bias is never applied).

FILE is a BFT export (``model.safetensors``, ``best.safetensors``, ``model_ema.safetensors``: the weights, with the
training config and class counts in the metadata) or a plain-PyTorch checkpoint (``checkpoints/last.pt``,
``checkpoints/best.pt``). A DeepSpeed checkpoint directory is evaluated through its export (``best.safetensors``).
The many/medium/few groups come from the *training* class counts: ``--train-manifest`` when given, else the counts
recorded at training time. Writes ``metrics.json``, ``per_class.csv``, ``reliability.png`` and
``acc_vs_class_size.png`` (see :func:`fastlivt.metrics.evaluate_outputs`) into ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from fastlivt.data_prep.config import parse_override
from fastlivt.data_prep.manifest import load_manifest
from fastlivt.config import ConfigError, TrainConfig, from_dict, to_dict
from fastlivt.engine.checkpoint import read_safetensors, safe_load
from fastlivt.engine.finetune import EXPORT_FORMAT, predict
from fastlivt.engine.runtime import resolve_device
from fastlivt.logs import get_logger

log = get_logger(__name__)


def read_classifier(path: Path) -> Tuple[Dict[str, torch.Tensor], TrainConfig, Optional[List[int]]]:
    """(weights, training config, training class counts or None) of an export or a checkpoint file."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory (a DeepSpeed checkpoint?): evaluate its export, e.g. "
                         f"{path.parent.parent / 'best.safetensors'}")
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: no such file {path}")
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
        if meta.get("format") != EXPORT_FORMAT or "config" not in meta:
            raise ValueError(f"{path}: not a fine-tuned classifier export (format {meta.get('format')!r}); "
                             f"an MGP encoder export has no classifier head to evaluate")
        return state, from_dict(TrainConfig, meta["config"]), meta.get("class_counts")
    obj = safe_load(path)  # weights_only: a crafted file is refused, never run
    if not isinstance(obj, dict) or "model" not in obj or "config" not in obj.get("meta", {}):
        raise ValueError(f"{path}: not a fastlivt checkpoint (no model / meta.config entries)")
    cfg = from_dict(TrainConfig, obj["meta"]["config"])
    if cfg.run.stage != "finetune":
        raise ValueError(f"{path}: a {cfg.run.stage} checkpoint; evaluate needs a fine-tuned classifier")
    return obj["model"], cfg, None


def with_overrides(cfg: TrainConfig, overrides: List[str]) -> TrainConfig:
    """``cfg`` with ``key=value`` overrides applied (checked like the YAML)."""
    data = to_dict(cfg)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
            node = node[k]
        node[keys[-1]] = value
    return from_dict(TrainConfig, data)


def default_loader(cfg: TrainConfig, split: str, stage: str, device: torch.device) -> Any:
    from fastlivt.data import build_loader

    return build_loader(cfg, split, stage, device=device, rank=0, world=1)


def run_evaluation(checkpoint: str, data: str, out: Optional[str] = None, train_manifest: Optional[str] = None,
                   overrides: Optional[List[str]] = None, confidence: str = "softmax", device: str = "auto",
                   make_loader: Optional[Callable[..., Any]] = None) -> Dict[str, Any]:
    """Evaluate ``checkpoint`` on the converted split ``data``; return the metrics dict (also written to ``out``)."""
    from fastlivt.metrics import evaluate_outputs
    from fastlivt.models.vit import build_vit_from_config

    path = Path(checkpoint)
    state, cfg, counts = read_classifier(path)
    if overrides:  # e.g. data.batch_size=256 data.backend=dali
        cfg = with_overrides(cfg, overrides)
    cfg.data.val = data
    if train_manifest:
        counts = list(load_manifest(train_manifest).class_counts)
    elif counts is None:
        if not cfg.data.train:
            raise ValueError(f"{path}: no training class counts recorded; pass --train-manifest DIR")
        counts = list(load_manifest(cfg.data.train).class_counts)
    model = build_vit_from_config(cfg.model, len(counts))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the configured classifier: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    dev = resolve_device(device, 0)
    model.to(dev)
    loader = (make_loader or default_loader)(cfg, "val", "eval", dev)
    val_manifest = loader.manifest
    if val_manifest.num_classes != len(counts):
        raise ValueError(f"{data}: {val_manifest.num_classes} classes, the model was trained on {len(counts)}")
    use_bf16 = cfg.run.amp == "bf16" and (dev.type == "cuda" or cfg.run.cpu_bf16)
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    logits, labels = predict(model, loader, autocast)
    out_dir = Path(out) if out else path.parent / f"eval-{Path(data).name}"
    metrics = evaluate_outputs(logits, labels, counts, val_manifest.class_names, out_dir, confidence=confidence)
    log.info("evaluated %s on %s (%d images): files in %s", path, data, len(labels), out_dir)
    return metrics


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fastlivt evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="BFT export (.safetensors) or checkpoint (.pt)")
    p.add_argument("--data", required=True, help="converted evaluation split (directory with manifest.json)")
    p.add_argument("--train-manifest", default=None, help="training split directory (class counts for many/medium/few)")
    p.add_argument("--out", default=None, help="output directory (default: eval-<data name> beside the checkpoint)")
    p.add_argument("--confidence", choices=("softmax", "sigmoid"), default="softmax", help="confidence for ECE/MCE")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. data.batch_size=256 data.backend=torch")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    metrics = run_evaluation(args.checkpoint, args.data, args.out, args.train_manifest, args.overrides,
                             args.confidence, args.device)
    print(json.dumps(metrics, indent=1, default=str))
    return 0

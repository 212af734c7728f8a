"""``fastlivt checkpoint info DIR`` and ``fastlivt checkpoint export DIR OUT.safetensors``: what a training checkpoint
holds, and its consolidated weights as one safetensors file — for checkpoints of either engine.

DIR is a run directory (``<run.out>``: its ``checkpoints/last``), a checkpoints directory (its ``last``), a plain-engine
checkpoint file (``last.pt``, ``best.pt``) or a DeepSpeed checkpoint directory (``checkpoints/last``). Every file is
read with ``weights_only=True`` (:func:`fastlivt.engine.checkpoint.safe_load`). ``info`` prints the epoch, optimizer
step, world size and accumulation, the data position (samples of the epoch's plan consumed), the config digest (sha256
of the config as canonical JSON) and the engine (torch, or DeepSpeed with its ZeRO stage). ``export`` writes the fp32
model weights (ZeRO shards consolidated with DeepSpeed's ``zero_to_fp32``) with the config in the metadata; a BFT
checkpoint's export is a classifier export that ``fastlivt evaluate`` reads.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from fastlivt.engine.checkpoint import CKPT_DIR, META_FILE, safe_load, save_safetensors
from fastlivt.logs import get_logger

log = get_logger(__name__)
EXPORT_FORMAT = "fastlivt-checkpoint-weights"


def locate(spec: str | Path, tag: str = "last") -> Tuple[str, Path]:
    """(engine, path) of the checkpoint DIR names: ``("torch", <file>.pt)`` or ``("deepspeed", <tag dir>)``."""
    p = Path(spec)
    if p.is_file():
        if p.suffix != ".pt":
            raise ValueError(f"{p}: not a checkpoint (.pt file or checkpoint directory expected)")
        return "torch", p
    if not p.is_dir():
        raise FileNotFoundError(f"no checkpoint at {p}")
    if (p / META_FILE.format(rank=0)).is_file():
        return "deepspeed", p
    for d in (p / CKPT_DIR, p):
        if (d / f"{tag}.pt").is_file():
            return "torch", d / f"{tag}.pt"
        if (d / tag / META_FILE.format(rank=0)).is_file():
            return "deepspeed", d / tag
    raise FileNotFoundError(f"{p}: no checkpoint {tag!r} (looked for {tag}.pt and {tag}/{META_FILE.format(rank=0)} "
                            f"in {p / CKPT_DIR} and {p})")


def read_meta(engine: str, path: Path) -> Dict[str, Any]:
    if engine == "torch":
        state = safe_load(path, mmap=True)
        if not isinstance(state, dict) or "meta" not in state:
            raise ValueError(f"{path}: not a fastlivt checkpoint (no 'meta' entry)")
        return state["meta"]
    import deepspeed  # noqa: F401  (DeepSpeed's enum in the shards joins the allow-list)

    return safe_load(path / META_FILE.format(rank=0))


def config_digest(config: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def zero_stage(path: Path) -> int:
    """The ZeRO stage recorded in a DeepSpeed checkpoint's optimizer shards (0 when there are none)."""
    shards = sorted(path.glob("*optim_states.pt"))
    if not shards:
        return 0
    state = safe_load(shards[0], mmap=True)
    stage = state.get("optimizer_state_dict", {}).get("zero_stage", 0)
    return int(getattr(stage, "value", stage))


def info(spec: str | Path) -> Dict[str, Any]:
    """The summary ``fastlivt checkpoint info`` prints, as a dict."""
    engine, path = locate(spec)
    meta = read_meta(engine, path)
    sampler = meta.get("sampler", {})
    cfg = meta.get("config", {})
    return {
        "path": str(path),
        "engine": "torch" if engine == "torch" else f"deepspeed zero-{zero_stage(path)}",
        "stage": cfg.get("run", {}).get("stage"),
        "epoch": meta.get("epoch"),
        "step": meta.get("step"),
        "world_size": sampler.get("world"),
        "accum": sampler.get("accum"),
        "batch_size": sampler.get("batch_size"),
        "sampler": sampler.get("kind"),
        "samples_consumed": sampler.get("samples_consumed"),
        "epoch_samples": sampler.get("epoch_samples"),
        "config_sha256": config_digest(cfg),
        "manifest_sha256": meta.get("manifest_sha256"),
    }


def consolidated_weights(engine: str, path: Path) -> Dict[str, torch.Tensor]:
    """The whole model's weights (fp32 for floating tensors, on CPU) of checkpoint ``path``."""
    if engine == "torch":
        state = safe_load(path)["model"]
    else:
        from fastlivt.engine.ds_checkpoint import scan_safe

        scan_safe(path)  # DeepSpeed's readers unpickle with weights_only=False: refuse unsafe files first
        if zero_stage(path) == 0:
            state = safe_load(sorted(path.glob("*model_states.pt"))[0])["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def export(spec: str | Path, out: str | Path) -> Path:
    """Write checkpoint ``spec``'s consolidated weights to ``out`` (safetensors, config and progress in the metadata)."""
    from fastlivt.engine.finetune import EXPORT_FORMAT as CLASSIFIER_FORMAT

    engine, path = locate(spec)
    meta = read_meta(engine, path)
    weights = consolidated_weights(engine, path)
    cfg = meta.get("config", {})
    stage = cfg.get("run", {}).get("stage")
    metadata = {"format": CLASSIFIER_FORMAT if stage == "finetune" else EXPORT_FORMAT, "config": cfg,
                "epoch": meta.get("epoch"), "step": meta.get("step"), "source": str(path)}
    return save_safetensors(weights, out, metadata)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fastlivt checkpoint", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    p_info = sub.add_parser("info", help="epoch, step, world size, data position, config digest, engine")
    p_info.add_argument("dir", help="run directory, checkpoints directory, .pt file or DeepSpeed tag directory")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_export = sub.add_parser("export", help="consolidated fp32 weights as safetensors")
    p_export.add_argument("dir")
    p_export.add_argument("out", help="output .safetensors file")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.action == "info":
        summary = info(args.dir)
        if args.json:
            print(json.dumps(summary, indent=1))
        else:
            for k, v in summary.items():
                print(f"{k:<17} {v}")
        return 0
    if not str(args.out).endswith(".safetensors"):
        raise SystemExit(f"fastlivt checkpoint export: OUT must end in .safetensors, got {args.out}")
    print(export(args.dir, args.out))
    return 0

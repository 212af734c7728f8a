"""What a checkpoint remembers besides the weights, and the safetensors exports.

A training checkpoint is written by the runtime (``Runtime.save``: model + optimizer, atomically) with a ``meta``
dict beside them, built from the run's parts by :class:`fastlivt.engine.checkpointer.Checkpointer`, holding everything
else an exact resume needs (this layout is the on-disk format; checkpoints written before the parts keep loading):

    epoch            the epoch the run was in (or the next one, at an epoch end)
    batch_in_epoch   micro-batches of that epoch already consumed per rank (at the checkpoint's world size)
    step             optimizer steps taken so far (the schedule's input)
    sampler          the data position as a global quantity: seed, epoch, order kind, ``samples_consumed`` (positions
                     of the epoch's global order already read, all ranks together), ``epoch_samples`` (where that
                     epoch's plan ends), ``world`` / ``accum`` / ``batch_size`` it was written with
    rng              python / numpy / torch (and CUDA) generator states at that moment, as tensors and ints
    schedule         the lr schedule's parameters (a resume with another schedule is refused)
    config           the whole TrainConfig as a dict
    manifest_sha256  hash of the training manifest (a resume on other data is refused)
    extra            task state: best metric, EMA weights, ...

Loading never runs code: every checkpoint file is unpickled with ``weights_only=True`` and the allow-list
:data:`SAFE_GLOBALS` (see :func:`safe_load`); a file that needs anything else is refused, naming the file.

Checkpoints live in ``<run.out>/checkpoints``: tag ``last`` (every N steps and each epoch end) and ``best`` (BFT).
Exports (``encoder.safetensors``, ``model.safetensors``) are written to a temporary name and renamed; their metadata
holds the config (JSON) so ``fastlivt evaluate`` can rebuild the model from the file alone.
"""
from __future__ import annotations

import enum
import json
import pickle
import random
import re
import sys
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from fastlivt.data_prep.atomic import atomic_path
from fastlivt.engine.nonfinite import refuse_nonfinite
from fastlivt.logs import get_logger

log = get_logger(__name__)

CKPT_DIR = "checkpoints"
META_FILE = "meta_rank{rank:05d}.pt"  # the per-rank meta beside a DeepSpeed checkpoint's shards


# --------------------------------------------------------------------------------------------------- safe loading
class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file that would need more than tensors, containers and the allow-listed types to unpickle."""


def enum_member(cls: Any, name: Any) -> Any:
    """What ``builtins.getattr`` may do inside a checkpoint: name a member of an (allow-listed) enum. Some Python
    versions (3.11.2, Debian 12's) pickle enum members as ``getattr(EnumClass, "member")``; anything else is refused."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"GLOBAL builtins.getattr applied to ({cls!r}, {name!r}), not an enum member")


def _safe_globals() -> list:
    """Types besides tensors and plain containers that checkpoint files legitimately hold: DeepSpeed's ZeRO optimizer
    files record its stage enum, its (static, fp32: unit) loss scaler and the fragment addresses of ZeRO-1/2 partitions.
    Unpickling them builds plain data objects. ``builtins.getattr`` resolves to :func:`enum_member` only."""
    allowed: list = [(enum_member, "builtins.getattr")]
    if "deepspeed" not in sys.modules:  # only DeepSpeed's own files hold its types; whoever reads them imported it
        return allowed
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    except ImportError:  # DeepSpeed not installed: plain-engine checkpoints need nothing extra
        pass
    return allowed


def safe_load(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with :func:`_safe_globals` allowed; a file that needs any other global
    (a pickle that would run code) raises :class:`UnsafeCheckpointError` naming the file and the refused global."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it refers to {found.group(1)}" if found else str(e).strip().splitlines()[-1][:200]
        raise UnsafeCheckpointError(f"{path}: refused to load: {what}, outside the allow-list of tensors, containers "
                                    f"and the project's own types, so unpickling it could run code") from None


# --------------------------------------------------------------------------------------------------- RNG
def capture_rng() -> Dict[str, Any]:
    """The state of every random generator the training step may draw from (this process), in a form that loads with
    ``weights_only=True``: numpy's key array as an int64 tensor, python's state as a tuple of ints."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------- files
def has_checkpoint(directory: str | Path, tag: str) -> bool:
    """Whether ``tag`` exists in either runtime's layout (``<tag>.pt`` file or DeepSpeed ``<tag>/`` directory)."""
    d = Path(directory)
    return (d / f"{tag}.pt").is_file() or (d / tag).is_dir()


def engine_of(directory: str | Path, tag: str) -> str:
    """``torch`` (``<tag>.pt``) or ``deepspeed`` (``<tag>/``) — which runtime wrote checkpoint ``tag``."""
    d = Path(directory)
    if (d / f"{tag}.pt").is_file():
        return "torch"
    if (d / tag).is_dir():
        return "deepspeed"
    raise FileNotFoundError(f"no checkpoint {tag!r} in {d} (neither {tag}.pt nor a {tag}/ directory)")


def peek_meta(directory: str | Path, tag: str) -> Dict[str, Any]:
    """Rank 0's ``meta`` of checkpoint ``tag`` without building a runtime (safe loading, tensors memory-mapped)."""
    d = Path(directory)
    if engine_of(d, tag) == "torch":
        state = safe_load(d / f"{tag}.pt", mmap=True)
        if not isinstance(state, dict) or "meta" not in state:
            raise ValueError(f"{d / f'{tag}.pt'}: not a fastlivt checkpoint (no 'meta' entry)")
        return state["meta"]
    path = d / tag / META_FILE.format(rank=0)
    if not path.is_file():
        raise FileNotFoundError(f"{d / tag}: no {path.name}; not a DeepSpeed checkpoint written by fastlivt")
    return safe_load(path)


def check_meta(meta: Dict[str, Any], where: str, manifest_sha256: str) -> None:
    """Refuse a resume whose checkpoint is incomplete or was taken on another training set."""
    for key in ("epoch", "batch_in_epoch", "step", "sampler", "rng", "schedule", "config", "manifest_sha256"):
        if key not in meta:
            raise ValueError(f"{where}: checkpoint meta lacks {key!r}; it was not written by this engine")
    if meta["manifest_sha256"] != manifest_sha256:
        raise ValueError(f"{where}: the checkpoint was trained on data with manifest sha256 {meta['manifest_sha256'][:12]}…, "
                         f"the configured training data has {manifest_sha256[:12]}…")


# --------------------------------------------------------------------------------------------------- exports
def save_safetensors(state: Dict[str, torch.Tensor], path: str | Path, metadata: Dict[str, Any]) -> Path:
    """Write ``state`` (contiguous CPU tensors) to ``path`` via a temporary name; ``metadata`` values are JSON-encoded."""
    from safetensors.torch import save_file

    path = Path(path)
    refuse_nonfinite(state, f"export {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    with atomic_path(path, fsync=True) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    log.info("exported %d tensors to %s", len(tensors), path)
    return path


def read_safetensors(path: str | Path) -> tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors, metadata with JSON values decoded) of an export."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"export not found: {path}")
    tensors: Dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        raw = f.metadata() or {}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    meta: Dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return tensors, meta

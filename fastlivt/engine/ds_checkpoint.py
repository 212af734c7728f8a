"""DeepSpeed checkpoints of :class:`~fastlivt.engine.ds_runtime.DeepSpeedRuntime`: atomic save, safe load, and resume on
another number of processes through DeepSpeed's universal checkpoint.

Layout: ``<dir>/<tag>/`` is DeepSpeed's own sharded checkpoint (``*_model_states.pt``, ``*_optim_states.pt``) plus one
``meta_rank<r>.pt`` per rank (the loop's meta). ``<dir>/latest`` names the newest tag.

Safety: DeepSpeed unpickles its files with ``weights_only=False``. Before DeepSpeed touches a checkpoint, every ``.pt``
file under it is read with ``weights_only=True`` and the project's allow-list
(:func:`fastlivt.engine.checkpoint.safe_load`, memory-mapped so the tensors are not read twice into memory): a file that
would run code is refused, naming it, and DeepSpeed never opens it.

World size change: the shards of ZeRO-1/2/3 hold a 1/W slice of the optimizer state, so a checkpoint written on W
processes does not load on W' != W. Rank 0 then converts it once, in-process, with DeepSpeed's
``deepspeed.checkpoint.ds_to_universal`` into ``<dir>/<tag>_universal`` (written under a temporary name and renamed),
and every rank loads that with ``checkpoint.load_universal`` set — DeepSpeed reshards weights and Adam moments onto the
new ranks. ZeRO-0 state is replicated and loads as is. Offloaded (NVMe) optimizer state is refused: resume on the
checkpoint's world size.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from fastlivt.data_prep.atomic import DiskFullError, is_disk_full, write_text_atomic
from fastlivt.engine.checkpoint import META_FILE, safe_load
from fastlivt.engine.nonfinite import NonFiniteError, first_nonfinite
from fastlivt.logs import get_logger

log = get_logger(__name__)
UNIVERSAL_SUFFIX = "_universal"


def scan_safe(path: Path) -> int:
    """Read every ``.pt`` under ``path`` with ``weights_only=True`` (raises naming the first unsafe file); the count."""
    import deepspeed  # noqa: F401  (its types join the allow-list once it is imported)

    files = sorted(path.rglob("*.pt"))
    for f in files:
        safe_load(f, mmap=True)
    return len(files)


def saved_world(path: Path, meta: Dict[str, Any]) -> int:
    """The data-parallel world size checkpoint ``path`` was written with."""
    world = meta.get("sampler", {}).get("world")
    if world is not None:
        return int(world)
    optim = list(path.glob("*zero_pp_rank_*_optim_states.pt"))
    return max(1, len(optim))


def save(rt: Any, directory: str, tag: str, meta: Dict[str, Any]) -> None:
    """DeepSpeed's sharded checkpoint under ``directory/tag`` with ``meta`` (per rank), atomically.

    Every rank must call it. DeepSpeed writes ``directory/tag.tmp``; only after all ranks have finished does rank 0
    rename it to ``directory/tag`` and then rewrite ``directory/latest`` (so a crash leaves the previous checkpoint
    intact). A full disk removes the partial ``tag.tmp`` and is one :class:`DiskFullError`. Several nodes need a shared filesystem for ``directory``. A stale universal conversion of ``tag`` is removed.
    """
    engine = rt.engine
    if engine.micro_steps % rt.accum_steps != 0:
        raise RuntimeError(f"checkpoint requested inside an accumulation cycle (micro step {engine.micro_steps}, "
                           f"accumulation {rt.accum_steps}): gradients in flight would be lost")
    root = Path(directory)
    final, tmp = root / tag, root / f"{tag}.tmp"
    # each rank checks the parameters it holds (a shard under ZeRO-3) and the task state; all learn of any failure
    bad = first_nonfinite([*engine.module.named_parameters(), ("extra", meta.get("extra", {}))])
    flag = torch.tensor([0.0 if bad is None else 1.0], device=rt.device)
    if rt.world > 1:
        torch.distributed.all_reduce(flag)
    if flag.item():
        raise NonFiniteError(f"not writing checkpoint {final}: tensor {bad or '(on another rank)'} is not finite "
                             f"(NaN or infinity); the previous checkpoint stays as it was")
    if rt.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    rt.barrier()
    try:
        engine.save_checkpoint(str(root), tag=tmp.name, client_state=meta, save_latest=False)
        torch.save(meta, tmp / META_FILE.format(rank=rt.rank))
    except Exception as e:
        if not is_disk_full(e, tmp):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the partial shards; `final` is untouched
        raise DiskFullError(tmp, e) from e
    rt.barrier()
    if rt.is_main:
        old = root / f"{tag}.old"
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
        tmp.rename(final)
        for stale in (old, root / f"{tag}{UNIVERSAL_SUFFIX}"):
            if stale.exists():
                shutil.rmtree(stale)
        write_text_atomic(root / "latest", tag)
    rt.barrier()


def convert_to_universal(path: Path, out: Path) -> None:
    """``ds_to_universal`` of checkpoint ``path`` into ``out`` (temporary name, then renamed); rank 0 only."""
    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    args = argparse.Namespace(input_folder=str(path), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # checkpoints need no universal_checkpoint_info of their own
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            ds_to_universal.main(args)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        log.error("ds_to_universal output:\n%s", printed.getvalue()[-4000:])
        raise
    finally:
        (path.parent / "latest_universal").unlink(missing_ok=True)  # the converter's own pointer; fastlivt uses tags
    tmp.rename(out)


def _group_scales(rt: Any) -> List[Optional[float]]:
    return [g.get("lr_scale") for g in rt.optimizer.param_groups]


def load(rt: Any, directory: str, tag: str) -> Dict[str, Any]:
    """Restore model, optimizer and engine counters from ``directory/tag`` on this runtime's world size (resharding
    through a universal checkpoint when it differs); return this rank's ``meta`` (rank 0's after a reshard)."""
    engine = rt.engine
    path = Path(directory) / tag
    if not path.is_dir():
        raise FileNotFoundError(f"DeepSpeed checkpoint not found: {path}")
    scan_safe(path)
    meta0 = safe_load(path / META_FILE.format(rank=0)) if (path / META_FILE.format(rank=0)).is_file() else {}
    world = saved_world(path, meta0)
    load_tag = tag
    if world != rt.world and rt.zero_stage > 0:
        offload = rt.ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if offload == "nvme":
            raise RuntimeError(f"{path}: written on {world} processes; NVMe-offloaded optimizer state cannot be "
                               f"resharded to {rt.world}: resume on {world} processes")
        load_tag = f"{tag}{UNIVERSAL_SUFFIX}"
        universal = Path(directory) / load_tag
        failure = torch.zeros(1, device=rt.device)
        if rt.is_main and not universal.is_dir():
            log.info("%s: written on %d processes, resuming on %d: converting to a universal checkpoint (%s)", path,
                     world, rt.world, universal)
            try:
                convert_to_universal(path, universal)
            except Exception as e:  # every rank must learn of it, or the others wait at the barrier forever
                log.error("universal conversion of %s failed: %s", path, e)
                failure.fill_(1)
        if rt.world > 1:
            torch.distributed.all_reduce(failure)
        if failure.item():
            raise RuntimeError(f"{path}: written on {world} processes with ZeRO-{rt.zero_stage}; DeepSpeed's universal "
                               f"checkpoint conversion failed (see the log): resume on {world} processes instead")
    scales = _group_scales(rt)
    universal_flag = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = load_tag != tag
    try:
        load_path, client_state = engine.load_checkpoint(str(directory), tag=load_tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=False)
    finally:
        engine._config.load_universal_checkpoint = universal_flag
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    for group, scale in zip(rt.optimizer.param_groups, scales):  # a universal load replaces the groups' extra keys
        if scale is not None:
            group["lr_scale"] = scale
    # Checkpoints are taken at accumulation boundaries: restart the micro-step counter in phase.
    engine.micro_steps = engine.global_steps * rt.accum_steps
    own = path / META_FILE.format(rank=rt.rank)
    if world == rt.world and own.is_file():
        return safe_load(own)
    return meta0 or dict(client_state or {})

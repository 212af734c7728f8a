"""One conversion: list the source, pick the long-tail subset, decode every image once, write FFCV + DALI + manifest.

The written order is one shuffled order (``numpy.random.default_rng(seed)``) of the kept samples, the same in
``labels.npy``, the ``.beton`` rows and the shard keys. Every output is written under a temporary name; only when all
of them are complete are they renamed, and the manifest is written last, so a killed or failed conversion never
leaves a directory that looks finished.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from fastlivt.data_prep.beton_writer import write_beton
from fastlivt.data_prep.atomic import DiskFullError, is_disk_full
from fastlivt.data_prep.config import ConfigError, ConvertConfig
from fastlivt.data_prep.decode import DecodeJob, WorkerDied, decode_all
from fastlivt.data_prep.longtail import select_longtail
from fastlivt.data_prep.manifest import LABELS_NAME, MANIFEST_NAME, Manifest, sha256_file
from fastlivt.data_prep.sources import SOURCES, Source, open_source
from fastlivt.data_prep.writers import TMP_SUFFIX, ShardWriter, StagedImages, beton_name

log = logging.getLogger("fastlivt.data_prep.convert")

FORMATS = ("ffcv", "dali")
WRITE_MODES = ("jpg", "raw", "proportion")
SPLITS = ("train", "val", "test")
STAGING_PREFIX = ".staging-"


class ConversionError(RuntimeError):
    """The conversion stopped: bad input under ``--on-error fail``, or nothing convertible."""


def check_config(cfg: ConvertConfig) -> None:
    """Reject settings that cannot work (a :class:`ConfigError`), naming the field and the value."""
    problems = []
    if cfg.source not in SOURCES:
        problems.append(f"source={cfg.source!r} (expected one of {', '.join(SOURCES)})")
    if cfg.split not in SPLITS:
        problems.append(f"split={cfg.split!r} (expected train|val|test)")
    bad = [f for f in cfg.formats if f not in FORMATS]
    if bad or not cfg.formats:
        problems.append(f"formats={','.join(cfg.formats)!r} (expected a non-empty subset of ffcv,dali)")
    if cfg.on_error not in ("skip", "fail"):
        problems.append(f"on_error={cfg.on_error!r} (expected skip|fail)")
    if cfg.write_mode not in WRITE_MODES:
        problems.append(f"write_mode={cfg.write_mode!r} (expected jpg|raw|proportion)")
    if cfg.imbalance_factor is not None and cfg.imbalance_factor < 1:
        problems.append(f"imbalance_factor={cfg.imbalance_factor} (expected >= 1)")
    if cfg.max_resolution is not None and cfg.max_resolution < 1:
        problems.append(f"max_resolution={cfg.max_resolution} (expected >= 1, or none)")
    if not 1 <= cfg.jpeg_quality <= 100:
        problems.append(f"jpeg_quality={cfg.jpeg_quality} (expected 1..100)")
    if not 0.0 <= cfg.compress_probability <= 1.0:
        problems.append(f"compress_probability={cfg.compress_probability} (expected 0..1)")
    if cfg.shard_size < 1:
        problems.append(f"shard_size={cfg.shard_size} (expected >= 1)")
    if cfg.workers < 0:
        problems.append(f"workers={cfg.workers} (expected >= 0)")
    if problems:
        raise ConfigError("invalid conversion settings: " + "; ".join(problems))


@dataclass
class _Skips:
    """Bad inputs met so far; under ``fail`` the first one stops the conversion."""

    policy: str
    items: List[Dict[str, str]] = field(default_factory=list)

    def add(self, path: str, reason: str) -> None:
        if self.policy == "fail":
            raise ConversionError(f"{path}: {reason} (--on-error fail)")
        self.items.append({"path": path, "reason": reason})


def _check_out_dir(out: Path, split: str) -> None:
    """One directory holds one split: refuse to write over a conversion of another split."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text()).get("split")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous is not None and previous != split:
        raise ConfigError(f"{path}: this directory holds the converted {previous!r} split; write the {split!r} "
                          f"split to its own --out directory")


def _clean_previous(out: Path, split: str) -> None:
    """Remove an earlier conversion of ``split`` in ``out`` (manifest first) and leftovers of a killed one."""
    if (out / MANIFEST_NAME).exists():
        log.warning("%s: replacing the earlier conversion in this directory", out)
        (out / MANIFEST_NAME).unlink()
    ours = re.compile(rf"^({re.escape(split)}\.beton|{re.escape(split)}-\d{{5}}\.(tar|idx)|labels\.npy|manifest\.json)"
                      rf"({re.escape(TMP_SUFFIX)})?$")
    removed = 0
    for entry in out.iterdir():
        if ours.match(entry.name) and entry.is_file():
            entry.unlink()
            removed += 1
        elif entry.name.startswith(f"{STAGING_PREFIX}{split}-") and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    if removed:
        log.info("%s: removed %d outputs/leftovers of an earlier conversion of split %r", out, removed, split)


def _listing_order(source: Source, cfg: ConvertConfig, skips: _Skips) -> Tuple[np.ndarray, Optional[float]]:
    """Listed samples to decode, in written (shuffled) order, and the imbalance factor applied."""
    for path, reason in source.problems:
        skips.add(path, reason)
    factor = cfg.imbalance_factor
    if factor is not None and cfg.split != "train":
        log.info("split %r stays balanced: imbalance factor %s applies to the training split only", cfg.split, factor)
        factor = None
    listed = np.bincount(source.labels, minlength=source.num_classes)
    for c in np.flatnonzero(listed == 0):
        skips.add(source.class_path(int(c)), f"class {c} ({source.class_names[c]}) is empty: no images listed")
    if factor is None:
        candidates = np.arange(len(source), dtype=np.int64)
    else:
        candidates = select_longtail(source.labels, source.num_classes, factor, cfg.seed)
    order = candidates[np.random.default_rng(cfg.seed).permutation(len(candidates))]
    return order, factor


@dataclass
class _Written:
    """What the decode pass wrote, per written sample: label, pixel shape, and where its pixels were staged."""

    labels: List[int] = field(default_factory=list)
    shapes: List[Tuple[int, int]] = field(default_factory=list)
    stage_ids: List[int] = field(default_factory=list)  # index into stage_files
    offsets: List[int] = field(default_factory=list)  # byte offset in that file
    stage_files: Dict[str, int] = field(default_factory=dict)  # staging file name -> id (insertion order = id)


def _decode_pass(job: DecodeJob, order: np.ndarray, cfg: ConvertConfig, skips: _Skips, shards: Optional[ShardWriter],
                 progress: bool) -> _Written:
    """Decode the listed samples ``order`` once each; stream the good ones, numbered in order, into the shards."""
    from tqdm import tqdm

    written = _Written()
    bar = tqdm(total=len(order), unit="img", desc=f"convert {cfg.source}/{cfg.split}", disable=not progress)
    with contextlib.closing(decode_all(job, order, cfg.workers)) as results, bar:
        for i, reason, jpeg, shape, staged, offset in results:
            bar.update()
            if reason is not None:
                skips.add(job.source.names[i], reason)
                continue
            y = int(job.source.labels[i])
            if shards is not None:
                shards.add(len(written.labels), jpeg, y)
            written.labels.append(y)
            written.shapes.append(shape)
            if job.staging_dir is not None:
                written.stage_ids.append(written.stage_files.setdefault(staged, len(written.stage_files)))
                written.offsets.append(offset)
    return written


def _hash_all(paths: List[Path], workers: int) -> Dict[str, Dict[str, object]]:
    with ThreadPoolExecutor(max(1, min(8, workers or 1))) as ex:
        digests = list(ex.map(sha256_file, paths))
    return {p.name: {"bytes": p.stat().st_size, "sha256": d} for p, d in zip(paths, digests)}


def _import_ffcv() -> None:
    """Import FFCV once, before the decode pool forks. Importing FFCV sets torch's thread count to 1; that is put
    back, so that a caller converting and then training in one process keeps its threads."""
    import torch

    threads = torch.get_num_threads()
    try:
        from ffcv.fields import rgb_image  # noqa: F401
    except ImportError as e:  # both formats are written with FFCV's resize rule and JPEG encoder
        raise ConfigError(f"convert needs ffcv 1.0.2 (both formats use its resize rule and JPEG encoder; "
                          f"pip install 'fastlivt[ffcv]'): {e}") from e

    torch.set_num_threads(threads)


def convert(cfg: ConvertConfig, progress: bool = True) -> Manifest:
    """Run one conversion described by ``cfg``; return the manifest written to ``cfg.out``."""
    _import_ffcv()

    check_config(cfg)
    started = time.perf_counter()
    out = Path(cfg.out)
    _check_out_dir(out, cfg.split)
    source = open_source(cfg.source, cfg.root, cfg.split, cfg.list, cfg.num_classes)
    log.info("%s %s: %d listed images, %d classes, %d listing problems", cfg.source, cfg.split, len(source),
             source.num_classes, len(source.problems))
    skips = _Skips(cfg.on_error)
    order, factor = _listing_order(source, cfg, skips)
    out.mkdir(parents=True, exist_ok=True)
    _clean_previous(out, cfg.split)  # only now: a failed listing leaves an earlier conversion untouched

    want_ffcv, want_dali = "ffcv" in cfg.formats, "dali" in cfg.formats
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{cfg.split}-", dir=out)) if want_ffcv else None
    shards = ShardWriter(out, cfg.split, cfg.shard_size) if want_dali else None
    temporaries: List[Tuple[Path, Path]] = []
    try:
        job = DecodeJob(source, cfg.max_resolution, cfg.jpeg_quality, want_dali, str(staging) if staging else None)
        try:
            written = _decode_pass(job, order, cfg, skips, shards, progress)
        except WorkerDied as e:
            raise ConversionError(str(e)) from None
        log.info("decoded %d images in %.1f s", len(order), time.perf_counter() - started)
        labels = written.labels
        if not labels:
            raise ConversionError(f"{cfg.root}: no valid images to write ({len(skips.items)} skipped)")
        counts = np.bincount(np.asarray(labels), minlength=source.num_classes)
        reported = {s["path"] for s in skips.items}
        for c in np.flatnonzero(counts == 0):
            if source.class_path(int(c)) not in reported:
                skips.add(source.class_path(int(c)),
                          f"class {c} ({source.class_names[c]}) is empty: all its images were skipped")

        label_arr = np.asarray(labels, dtype=np.int64)
        if shards is not None:
            shards.finish()
            temporaries += shards.temporaries
        if staging is not None:
            files = [str(staging / name) for name in written.stage_files]
            dataset = StagedImages(files, np.asarray(written.stage_ids), np.asarray(written.offsets, dtype=np.int64),
                                   np.asarray(written.shapes, dtype=np.int64), label_arr, cfg.seed,
                                   reseed=cfg.write_mode == "proportion")
            beton = out / beton_name(cfg.split)
            beton_tmp = beton.with_name(beton.name + TMP_SUFFIX)
            temporaries.append((beton_tmp, beton))
            log.info("writing %s (%s mode) with FFCV's DatasetWriter", beton.name, cfg.write_mode)
            t0 = time.perf_counter()
            try:
                write_beton(beton_tmp, dataset, cfg.write_mode, cfg.jpeg_quality, cfg.compress_probability,
                            cfg.workers)
            except RuntimeError as e:
                raise ConversionError(str(e)) from None
            log.info("wrote %s in %.1f s", beton.name, time.perf_counter() - t0)
        labels_path = out / LABELS_NAME
        labels_tmp = labels_path.with_name(labels_path.name + TMP_SUFFIX)
        temporaries.append((labels_tmp, labels_path))
        with open(labels_tmp, "wb") as f:
            np.save(f, label_arr)

        t0 = time.perf_counter()
        hashed = _hash_all([tmp for tmp, _ in temporaries], cfg.workers)
        log.info("hashed %d outputs in %.1f s", len(temporaries), time.perf_counter() - t0)
        files_meta = {final.name: hashed[tmp.name] for tmp, final in temporaries}
        image = {"write_mode": cfg.write_mode, "max_resolution": cfg.max_resolution, "jpeg_quality": cfg.jpeg_quality}
        if cfg.write_mode == "proportion":
            image["compress_probability"] = cfg.compress_probability
        manifest = Manifest(
            source=cfg.source, split=cfg.split, num_classes=source.num_classes, class_names=source.class_names,
            class_counts=[int(v) for v in counts], num_samples=len(labels), imbalance_factor=factor, seed=cfg.seed,
            image=image, ffcv=beton_name(cfg.split) if want_ffcv else None,
            dali_shards=list(shards.shards) if shards else [], dali_index=list(shards.indexes) if shards else [],
            shard_sizes=list(shards.sizes) if shards else [], files=files_meta, skipped=skips.items,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), root=str(out),
        )
        for tmp, final in temporaries:
            os.replace(tmp, final)
        temporaries = []
        manifest.save(out)
    except BaseException as e:
        if shards is not None:
            shards.abort()
            temporaries += [t for t in shards.temporaries if t not in temporaries]
        for tmp, _ in temporaries:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if isinstance(e, Exception) and not isinstance(e, DiskFullError) and is_disk_full(e, out):
            raise DiskFullError(out, e) from e  # after the clean-up: the free space is what the user has
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    elapsed = time.perf_counter() - started
    if skips.items:
        log.warning("skipped %d bad inputs (listed in %s under 'skipped')", len(skips.items), out / MANIFEST_NAME)
    print(f"converted {manifest.num_samples} images ({len(skips.items)} skipped) in {elapsed:.1f} s: "
          f"{manifest.num_samples / elapsed:.0f} images/s")
    return manifest

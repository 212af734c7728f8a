"""``fastlivt convert`` (also ``python -m fastlivt.data_prep``): the one-time conversion of a dataset to FFCV and DALI formats.

::

    fastlivt convert SOURCE --root PATH [--list FILE] [--split train|val|test] [--imbalance-factor G] [--seed S]
                     --formats ffcv,dali --out DIR [--on-error skip|fail] [--max-resolution N] [--jpeg-quality Q]
                     [--workers N] [--write-mode jpg|raw|proportion] [--shard-size N] [--config FILE] [key=value ...]
    fastlivt convert --verify DIR

Settings come from the ConvertConfig defaults, then ``--config FILE``, then ``key=value`` overrides, then the flags.

A user's mistake (:data:`USER_ERRORS`: a bad key or value, a missing config, list or source root) is one line
``fastlivt: error: ...`` on stderr and exit status 2, without a traceback (``--debug`` or ``FASTLIVT_DEBUG=1`` shows
it): :func:`main` raises it for the ``fastlivt`` command to report, :func:`run_as_program` reports it the same way for
``python -m fastlivt.data_prep``. A conversion that fails (a bad input under ``--on-error fail``, nothing convertible, a
writer that died) is ``fastlivt convert: error: ...`` and exit status 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import List, Optional

from fastlivt.data_prep.atomic import DiskFullError
from fastlivt.data_prep.config import ConfigError, ConvertConfig, load_config
from fastlivt.data_prep.convert import ConversionError, convert
from fastlivt.data_prep.log_handler import install_stderr_handler
from fastlivt.data_prep.manifest import Manifest, shot_groups
from fastlivt.data_prep.sources import SOURCES, SourceError
from fastlivt.data_prep.verify import verify


UNSET = object()  # default of flags whose value may be None
USER_ERRORS = (DiskFullError, ConfigError, SourceError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
DEBUG_FLAG, DEBUG_ENV = "--debug", "FASTLIVT_DEBUG"


def _optional_int(text: str) -> Optional[int]:
    if text.lower() in ("none", "0"):
        return None
    return int(text)


def _optional_float(text: str) -> Optional[float]:
    return None if text.lower() == "none" else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlivt convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help=f"source format: {' | '.join(SOURCES)}")
    p.add_argument("overrides", nargs="*", help="key=value overrides of ConvertConfig fields")
    p.add_argument("--config", help="YAML file of ConvertConfig fields (e.g. configs/fmnist_lt/convert.yaml)")
    p.add_argument("--verify", metavar="DIR", help="re-hash the outputs in DIR against its manifest, then exit")
    p.add_argument("--root", help="dataset root (list/JSON paths are relative to it)")
    p.add_argument("--list", help="list file of 'relpath label' lines (list) or the iNat JSON (inat)")
    p.add_argument("--split", choices=["train", "val", "test"])
    p.add_argument("--imbalance-factor", type=_optional_float, default=UNSET,
                   help="G: keep int(n_max*(1/G)^(c/(C-1))) of class c (none: keep all)")
    p.add_argument("--seed", type=int, help="long-tail subset and write order (default 0)")
    p.add_argument("--formats", type=lambda s: [f.strip() for f in s.split(",") if f.strip()], help="ffcv,dali")
    p.add_argument("--out", help="output directory (one per split)")
    p.add_argument("--on-error", choices=["skip", "fail"], help="bad input: skip and record it, or stop")
    p.add_argument("--max-resolution", type=_optional_int, default=UNSET,
                   help="longest side after resizing (none: keep)")
    p.add_argument("--jpeg-quality", type=int)
    p.add_argument("--write-mode", choices=["jpg", "raw", "proportion"], help="FFCV image write mode")
    p.add_argument("--compress-probability", type=float, help="FFCV 'proportion' mode: share written as JPEG")
    p.add_argument("--shard-size", type=int, help="samples per DALI shard")
    p.add_argument("--num-classes", type=int, help="expected number of classes (list: default max label + 1)")
    p.add_argument("--workers", type=int, help="decode/encode processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> ConvertConfig:
    overrides = list(args.overrides)
    source = args.source
    if source is not None and "=" in source:  # `fastlivt convert --config f.yaml key=value`
        overrides.insert(0, source)
        source = None
    cfg = load_config(ConvertConfig, args.config, overrides)
    flags = {"source": source, "root": args.root, "list": args.list, "split": args.split, "seed": args.seed,
             "formats": args.formats, "out": args.out, "on_error": args.on_error, "jpeg_quality": args.jpeg_quality,
             "write_mode": args.write_mode, "compress_probability": args.compress_probability,
             "shard_size": args.shard_size, "num_classes": args.num_classes, "workers": args.workers}
    given = {k: v for k, v in flags.items() if v is not None}
    for name in ("imbalance_factor", "max_resolution"):  # may be set to none explicitly
        if getattr(args, name) is not UNSET:
            given[name] = getattr(args, name)
    return dataclasses.replace(cfg, **given)


def summary(m: Manifest) -> str:
    """Classes, counts, many/medium/few class numbers and files of a written split."""
    counts = m.class_counts
    lines = [f"{m.source}/{m.split}: {m.num_samples} images, {m.num_classes} classes"
             + (f", imbalance factor {m.imbalance_factor:g}" if m.imbalance_factor else "")
             + f" (largest class {max(counts)}, smallest {min(counts)})"]
    shown = counts if len(counts) <= 20 else counts[:10] + ["..."] + counts[-5:]
    lines.append("  class counts: " + " ".join(str(c) for c in shown))
    if m.split == "train":
        g = shot_groups(counts)
        lines.append(f"  many/medium/few classes (>100 / 20-100 / <20 images): "
                     f"{len(g['many'])} / {len(g['medium'])} / {len(g['few'])}")
    lines.append(f"  skipped: {len(m.skipped)}" + "".join(f"\n    {s['path']}: {s['reason']}" for s in m.skipped[:20])
                 + (f"\n    ... ({len(m.skipped) - 20} more in manifest.json)" if len(m.skipped) > 20 else ""))
    lines.append(f"  files in {m.root}:")
    for name, meta in m.files.items():
        lines.append(f"    {name:<24} {meta['bytes'] / 2**20:10.2f} MiB  sha256 {meta['sha256'][:16]}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """``fastlivt convert``: 0 when done, 1 when the conversion or ``--verify`` failed; a user's mistake is raised."""
    install_stderr_handler()
    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if args.verify:
        problems, checked = verify(args.verify)
        for p in problems:
            print(f"VERIFY FAILED {p}", file=sys.stderr)
        if problems:
            return 1
        print(f"{Path(args.verify) / 'manifest.json'}: all {checked} files match their size and sha256")
        return 0
    cfg = config_from_args(args)
    try:
        manifest = convert(cfg, progress=not args.no_progress)
    except ConversionError as e:
        print(f"fastlivt convert: error: {e}", file=sys.stderr)
        return 1
    print(summary(manifest))
    return 0


def run_as_program(argv: Optional[List[str]] = None) -> int:
    """``python -m fastlivt.data_prep``: :func:`main`, a user's mistake reported as ``fastlivt convert`` reports it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return main([a for a in argv if a != DEBUG_FLAG])
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"fastlivt: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_as_program())

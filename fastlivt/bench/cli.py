"""``fastlivt bench all | data | attention | model | loss | step | compiled | deepspeed`` — the throughput harness.

Every part measures its comparison and its baseline in the same process run. Results go to
``<out>/bench-<date>-<device>.{json,md,png}``: one row per measurement with device, backend, shapes, dtype, median and
spread over repeats, and the ratio to its baseline. A backend that cannot run here is a row ``unavailable: <reason>``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

from fastlivt.data_prep.atomic import write_text_atomic

PARTS = ["data", "attention", "model", "loss", "step", "compiled", "deepspeed"]


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastlivt bench: --device cuda asked for, but torch.cuda.is_available() is False")
    return torch.device(name)


def run_parts(parts: List[str], quick: bool, device, out: Optional[Path] = None) -> list:
    from fastlivt.bench.common import Row, device_name
    from fastlivt.logs import get_logger

    log = get_logger("bench")
    rows: List[Row] = []
    for part in parts:
        t0 = time.perf_counter()
        log.info("bench %s (%s) ...", part, "quick" if quick else "full")
        try:
            module = importlib.import_module(f"fastlivt.bench.{part}")
            if hasattr(module, "run_chunks"):  # a part that yields its rows group by group: each is written at once
                for chunk in module.run_chunks(quick=quick, device=device):
                    rows += chunk
                    if out is not None:
                        write_results(rows, out, device)
            else:
                rows += module.run(quick=quick, device=device)
        except Exception as e:  # a crashed part is reported as such, loudly, never skipped
            traceback.print_exc()
            rows.append(Row(part=part, name="(whole part)", backend="-", device=device_name(device),
                            unavailable=f"error: {type(e).__name__}: {e}"))
        log.info("bench %s done in %.1f s", part, time.perf_counter() - t0)
        if out is not None:  # results so far, so that a crash or a hang in a later part loses nothing
            write_results(rows, out, device)
    return rows


def fmt(v, digits=3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def to_markdown(rows, title: str) -> str:
    head = "| part | name | backend | shape | dtype | median | ± | unit | vs baseline | ratio | extra |"
    lines = [f"### {title}", "", head, "|" + "---|" * 11]
    for r in rows:
        extra = ", ".join(f"{k}={fmt(v)}" for k, v in r.extra.items())
        if r.unavailable:
            lines.append(f"| {r.part} | {r.name} | {r.backend} | {r.shape} | {r.dtype} | unavailable: {r.unavailable} | | | | | |")
        else:
            ratio = f"{r.ratio:.2f}×" if r.ratio is not None else ""
            lines.append(f"| {r.part} | {r.name} | {r.backend} | {r.shape} | {r.dtype} | {fmt(r.median)} | {fmt(r.spread)} "
                         f"| {r.unit} | {r.baseline} | {ratio} | {extra} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.ratio is not None]
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.32 * len(shown) + 1)))
    labels = [f"{r.part}: {r.name} [{r.backend}] {r.shape} {r.dtype}"[:90] for r in shown]
    ax.barh(range(len(shown)), [r.ratio for r in shown], color=["tab:green" if r.ratio >= 1 else "tab:red" for r in shown])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(shown)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ratio to the baseline measured in the same run (>1 = faster)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    from fastlivt.metrics import save_figure

    save_figure(fig, path)


def write_results(rows, out: Path, device) -> Path:
    from fastlivt.bench.common import device_name

    out.mkdir(parents=True, exist_ok=True)
    dev = device_name(device)
    stem = f"bench-{dt.date.today().isoformat()}-{re.sub(r'[^A-Za-z0-9]+', '_', dev).strip('_')}"
    title = f"fastlivt bench on {dev}, {dt.datetime.now().isoformat(timespec='minutes')}"
    payload = {"device": dev, "date": dt.datetime.now().isoformat(timespec="seconds"), "rows": [r.to_dict() for r in rows]}
    for suffix, text in ((".json", json.dumps(payload, indent=1)), (".md", to_markdown(rows, title))):
        write_text_atomic(out / (stem + suffix), text)
    plot(rows, out / (stem + ".png"), title)
    return out / stem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastlivt bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=PARTS + ["all"], help="which comparison to run (all = every part, one process)")
    ap.add_argument("--quick", action="store_true", help="small shapes and few repeats (< 2 min on 2 CPU cores)")
    ap.add_argument("--out", default="runs/bench", help="directory for bench-<date>-<device>.{json,md,png}")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args(argv)
    device = _device(args.device)
    parts = [p for p in PARTS if p != "compiled"] if args.part == "all" else [args.part]  # model/step hold its rows
    rows = run_parts(parts, args.quick, device, Path(args.out))
    stem = write_results(rows, Path(args.out), device)
    print(to_markdown(rows, f"fastlivt bench {args.part} ({device})"))
    print(f"wrote {stem}.json, .md, .png")
    errors = [r for r in rows if r.unavailable and r.unavailable.startswith("error:")]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

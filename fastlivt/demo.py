"""``fastlivt demo``: the embedded default — LiVT end to end on Fashion-MNIST-LT, on a laptop-sized CPU.

1. convert Debian's Fashion-MNIST (real images, no download) to Fashion-MNIST-LT (imbalance 100, 14,886 training
   images) and the balanced 10,000-image test set, in both formats (FFCV .beton + DALI shards);
2. MGP of a small ViT (patch 7 on the items' own 28 px: 16 tokens, ``configs/fmnist_lt/mgp.yaml``);
3. BFT from that one encoder export with each loss ``ce``, ``bce``, ``bal_ce``, ``bal_bce`` (``configs/fmnist_lt/bft.yaml``);
4. evaluation of each final model (not a test-selected "best") on the test set: overall, many, medium, few, the five
   rarest classes, ECE and MCE; a table (printed, ``results.md``), ``results.json`` and ``results.png``.

``--seeds 0,1,2`` repeats steps 2-4 per seed (under ``OUT/seed_<s>``) and reports every figure as mean ± std over
the seeds, per seed, and which of the paper's claims hold on every seed. Extra ``key=value`` arguments override the
BFT config of every loss (``fastlivt demo --proxy --seeds 0,1,2 data.mixup=0.8 data.cutmix=1.0``).

``--quick`` shortens every stage (a smoke run of a few minutes); the full run is sized for 20 minutes on 2 cores in fp32
(bf16 autocast on CPUs with AVX512-BF16/AMX, ``--cpu-bf16``, is faster). ``--proxy`` runs the same pipeline on a split of the
*training* images only (an LT subset of all but 500 per class, evaluated on those 500 per class): the schedule
was chosen there, never on the test set.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from fastlivt.data_prep.atomic import atomic_path, write_text_atomic
from fastlivt.demo_results import (Results, aggregate, per_class_accuracy, per_seed_table, plot_results,
                                   results_table, summary_table)
from fastlivt.logs import get_logger

log = get_logger(__name__)
LOSSES = ("ce", "bce", "bal_ce", "bal_bce")
FMNIST = "/usr/share/datasets/fashion-mnist"
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "fmnist_lt"
# The demo's schedule (config overrides per stage): MGP 5 epochs, BFT 6 per loss, sized to fit 20 min on 2 AVX2 CPU
# cores in fp32 at the slowest rates seen on such machines (README, "The demo", has the times); --quick: a smoke run.
FULL = {"mgp": ["run.epochs=5", "optim.warmup_epochs=1"], "bft": ["run.epochs=6", "optim.warmup_epochs=1"]}
QUICK = {"mgp": ["run.epochs=1", "optim.warmup_epochs=0.2", "run.max_steps=8"],
         "bft": ["run.epochs=1", "optim.warmup_epochs=0.2", "run.max_steps=8"]}


PROXY_HOLDOUT = 500  # training images per class held out as the proxy's balanced validation set


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where ``run.cpu_bf16`` speeds training up."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def write_proxy_source(out: Path, seed: int = 1) -> Path:
    """Fashion-MNIST's *training* images split in two, as IDX files under ``out``: ``PROXY_HOLDOUT`` per class as
    the "t10k" (validation) split, the rest as "train" (the pool the LT subset is drawn from). For choosing the
    demo's schedule without looking at the test set."""
    import gzip

    import numpy as np

    from fastlivt.data_prep.sources import read_fmnist

    src = read_fmnist(Path(FMNIST), "train")
    labels = np.asarray(src.labels)
    rng = np.random.default_rng(seed)
    held = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:PROXY_HOLDOUT] for c in range(src.num_classes)])
    keep = np.setdiff1d(np.arange(len(labels)), held)
    out.mkdir(parents=True, exist_ok=True)
    for prefix, idx in (("train", keep), ("t10k", np.sort(held))):
        for kind, arr, magic in (("images-idx3", src.array[idx], 0x803), ("labels-idx1", labels[idx].astype(np.uint8), 0x801)):
            path = out / f"{prefix}-{kind}-ubyte.gz"
            with atomic_path(path) as tmp, gzip.open(tmp, "wb", compresslevel=1) as f:
                f.write(magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes())
    return out


def convert_split(split: str, out: Path, imbalance: Optional[float], root: str = FMNIST) -> Any:
    """Convert once; reuse an existing conversion whose files still match the manifest's hashes."""
    from fastlivt.data_prep.config import ConvertConfig
    from fastlivt.data_prep.convert import convert
    from fastlivt.data_prep.manifest import load_manifest
    from fastlivt.data_prep.verify import verify

    if (out / "manifest.json").is_file():
        problems, _ = verify(out)
        if not problems:
            log.info("demo: reusing %s (verified)", out)
            return load_manifest(out)
        log.warning("demo: %s fails verification (%s); converting again", out, problems[0])
    cfg = ConvertConfig(source="fmnist", root=root, split=split, imbalance_factor=imbalance, formats=["ffcv", "dali"],
                        out=str(out), write_mode="raw", on_error="fail", workers=2)
    return convert(cfg, progress=True)


def parse_seeds(text: str) -> List[int]:
    """``"0,1,2"`` → [0, 1, 2] (distinct, in order); a clear error otherwise."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip() != ""]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct integers, got {text!r}")
    return seeds


def run_seed(seed: int, out: Path, data: Path, test_split: str, losses: List[str], plan: Dict[str, List[str]],
             backend: str, bf16: bool) -> tuple[Results, Dict[str, float]]:
    """MGP once, then BFT with each loss from that encoder, each evaluated on ``data/test_split``; all under ``out``."""
    from fastlivt.config import TrainConfig, load_config
    from fastlivt.engine.evaluate import run_evaluation
    from fastlivt.engine.finetune import MODEL_EXPORT, BFTTask
    from fastlivt.engine.loop import train
    from fastlivt.engine.pretrain import ENCODER_EXPORT, MGPTask

    common = [f"data.train={data / 'train'}", f"data.backend={backend}", f"run.seed={seed}",
              f"run.cpu_bf16={str(bf16).lower()}"]
    t0 = time.perf_counter()
    train(load_config(TrainConfig, CONFIGS / "mgp.yaml", common + plan["mgp"] + [f"run.out={out / 'mgp'}"]), MGPTask())
    timings = {"mgp_s": time.perf_counter() - t0}
    encoder = out / "mgp" / ENCODER_EXPORT
    results: Results = {}
    for loss in losses:
        bft = common + plan["bft"] + [f"run.out={out / ('bft_' + loss)}", f"model.init={encoder}", f"loss.name={loss}",
                                      "data.val="]
        t0 = time.perf_counter()
        train(load_config(TrainConfig, CONFIGS / "bft.yaml", bft), BFTTask())
        timings[f"bft_{loss}_s"] = time.perf_counter() - t0
        m = run_evaluation(str(out / ("bft_" + loss) / MODEL_EXPORT), str(data / test_split), out=str(out / f"eval_{loss}"),
                           train_manifest=str(data / "train"), overrides=[f"data.backend={backend}"])
        m["per_class_accuracy"] = per_class_accuracy(out / f"eval_{loss}")
        results[loss] = m
    return results, timings


def write_results(out: Path, header: str, per_seed: Dict[int, Results], counts: List[int], names: List[str],
                  record: Dict[str, Any]) -> str:
    """results.md / results.json / results.png under ``out``; one seed: its table; several: mean ± std, the
    claims seed by seed, the overall accuracy per seed. Returns the markdown."""
    if len(per_seed) == 1:
        (seed, results), = per_seed.items()
        text = header + "\n\n" + results_table(results, counts, names) + "\n"
        record = {**record, "seed": seed, "results": results}
    else:
        summary = aggregate(per_seed)
        text = (header + "\n\nmean ± std over seeds " + ", ".join(map(str, sorted(per_seed))) + "\n\n"
                + summary_table(summary, counts, names) + "\n\noverall accuracy per seed\n\n"
                + per_seed_table(per_seed) + "\n")
        record = {**record, "seeds": sorted(per_seed), "summary": summary,
                  "per_seed": {str(s): r for s, r in per_seed.items()}}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.md", text)  # atomic: a full disk is one line and keeps the previous table
    write_text_atomic(out / "results.json", json.dumps(record, indent=1, default=str))
    plot_results(per_seed, counts, out / "results.png")
    return text


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fastlivt demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of every stage (a few steps each)")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo; quick: runs/demo-quick)")
    p.add_argument("--data", default="data/fmnist_lt", help="where the converted splits go (reused when they verify)")
    p.add_argument("--seed", type=int, default=0, help="the training seed of a one-seed run")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (e.g. 0,1,2): the whole pipeline per seed under "
                                                 "OUT/seed_<s>, figures reported as mean ± std and per seed")
    p.add_argument("--backend", default="ffcv", choices=("ffcv", "dali", "torch"), help="loader backend")
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated subset of " + ",".join(LOSSES))
    p.add_argument("--proxy", action="store_true",
                   help=f"train on an LT subset of Fashion-MNIST's training images minus {PROXY_HOLDOUT} per class and "
                        "evaluate on those held-out images, never the test set (for choosing a schedule)")
    p.add_argument("--bft-epochs", type=int, default=None, help="BFT epochs per loss (default: 6; quick: 1)")
    p.add_argument("--cpu-bf16", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast on CPU, both stages (auto: on where the CPU has AVX512-BF16 or AMX)")
    p.add_argument("overrides", nargs="*", default=[],
                   help="BFT config overrides key=value for every loss (e.g. data.mixup=0.8 loss.tau=1.05)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not Path(FMNIST, "train-images-idx3-ubyte.gz").is_file():
        print(f"fastlivt demo: {FMNIST} not found; install Debian's dataset-fashion-mnist (bash scripts/install.sh)",
              file=sys.stderr)
        return 2
    losses = [x for x in args.losses.split(",") if x]
    bad = [x for x in losses if x not in LOSSES]
    if bad:
        p.error(f"--losses: unknown {bad}; choose from {LOSSES}")
    try:
        seeds = parse_seeds(args.seeds) if args.seeds is not None else [args.seed]
    except ValueError as e:
        p.error(str(e))

    t_start = time.perf_counter()
    plan = QUICK if args.quick else FULL
    if args.bft_epochs is not None:
        if args.bft_epochs < 1:
            p.error(f"--bft-epochs must be >= 1, got {args.bft_epochs}")
        plan = {**plan, "bft": plan["bft"] + [f"run.epochs={args.bft_epochs}", f"optim.warmup_epochs={min(1, args.bft_epochs / 5)}"]}
    if args.overrides:
        plan = {**plan, "bft": plan["bft"] + list(args.overrides)}
    from fastlivt.config import ConfigError, TrainConfig, load_config

    try:  # a bad override fails now, not after the conversion and MGP
        bft_loss = load_config(TrainConfig, CONFIGS / "bft.yaml", plan["bft"]).loss
    except ConfigError as e:
        p.error(str(e))
    out = Path(args.out)
    if args.out == "runs/demo":
        out = Path("runs/demo" + ("-proxy" if args.proxy else "") + ("-quick" if args.quick else ""))
    data, root, test_split = Path(args.data), FMNIST, "test"
    if args.proxy:
        data, test_split = data / "proxy", "val"
        root = str(write_proxy_source(data / "source"))
    train_m = convert_split("train", data / "train", 100, root)
    test_m = convert_split("test", data / test_split, None, root)
    log.info("demo: train %d images %s; %s %d images", train_m.num_samples, train_m.class_counts, test_split,
             test_m.num_samples)
    bf16 = args.cpu_bf16 == "on" or (args.cpu_bf16 == "auto" and cpu_has_bf16())
    log.info("demo: bf16 autocast on CPU %s (--cpu-bf16 %s)", "on" if bf16 else "off", args.cpu_bf16)

    per_seed: Dict[int, Results] = {}
    timings: Dict[str, Any] = {}
    for seed in seeds:
        seed_out = out if args.seeds is None else out / f"seed_{seed}"
        per_seed[seed], timings[f"seed_{seed}"] = run_seed(seed, seed_out, data, test_split, losses, plan, args.backend, bf16)
        if args.seeds is not None:  # each seed's own table, written as soon as it is done
            write_results(seed_out, f"seed {seed}", {seed: per_seed[seed]}, train_m.class_counts, train_m.class_names, {})
    timings["total_s"] = time.perf_counter() - t_start

    what = "held-out training (proxy val)" if args.proxy else "test"
    header = (f"Fashion-MNIST-LT γ=100 ({train_m.num_samples} train / {test_m.num_samples} {what} images), "
              f"seed(s) {', '.join(map(str, seeds))}, {'quick' if args.quick else 'full'} run, "
              f"{timings['total_s'] / 60:.1f} min; bias τ {bft_loss.tau:g}, Bal-BCE form {bft_loss.form}; accuracies and "
              "ECE/MCE in %")
    record = {"quick": args.quick, "proxy": args.proxy, "cpu_bf16": bf16, "plan": plan, "timings": timings,
              "train_class_counts": train_m.class_counts, "loss_form": bft_loss.form, "loss_tau": bft_loss.tau}
    text = write_results(out, header, per_seed, train_m.class_counts, train_m.class_names, record)
    print(text)
    print(f"wrote {out / 'results.md'}, results.json, results.png; per-loss metrics, per-class CSVs and plots under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

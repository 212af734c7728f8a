"""The demo's results: per-seed metrics → tables (markdown), aggregation over seeds (mean ± spread), plots.

A *result* is what :func:`fastlivt.engine.evaluate.run_evaluation` returns for one loss (overall / many / medium /
few accuracy, ECE, MCE, in %) plus ``per_class_accuracy``. Over several seeds every figure is reported as the mean
± the sample standard deviation (ddof 1; 0 for one seed) with the min and max, and each claim of the demo (e.g.
"bal_bce beats bal_ce overall") is counted seed by seed, so the README states only what holds on every seed.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


Results = Dict[str, Dict[str, Any]]  # loss -> metrics of one seed
METRICS = ("overall", "many", "medium", "few", "ece", "mce")
# (metric, winner, loser, higher is better): the paper's Table 6 ordering and calibration, checked per seed
CLAIMS = (("overall", "bal_bce", "bal_ce", True), ("overall", "bal_bce", "bce", True), ("overall", "bal_bce", "ce", True),
          ("overall", "bal_ce", "ce", True), ("medium", "bal_bce", "bce", True), ("medium", "bal_ce", "ce", True),
          ("ece", "bal_bce", "bal_ce", False), ("mce", "bal_bce", "bal_ce", False))
# Table 6's headline ("Bal-BCE ameliorates the original BCE by a large margin"): the bias gains more for BCE than for CE
GAIN_CLAIM = ("overall", ("bal_bce", "bce"), ("bal_ce", "ce"))


def per_class_accuracy(eval_dir: Path) -> List[float]:
    """Per-class accuracy in percent, from the evaluation's per_class.csv."""
    with open(eval_dir / "per_class.csv") as f:
        return [float(r["accuracy"]) if r["accuracy"] else float("nan") for r in csv.DictReader(f)]


def rarest_classes(counts: List[int], k: int = 5) -> List[int]:
    return sorted(range(len(counts)), key=lambda c: (counts[c], c))[:k]


def spread(values: Sequence[Optional[float]]) -> Optional[Dict[str, float]]:
    """mean, sample std (ddof 1; 0 for one value), min and max of the defined values (None if there are none)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": len(vals)}


def aggregate(per_seed: Dict[int, Results]) -> Dict[str, Any]:
    """Every metric of every loss over the seeds (:func:`spread`), per-class accuracy means, and the claims'
    per-seed outcomes: ``claims[i] = {"claim": text, "holds": [bool per seed], "all": bool}``."""
    seeds = sorted(per_seed)
    losses = [loss for loss in per_seed[seeds[0]] if all(loss in per_seed[s] for s in seeds)]
    summary: Dict[str, Any] = {"seeds": seeds, "losses": {}, "claims": []}
    for loss in losses:
        runs = [per_seed[s][loss] for s in seeds]
        entry = {m: spread([r.get(m) for r in runs]) for m in METRICS}
        n_cls = len(runs[0]["per_class_accuracy"])
        entry["per_class_accuracy"] = [spread([r["per_class_accuracy"][c] for r in runs]) for c in range(n_cls)]
        summary["losses"][loss] = entry
    for metric, win, lose, higher in CLAIMS:
        if win not in losses or lose not in losses:
            continue
        holds = []
        for s in seeds:
            a, b = per_seed[s][win].get(metric), per_seed[s][lose].get(metric)
            holds.append(a is not None and b is not None and (a > b if higher else a < b))
        word = "higher" if higher else "lower"
        summary["claims"].append({"claim": f"{win} {metric} {word} than {lose}", "holds": holds, "all": all(holds)})
    metric, (bal_b, b), (bal_c, c) = GAIN_CLAIM
    if all(x in losses for x in (bal_b, b, bal_c, c)):
        gains = [(per_seed[s][bal_b][metric] - per_seed[s][b][metric], per_seed[s][bal_c][metric] - per_seed[s][c][metric])
                 for s in seeds]
        holds = [gb > gc for gb, gc in gains]
        summary["claims"].append({"claim": f"the bias gains more {metric} for bce ({bal_b} - {b}) than for ce "
                                           f"({bal_c} - {c})", "holds": holds, "all": all(holds)})
    return summary


def _pct(v: Optional[float]) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def results_table(results: Results, counts: List[int], names: List[str]) -> str:
    """One seed: a row per loss (overall, many, medium, few, the five rarest classes, ECE, MCE)."""
    rare = rarest_classes(counts)
    head = ["loss", "overall", "many", "medium", "few"] + [f"{names[c]} (n={counts[c]})" for c in rare] + ["ECE", "MCE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for loss, m in results.items():
        per_class = m["per_class_accuracy"]
        cells = [loss, _pct(m["overall"]), _pct(m["many"]), _pct(m["medium"]), _pct(m["few"])]
        cells += [_pct(per_class[c]) for c in rare] + [f"{m['ece']:.2f}", f"{m['mce']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(s: Optional[Dict[str, float]]) -> str:
    return "–" if s is None else f"{s['mean']:.1f} ± {s['std']:.1f}"


def summary_table(summary: Dict[str, Any], counts: List[int], names: List[str]) -> str:
    """Several seeds: mean ± std per loss, then the per-seed outcome of each claim."""
    rare = rarest_classes(counts)
    head = ["loss", "overall", "many", "medium", "few"] + [f"{names[c]} (n={counts[c]})" for c in rare] + ["ECE", "MCE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for loss, e in summary["losses"].items():
        cells = [loss] + [_pm(e[m]) for m in ("overall", "many", "medium", "few")]
        cells += [_pm(e["per_class_accuracy"][c]) for c in rare] + [_pm(e["ece"]), _pm(e["mce"])]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = summary["seeds"]
    lines += ["", "| claim | " + " | ".join(f"seed {s}" for s in seeds) + " | holds on all |",
              "|---|" + "---|" * (len(seeds) + 1)]
    for c in summary["claims"]:
        lines.append(f"| {c['claim']} | " + " | ".join("yes" if h else "no" for h in c["holds"]) +
                     f" | **{'yes' if c['all'] else 'no'}** |")
    return "\n".join(lines)


def per_seed_table(per_seed: Dict[int, Results], metric: str = "overall") -> str:
    """One ``metric`` per seed and loss (rows: seeds)."""
    seeds = sorted(per_seed)
    losses = list(per_seed[seeds[0]])
    lines = ["| seed | " + " | ".join(losses) + " |", "|---|" + "---|" * len(losses)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(_pct(per_seed[s][loss].get(metric)) for loss in losses) + " |")
    return "\n".join(lines)


def plot_results(per_seed: Dict[int, Results], counts: List[int], path: Path) -> None:
    """Per-class accuracy, head to tail, one bar per loss: the mean over seeds with min–max whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary = aggregate(per_seed)
    order = sorted(range(len(counts)), key=lambda c: -counts[c])
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(summary["losses"]))
    for i, (loss, e) in enumerate(summary["losses"].items()):
        stats = [e["per_class_accuracy"][c] or {"mean": np.nan, "min": np.nan, "max": np.nan} for c in order]
        mean = np.array([s["mean"] for s in stats])
        err = np.array([[s["mean"] - s["min"] for s in stats], [s["max"] - s["mean"] for s in stats]])
        ax.bar(np.arange(len(order)) + i * width, mean, width, label=loss,
               yerr=err if len(per_seed) > 1 else None, capsize=2)
    ax.set_xticks(np.arange(len(order)) + 0.4 - width / 2, [f"{c}\n(n={counts[c]})" for c in order], fontsize=7)
    ax.set_xlabel("class (training images), head to tail")
    ax.set_ylabel("accuracy (%)")
    seeds = ", ".join(map(str, sorted(per_seed)))
    ax.set_title(f"Fashion-MNIST-LT (γ=100): per-class accuracy after BFT, seed(s) {seeds}"
                 + (" (mean, min–max)" if len(per_seed) > 1 else ""))
    ax.legend()
    fig.tight_layout()
    from fastlivt.metrics import save_figure

    save_figure(fig, path)

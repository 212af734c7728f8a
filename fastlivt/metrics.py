"""Long-tail evaluation: top-1/top-5, many/medium/few-shot accuracy, ECE/MCE, and the files of an evaluation.

Conventions (as in LiVT's evaluation):
- Accuracies and calibration errors are percentages (0–100).
- ``overall`` is plain top-1 over samples; the groups (from the *training* class counts, via
  :func:`fastlivt.data_prep.manifest.shot_groups`: many > 100, medium 20–100, few < 20 images) report the mean of per-class
  accuracies over the group's classes that have test samples. A group without such classes is ``None``, never NaN.
- Confidence is the top softmax probability of the raw logits (the training bias is never applied), or the top
  sigmoid probability with ``confidence="sigmoid"``.
- ECE/MCE use 15 equal-width bins, ``np.digitize(conf, linspace(0, 1, 16), right=True)``: bin b holds
  b/15 < conf ≤ (b+1)/15 (a confidence of exactly 0 joins the first bin); ECE = Σ_b n_b/N · |acc_b − conf_b|,
  MCE = max_b |acc_b − conf_b|, empty bins count as gap 0.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from fastlivt.data_prep.atomic import atomic_path, write_json_atomic
from fastlivt.data_prep.manifest import shot_groups

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]
GROUPS = ("many", "medium", "few")


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _labels(preds: ArrayLike, labels: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    p, y = _np(preds).astype(np.int64).ravel(), _np(labels).astype(np.int64).ravel()
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"preds and labels must be non-empty and of equal length, got {p.size} and {y.size}")
    return p, y


def per_class_accuracy(preds: ArrayLike, labels: ArrayLike, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """(accuracy in % per class, NaN where a class has no test sample; test count per class)."""
    p, y = _labels(preds, labels)
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    count = np.bincount(y, minlength=num_classes)
    correct = np.bincount(y, weights=(p == y).astype(np.float64), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(count > 0, 100.0 * correct / np.maximum(count, 1), np.nan)
    return acc, count


def shot_accuracy(preds: ArrayLike, labels: ArrayLike, train_class_counts: ArrayLike) -> Dict[str, Optional[float]]:
    """{'overall', 'many', 'medium', 'few'} in %: overall = top-1 over samples; groups = mean per-class accuracy.

    Groups come from the training class counts (many > 100, medium 20–100, few < 20); a group none of whose classes
    appear in ``labels`` is None.
    """
    counts = _np(train_class_counts).ravel()
    p, y = _labels(preds, labels)
    acc, _ = per_class_accuracy(p, y, counts.size)
    out: Dict[str, Optional[float]] = {"overall": float(100.0 * np.mean(p == y))}
    for group, idx in shot_groups(counts).items():
        vals = acc[idx]
        vals = vals[~np.isnan(vals)]
        out[group] = float(vals.mean()) if vals.size else None
    return out


def calibration_bins(confidences: ArrayLike, correct: ArrayLike, n_bins: int = 15) -> Dict[str, np.ndarray]:
    """Per equal-width bin: count, mean accuracy and mean confidence (0 in empty bins) and the bin edges."""
    conf = _np(confidences).astype(np.float64).ravel()
    ok = _np(correct).astype(np.float64).ravel()
    if conf.shape != ok.shape or conf.size == 0:
        raise ValueError(f"confidences and correct must be non-empty and of equal length, got {conf.size} and {ok.size}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if np.any(~np.isfinite(conf)) or conf.min() < 0 or conf.max() > 1:
        raise ValueError("confidences must be finite and in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges, right=True), 1, n_bins) - 1  # 0-based bin; conf == 0 joins the first
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    acc_sum = np.bincount(idx, weights=ok, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    nz = np.maximum(count, 1)
    return {"edges": edges, "count": count, "accuracy": acc_sum / nz, "confidence": conf_sum / nz}


def calibration_errors(confidences: ArrayLike, correct: ArrayLike, n_bins: int = 15) -> Tuple[float, float]:
    """(ECE, MCE) in % over ``n_bins`` equal-width confidence bins (empty bins have gap 0)."""
    b = calibration_bins(confidences, correct, n_bins)
    gap = np.abs(b["accuracy"] - b["confidence"])
    ece = float(np.sum(gap * b["count"]) / np.sum(b["count"]))
    return 100.0 * ece, 100.0 * float(gap.max())


def confidences_from_logits(logits: torch.Tensor, kind: str = "softmax") -> Tuple[torch.Tensor, torch.Tensor]:
    """(confidence, prediction) from raw logits: top softmax probability, or top sigmoid probability."""
    x = logits.detach().float()
    if kind == "softmax":
        conf, pred = torch.softmax(x, dim=-1).max(dim=-1)
    elif kind == "sigmoid":
        top, pred = x.max(dim=-1)
        conf = torch.sigmoid(top)
    else:
        raise ValueError(f"confidence {kind!r} not in ('softmax', 'sigmoid')")
    return conf, pred


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """{'top1': %, 'top5': %} (k capped at the number of classes), via timm.utils.accuracy."""
    from timm.utils import accuracy

    vals = accuracy(logits.detach().float(), labels.long(), topk=tuple(ks))
    return {f"top{k}": float(v) for k, v in zip(ks, vals)}


# ------------------------------------------------------------------------------------------------ files
def save_figure(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` (write-then-rename) and close it, even when writing fails."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def _plots(bins: Dict[str, np.ndarray], train_counts: np.ndarray, class_acc: np.ndarray, ece: float, out: Path,
           confidence: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, width = bins["edges"], np.diff(bins["edges"])
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    has = bins["count"] > 0
    ax.bar(edges[:-1][has], bins["accuracy"][has], width=width[has], align="edge", edgecolor="k", label="accuracy")
    ax.bar(edges[:-1][has], (bins["confidence"] - bins["accuracy"])[has], bottom=bins["accuracy"][has], width=width[has],
           align="edge", color="tab:red", alpha=0.35, label="gap")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"confidence ({confidence} of raw logits)", ylabel="accuracy",
           title=f"reliability, ECE {ece:.2f}%")
    ax.legend(loc="upper left")
    fig.tight_layout()
    save_figure(fig, out / "reliability.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    seen = ~np.isnan(class_acc)
    ax.scatter(train_counts[seen], class_acc[seen], s=8, alpha=0.6)
    for x in (20, 100):
        ax.axvline(x, color="k", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set(xlabel="training images of the class (log)", ylabel="class accuracy (%)",
           title="accuracy vs class size (few < 20 ≤ medium ≤ 100 < many)")
    fig.tight_layout()
    save_figure(fig, out / "acc_vs_class_size.png")


def evaluate_outputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    train_class_counts: ArrayLike,
    class_names: Optional[List[str]],
    out_dir: Union[str, Path],
    confidence: str = "softmax",
) -> Dict[str, object]:
    """All metrics of raw ``logits`` [N, C] against ``labels`` [N]; writes into ``out_dir`` (atomically):
    ``metrics.json`` (the returned dict), ``per_class.csv`` (class, name, train count, test count, accuracy %),
    ``reliability.png`` and ``acc_vs_class_size.png``.
    """
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels).long().reshape(-1)
    counts = _np(train_class_counts).astype(np.int64).ravel()
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be [N, C] with N = len(labels) = {labels.shape[0]}, got {tuple(logits.shape)}")
    c = logits.shape[1]
    if counts.size != c:
        raise ValueError(f"train_class_counts has {counts.size} classes, logits have {c}")
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ValueError(f"class_names has {len(names)} entries, logits have {c} classes")
    conf, pred = confidences_from_logits(logits, confidence)
    correct = (pred == labels.to(pred.device)).cpu().numpy()
    shots = shot_accuracy(pred, labels, counts)
    ece, mce = calibration_errors(conf.cpu().numpy(), correct)
    class_acc, test_counts = per_class_accuracy(pred, labels, c)
    groups = shot_groups(counts)
    metrics: Dict[str, object] = {
        **topk_accuracy(logits, labels.to(logits.device)),
        **shots,
        "ece": ece,
        "mce": mce,
        "confidence": confidence,
        "num_samples": int(labels.numel()),
        "num_classes": int(c),
        "group_classes": {g: int(len(idx)) for g, idx in groups.items()},
        "units": "percent",
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", metrics)
    with atomic_path(out / "per_class.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "name", "train_count", "test_count", "accuracy"])
        for i in range(c):
            w.writerow([i, names[i], int(counts[i]), int(test_counts[i]), "" if np.isnan(class_acc[i]) else f"{class_acc[i]:.4f}"])
    _plots(calibration_bins(conf.cpu().numpy(), correct), counts, class_acc, ece, out, confidence)
    return metrics

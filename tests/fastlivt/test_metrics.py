"""Long-tail metrics on hand-computed cases."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from fastlivt.metrics import calibration_errors, evaluate_outputs, shot_accuracy, topk_accuracy

# training counts -> many {0, 1} (> 100), medium {2, 3} (20..100), few {4, 5} (< 20)
TRAIN = [200, 150, 100, 20, 19, 5]


def test_shot_accuracy_by_hand():
    labels = [0, 0, 0, 0, 1, 1, 2, 3, 4, 4]
    preds = [0, 0, 0, 1, 1, 1, 5, 3, 4, 0]
    # class acc: 0 -> 3/4, 1 -> 2/2, 2 -> 0/1, 3 -> 1/1, 4 -> 1/2, 5 -> no test sample
    out = shot_accuracy(np.array(preds), torch.tensor(labels), TRAIN)
    assert out["overall"] == pytest.approx(70.0)  # 7 of 10 samples (not the class mean, which is 65)
    assert out["many"] == pytest.approx((75.0 + 100.0) / 2)
    assert out["medium"] == pytest.approx((0.0 + 100.0) / 2)
    assert out["few"] == pytest.approx(50.0)  # class 5 has no test sample: not counted
    assert set(out) == {"overall", "many", "medium", "few"}


def test_missing_group_is_none_not_nan():
    out = shot_accuracy([0, 1, 1], [0, 1, 0], [5000, 500])  # CIFAR-10-LT-like: no medium or few class
    assert out["medium"] is None and out["few"] is None
    assert out["many"] == pytest.approx(75.0)  # class 0: 1/2, class 1: 1/1
    json.dumps(out)  # serialisable, no NaN


def test_calibration_by_hand():
    conf = [0.95, 0.95, 0.5, 0.5]
    correct = [1, 0, 1, 1]
    # bin (14/15, 1]: acc 0.5, conf 0.95, gap 0.45; bin (7/15, 8/15]: acc 1.0, conf 0.5, gap 0.5
    ece, mce = calibration_errors(conf, correct)
    assert ece == pytest.approx(100 * (2 * 0.45 + 2 * 0.5) / 4)
    assert mce == pytest.approx(50.0)


def test_calibration_perfect_and_edges():
    ece, mce = calibration_errors([0.75] * 4, [1, 1, 1, 0])  # conf 0.75, accuracy 3/4
    assert ece == pytest.approx(0.0, abs=1e-12) and mce == pytest.approx(0.0, abs=1e-12)
    # conf 1.0 falls in the last bin, conf 0.0 in the first: gaps 0 and 0 -> both errors 0
    ece, mce = calibration_errors([1.0, 0.0], [1, 0])
    assert ece == pytest.approx(0.0) and mce == pytest.approx(0.0)
    # two bins, 2 bins only: (0, .5] holds 0.2 (wrong, gap .2), (.5, 1] holds 0.9 and 0.7 (both right: gap .2)
    ece, mce = calibration_errors([0.2, 0.9, 0.7], [0, 1, 1], n_bins=2)
    assert ece == pytest.approx(100 * (0.2 * 1 + 0.2 * 2) / 3) and mce == pytest.approx(20.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration_errors([1.2], [1])


def test_topk_with_fewer_classes_than_k():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [2.0, 3.0, 1.0]])
    labels = torch.tensor([0, 0, 2])
    acc = topk_accuracy(logits, labels)
    assert acc["top1"] == pytest.approx(100 / 3)  # only sample 0
    assert acc["top5"] == pytest.approx(100.0)  # k capped at C = 3


def test_evaluate_outputs_writes_every_file(tmp_path):
    # 6 classes, 12 samples; logits chosen so the predictions are known
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    preds = torch.tensor([0, 0, 1, 0, 2, 3, 3, 3, 4, 1, 5, 5])
    logits = torch.full((12, 6), -2.0)
    logits[torch.arange(12), preds] = 2.0
    names = ["cat", "dog", "owl", "eel", "yak", "emu"]
    m = evaluate_outputs(logits, labels, TRAIN, names, tmp_path / "eval")
    assert m["top1"] == pytest.approx(100 * 9 / 12)
    assert m["many"] == pytest.approx((100 + 50) / 2) and m["medium"] == pytest.approx((50 + 100) / 2)
    assert m["few"] == pytest.approx((50 + 100) / 2)
    p_top = math.exp(2) / (math.exp(2) + 5 * math.exp(-2))  # every sample's softmax confidence
    assert m["ece"] == pytest.approx(100 * abs(0.75 - p_top)) and m["mce"] == pytest.approx(100 * abs(0.75 - p_top))
    out = tmp_path / "eval"
    assert json.loads((out / "metrics.json").read_text())["top1"] == pytest.approx(75.0)
    rows = list(csv.DictReader(open(out / "per_class.csv")))
    assert [r["name"] for r in rows] == names
    assert rows[1] == {"class": "1", "name": "dog", "train_count": "150", "test_count": "2", "accuracy": "50.0000"}
    for png in ("reliability.png", "acc_vs_class_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp*"))
    sig = evaluate_outputs(logits, labels, TRAIN, None, tmp_path / "sig", confidence="sigmoid")
    s_top = 1 / (1 + math.exp(-2))
    assert sig["ece"] == pytest.approx(100 * abs(0.75 - s_top)) and sig["confidence"] == "sigmoid"
    with pytest.raises(ValueError, match="train_class_counts has 5"):
        evaluate_outputs(logits, labels, TRAIN[:5], None, tmp_path / "bad")

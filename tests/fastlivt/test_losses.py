"""Logit biases and the loss family (CE, BCE, Bal-CE, Bal-BCE) on the PyTorch path and the fused path (interpreter)."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastlivt.config import LossConfig
from fastlivt.losses import build_loss, logit_bias
from fastlivt.targets import MixTarget

COUNTS = [500, 120, 60, 21, 9, 3]  # long-tailed, C = 6


def by_hand_priors(counts):
    total = sum(counts)
    return [n / total for n in counts]


# ------------------------------------------------------------------------------------------------ biases
def test_bias_forms_match_the_paper_formulas():
    pi = by_hand_priors(COUNTS)
    c = len(COUNTS)
    bal_ce = [math.log(p) for p in pi]
    official = [math.log(p / (1 - p)) for p in pi]
    paper = [math.log(p / (1 - p)) + math.log(c - 1) for p in pi]
    np.testing.assert_allclose(logit_bias(COUNTS, "bal_ce", dtype=torch.float64), bal_ce, rtol=1e-12)
    np.testing.assert_allclose(logit_bias(COUNTS, "bal_ce", add_log_c=True, dtype=torch.float64),
                               [b + math.log(c) for b in bal_ce], rtol=1e-12)
    np.testing.assert_allclose(logit_bias(COUNTS, "bal_bce_official", dtype=torch.float64), official, rtol=1e-12)
    np.testing.assert_allclose(logit_bias(COUNTS, "bal_bce", dtype=torch.float64), paper, rtol=1e-12)
    np.testing.assert_allclose(logit_bias(COUNTS, "bal_bce", tau=1.05, dtype=torch.float64), [1.05 * b for b in paper], rtol=1e-12)
    assert logit_bias(COUNTS, "bal_bce").dtype == torch.float32


def test_test_prior_form_of_theorem_3():
    pi = by_hand_priors(COUNTS)
    c = len(COUNTS)
    uniform = logit_bias(COUNTS, "bal_bce", test_prior=[1] * c, dtype=torch.float64)
    np.testing.assert_allclose(uniform, logit_bias(COUNTS, "bal_bce", dtype=torch.float64), rtol=1e-12, atol=1e-12)
    same = logit_bias(COUNTS, "bal_bce", test_prior=COUNTS, dtype=torch.float64)  # test prior = train prior: no bias
    np.testing.assert_allclose(same, np.zeros(c), atol=1e-12)
    pt = [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]
    expected = [(math.log(p) - math.log(q)) - (math.log(1 - p) - math.log(1 - q)) for p, q in zip(pi, pt)]
    np.testing.assert_allclose(logit_bias(COUNTS, "bal_bce", test_prior=pt, dtype=torch.float64), expected, rtol=1e-12)


def test_extreme_priors_are_finite_and_accurate():
    rare = 1 / 437_513
    b = logit_bias([1, 437_512], "bal_bce_official", dtype=torch.float64)
    assert torch.isfinite(b).all()
    assert b[0].item() == pytest.approx(math.log(rare) - math.log1p(-rare), rel=1e-14)
    b2 = logit_bias([999, 1], "bal_bce", dtype=torch.float64)  # pi = 0.999 and 0.001, log(C - 1) = 0
    assert b2[0].item() == pytest.approx(math.log(999.0), rel=1e-12)
    assert b2[1].item() == pytest.approx(-math.log(999.0), rel=1e-12)


def test_bad_counts_and_forms_are_named():
    with pytest.raises(ValueError, match=r"class_counts\[2\] = 0"):
        logit_bias([5, 3, 0], "bal_bce")
    with pytest.raises(ValueError, match="form"):
        logit_bias([5, 3], "focal")
    with pytest.raises(ValueError, match="at least 2 classes"):
        logit_bias([5], "bal_bce")
    with pytest.raises(ValueError, match="test_prior has 2"):
        logit_bias([5, 3, 1], "bal_bce", test_prior=[1, 1])
    with pytest.raises(ValueError, match="focal"):  # the section checks its choices (pydantic)
        build_loss(LossConfig(name="focal"), COUNTS)


# ------------------------------------------------------------------------------------------------ losses
def logits_and_targets(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = len(COUNTS)
    logits = 2 * torch.randn(n, c, generator=g, dtype=torch.float64)
    la = torch.randint(0, c, (n,), generator=g)
    return logits, la, la.flip(0)


def soft(labels, c, s):
    return torch.full((labels.numel(), c), s / c, dtype=torch.float64).scatter_(1, labels.view(-1, 1), 1 - s + s / c)


def test_bal_ce_is_logit_adjusted_cross_entropy():
    logits, la, lb = logits_and_targets()
    tau, lam, s = 1.05, 0.3, 0.1
    log_pi = torch.tensor([math.log(p) for p in by_hand_priors(COUNTS)], dtype=torch.float64)
    x = logits + tau * log_pi
    log_p = x - torch.logsumexp(x, dim=1, keepdim=True)
    c = len(COUNTS)
    hard = -log_p[torch.arange(len(la)), la].mean()
    y = lam * soft(la, c, s) + (1 - lam) * soft(lb, c, s)
    mixed = -(y * log_p).sum(1).mean()
    loss = build_loss(LossConfig(name="bal_ce", tau=tau), COUNTS)
    assert loss(logits, la).item() == pytest.approx(hard.item(), rel=1e-6)
    assert loss(logits, MixTarget(la, lb, lam, s)).item() == pytest.approx(mixed.item(), rel=1e-6)
    assert loss(logits, y).item() == pytest.approx(mixed.item(), rel=1e-6)
    plain = build_loss(LossConfig(name="ce"), COUNTS)
    assert plain(logits, la).item() == pytest.approx(F.cross_entropy(logits, la).item(), rel=1e-12)


@pytest.mark.parametrize("fused", ["torch", "triton"])
@pytest.mark.parametrize("name,form", [("bal_bce", "paper"), ("bal_bce", "official"), ("bce", "paper")])
def test_bce_family_matches_timm_sum_classes(fused, name, form):
    from timm.loss import BinaryCrossEntropy

    logits, la, lb = logits_and_targets(n=10, seed=1)
    logits = logits.float()
    c, tau, lam, s = len(COUNTS), 1.05, 0.6, 0.1
    if name == "bce":
        bias = torch.zeros(c)
    else:
        bias_form = "bal_bce" if form == "paper" else "bal_bce_official"
        bias = logit_bias(COUNTS, bias_form, tau=tau)
    timm_bce = BinaryCrossEntropy(smoothing=0.0, sum_classes=True)  # batch mean of the per-sample class sum
    y = (lam * soft(la, c, s) + (1 - lam) * soft(lb, c, s)).float()
    expected = timm_bce(logits.double() + bias.double(), y.double()).item()
    loss = build_loss(LossConfig(name=name, tau=tau, form=form, fused=fused), COUNTS)
    for target in (MixTarget(la, lb, lam, s), y):
        assert loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
        assert loss.backend == fused
    hard = build_loss(LossConfig(name=name, tau=tau, form=form, fused=fused), COUNTS, smoothing=s)
    assert hard(logits, la).item() == pytest.approx(timm_bce(logits.double() + bias.double(), soft(la, c, s)).item(), rel=1e-6)


def test_fused_and_torch_paths_agree_in_value_and_gradient():
    logits, la, lb = logits_and_targets(n=12, seed=2)
    target = MixTarget(la, lb, 0.25, 0.1)
    grads = {}
    for fused in ("torch", "triton"):
        z = logits.float().clone().requires_grad_(True)
        loss = build_loss(LossConfig(name="bal_bce", fused=fused), COUNTS)(z, target)
        (grads[fused],) = torch.autograd.grad(loss, z)
        grads[fused + "_loss"] = loss.detach()
    assert grads["triton_loss"].item() == pytest.approx(grads["torch_loss"].item(), rel=1e-6)
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-5, atol=1e-8)


def test_bf16_logits_on_both_paths():
    logits, la, lb = logits_and_targets(n=6, seed=3)
    z = logits.to(torch.bfloat16)
    ref = build_loss(LossConfig(name="bal_bce", fused="torch"), COUNTS)(z.double(), la).item()
    for fused in ("torch", "triton"):
        out = build_loss(LossConfig(name="bal_bce", fused=fused), COUNTS)(z, la)
        assert out.dtype == torch.float32 and out.item() == pytest.approx(ref, rel=1e-5)


class Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_backend_choice_is_logged_once_and_explicit_triton_fails_clearly(monkeypatch):
    cap = Capture()
    logger = logging.getLogger("fastlivt.losses")
    logger.addHandler(cap)
    try:
        logits, la, _ = logits_and_targets(n=4)
        auto = build_loss(LossConfig(name="bal_bce"), COUNTS)
        auto(logits.float(), la)
        auto(logits.float(), la)
        assert auto.backend == "triton"  # conftest sets TRITON_INTERPRET=1
        assert sum("fused Triton" in m for m in cap.messages) == 1
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        auto(logits.float(), la)
        assert auto.backend == "torch"
        assert any("plain PyTorch" in m and "TRITON_INTERPRET" in m for m in cap.messages)
        with pytest.raises(RuntimeError, match="fused='triton' asked for"):
            build_loss(LossConfig(name="bal_bce", fused="triton"), COUNTS)
    finally:
        logger.removeHandler(cap)
    with pytest.raises(ValueError, match="BCE losses only"):
        build_loss(LossConfig(name="bal_ce", fused="triton"), COUNTS)
    assert build_loss(LossConfig(name="bal_ce"), COUNTS).backend == "torch"


def test_bias_is_never_applied_to_the_logits():
    # A prior that would flip the prediction if it were applied: class 0 is the head class.
    counts = [1000, 10]
    logits = torch.tensor([[0.0, 1.0], [0.5, 0.6]])
    before = logits.clone()
    for name in ("bal_bce", "bal_ce"):
        loss = build_loss(LossConfig(name=name), counts).eval()
        loss(logits, torch.tensor([1, 1]))
        assert torch.equal(logits, before)  # nothing in place
        assert not any(hasattr(loss, attr) for attr in ("adjust", "apply_bias", "predict"))
    biased = logits + logit_bias(counts, "bal_bce")
    assert torch.equal(biased.argmax(1), torch.tensor([0, 0]))  # what a biased evaluation would predict
    from fastlivt.metrics import shot_accuracy, topk_accuracy

    assert topk_accuracy(logits, torch.tensor([1, 1]), ks=(1,))["top1"] == 100.0  # raw logits: both class 1
    assert shot_accuracy(logits.argmax(1), torch.tensor([1, 1]), counts)["overall"] == 100.0


def test_bad_targets_are_named():
    loss = build_loss(LossConfig(name="bal_bce", fused="torch"), COUNTS)
    logits, la, _ = logits_and_targets(n=4)
    with pytest.raises(ValueError, match=r"label 6 outside \[0, 6\)"):
        loss(logits, torch.tensor([0, 1, 2, 6]))
    with pytest.raises(ValueError, match="logits must be"):
        loss(logits[:, :3], la)
    with pytest.raises(ValueError, match="dense target shape"):
        loss(logits, torch.zeros(4, 5))
    with pytest.raises(TypeError, match="MixTarget"):
        loss(logits, [0, 1, 2, 3])

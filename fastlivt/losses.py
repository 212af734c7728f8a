"""The loss family of Balanced Fine-Tuning: class priors → logit biases; CE, BCE, Bal-CE and Bal-BCE.

With training priors π_c = n_c / Σ n (from the training manifest's ``class_counts``), the losses add a per-class bias
τ·b_c to the logits *during training only* (evaluation, top-1 and confidences use the raw logits):

- Bal-CE (Thm 1, logit adjustment):   b = log π            (optionally + log C)
- Bal-BCE, paper form (Eq. 10):       b = log π − log(1 − π) + log(C − 1)
  with a test prior π^t (Thm 3):      b = (log π − log π^t) − (log(1 − π) − log(1 − π^t))
  (a uniform π^t = 1/C gives back Eq. 10)
- Bal-BCE, official-code form:        b = log π − log(1 − π)

The BCE losses sum over classes and average over the batch — the official LiVT code's ``C * mean`` and timm's
``BinaryCrossEntropy(sum_classes=True)``. The CE losses average over the batch. Targets are hard labels (long [N]),
dense soft targets (float [N, C]) or a :class:`fastlivt.targets.MixTarget` (the compact mixup form).

BCE losses run through the fused Triton kernel (:mod:`fastlivt.kernels.bal_bce`) on CUDA and under ``TRITON_INTERPRET=1``, and
through PyTorch's ``binary_cross_entropy_with_logits`` otherwise (``fused="auto"``); the choice is logged once per
backend and exposed as ``loss.backend``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastlivt.config import ConfigError, LossConfig
from fastlivt.logs import get_logger
from fastlivt.targets import MixTarget

log = get_logger(__name__)

LOSSES = ("ce", "bce", "bal_ce", "bal_bce")
BIAS_FORMS = ("bal_ce", "bal_bce", "bal_bce_official")
FUSED = ("auto", "triton", "torch")
Target = Union[torch.Tensor, MixTarget]


def class_priors(class_counts: Union[Sequence[int], np.ndarray, torch.Tensor], what: str = "class_counts") -> np.ndarray:
    """π_c = n_c / Σ n in float64; every class needs at least one sample (log π must be finite)."""
    counts = np.asarray(class_counts.cpu() if isinstance(class_counts, torch.Tensor) else class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"{what}: expected a non-empty 1-D sequence of per-class counts, got shape {counts.shape}")
    bad = np.flatnonzero(~np.isfinite(counts) | (counts <= 0))
    if bad.size:
        raise ValueError(f"{what}[{bad[0]}] = {counts[bad[0]]}: every class needs a positive count "
                         f"(a class without training samples has no finite log-prior)")
    return counts / counts.sum()


def logit_bias(
    class_counts: Union[Sequence[int], np.ndarray, torch.Tensor],
    form: str,
    tau: float = 1.0,
    test_prior: Optional[Union[Sequence[float], np.ndarray, torch.Tensor]] = None,
    add_log_c: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """τ · b, the per-class logit bias [C] added to the logits in training (see the module docstring for b).

    form: ``"bal_ce"`` | ``"bal_bce"`` (paper, Eq. 10 / Thm 3) | ``"bal_bce_official"``. ``test_prior``: per-class
    test-set counts or probabilities (normalised here), replacing the uniform test prior (``bal_ce`` and ``bal_bce``).
    ``add_log_c``: add log C to the Bal-CE bias. Computed in float64 with ``log1p(−π)`` so that π = 1/437,513 and
    π = 0.999 stay finite; returned in ``dtype``.
    """
    if form not in BIAS_FORMS:
        raise ValueError(f"logit_bias: form {form!r} not in {BIAS_FORMS}")
    if not math.isfinite(tau):
        raise ValueError(f"logit_bias: tau must be finite, got {tau}")
    pi = class_priors(class_counts)
    c = pi.size
    if c < 2 and form != "bal_ce":
        raise ValueError(f"logit_bias: form {form!r} needs at least 2 classes, class_counts has {c}")
    if add_log_c and form != "bal_ce":
        raise ValueError("logit_bias: add_log_c applies to form='bal_ce' only")
    if test_prior is not None:
        if form == "bal_bce_official":
            raise ValueError("logit_bias: the official-code form has no test prior; use form='bal_bce'")
        pt = class_priors(test_prior, what="test_prior")
        if pt.size != c:
            raise ValueError(f"logit_bias: test_prior has {pt.size} classes, class_counts has {c}")
    if form == "bal_ce":
        b = np.log(pi) - (np.log(pt) if test_prior is not None else 0.0)
        if add_log_c:
            b = b + math.log(c)
    elif form == "bal_bce_official":
        b = np.log(pi) - np.log1p(-pi)
    elif test_prior is None:
        b = np.log(pi) - np.log1p(-pi) + math.log(c - 1)
    else:
        b = (np.log(pi) - np.log(pt)) - (np.log1p(-pi) - np.log1p(-pt))
    if not np.all(np.isfinite(b)):
        raise ValueError(f"logit_bias: non-finite bias for class {int(np.flatnonzero(~np.isfinite(b))[0])}")
    return torch.as_tensor(tau * b, dtype=dtype)


def dense_target(target: Target, num_classes: int, dtype: torch.dtype, smoothing: float = 0.0) -> torch.Tensor:
    """The N × C soft target of any accepted target form (hard labels are smoothed with ``smoothing``)."""
    if isinstance(target, MixTarget):
        return target.dense(num_classes, dtype=dtype)
    if target.is_floating_point():
        return target.to(dtype)
    return MixTarget.from_labels(target, smoothing).dense(num_classes, dtype=dtype)


class LongTailLoss(nn.Module):
    """``loss(logits, target) -> scalar`` for one of ``ce | bce | bal_ce | bal_bce`` (see :func:`build_loss`).

    Buffers: ``bias`` [C] = b (unscaled, fp32; zeros for ce/bce) and ``scaled_bias`` = τ·b, the tensor actually added.
    ``backend`` is ``"triton"`` or ``"torch"`` — the path of the last call (before any call: the path CUDA logits would
    take if CUDA is available, else CPU logits). The bias only ever enters the loss; nothing here changes logits.
    ``grad_scale``: the gradient the loss's backward receives — the weight the training runtime gives each
    micro-batch's loss (1 / accumulation steps). The fused path writes its gradient already so weighted, in the
    forward's single pass (:mod:`fastlivt.kernels.bal_bce_op`); the PyTorch paths take the weight from autograd as usual.
    """

    def __init__(self, name: str, bias: Optional[torch.Tensor], num_classes: int, tau: float, fused: str,
                 smoothing: float, form: str, grad_scale: float = 1.0) -> None:
        super().__init__()
        if not (math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"loss {name}: grad_scale must be a positive number, got {grad_scale}")
        self.grad_scale = float(grad_scale)
        self.name, self.num_classes, self.tau, self.fused, self.smoothing, self.form = name, num_classes, tau, fused, smoothing, form
        self.family = "bce" if name.endswith("bce") else "ce"
        self.has_bias = bias is not None
        b = bias if bias is not None else torch.zeros(num_classes)
        self.register_buffer("bias", b.float(), persistent=False)
        self.register_buffer("scaled_bias", (tau * b.double()).float(), persistent=False)
        self._logged: set = set()
        self.backend = self.backend_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"))[0]

    def extra_repr(self) -> str:
        return f"name={self.name}, form={self.form}, C={self.num_classes}, tau={self.tau}, fused={self.fused}, backend={self.backend}"

    def backend_for(self, device: torch.device) -> tuple:
        """(backend, reason) that logits on ``device`` take."""
        if self.family == "ce":
            return "torch", "softmax losses have no fused kernel"
        if self.fused == "torch":
            return "torch", "fused='torch' asked for"
        from fastlivt.kernels.launch import kernel_available  # imports triton

        ok, why = kernel_available(device)
        if ok:
            return "triton", why
        if self.fused == "triton":
            raise RuntimeError(f"loss {self.name}: fused='triton' asked for, but {why}")
        return "torch", why

    def note_backend(self, device: torch.device) -> str:
        """The backend logits on ``device`` take, logged the first time it is chosen (called by ``forward`` in eager
        mode; a compiled loss is noted before compiling, since a log call inside a compiled region breaks the graph)."""
        backend, why = self.backend_for(device)
        if backend not in self._logged:
            self._logged.add(backend)
            log.info("loss %s: %s path (%s)", self.name, "fused Triton" if backend == "triton" else "plain PyTorch", why)
        return backend

    def forward(self, logits: torch.Tensor, target: Target) -> torch.Tensor:
        self._check(logits, target)
        if torch.compiler.is_compiling():
            backend = self.backend_for(logits.device)[0]
        else:
            backend = self.note_backend(logits.device)
        self.backend = backend
        bias = self.scaled_bias if self.has_bias else None
        if self.family == "bce":
            if backend == "triton":
                return self._fused(logits, target, bias)
            return self._bce_torch(logits, target, bias)
        return self._ce_torch(logits, target, bias)

    # ------------------------------------------------------------------------------------------- paths
    def _fused(self, logits: torch.Tensor, target: Target, bias: Optional[torch.Tensor]) -> torch.Tensor:
        from fastlivt.kernels.bal_bce_op import bal_bce

        if isinstance(target, MixTarget):
            return bal_bce(logits, bias, label_a=target.label_a, label_b=target.label_b, lam=target.lam,
                           smoothing=target.smoothing, grad_scale=self.grad_scale)
        if target.is_floating_point():
            return bal_bce(logits, bias, target=target, grad_scale=self.grad_scale)
        return bal_bce(logits, bias, label_a=target, smoothing=self.smoothing, grad_scale=self.grad_scale)

    @staticmethod
    def _compute_view(logits: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits + τb, upcast to fp32 from fp16/bf16 (as autocast does for these losses)."""
        x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        return x + bias.to(x.dtype) if bias is not None else x

    def _bce_torch(self, logits: torch.Tensor, target: Target, bias: Optional[torch.Tensor]) -> torch.Tensor:
        x = self._compute_view(logits, bias)
        y = dense_target(target, self.num_classes, x.dtype, self.smoothing)
        return F.binary_cross_entropy_with_logits(x, y, reduction="sum") / x.shape[0]

    def _ce_torch(self, logits: torch.Tensor, target: Target, bias: Optional[torch.Tensor]) -> torch.Tensor:
        x = self._compute_view(logits, bias)
        if isinstance(target, MixTarget):
            ce_a = F.cross_entropy(x, target.label_a, label_smoothing=target.smoothing)
            if target.lam == 1.0:
                return ce_a
            return target.lam * ce_a + (1.0 - target.lam) * F.cross_entropy(x, target.label_b, label_smoothing=target.smoothing)
        if target.is_floating_point():
            return torch.sum(-target.to(x.dtype) * F.log_softmax(x, dim=-1), dim=-1).mean()
        return F.cross_entropy(x, target, label_smoothing=self.smoothing)

    def _check(self, logits: torch.Tensor, target: Target) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes or logits.shape[0] == 0:
            raise ValueError(f"loss {self.name}: logits must be [N, {self.num_classes}] with N > 0, got {tuple(logits.shape)}")
        n = logits.shape[0]
        labels = [target.label_a, target.label_b] if isinstance(target, MixTarget) else [target]
        if isinstance(target, MixTarget):
            if not (0.0 <= target.lam <= 1.0) or not (0.0 <= target.smoothing < 1.0):
                raise ValueError(f"loss {self.name}: MixTarget lam={target.lam} / smoothing={target.smoothing} out of range")
        elif not isinstance(target, torch.Tensor):
            raise TypeError(f"loss {self.name}: target must be a Tensor or MixTarget, got {type(target).__name__}")
        elif target.is_floating_point():
            if target.shape != logits.shape:
                raise ValueError(f"loss {self.name}: dense target shape {tuple(target.shape)} != logits {tuple(logits.shape)}")
            return
        for lab in labels:
            if lab.shape != (n,) or lab.is_floating_point():
                raise ValueError(f"loss {self.name}: labels must be an integer tensor of shape ({n},), got "
                                 f"{lab.dtype} {tuple(lab.shape)}")
            if lab.device.type == "cpu" and not torch.compiler.is_compiling():  # free here; on CUDA (or traced) it
                # would synchronise or break the graph (the kernel makes such rows NaN)
                lo, hi = int(lab.min()), int(lab.max())
                if lo < 0 or hi >= self.num_classes:
                    raise ValueError(f"loss {self.name}: label {lo if lo < 0 else hi} outside [0, {self.num_classes})")


def build_loss(spec: LossConfig, class_counts: Union[Sequence[int], np.ndarray, torch.Tensor],
               smoothing: float = 0.0, grad_scale: float = 1.0) -> LongTailLoss:
    """The training loss of the config section ``spec`` (:class:`fastlivt.config.LossConfig`, handed over whole) for
    a training set of ``class_counts``; called as ``loss(logits, target)``.

    spec.name: ``ce | bce | bal_ce | bal_bce``. spec.tau: bias scale τ (paper: 1; Places-LT 1.05). spec.form:
    ``"paper"`` (Eq. 10 / Thm 3) or ``"official"`` (the released code's log π − log(1 − π); that code also ignores τ,
    so set tau=1 to reproduce it) — Bal-BCE only. spec.fused: ``"auto"`` (Triton kernel on CUDA or under
    TRITON_INTERPRET=1, PyTorch otherwise), ``"triton"`` (an error where it cannot run), ``"torch"``.
    spec.test_prior / spec.add_log_c: see :func:`logit_bias`. smoothing (``data.smoothing``): label smoothing applied
    to hard-label targets (MixTarget carries its own). grad_scale: the weight the caller gives the loss before
    ``backward`` (see :class:`LongTailLoss`).
    """
    name, form, fused, tau = spec.name, spec.form, spec.fused, spec.tau  # choices checked by LossConfig
    if fused == "triton" and not name.endswith("bce"):
        raise ValueError(f"loss {name}: fused='triton' applies to the BCE losses only (softmax losses run in PyTorch)")
    if not (0.0 <= smoothing < 1.0):
        raise ValueError(f"loss smoothing must be in [0, 1), got {smoothing}")
    if spec.add_log_c and name != "bal_ce":
        raise ConfigError(f"loss.add_log_c applies to loss.name=bal_ce only, not {name}")
    if spec.test_prior is not None and name not in ("bal_ce", "bal_bce"):
        raise ConfigError(f"loss.test_prior applies to the balanced losses (bal_ce, bal_bce) only, not {name}")
    if spec.test_prior is not None and name == "bal_bce" and form == "official":
        raise ConfigError("loss.test_prior needs loss.form=paper with loss.name=bal_bce (the official-code form has no "
                          "test prior); set loss.form=paper or drop loss.test_prior")
    pi = class_priors(class_counts)
    bias = None
    if name == "bal_ce":
        bias = logit_bias(class_counts, "bal_ce", 1.0, test_prior=spec.test_prior, add_log_c=spec.add_log_c)
    elif name == "bal_bce":
        bias_form = "bal_bce" if form == "paper" else "bal_bce_official"
        bias = logit_bias(class_counts, bias_form, 1.0, test_prior=spec.test_prior)
    loss = LongTailLoss(name, bias, pi.size, float(tau), fused, float(smoothing), form, grad_scale)
    if fused == "triton":
        loss.backend_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # fail early, clearly
    return loss

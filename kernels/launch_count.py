"""Kernel launches and whole [N, C] passes of one differentiable ``bal_bce`` call (forward + backward), by kernel.

Counted at the launch sites (:data:`fastlivt.kernels.launch.LAUNCHES`, :data:`fastlivt.kernels.launch.PASSES`) around a call of
:func:`fastlivt.kernels.bal_bce_op.bal_bce` with ``grad_scale = 1 / accum`` and ``(loss / accum).backward()`` — the training
runtime's backward; ``fastlivt bench loss`` reports them per call.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict

import torch

from fastlivt.kernels.bal_bce_op import bal_bce
from fastlivt.kernels.launch import LAUNCHES, PASSES, interpreter_enabled, kernel_available

_COUNT_SNIPPET = """
import json, sys, torch
from fastlivt.kernels.launch_count import counts_per_call
n, c, dtype, accum = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3]), int(sys.argv[4])
print(json.dumps(counts_per_call(c, dtype, torch.device("cpu"), n, accum)))
"""


def _delta(counter, before: Dict[str, int]) -> Dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in counter.items() if v - before.get(k, 0)}


def counts_per_call(c: int, dtype: torch.dtype, device: torch.device, n: int = 8,
                    accum: int = 1) -> Dict[str, Dict[str, int]]:
    """``{"launches": by kernel, "passes": whole [N, C] reads and writes}`` of one ``bal_bce(...)`` forward and the
    backward the training runtime runs at ``accum`` accumulation steps.

    Where the kernel runs in this process (CUDA, or the interpreter) it is counted here; otherwise in a child process
    under ``TRITON_INTERPRET=1`` on CPU tensors (the launch sites are the same; the count does not depend on N)."""
    available, why = kernel_available(device)
    if not available and interpreter_enabled():  # the interpreter is on and still cannot run it: a child would not
        raise RuntimeError(f"cannot count the kernel's launches: {why}")
    if available:
        z = torch.randn(n, c, device=device).to(dtype).requires_grad_(True)
        labels = torch.randint(0, c, (n,), device=device)
        launches, passes = dict(LAUNCHES), dict(PASSES)
        loss = bal_bce(z, torch.randn(c, device=device), label_a=labels, label_b=labels.flip(0), lam=0.7,
                       smoothing=0.1, grad_scale=1.0 / accum)
        (loss / accum).backward()
        return {"launches": _delta(LAUNCHES, launches), "passes": _delta(PASSES, passes)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _COUNT_SNIPPET, str(n), str(c), str(dtype).replace("torch.", ""),
                          str(accum)], env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"launch count under TRITON_INTERPRET=1 failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])

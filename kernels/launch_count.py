"""Kernel launches of one differentiable ``bal_bce`` call (forward + backward), by kernel.

Counted at the launch sites (:data:`kernels.launch.LAUNCHES`) around a call of :func:`kernels.bal_bce_op.bal_bce`;
``fastlivt bench loss`` reports the total per call.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict

import torch

from kernels.bal_bce_op import bal_bce
from kernels.launch import LAUNCHES, kernel_available

_COUNT_SNIPPET = """
import json, sys, torch
from kernels.bal_bce_op import bal_bce
from kernels.launch import LAUNCHES
n, c, dtype = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3])
z = torch.randn(n, c).to(dtype).requires_grad_(True)
labels = torch.randint(0, c, (n,))
bal_bce(z, torch.randn(c), label_a=labels, label_b=labels.flip(0), lam=0.7, smoothing=0.1).backward()
print(json.dumps(dict(LAUNCHES)))
"""


def launches_per_call(c: int, dtype: torch.dtype, device: torch.device, n: int = 8) -> Dict[str, int]:
    """Kernel launches of one ``bal_bce(...)`` forward + ``loss.backward()``, by kernel, counted at the launch sites.

    Where the kernel runs in this process (CUDA, or the interpreter) it is counted here; otherwise in a child process
    under ``TRITON_INTERPRET=1`` on CPU tensors (the launch sites are the same; the count does not depend on N)."""
    if kernel_available(device)[0]:
        z = torch.randn(n, c, device=device).to(dtype).requires_grad_(True)
        labels = torch.randint(0, c, (n,), device=device)
        before = dict(LAUNCHES)
        bal_bce(z, torch.randn(c, device=device), label_a=labels, label_b=labels.flip(0), lam=0.7,
                smoothing=0.1).backward()
        return {k: LAUNCHES[k] - before.get(k, 0) for k in LAUNCHES if LAUNCHES[k] - before.get(k, 0)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _COUNT_SNIPPET, str(n), str(c), str(dtype).replace("torch.", "")],
                         env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"launch count under TRITON_INTERPRET=1 failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])

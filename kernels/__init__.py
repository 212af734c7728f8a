"""Triton kernels of fastlivt.

- :mod:`kernels.bal_bce` — Balanced BCE: bias add, stable BCE, gradient and the scalar loss in one launch.
- :mod:`kernels.bal_bce_op` — the differentiable :func:`~kernels.bal_bce_op.bal_bce` and the custom ops
  ``fastlivt::bal_bce`` / ``fastlivt::bal_bce_grad`` that compiled graphs take whole.
- :mod:`kernels.launch` — availability, launch layout, argument list, the launch counter.
- :mod:`kernels.launch_count` — kernel launches of one ``bal_bce`` forward + backward.
- :mod:`kernels.sass` — the kernel's sm_90 SASS read without a GPU (instructions per logit, access widths).
- :mod:`kernels.reference` — the float64 PyTorch reference (tests).

Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

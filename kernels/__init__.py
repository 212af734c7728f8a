"""Triton kernels of fastlivt.

- :mod:`kernels.bal_bce` — Balanced BCE: bias add, stable BCE, gradient and the scalar loss in one launch.
- :mod:`kernels.bal_bce_op` — the differentiable :func:`~kernels.bal_bce_op.bal_bce`: one custom op,
  ``fastlivt::bal_bce``, eager and compiled (loss and gradient in one launch, the gradient kept for the backward).
- :mod:`kernels.launch` — availability, launch layout, argument list, the launch records (launches, [N, C] passes).
- :mod:`kernels.launch_count` — launches and [N, C] passes of one ``bal_bce`` forward + backward.
- :mod:`kernels.sass` — the kernel's sm_90 SASS read without a GPU (instructions per logit, access widths).
- :mod:`kernels.reference` — the float64 PyTorch reference (tests).

Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

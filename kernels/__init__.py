"""Triton kernels of fastlivt.

- :mod:`fastlivt.kernels.bal_bce` — Balanced BCE: bias add, stable BCE, gradient and the scalar loss in one launch.
- :mod:`fastlivt.kernels.bal_bce_op` — the differentiable :func:`~fastlivt.kernels.bal_bce_op.bal_bce`: one custom op,
  ``fastlivt::bal_bce``, eager and compiled (loss and gradient in one launch, the gradient kept for the backward).
- :mod:`fastlivt.kernels.launch` — availability, launch layout, argument list, the launch records (launches, [N, C] passes).
- :mod:`fastlivt.kernels.launch_count` — launches and [N, C] passes of one ``bal_bce`` forward + backward.
- :mod:`fastlivt.kernels.sass` — the kernel's sm_90 SASS read without a GPU (instructions per logit, access widths).
- :mod:`fastlivt.kernels.reference` — the float64 PyTorch reference (tests).

Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

# This folder is the package fastlivt.kernels (the link fastlivt/kernels points here; the wheel installs it there and
# nowhere else). Imported by the top-level name a checkout on sys.path also offers, it would be a second copy of every
# module (for the kernels, a second registration of the torch.library op): refused.
if __name__ != "fastlivt.kernels":
    raise ImportError(f"import fastlivt.kernels, not {__name__}: this folder is importable only as fastlivt.kernels")

"""Triton kernels of fastlivt.

- :mod:`kernels.bal_bce` — Balanced BCE: bias add, stable BCE, loss reduction and gradient in one pass over the logits.
- :mod:`kernels.reference` — its float64 PyTorch reference (tests).

Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

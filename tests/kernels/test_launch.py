"""fastlivt.kernels.launch: the flat vector width and the fast-math switch (pure functions, no kernel run)."""
from __future__ import annotations

import torch

from fastlivt.kernels.launch import default_fast, use_asm, vector_width


def test_vector_width_divides_the_flat_size_and_never_exceeds_a_row():
    assert vector_width(1024, 8142) == 8  # iNat18 at batch 1,024: 128-bit bf16 vectors
    assert vector_width(3, 8142) == 2  # 24,426 logits: only pairs tile the flat array
    assert vector_width(7, 5) == 1
    assert vector_width(8, 3) == 2  # 24 logits, but a vector may not be longer than a row of 3
    for n, c in [(5, 12), (6, 10), (1, 16), (9, 7)]:
        g = vector_width(n, c)
        assert (n * c) % g == 0 and g <= c and g in (1, 2, 4, 8)


def test_fast_math_flag_logic():
    assert default_fast(torch.bfloat16) and default_fast(torch.float16)
    assert not default_fast(torch.float32) and not default_fast(torch.float64)
    assert use_asm(True, interpret=False)  # CUDA: PTX ex2/lg2/rcp.approx
    assert not use_asm(True, interpret=True)  # the interpreter cannot run inline assembly
    assert not use_asm(False, interpret=False)

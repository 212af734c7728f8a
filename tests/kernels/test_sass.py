"""What the fused kernel compiles to on sm_90 (Triton's compiler and nvdisasm; no GPU needed)."""
from __future__ import annotations

import pytest
import torch

from fastlivt.kernels.sass import access_bits, analyse, nvdisasm_path, sm90_figures

needs_nvdisasm = pytest.mark.skipif(nvdisasm_path() is None, reason="nvdisasm not found")

HANDMADE = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_3:
        /*0010*/                   LDG.E.EF.64 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0030*/                   FADD R4, R4, R8 ;
        /*0040*/                   MUFU.EX2 R5, R4 ;
        /*0050*/                   STG.E.64 desc[UR4][R2.64], R4 ;
        /*0060*/               @P0 BRA `(.L_x_3) ;
        /*0070*/                   EXIT ;
"""


def test_reader_on_handmade_sass():
    figures = analyse(HANDMADE, logits_per_thread_per_iter=4)
    assert figures["loop_instructions"] == 6 and figures["instructions_per_logit"] == 1.5
    assert figures["logit_load_bits"] == 64 and figures["grad_store_bits"] == 64 and figures["mufu_per_logit"] == 0.25
    assert access_bits("LDG.E.U16") == 16 and access_bits("LDG.E") == 32 and access_bits("@!P2 STG.E.128") == 128


@needs_nvdisasm
def test_inat18_bf16_steady_state_meets_the_figures():
    figures = sm90_figures(1024, 8142, torch.bfloat16)
    assert figures["vector"] == 8 and figures["fast"]
    assert figures["logit_load_bits"] == 128 and figures["grad_store_bits"] == 128
    assert figures["instructions_per_logit"] <= 20
    assert figures["mufu_per_logit"] == 3  # ex2, rcp, lg2: one hardware approximation each


@needs_nvdisasm
def test_layout_and_math_change_what_the_reader_sees():
    precise = sm90_figures(1024, 8142, torch.bfloat16, fast=False)
    fast = sm90_figures(1024, 8142, torch.bfloat16)
    assert precise["instructions_per_logit"] > fast["instructions_per_logit"]  # libdevice exp, polynomial, divisions
    scalar = sm90_figures(3, 8141, torch.bfloat16)  # 24,423 logits: odd, so vectors of one element
    assert scalar["vector"] == 1 and scalar["logit_load_bits"] == 16 and scalar["grad_store_bits"] == 16


def test_written_out_specialisation_rules_agree_with_triton():
    from fastlivt.kernels.sass import _specialize, specialize_written_out

    for value in (torch.empty(2, dtype=torch.bfloat16), torch.empty(2, dtype=torch.int64), 1, 16, 8160, 17, 2**33,
                  0.5, True):
        assert specialize_written_out(value) == tuple(_specialize(value)), value

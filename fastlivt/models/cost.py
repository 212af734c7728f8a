"""What one training image costs the MGP and BFT models: model FLOPs (for MFU) and an estimate of the memory; and the
MFU denominator, the dense GEMM rate of a device measured in this process (:func:`gemm_peak_flops`).

FLOPs count multiply-adds as 2 and only the matrix products (the convention of MFU: PaLM, Megatron): per pre-norm
block with MLP ratio 4 on N tokens of width D, 24·N·D² for the qkv/proj/MLP GEMMs and 4·N²·D for QKᵀ and PV. A
training step is 3× the forward (backward = 2× forward); attention's recomputation inside a fused backward is not
model FLOPs. MGP: patch projection on all L patches, the encoder on 1 + keep tokens (visible only), the decoder
embedding, 8 decoder blocks and the pixel predictor on 1 + L tokens. BFT: patch projection, the blocks on 1 + L
tokens, the head. ``tests/fastlivt/models/test_cost.py`` checks these against ``torch.utils.flop_counter.FlopCounterMode``.

Memory (an estimate, bf16 autocast, flash/memory-efficient attention, no activation checkpointing): what autograd
keeps per token and block, in bytes — the fp32 LayerNorm inputs (2 × 4·D), the bf16 inputs of qkv, proj, fc1 and fc2
(2·D + 2·D + 2·D + 8·D), q/k/v and the attention output (6·D + 2·D), the GELU input (8·D): 38·D bytes — plus per
parameter 4 (fp32 weight) + 4 (grad) + 8 (AdamW moments) + 2 (autocast's bf16 weight copy) bytes.
``scripts/gpu_check.sh`` measures the real peak (``torch.cuda.max_memory_allocated``) of the same steps; the README
compares the two. The estimate leaves out the backward's transient buffers, which grow with tokens per image: it is
close for short sequences and low for long ones, so size long-sequence configs from measurements.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch

from fastlivt.models.vit import arch_spec

ACT_BYTES_PER_TOKEN_DIM = 38  # per block, see the module docstring
PARAM_STATE_BYTES = 18  # fp32 weight + grad + two AdamW moments + bf16 copy


def block_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of ``depth`` pre-norm blocks on ``tokens`` tokens: (8 + 4·mlp_ratio)·N·D²·... = 24·N·D² + 4·N²·D."""
    gemm = 2 * tokens * dim * dim * (4 + 2 * mlp_ratio)
    return float(depth * (gemm + 4 * tokens * tokens * dim))


@dataclass
class StepCost:
    """Per image: ``forward_flops``, ``train_flops`` (3× forward), ``activation_bytes`` (estimate) and ``params``."""

    forward_flops: float
    activation_bytes: float
    params: int

    @property
    def train_flops(self) -> float:
        return 3.0 * self.forward_flops

    def memory_gb(self, batch: int) -> float:
        """Estimated peak of a training step at micro-batch ``batch``: activations + parameter/optimizer state."""
        return (batch * self.activation_bytes + PARAM_STATE_BYTES * self.params) / 1e9


def vit_params(tokens: int, dim: int, depth: int, patch_dim: int, mlp_ratio: float = 4.0) -> int:
    per_block = int(dim * dim * (4 + 2 * mlp_ratio) + dim * (9 + mlp_ratio))  # weights + biases + 2 LayerNorms
    return depth * per_block + patch_dim * dim + dim + tokens * dim + 2 * dim


def mgp_cost(arch: str = "vit_base", img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
             mask_ratio: float = 0.75, decoder_dim: int = 512, decoder_depth: int = 8, embed_dim: int = 0,
             depth: int = 0, num_heads: int = 0) -> StepCost:
    """Cost of one MGP image (encoder on the visible tokens only, decoder on all)."""
    spec = arch_spec(arch, embed_dim, depth, num_heads)
    d, n_blocks = spec["embed_dim"], spec["depth"]
    length = (img_size // patch_size) ** 2
    keep = int(length * (1 - mask_ratio))
    patch_dim = patch_size * patch_size * in_chans
    flops = (2.0 * length * patch_dim * d + block_flops(1 + keep, d, n_blocks) + 2.0 * (1 + keep) * d * decoder_dim
             + block_flops(1 + length, decoder_dim, decoder_depth) + 2.0 * (1 + length) * decoder_dim * patch_dim)
    act = ACT_BYTES_PER_TOKEN_DIM * ((1 + keep) * d * n_blocks + (1 + length) * decoder_dim * decoder_depth)
    act += (1 + length) * (4 * decoder_dim + 4 * patch_dim) + 4 * length * patch_dim * 2  # head, pred, target
    params = (vit_params(1 + length, d, n_blocks, patch_dim) + vit_params(1 + length, decoder_dim, decoder_depth, 0)
              + d * decoder_dim + decoder_dim * patch_dim)
    return StepCost(flops, float(act), params)


def bft_cost(arch: str = "vit_base", img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
             num_classes: int = 1000, embed_dim: int = 0, depth: int = 0, num_heads: int = 0,
             checkpointing: bool = False) -> StepCost:
    """Cost of one BFT image (the classifier on 1 + L tokens, forward + backward). With activation ``checkpointing``
    autograd keeps each block's bf16 input (2·D bytes per token) plus one block's activations while it recomputes."""
    spec = arch_spec(arch, embed_dim, depth, num_heads)
    d, n_blocks = spec["embed_dim"], spec["depth"]
    length = (img_size // patch_size) ** 2
    patch_dim = patch_size * patch_size * in_chans
    flops = 2.0 * length * patch_dim * d + block_flops(1 + length, d, n_blocks) + 2.0 * d * num_classes
    per_block = ACT_BYTES_PER_TOKEN_DIM * (1 + length) * d
    act = (2 * (1 + length) * d * n_blocks + per_block if checkpointing else per_block * n_blocks) + 4 * length * patch_dim
    params = vit_params(1 + length, d, n_blocks, patch_dim) + d * num_classes + num_classes
    return StepCost(flops, float(act), params)


def cost_from_config(cfg: Any, stage: str, num_classes: int = 0) -> StepCost:
    """:class:`StepCost` of the model a :class:`fastlivt.config.TrainConfig` trains (``stage``: mgp | bft)."""
    m = cfg.model
    common: Dict[str, Any] = dict(arch=m.arch, img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans,
                                  embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads)
    if stage == "mgp":
        return mgp_cost(mask_ratio=m.mask_ratio, decoder_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
                        **common)
    return bft_cost(num_classes=m.num_classes or num_classes, checkpointing=m.grad_checkpointing, **common)


_PEAKS: Dict[Tuple[str, torch.dtype], float] = {}


def gemm_peak_size(device: torch.device) -> Tuple[int, int]:
    """(n, repeats) of the n³ GEMM that :func:`gemm_peak_flops` times on ``device``."""
    return (8192, 10) if device.type == "cuda" else (1024, 5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The best dense GEMM rate (FLOP/s) of ``device`` in ``dtype``, measured here once per process: the MFU
    denominator, so that MFU compares against what this device really reaches in this run (a CPU row is a ratio too).
    CUDA: 8192³ (16 384³ is no faster on H100/H200); CPU: 1024³."""
    key = (str(device), dtype)
    if key not in _PEAKS:
        n, repeats = gemm_peak_size(device)
        g = torch.Generator(device=device).manual_seed(0)  # private: the global RNG streams stay untouched
        a = torch.randn(n, n, device=device, generator=g).to(dtype)
        b = torch.randn(n, n, device=device, generator=g).to(dtype)
        for _ in range(2):
            a @ b
        _sync(device)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        _PEAKS[key] = 2.0 * n ** 3 / best
        del a, b
    return _PEAKS[key]


__all__ = ["StepCost", "block_flops", "bft_cost", "cost_from_config", "gemm_peak_flops", "gemm_peak_size", "mgp_cost"]

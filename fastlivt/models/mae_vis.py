"""MGP reconstructions for the eye: original | masked | reconstructed, one row per image (written by ``pretrain``)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from fastlivt.models.mae import MaskedAutoencoderViT


@torch.no_grad()
def reconstruction_grid(model: MaskedAutoencoderViT, imgs: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                        mask_ratio: float = 0.75, max_images: int = 8, seed: int = 0) -> np.ndarray:
    """uint8 [rows·H, 3·W, 3] image: per sample, original | masked (removed patches grey) | reconstruction.

    ``imgs`` are normalised with ``mean``/``std``; the reconstruction shows the visible patches as they are and the
    predicted ones (de-normalised with the patch's own statistics under ``norm_pix_loss``, as MAE's demo does). The
    mask comes from a private generator seeded with ``seed``: the global RNG stream is untouched.
    """
    was_training = model.training
    model.eval()
    try:
        imgs = imgs[:max_images].float()
        n = imgs.shape[0]
        noise = torch.rand(n, model.num_patches, generator=torch.Generator().manual_seed(seed)).to(imgs.device)
        weight_dtype = model.patch_embed.proj.weight.dtype  # bf16 under DeepSpeed bf16
        latent, mask, ids_restore = model.forward_encoder(imgs.to(weight_dtype), mask_ratio, noise=noise)
        pred = model.forward_decoder(latent, ids_restore).float()
        mask = mask.float()
    finally:
        model.train(was_training)
    target = model.patchify(imgs)
    if model.norm_pix_loss:
        pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    m = mask.unsqueeze(-1)
    c = imgs.shape[1]
    mean_t = torch.tensor(mean, dtype=torch.float32, device=imgs.device).view(1, c, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=imgs.device).view(1, c, 1, 1)

    def to_pixels(patches: torch.Tensor) -> torch.Tensor:
        return (model.unpatchify(patches) * std_t + mean_t).clamp(0, 1)

    original = to_pixels(target)
    masked = model.unpatchify(model.patchify(original) * (1 - m) + 0.5 * m)
    recon = to_pixels(target * (1 - m) + pred * m)
    row = torch.cat([original, masked, recon], dim=3)  # [n, C, H, 3W]
    if c == 1:
        row = row.expand(-1, 3, -1, -1)
    grid = row.permute(0, 2, 3, 1).reshape(-1, row.shape[3], 3)  # rows stacked vertically
    return (grid * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


__all__ = ["reconstruction_grid"]

"""Masked generative pretraining (MGP) model: MAE's masked autoencoder on timm ViT blocks.

As in MAE (He et al., 2022) and LiVT §4.1: the image is cut into patches; each sample keeps a random
``len_keep = int(L·(1−mask_ratio))`` of them; the encoder adds fixed 2-D sin-cos positions, keeps only the visible
tokens, prepends the class token and runs its blocks on those alone (that is where the speed comes from); a light
decoder re-inserts a shared mask token at the removed positions, adds its own positions, and predicts the p²·C pixel
values of every patch; the loss is the MSE on the removed patches only (optionally against per-patch normalised pixels).

The encoder's parameters carry timm ``VisionTransformer`` names (``patch_embed.*, cls_token, pos_embed, blocks.*,
norm.*``), so :meth:`MaskedAutoencoderViT.encoder_state_dict` is directly what the classifier of balanced fine-tuning
loads (:func:`fastlivt.models.vit.load_encoder`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from timm.layers import LayerNorm
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models._manipulate import checkpoint_seq
from timm.models.vision_transformer import Block
from torch import nn

from fastlivt.data_prep.atomic import atomic_path
from fastlivt.config import ConfigError
from fastlivt.models.attention import attention_layer, check_backend_name
from fastlivt.models.layers import PatchEmbed, compute_dtype
from fastlivt.models.vit import DECODER_PREFIXES, ENCODER_PREFIXES, arch_spec


# --------------------------------------------------------------------------------------------------- pieces
def sincos_pos_embed(embed_dim: int, grid: Tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings [1, (1 +) h·w, D] in MAE's layout (class-token row all zeros).

    timm's ``build_sincos2d_pos_embed`` gives the channel blocks [sin y, sin x, cos y, cos x] (D/4 each, frequencies
    1/10000^(i/(D/4))); MAE orders them [sin x, cos x, sin y, cos y], x = column, y = row of the patch.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    emb = build_sincos2d_pos_embed(list(grid), dim=embed_dim)  # [h·w, D], tokens in row-major order
    sin_y, sin_x, cos_y, cos_x = emb.chunk(4, dim=1)
    emb = torch.cat([sin_x, cos_x, sin_y, cos_y], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, embed_dim), emb], dim=0)
    return emb.unsqueeze(0)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] images → [N, L, p·p·C] patches (row-major patch order; pixels (p, q, channel) inside a patch)."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"patchify: image size {h}x{w} is not a multiple of the patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, in_chans: int = 3,
               grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Inverse of :func:`patchify`: [N, L, p·p·C] → [N, C, H, W] (square grid unless ``grid`` is given)."""
    n, length, _ = x.shape
    p = patch_size
    if grid is None:
        side = int(round(length ** 0.5))
        if side * side != length:
            raise ValueError(f"unpatchify: {length} patches is not a square grid; pass grid=(h, w)")
        grid = (side, side)
    h, w = grid
    x = x.reshape(n, h, w, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, in_chans, h * p, w * p)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise, exactly as MAE.

    x: [N, L, D] tokens. Returns ``x_visible`` [N, len_keep, D] (the tokens of the ``len_keep = int(L·(1−r))``
    smallest noise values, in that order), ``mask`` [N, L] (0 = kept, 1 = removed, in the original order) and
    ``ids_restore`` [N, L] (argsort of the shuffle: gathering the shuffled sequence with it restores the order).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)  # noise in [0, 1]
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_visible, mask, ids_restore


class MaskedPatchMSE(nn.Module):
    """MAE's loss: per-patch MSE between predictions and the (optionally per-patch normalised) pixels of ``imgs``,
    averaged over the removed patches (mask 1). A module of its own so that it is one compiled region: Inductor fuses
    patchify, normalisation, the upcast of bf16 predictions, the square and the masked mean into one pass."""

    def __init__(self, patch_size: int, norm_pix_loss: bool) -> None:
        super().__init__()
        self.patch_size, self.norm_pix_loss = patch_size, norm_pix_loss

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs, self.patch_size).float()
        if self.norm_pix_loss:
            var, mean = torch.var_mean(target, dim=-1, keepdim=True)
            target = (target - mean) * torch.rsqrt(var + 1.0e-6)
        return target

    def forward(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        loss = (pred.float() - self.targets(imgs)).square().mean(dim=-1)  # [N, L], mean loss per patch
        return (loss * mask).sum() / mask.sum()


# --------------------------------------------------------------------------------------------------- model
class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder (timm names) and a light ViT decoder; ``forward(imgs) -> (loss, pred, mask)``."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 attention: str = "auto") -> None:
        super().__init__()
        attn = attention_layer(check_backend_name(attention))
        self.patch_size, self.in_chans, self.norm_pix_loss = patch_size, in_chans, norm_pix_loss
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.grad_checkpointing = False

        # encoder (timm VisionTransformer names)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        grid = tuple(self.patch_embed.grid_size)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, grid), requires_grad=False)  # fixed sin-cos
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm,
                                            attn_layer=attn) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_embed_dim, grid), requires_grad=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, attn_layer=attn)
            for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
        self.loss = MaskedPatchMSE(patch_size, norm_pix_loss)  # no parameters: the state dict is unchanged
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE's init: xavier-uniform linears (patch projection as a linear), N(0, 0.02) tokens, LayerNorm (1, 0)."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "mask_token", "decoder_pos_embed"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _run(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint_seq(blocks, x)
        return blocks(x)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.in_chans, tuple(self.patch_embed.grid_size))

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, visible_only: bool = True,
                        noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed patches, add positions, mask, prepend the class token, run the blocks: (latent, mask, ids_restore).

        ``latent`` is [N, 1 + len_keep, D]. With ``visible_only=False`` the same encoder runs on all L patch tokens
        (latent [N, 1 + L, D], natural order; ``mask`` still says which patches the loss scores) — the baseline that
        measures what running the encoder on visible tokens only saves; it is not a pretraining objective.
        """
        x = self.patch_embed(imgs)
        dtype = compute_dtype(x)  # bf16 under autocast: positions and class token join in it (no fp32 stream)
        x = x.to(dtype) + self.pos_embed[:, 1:, :].to(dtype)
        x_visible, mask, ids_restore = random_masking(x, mask_ratio, noise)
        if visible_only:
            x = x_visible
        cls = (self.cls_token + self.pos_embed[:, :1, :]).to(dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = self._run(self.blocks, x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Re-insert mask tokens at the removed positions, add positions, decode: [N, L, p·p·C] predictions."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        if x.shape[1] - 1 < length:  # visible tokens only: append mask tokens and unshuffle
            mask_tokens = self.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)
            x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
            x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
            x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed.to(x.dtype)  # the decoder's compute dtype (bf16 under autocast)
        x = self.decoder_norm(self._run(self.decoder_blocks, x))
        return self.decoder_pred(x)[:, 1:, :]  # drop the class token

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """Per-patch regression targets [N, L, p·p·C]: pixels, or per-patch normalised pixels (``norm_pix_loss``)."""
        return self.loss.targets(imgs)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches only (mask 1)."""
        return self.loss(imgs, pred, mask)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, visible_only: bool = True
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, visible_only)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p·p·C]
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    def encoder_state_dict(self) -> Dict[str, torch.Tensor]:
        """The encoder's tensors under timm ``VisionTransformer`` names: what balanced fine-tuning loads."""
        return encoder_tensors(self.state_dict())

    def export_metadata(self) -> Dict[str, str]:
        return {"format": "fastlivt-mgp-encoder", "embed_dim": str(self.embed_dim), "depth": str(self.depth),
                "num_heads": str(self.num_heads), "patch_size": str(self.patch_size),
                "img_size": str(self.patch_embed.img_size[0]), "in_chans": str(self.in_chans)}


# --------------------------------------------------------------------------------------------------- export
def encoder_tensors(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The encoder entries of a full MAE state dict (``module.`` prefixes stripped), detached and contiguous."""
    out = {}
    for k, v in state.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith(ENCODER_PREFIXES) and not k.startswith(DECODER_PREFIXES):
            out[k] = v.detach().contiguous()
    if "pos_embed" not in out or not any(k.startswith("blocks.") for k in out):
        raise ValueError(f"not an MAE/ViT state dict: no pos_embed/blocks among {sorted(state)[:8]} ...")
    return out


def save_encoder(source: Union[MaskedAutoencoderViT, Mapping[str, torch.Tensor]], path: Union[str, Path],
                 metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write the encoder export (safetensors, fp32 on CPU) atomically: temp file in the same folder, then rename."""
    from safetensors.torch import save_file

    path = Path(path)
    if isinstance(source, MaskedAutoencoderViT):
        tensors, meta = source.encoder_state_dict(), source.export_metadata()
    else:
        tensors, meta = encoder_tensors(source), {"format": "fastlivt-mgp-encoder"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tensors = {k: v.to("cpu", torch.float32).clone() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def build_mae(model_cfg: Any) -> MaskedAutoencoderViT:
    """:class:`MaskedAutoencoderViT` from a :class:`fastlivt.config.ModelConfig`."""
    spec = arch_spec(model_cfg.arch, model_cfg.embed_dim, model_cfg.depth, model_cfg.num_heads)
    if model_cfg.img_size % model_cfg.patch_size:
        raise ConfigError(f"model.img_size {model_cfg.img_size} is not a multiple of model.patch_size "
                         f"{model_cfg.patch_size}")
    model = MaskedAutoencoderViT(
        img_size=model_cfg.img_size, patch_size=model_cfg.patch_size, in_chans=model_cfg.in_chans,
        decoder_embed_dim=model_cfg.decoder_embed_dim, decoder_depth=model_cfg.decoder_depth,
        decoder_num_heads=model_cfg.decoder_num_heads, norm_pix_loss=model_cfg.norm_pix_loss,
        attention=model_cfg.attention, **spec)
    if model_cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


__all__ = ["MaskedAutoencoderViT", "MaskedPatchMSE", "build_mae", "encoder_tensors", "patchify", "random_masking",
           "save_encoder", "sincos_pos_embed", "unpatchify"]

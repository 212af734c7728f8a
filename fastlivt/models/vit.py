"""The ViT classifier of balanced fine-tuning: timm's ``VisionTransformer`` with global average pooling + ``fc_norm``.

It is timm's class itself (``group_matcher`` for layer-wise lr decay, ``set_grad_checkpointing``, ``no_weight_decay``
all intact), built with :mod:`fastlivt.models.attention` as its attention so the backend choice is ours. The MGP encoder
(:class:`fastlivt.models.mae.MaskedAutoencoderViT`) uses the same parameter names, so its export loads here with
:func:`load_encoder`; only the classifier's ``head``/``fc_norm`` are new (and the encoder's final ``norm``, which
average pooling replaces by ``fc_norm``, is left out — as in MAE/LiVT fine-tuning).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fastlivt.config import ConfigError
from fastlivt.logs import get_logger
from fastlivt.models.attention import attention_layer, check_backend_name
from fastlivt.models.layers import PatchEmbed, compute_dtype

log = get_logger(__name__)

# width / depth / heads of the standard sizes (ViT paper; DeiT for tiny and small)
ARCHS: Dict[str, Dict[str, int]] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}
# keys of the encoder export (MGP) that the classifier shares
ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.")
# keys of a full MAE state dict that are not the encoder (ignored when loading one into the classifier)
DECODER_PREFIXES = ("decoder_", "mask_token")


def arch_spec(arch: str, embed_dim: int = 0, depth: int = 0, num_heads: int = 0) -> Dict[str, int]:
    """Width/depth/heads of ``arch`` (``vit_tiny`` or ``tiny`` etc.), each overridden by a non-zero argument."""
    key = arch if arch.startswith("vit_") else f"vit_{arch}"
    if key not in ARCHS:
        raise ConfigError(f"model.arch {arch!r} is unknown; choose one of {', '.join(ARCHS)}")
    spec = dict(ARCHS[key])
    for name, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
        if value:
            spec[name] = int(value)
    if spec["embed_dim"] % spec["num_heads"]:
        raise ValueError(f"embed_dim {spec['embed_dim']} is not divisible by num_heads {spec['num_heads']}")
    return spec


class ViTClassifier(VisionTransformer):
    """timm's ``VisionTransformer`` whose class token and positions are added in the compute dtype: under bf16
    autocast the residual stream stays bf16 (timm adds the fp32 parameters, which promotes the stream to fp32)."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_size or self.no_embed_class or self.pos_embed is None:
            return super()._pos_embed(x)
        dtype = compute_dtype(x)
        prefix = [t.to(dtype).expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        x = torch.cat(prefix + [x.to(dtype)], dim=1) if prefix else x.to(dtype)
        return self.pos_drop(x + self.pos_embed.to(dtype))


def build_vit(arch: str, img_size: int = 224, patch_size: int = 16, num_classes: int = 1000, global_pool: str = "avg",
              drop_path: float = 0.0, attention: str = "auto", in_chans: int = 3, embed_dim: int = 0, depth: int = 0,
              num_heads: int = 0) -> VisionTransformer:
    """timm ``VisionTransformer`` for classification as in MAE/LiVT fine-tuning.

    ``global_pool="avg"`` averages the patch tokens and applies ``fc_norm`` (no final ``norm``); ``"token"`` uses the
    class token after ``norm``. The head is initialised with trunc_normal(std=2e-5), bias 0. Construct under
    ``with torch.device("meta"):`` to get shapes and parameter counts without memory.
    """
    if global_pool not in ("avg", "token"):
        raise ConfigError(f"model.global_pool must be 'avg' or 'token', got {global_pool!r}")
    if img_size % patch_size:
        raise ConfigError(f"model.img_size {img_size} is not a multiple of model.patch_size {patch_size}")
    spec = arch_spec(arch, embed_dim, depth, num_heads)
    model = ViTClassifier(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes, global_pool=global_pool,
        mlp_ratio=4.0, qkv_bias=True, drop_path_rate=drop_path,
        attn_layer=attention_layer(check_backend_name(attention)), embed_layer=PatchEmbed,
        **spec)
    if num_classes > 0:
        trunc_normal_(model.head.weight, std=2e-5)
        nn.init.zeros_(model.head.bias)
    return model


def build_vit_from_config(model_cfg: Any, num_classes: int) -> VisionTransformer:
    """:func:`build_vit` from a :class:`fastlivt.config.ModelConfig` (``num_classes`` from the manifest if it is 0)."""
    n = model_cfg.num_classes or num_classes
    if n <= 0:
        raise ConfigError(f"model.num_classes must be > 0 (got config {model_cfg.num_classes}, manifest {num_classes})")
    model = build_vit(model_cfg.arch, img_size=model_cfg.img_size, patch_size=model_cfg.patch_size, num_classes=n,
                      global_pool=model_cfg.global_pool, drop_path=model_cfg.drop_path, attention=model_cfg.attention,
                      in_chans=model_cfg.in_chans, embed_dim=model_cfg.embed_dim, depth=model_cfg.depth,
                      num_heads=model_cfg.num_heads)
    if model_cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on meta tensors)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def interpolate_pos_embed(pos_embed: torch.Tensor, new_grid: Union[int, Sequence[int]], num_prefix_tokens: int = 1,
                          old_grid: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Resample absolute position embeddings [1, prefix + h·w, D] to a new patch grid (bicubic, timm's resampler).

    The class-token entry is kept as is; the h×w grid (square unless ``old_grid`` says otherwise) is resized, e.g.
    14×14 (224 px, patch 16) → 24×24 (384 px).
    """
    new_grid = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"pos_embed holds {n} grid positions, not a square; pass old_grid")
        old_grid = (side, side)
    return resample_abs_pos_embed(pos_embed, new_size=list(new_grid), old_size=list(old_grid),
                                  num_prefix_tokens=num_prefix_tokens)


class EncoderLoadError(ValueError):
    """An encoder export does not fit the classifier (missing/unexpected keys or wrong shapes)."""


@dataclass
class LoadReport:
    """What :func:`load_encoder` did: ``loaded`` keys, ``missing`` (new in the classifier), ``unexpected`` (in the file
    but not the classifier, dropped), ``ignored`` (MAE decoder keys), ``interpolated`` (pos-embed grid change)."""

    source: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    interpolated: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = None

    def summary(self) -> str:
        s = f"{self.source}: loaded {len(self.loaded)} tensors; new in the classifier: {self.missing or 'none'}"
        if self.unexpected:
            s += f"; not used by the classifier: {self.unexpected}"
        if self.ignored:
            s += f"; ignored {len(self.ignored)} MAE decoder tensors"
        if self.interpolated:
            s += f"; pos_embed grid {self.interpolated[0]} -> {self.interpolated[1]}"
        return s


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch checkpoint (its ``model``/``state_dict`` entry if any)."""
    path = Path(path)
    if not path.is_file():
        raise EncoderLoadError(f"encoder file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise EncoderLoadError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def load_encoder(model: VisionTransformer, source: Union[str, Path, Mapping[str, torch.Tensor]]) -> LoadReport:
    """Load an MGP encoder export (``patch_embed.*, cls_token, pos_embed, blocks.*, norm.*``) into a classifier.

    Allowed differences: the classifier's ``head.*`` and ``fc_norm.*`` are new (missing); the encoder's ``norm.*`` is
    not used when the classifier has ``fc_norm`` instead; MAE decoder keys are ignored; ``pos_embed`` is interpolated
    to the classifier's patch grid. Any other missing or unexpected key, or a shape mismatch, is an
    :class:`EncoderLoadError` naming the keys.
    """
    name = str(source) if not isinstance(source, Mapping) else "state dict"
    state = dict(read_state_dict(source) if not isinstance(source, Mapping) else source)
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    report = LoadReport(source=name)
    report.ignored = sorted(k for k in state if k.startswith(DECODER_PREFIXES))
    for k in report.ignored:
        del state[k]
    own = model.state_dict()
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        new_grid = tuple(model.patch_embed.grid_size)
        pe = state["pos_embed"]
        n = pe.shape[1] - model.num_prefix_tokens
        side = math.isqrt(n)
        state["pos_embed"] = interpolate_pos_embed(pe, new_grid, model.num_prefix_tokens)
        report.interpolated = ((side, side), new_grid)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    report.missing = missing
    report.unexpected = unexpected
    bad_missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
    bad_unexpected = [k for k in unexpected if not (k.startswith("norm.") and isinstance(model.norm, nn.Identity))]
    if bad_missing or bad_unexpected:
        raise EncoderLoadError(f"{name} does not fit the classifier: missing {bad_missing}, "
                               f"unexpected {bad_unexpected}")
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in state if k in own and state[k].shape != own[k].shape]
    if wrong:
        raise EncoderLoadError(f"{name}: shape mismatch: {'; '.join(wrong)}")
    usable = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    log.info("load_encoder %s", report.summary())
    return report


__all__ = ["ARCHS", "EncoderLoadError", "LoadReport", "ViTClassifier", "arch_spec", "build_vit", "build_vit_from_config",
           "count_params", "interpolate_pos_embed", "load_encoder", "read_state_dict"]

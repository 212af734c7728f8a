"""Models of both stages: the MGP masked autoencoder (:mod:`.mae`), the BFT classifier (:mod:`.vit`), and the
attention backends they share (:mod:`.attention`)."""
from fastlivt.models.attention import attend, attention_layer, resolve_backend, set_attention_backend
from fastlivt.models.mae import MaskedAutoencoderViT, build_mae, random_masking, save_encoder
from fastlivt.models.mae_vis import reconstruction_grid
from fastlivt.models.vit import (ARCHS, build_vit, build_vit_from_config, count_params, interpolate_pos_embed,
                                 load_encoder)

__all__ = ["ARCHS", "MaskedAutoencoderViT", "attend", "attention_layer", "build_mae", "build_vit",
           "build_vit_from_config", "count_params", "interpolate_pos_embed", "load_encoder", "random_masking",
           "reconstruction_grid", "resolve_backend", "save_encoder", "set_attention_backend"]

"""BFT classifier: sizes, meta construction, MGP export → classifier, position-embedding interpolation."""
import numpy as np
import pytest
import torch
from timm.optim import param_groups_layer_decay

from fastlivt.config import ModelConfig
from fastlivt.models.mae import MaskedAutoencoderViT, save_encoder
from fastlivt.models.vit import (EncoderLoadError, build_vit, build_vit_from_config, count_params,
                                 interpolate_pos_embed, load_encoder)


def vit_param_formula(dim, depth, patch, img, classes, in_chans=3):
    """Parameters of a ViT with class token, learned positions, avg pool + fc_norm, linear head (by hand)."""
    tokens = (img // patch) ** 2 + 1
    norms = 2 * 2 * dim
    block = norms + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim)
    stem = (in_chans * patch * patch * dim + dim) + dim + tokens * dim  # patch projection, class token, positions
    return stem + depth * block + 2 * dim + dim * classes + classes


def test_vit_large_384_on_meta():
    with torch.device("meta"):
        model = build_vit("vit_large", img_size=384, patch_size=16, num_classes=1000)
    assert model.pos_embed.is_meta
    n = count_params(model)
    assert n == vit_param_formula(1024, 24, 16, 384, 1000)
    assert 303e6 < n < 306e6  # "ViT-L ~304M"


@pytest.mark.parametrize("arch, dim, depth, heads", [("vit_tiny", 192, 12, 3), ("small", 384, 12, 6),
                                                     ("vit_base", 768, 12, 12)])
def test_arch_sizes(arch, dim, depth, heads):
    with torch.device("meta"):
        model = build_vit(arch, img_size=224, patch_size=16, num_classes=10)
    assert model.embed_dim == dim and len(model.blocks) == depth and model.blocks[0].attn.num_heads == heads
    assert count_params(model) == vit_param_formula(dim, depth, 16, 224, 10)


def test_classifier_head_pool_and_layer_decay_groups():
    torch.manual_seed(0)
    model = build_vit("vit_tiny", img_size=32, patch_size=4, num_classes=7, depth=3, attention="math")
    assert isinstance(model.norm, torch.nn.Identity) and model.fc_norm.weight.shape == (192,)  # avg pool + fc_norm
    assert model.head.weight.std().item() < 1e-4 and torch.all(model.head.bias == 0)  # trunc_normal(2e-5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({round(g["lr_scale"], 6) for g in groups})
    assert scales == sorted(round(0.75 ** (4 - i), 6) for i in range(5))  # stem, 3 blocks, head: ld**(L+1-i)
    with pytest.raises(ValueError, match="vit_huge"):
        build_vit("vit_huge")
    with pytest.raises(ValueError, match="global_pool"):
        build_vit("vit_tiny", global_pool="max")


def test_build_from_config():
    cfg = ModelConfig(arch="vit_small", img_size=32, patch_size=4, depth=2, drop_path=0.1, attention="sdpa",
                      grad_checkpointing=True)
    model = build_vit_from_config(cfg, num_classes=10)
    assert model.num_classes == 10 and len(model.blocks) == 2 and model.grad_checkpointing
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    with pytest.raises(ValueError, match="num_classes"):
        build_vit_from_config(cfg, num_classes=0)


@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(0)
    return MaskedAutoencoderViT(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32,
                                decoder_depth=1, decoder_num_heads=4, attention="sdpa").eval()


def test_mgp_export_loads_into_classifier(mae, tmp_path):
    path = save_encoder(mae, tmp_path / "encoder.safetensors")
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temp file left
    model = build_vit("vit_tiny", img_size=32, patch_size=4, num_classes=5, embed_dim=48, depth=2, num_heads=3)
    report = load_encoder(model, path)
    assert report.missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report.unexpected == ["norm.bias", "norm.weight"]  # replaced by fc_norm under average pooling
    assert report.interpolated is None
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, mae.blocks[1].attn.qkv.weight)
    torch.testing.assert_close(model.pos_embed, mae.pos_embed)
    assert model.pos_embed.requires_grad  # learned from here on, as in MAE fine-tuning

    # the same encoder computes the same thing: class-token features with no patch removed (mask 0 only reorders)
    tok = build_vit("vit_tiny", img_size=32, patch_size=4, num_classes=5, embed_dim=48, depth=2, num_heads=3,
                    global_pool="token").eval()
    report = load_encoder(tok, mae.encoder_state_dict())
    assert report.missing == ["head.bias", "head.weight"] and report.unexpected == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        latent, _, _ = mae.forward_encoder(x, mask_ratio=0.0)
        torch.testing.assert_close(tok.forward_features(x)[:, 0], latent[:, 0], atol=1e-5, rtol=1e-5)


def test_full_mae_state_dict_loads_with_decoder_ignored(mae):
    model = build_vit("vit_tiny", img_size=32, patch_size=4, num_classes=5, embed_dim=48, depth=2, num_heads=3)
    state = {"module." + k: v for k, v in mae.state_dict().items()}  # a DDP-wrapped full checkpoint
    report = load_encoder(model, state)
    assert report.ignored and all(k.startswith(("decoder_", "mask_token")) for k in report.ignored)


def test_export_that_does_not_fit_is_an_error(mae, tmp_path):
    model = build_vit("vit_tiny", img_size=32, patch_size=4, num_classes=5, embed_dim=48, depth=2, num_heads=3)
    state = mae.encoder_state_dict()
    del state["blocks.0.attn.qkv.weight"]
    with pytest.raises(EncoderLoadError, match=r"blocks\.0\.attn\.qkv\.weight"):
        load_encoder(model, state)
    deeper = build_vit("vit_tiny", img_size=32, patch_size=4, num_classes=5, embed_dim=48, depth=3, num_heads=3)
    with pytest.raises(EncoderLoadError, match=r"blocks\.2\."):
        load_encoder(deeper, mae.encoder_state_dict())
    wider = build_vit("vit_tiny", img_size=32, patch_size=4, num_classes=5, embed_dim=96, depth=2, num_heads=3)
    with pytest.raises(EncoderLoadError, match="shape mismatch"):
        load_encoder(wider, mae.encoder_state_dict())
    with pytest.raises(EncoderLoadError, match="not found"):
        load_encoder(model, tmp_path / "missing.safetensors")


def smooth(ys, xs):
    y, x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([np.sin(np.pi * x) * np.cos(0.5 * np.pi * y), x * y, np.cos(np.pi * (x - y))], -1)


def test_pos_embed_interpolation_keeps_the_grid():
    old, new = 14, 24  # 224 px -> 384 px at patch 16
    centres = lambda n: (np.arange(n) + 0.5) / n  # noqa: E731  patch centres in [0, 1]
    grid = smooth(centres(old), centres(old)).reshape(old * old, 3)
    cls = np.array([[7.0, -3.0, 0.5]])
    pe = torch.tensor(np.concatenate([cls, grid])[None], dtype=torch.float32)
    out = interpolate_pos_embed(pe, 24)
    assert out.shape == (1, 1 + new * new, 3)
    np.testing.assert_allclose(out[0, 0].numpy(), cls[0])  # class-token entry untouched
    expected = smooth(centres(new), centres(new))
    got = out[0, 1:].numpy().reshape(new, new, 3)  # row-major grid, rows = y
    err = np.abs(got - expected)
    assert err[2:-2, 2:-2].max() < 2e-3  # interior: the same smooth function sampled at the new patch centres
    assert err.max() < 0.05  # border rows: bicubic extrapolation, still close
    assert np.abs(got - expected.transpose(1, 0, 2)).max() > 0.5  # a transposed grid would be caught
    corners = np.linspace(0, 1, new)
    assert np.abs(got - smooth(corners, corners)).max() > 0.08  # so would a corner-aligned (shifted) grid
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.zeros(1, 1 + 12, 3), 4)


def test_export_at_32px_loads_into_a_48px_classifier(mae):
    model = build_vit("vit_tiny", img_size=48, patch_size=4, num_classes=5, embed_dim=48, depth=2, num_heads=3)
    report = load_encoder(model, mae.encoder_state_dict())
    assert report.interpolated == ((8, 8), (12, 12))
    assert model.pos_embed.shape == (1, 1 + 144, 48)
    torch.testing.assert_close(model.pos_embed[:, 0], mae.pos_embed[:, 0])
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)


def test_patch_embed_keeps_timm_keys_and_runs_fp32_under_cpu_autocast():
    from timm.layers import PatchEmbed as TimmPatchEmbed

    from fastlivt.models.layers import PatchEmbed

    torch.manual_seed(0)
    ours, timms = PatchEmbed(32, 4, 3, 16), TimmPatchEmbed(32, 4, 3, 16)
    assert ours.load_state_dict(timms.state_dict()) is not None and set(ours.state_dict()) == set(timms.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), timms(x), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ours, y_timm = ours(x), timms(x)
    assert y_timm.dtype == torch.bfloat16 and y_ours.dtype == torch.float32
    torch.testing.assert_close(y_ours, timms(x), rtol=0, atol=0)  # the fp32 result exactly
    model = build_vit("vit_tiny", img_size=32, patch_size=4, num_classes=3)
    assert isinstance(model.patch_embed, PatchEmbed)

"""MGP model: MAE masking, visible-only encoder, masked-only loss, positions, reconstruction grid, a real-data fit."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from fastlivt.config import ModelConfig
from fastlivt.models.mae import MaskedAutoencoderViT, build_mae, patchify, random_masking, sincos_pos_embed, unpatchify
from fastlivt.models.mae_vis import reconstruction_grid

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def tiny_mae(**kw) -> MaskedAutoencoderViT:
    args = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32,
                decoder_depth=1, decoder_num_heads=4, attention="sdpa")
    args.update(kw)
    return MaskedAutoencoderViT(**args)


@pytest.mark.parametrize("length, ratio", [(49, 0.75), (50, 0.75), (196, 0.75), (64, 0.6)])
def test_random_masking_invariants(length, ratio):
    torch.manual_seed(0)
    n, d = 6, 5
    len_keep = int(length * (1 - ratio))  # MAE's formula, truncation included (50 -> 12)
    # token j of sample i carries the value i*1000 + j in every channel, so positions can be read back
    x = (torch.arange(n)[:, None] * 1000 + torch.arange(length)[None, :]).float()[..., None].expand(n, length, d)
    x_vis, mask, ids_restore = random_masking(x, ratio)
    assert x_vis.shape == (n, len_keep, d)
    assert mask.shape == (n, length) and ids_restore.shape == (n, length)
    assert torch.all(mask.sum(dim=1) == length - len_keep)  # exactly len_keep visible per sample
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for i in range(n):
        kept = (x_vis[i, :, 0] - i * 1000).long()
        assert torch.equal(torch.sort(kept).values, torch.nonzero(mask[i] == 0).flatten())  # visible = mask 0
        assert torch.equal(torch.sort(ids_restore[i]).values, torch.arange(length))  # a permutation
    # ids_restore inverts the shuffle: visible tokens + placeholders, gathered, land back at their own positions
    filler = torch.full((n, length - len_keep, d), -1.0)
    restored = torch.gather(torch.cat([x_vis, filler], 1), 1, ids_restore[..., None].expand(-1, -1, d))
    visible = mask == 0
    assert torch.equal(restored[visible], x[visible])
    assert torch.all(restored[~visible] == -1.0)
    # different samples get different masks
    assert len({tuple(m.tolist()) for m in mask}) == n


def test_masking_follows_the_noise():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    x = torch.arange(4).float().view(1, 4, 1)
    x_vis, mask, ids_restore = random_masking(x, 0.5, noise=noise)
    assert x_vis.flatten().tolist() == [1.0, 3.0]  # two smallest noise values, in ascending-noise order
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert ids_restore.tolist() == [[3, 0, 2, 1]]
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(x, 1.0)


def test_encoder_blocks_see_visible_tokens_only():
    torch.manual_seed(0)
    model = tiny_mae()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    decoder_seen = []
    model.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: decoder_seen.append(args[0].shape[1]))
    imgs = torch.randn(3, 3, 32, 32)
    length = 64
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    assert seen == [int(length * 0.25) + 1]  # len_keep + class token
    assert decoder_seen == [length + 1]  # the decoder always sees every position
    assert pred.shape == (3, length, 4 * 4 * 3) and torch.isfinite(loss)
    model(imgs, mask_ratio=0.75, visible_only=False)  # the all-tokens baseline of the benchmark
    assert seen[-1] == length + 1 and decoder_seen[-1] == length + 1


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_scores_masked_patches_only(norm_pix):
    torch.manual_seed(0)
    model = tiny_mae(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, pred, mask = model(imgs)
        loss = model.forward_loss(imgs, pred, mask)
        visible = (mask == 0)[..., None]
        assert torch.equal(model.forward_loss(imgs, pred + 5.0 * visible, mask), loss)  # visible: ignored
        assert not torch.allclose(model.forward_loss(imgs, pred + 5.0 * ~visible, mask), loss)  # masked: scored
    # the value, recomputed in float64 numpy from the pixels
    p = imgs.double().numpy().reshape(2, 3, 8, 4, 8, 4).transpose(0, 2, 4, 3, 5, 1).reshape(2, 64, 48)
    if norm_pix:
        p = (p - p.mean(-1, keepdims=True)) / np.sqrt(p.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((pred.double().numpy() - p) ** 2).mean(-1)
    m = mask.double().numpy()
    np.testing.assert_allclose(loss.item(), (per_patch * m).sum() / m.sum(), rtol=1e-5)


def test_patchify_roundtrip_and_layout():
    imgs = torch.randn(2, 3, 8, 12)
    x = patchify(imgs, 4)
    assert x.shape == (2, 6, 48)
    # patch (row 1, col 2) holds pixels [4:8, 8:12] ordered (p, q, channel)
    torch.testing.assert_close(x[1, 1 * 3 + 2], imgs[1, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(unpatchify(x, 4, 3, grid=(2, 3)), imgs)
    with pytest.raises(ValueError, match="multiple"):
        patchify(torch.randn(1, 3, 10, 10), 4)


def mae_numpy_sincos(embed_dim, grid_size):
    """MAE's get_2d_sincos_pos_embed (models_mae/util/pos_embed.py), re-typed in float64 numpy."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64)), 0)
    emb = np.concatenate([one_d(embed_dim // 2, g[0]), one_d(embed_dim // 2, g[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_sincos_positions_match_mae_and_are_fixed():
    ours = sincos_pos_embed(64, (7, 7))
    np.testing.assert_allclose(ours[0].double().numpy(), mae_numpy_sincos(64, 7), atol=1e-5)
    model = tiny_mae()
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    np.testing.assert_allclose(model.pos_embed[0].double().numpy(), mae_numpy_sincos(48, 8), atol=1e-5)


def test_build_mae_from_config_and_reconstruction_grid():
    cfg = ModelConfig(arch="vit_tiny", depth=2, img_size=32, patch_size=4, decoder_embed_dim=64, decoder_depth=1,
                      decoder_num_heads=4, attention="math")
    model = build_mae(cfg)
    assert model.embed_dim == 192 and len(model.blocks) == 2 and model.blocks[0].attn.backend == "math"
    assert model.norm_pix_loss is True  # the config default, as MAE/LiVT pretrain
    imgs = torch.randn(5, 3, 32, 32)
    state = torch.random.get_rng_state()
    model.train()
    grid = reconstruction_grid(model, imgs, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), max_images=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the training RNG stream is untouched
    assert model.training
    assert grid.shape == (4 * 32, 3 * 32, 3) and grid.dtype == np.uint8
    original = np.clip(imgs[:4].numpy() * 0.2 + 0.5, 0, 1).transpose(0, 2, 3, 1).reshape(-1, 32, 3)
    np.testing.assert_allclose(grid[:, :32] / 255.0, original, atol=1 / 255 + 1e-6)
    masked = grid[:, 32:64].reshape(4, 8, 4, 8, 4, 3)  # (image, row, p, col, q, c)
    grey_patches = np.all(masked == 128, axis=(2, 4, 5)).sum()
    assert grey_patches >= 4 * 48  # 48 of 64 patches removed per image
    # visible patches of the reconstruction are the original pixels
    assert (grid[:, 64:] == grid[:, :32]).mean() > 0.25


def load_fmnist(n):
    if not FMNIST.is_file():
        pytest.skip(f"Fashion-MNIST not found at {FMNIST} (apt-get install dataset-fashion-mnist)")
    with gzip.open(FMNIST, "rb") as f:
        raw = f.read(16 + 28 * 28 * n)
    magic, count, rows, cols = np.frombuffer(raw[:16], dtype=">i4")
    assert magic == 2051 and rows == cols == 28
    return np.frombuffer(raw[16:], dtype=np.uint8).reshape(n, 28, 28)


def test_tiny_mae_learns_fashion_mnist():
    images = load_fmnist(64).astype(np.float32) / 255.0
    x = torch.from_numpy(np.pad(images, ((0, 0), (2, 2), (2, 2))))[:, None]  # 32x32, one channel
    x = (x - 0.286) / 0.353
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(img_size=32, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=4,
                                 decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, attention="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    losses = []
    for _ in range(100):
        loss, _, _ = model(x, mask_ratio=0.75)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    predict_zero = (patchify(x, 4) ** 2).mean().item()  # the loss of predicting the dataset mean everywhere
    assert last < 0.5 * first, f"reconstruction loss {first:.3f} -> {last:.3f}"
    assert last < 0.6 * predict_zero, f"final loss {last:.3f} vs {predict_zero:.3f} for predicting the mean"

"""bf16 end to end under autocast (the residual streams stay bf16; numbers within a stated tolerance of fp32) and the
fused AdamW the runtimes train with (fused where torch has it; the same training as the unfused optimizer)."""
from __future__ import annotations

import pytest
import torch

from fastlivt.config import TrainConfig, load_config
from fastlivt.engine.optim import build_adamw, fused_adamw_status, param_groups
from fastlivt.engine.torch_runtime import TorchRuntime
from fastlivt.models.mae import MaskedAutoencoderViT
from fastlivt.models.vit import build_vit

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)
# Stated tolerances of the bf16 path (8 mantissa bits, ~3e-3 relative per rounding, over two blocks):
LOSS_RTOL = 2e-2  # MGP loss relative to fp32
LOGIT_ATOL = 5e-2  # BFT logits, absolute, relative to their spread (std ~1)


def tiny_mae():
    torch.manual_seed(0)
    return MaskedAutoencoderViT(**TINY, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, norm_pix_loss=True)


def stream_dtypes(model, blocks):
    """Record the dtype of the residual stream entering each block in ``blocks``."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype)) for b in blocks]
    return seen, hooks


def test_mgp_residual_streams_are_bf16_and_loss_close_to_fp32():
    model = tiny_mae()
    imgs = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(8, model.num_patches, generator=torch.Generator().manual_seed(2))
    seen, hooks = stream_dtypes(model, list(model.blocks) + list(model.decoder_blocks))
    with torch.no_grad():
        latent, mask, ids = model.forward_encoder(imgs, 0.75, noise=noise)
        ref = model.forward_loss(imgs, model.forward_decoder(latent, ids), mask)
        assert seen == [torch.float32] * 4  # fp32 without autocast
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latent, mask, ids = model.forward_encoder(imgs, 0.75, noise=noise)
            pred = model.forward_decoder(latent, ids)
            loss = model.forward_loss(imgs, pred, mask)
    for h in hooks:
        h.remove()
    # encoder (positions + class token) and decoder (mask token + decoder positions) streams: bf16, never promoted
    assert seen == [torch.bfloat16] * 4
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32  # the loss reduces in fp32
    assert abs(loss.item() - ref.item()) <= LOSS_RTOL * ref.item(), (loss.item(), ref.item())


def test_bft_residual_stream_is_bf16_and_logits_close_to_fp32():
    torch.manual_seed(0)
    model = build_vit("vit_tiny", num_classes=5, **TINY).eval()
    torch.nn.init.normal_(model.head.weight, std=0.05)  # a head that shows differences (the init is std 2e-5)
    imgs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen, hooks = stream_dtypes(model, model.blocks)
    with torch.no_grad():
        ref = model(imgs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(imgs)
    for h in hooks:
        h.remove()
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 2
    scale = ref.std().item()
    assert (out.float() - ref).abs().max().item() <= LOGIT_ATOL * max(scale, 1.0), (out, ref)


def test_bf16_gradients_reach_the_positions_and_tokens_in_fp32():
    model = tiny_mae()
    imgs = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = model(imgs)
    loss.backward()
    for p in (model.cls_token, model.mask_token):
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0


def test_runtime_optimizer_is_fused_where_torch_has_it():
    ok, why = fused_adamw_status("cpu")
    assert ok, why  # torch >= 2.4 has a fused AdamW for CPU tensors
    rt = TorchRuntime(load_config(TrainConfig, None, ["run.device=cpu", "run.compile=off"]))
    model = tiny_mae()
    rt.prepare(model, param_groups(model, 0.05), 1e-3, (0.9, 0.95), 0.05)
    assert rt.optimizer.defaults["fused"] is True


def test_fused_adamw_trains_like_the_foreach_one():
    """Same model, data and layer-decay groups: fused and foreach AdamW reach the same weights (fp32 rounding apart)."""
    results = []
    imgs = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(8) % 5
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_vit("vit_tiny", num_classes=5, **TINY)
        groups = param_groups(model, 0.05, 0.75)
        for g in groups:
            g["lr"] = 1e-3 * g["lr_scale"]
        if fused:
            opt = build_adamw(groups, 1e-3, (0.9, 0.99), 0.05, torch.device("cpu"))
            assert opt.defaults["fused"]
        else:
            opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.05, foreach=True)
        losses = []
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(imgs), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (fused_losses, fused_w), (ref_losses, ref_w) = results
    assert fused_losses == pytest.approx(ref_losses, rel=1e-5)
    for a, b in zip(fused_w, ref_w):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert fused_losses[-1] < fused_losses[0]  # it trains

"""Attention backends: sdpa and math against a float64 reference, timm weight compatibility, explicit-backend errors."""
import logging

import numpy as np
import pytest
import torch
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import VisionTransformer

from fastlivt.models.attention import (Attention, AttentionBackendError, attend, attention_layer, math_attention,
                                       resolve_backend, set_attention_backend, xformers_status)


def reference_attention(q, k, v):
    """softmax(QKᵀ/√d)V in float64 numpy, [B, H, L, d]."""
    q, k, v = (t.detach().double().numpy() for t in (q, k, v))
    logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return p @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["sdpa", "math", "auto"])
def test_backends_match_reference(backend, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g, dtype=dtype) for _ in range(3))
    out = attend(q, k, v, backend=backend)
    assert out.shape == (2, 3, 17, 8) and out.dtype == dtype
    np.testing.assert_allclose(out.double().numpy(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    # the [B, L, heads, d] layout gives the same numbers
    out_blhd = attend(*(t.transpose(1, 2) for t in (q, k, v)), backend=backend, layout="blhd")
    np.testing.assert_allclose(out_blhd.transpose(1, 2).double().numpy(), out.double().numpy(), atol=1e-6)


def test_sdpa_and_math_gradients_agree():
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(2, 4, 13, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    grads = {}
    for backend in ("sdpa", "math"):
        qkv = [t.clone().requires_grad_(True) for t in base]
        (attend(*qkv, backend=backend) ** 2).sum().backward()
        grads[backend] = [t.grad for t in qkv]
    for a, b in zip(grads["sdpa"], grads["math"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_module_keeps_timm_names_and_matches_timm_forward():
    torch.manual_seed(0)
    timm_attn = TimmAttention(32, num_heads=4, qkv_bias=True)
    ours = Attention(32, num_heads=4, qkv_bias=True, backend="math")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in timm_attn.state_dict().items()}
    ours.load_state_dict(timm_attn.state_dict(), strict=True)
    x = torch.randn(3, 11, 32)
    expected = timm_attn(x)
    for backend in ("math", "sdpa"):
        set_attention_backend(ours, backend)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_timm_vit_checkpoint_loads_into_our_blocks():
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5, global_pool="avg")
    timm_vit = VisionTransformer(**kw).eval()
    ours = VisionTransformer(**kw, attn_layer=attention_layer("math")).eval()
    ours.load_state_dict(timm_vit.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), timm_vit(x), atol=1e-5, rtol=1e-5)
    assert set_attention_backend(ours, "sdpa") == 2
    assert all(b.attn.backend == "sdpa" for b in ours.blocks)


def test_backend_resolution_and_errors():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa"
    assert resolve_backend("math", cpu) == "math"
    with pytest.raises(AttentionBackendError, match="CUDA only"):
        resolve_backend("xformers", cpu)
    with pytest.raises(AttentionBackendError, match="xformers"):
        attend(*(torch.randn(1, 1, 4, 8) for _ in range(3)), backend="xformers")
    with pytest.raises(ValueError, match="flash"):
        resolve_backend("flash", cpu)
    with pytest.raises(ValueError, match="flash"):
        attention_layer("flash")


def test_auto_logs_its_choice_once():
    import fastlivt.models.attention as A

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    A.log.addHandler(handler)
    A._resolve.cache_clear()
    A._logged.clear()
    try:
        for _ in range(3):
            resolve_backend("auto", "cpu")
    finally:
        A.log.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert len(messages) == 1 and "sdpa" in messages[0] and "CUDA only" in messages[0]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_xformers_matches_sdpa_on_cuda(dtype, tol):
    dev = torch.device("cuda")
    usable, reason = xformers_status("cuda", torch.cuda.current_device())
    assert resolve_backend("auto", dev) == ("xformers" if usable else "sdpa")  # auto follows the probe
    if not usable:
        with pytest.raises(AttentionBackendError, match="xformers"):
            resolve_backend("xformers", dev)
        pytest.skip(f"xformers cannot run on this GPU machine: {reason}")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(4, 12, 197, 64, device=dev, dtype=dtype, generator=g) for _ in range(3))
    ref = attend(q, k, v, backend="sdpa").float()
    torch.testing.assert_close(attend(q, k, v, backend="xformers").float(), ref, atol=tol, rtol=tol)
    # through the module, with the qkv layout fast path, forward and backward
    torch.manual_seed(0)
    attn = Attention(256, num_heads=4, qkv_bias=True, backend="sdpa").to(dev, dtype)
    x = torch.randn(2, 65, 256, device=dev, dtype=dtype, requires_grad=True)
    y_sdpa = attn(x)
    (gx_sdpa,) = torch.autograd.grad(y_sdpa.float().sum(), x)
    set_attention_backend(attn, "xformers")
    y_x = attn(x)
    (gx_x,) = torch.autograd.grad(y_x.float().sum(), x)
    torch.testing.assert_close(y_x.float(), y_sdpa.float(), atol=tol * 5, rtol=tol * 5)
    torch.testing.assert_close(gx_x.float(), gx_sdpa.float(), atol=tol * 20, rtol=tol * 20)


def test_sdpa_under_cpu_autocast_runs_in_fp32_and_returns_the_input_dtype(monkeypatch):
    import fastlivt.models.attention as attention_module

    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kw):  # what the kernel really gets (bf16 there has a very slow CPU backward)
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", recording_sdpa)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g) for _ in range(3))
    ref = math_attention(q.double(), k.double(), v.double())
    qb, kb, vb = (t.bfloat16().requires_grad_(True) for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(qb, kb, vb, "sdpa")
    assert out.dtype == torch.bfloat16 and seen == [(torch.float32, False)]
    # computed from the bf16-rounded inputs in fp32: only the final rounding to bf16 differs from float64
    ref_b = math_attention(qb.detach().double(), kb.detach().double(), vb.detach().double())
    assert (out.double() - ref_b).abs().max() <= 2 ** -8 * ref_b.abs().max()
    assert (out.double() - ref).abs().max() < 0.05
    out.float().sum().backward()
    assert qb.grad is not None and qb.grad.dtype == torch.bfloat16 and torch.isfinite(qb.grad.float()).all()


def test_auto_under_cpu_autocast_takes_math_and_matches_fp32(monkeypatch):
    import fastlivt.models.attention as attention_module

    calls = []
    monkeypatch.setattr(attention_module, "math_attention",
                        lambda *a, **k: calls.append(a[0].dtype) or math_attention(*a, **k))
    torch.manual_seed(0)
    layer = attention_layer("auto")(32, num_heads=4)
    x = torch.randn(3, 9, 32)
    ref = layer(x)
    assert calls == []  # fp32 on CPU: SDPA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        q = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
        attend(q, q, q, "auto")
    assert calls == [torch.bfloat16, torch.bfloat16] and out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()

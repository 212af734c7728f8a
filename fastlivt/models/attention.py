"""Scaled dot-product attention with a choice of backend, and timm's ViT attention module built on it.

``attend(q, k, v, backend)`` computes softmax(QKᵀ/√d)·V for ``q, k, v`` of shape [B, heads, L, d] (SDPA's layout):

- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only; it wants [B, L, heads, d]);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (CPU and CUDA);
- ``math``: the explicit softmax(QKᵀ/√d)·V, the reference the others are tested against;
- ``auto``: xformers on CUDA when it imports and runs, SDPA otherwise; the choice and its reason are logged once.
  Under CPU autocast (bf16/fp16 inputs on CPU) ``auto`` takes ``math``: PyTorch's CPU SDPA backward is slower in
  reduced precision than in fp32 at small head sizes, while the written-out form runs as bf16 matmuls (the README
  gives the demo's figures). An explicit ``sdpa`` there runs SDPA in fp32.

:class:`Attention` is timm's ``Attention`` (same ``qkv``/``proj`` parameters, names and shapes, so timm checkpoints and
our exports load unchanged) whose core calls :func:`attend`; pass ``attn_layer=attention_layer(backend)`` to timm's
``Block``/``VisionTransformer`` so that MGP and BFT share one choice.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from torch import nn

from fastlivt.logs import get_logger

BACKENDS = ("auto", "xformers", "sdpa", "math")
log = get_logger(__name__)
_logged: set = set()


class AttentionBackendError(RuntimeError):
    """An attention backend was asked for explicitly but cannot run on this device."""


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {', '.join(BACKENDS)}")
    return name


@functools.lru_cache(maxsize=None)
def xformers_status(device_type: str, device_index: Optional[int] = None) -> Tuple[bool, str]:
    """(usable, reason): whether ``xformers.ops.memory_efficient_attention`` runs on this device (probed once)."""
    if device_type != "cuda":
        return False, f"xformers memory_efficient_attention runs on CUDA only (tensors are on {device_type})"
    try:
        import xformers.ops as xops
    except Exception as e:  # ImportError, or a broken build raising anything at import
        return False, f"xformers does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        dev = torch.device(device_type, device_index)
        q = torch.randn(1, 8, 2, 64, device=dev, dtype=torch.float16)  # fp16: every xformers-capable GPU
        xops.memory_efficient_attention(q, q, q)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        reason = f"xformers memory_efficient_attention failed on a probe ({type(e).__name__}: {first})"
        return False, reason + _xformers_build_problem()
    import xformers

    return True, f"xformers {xformers.__version__} memory_efficient_attention runs on {torch.cuda.get_device_name(dev)}"


def _xformers_build_problem() -> str:
    """Why xformers' compiled kernels are missing, when its C++/CUDA extension failed to load (else "")."""
    try:
        from xformers import _cpp_lib
    except Exception:
        return ""
    exc = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    if exc is None:
        return ""
    text = " ".join(str(exc).split())
    cut = text.find("Please reinstall")
    text = text[:cut].strip() if cut > 0 else text[:300]
    cause = f" [{exc.__cause__.__cause__}]" if exc.__cause__ is not None and exc.__cause__.__cause__ else ""
    return f"; its C++/CUDA extension did not load: {text}{cause} — install an xformers build for this torch/CUDA"


def _log_once(key: tuple, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(msg, *args)


@functools.lru_cache(maxsize=None)
def _resolve(name: str, device_type: str, device_index: Optional[int]) -> str:
    check_backend_name(name)
    if name in ("sdpa", "math"):
        return name
    ok, reason = xformers_status(device_type, device_index)
    if name == "xformers":
        if not ok:
            raise AttentionBackendError(f"attention backend 'xformers' was asked for but cannot run: {reason}; "
                                        f"use attention=sdpa (or auto)")
        return "xformers"
    choice = "xformers" if ok else "sdpa"
    _log_once(("auto", device_type, device_index), "attention backend auto -> %s on %s: %s", choice,
              device_type, reason if ok else reason + "; using torch scaled_dot_product_attention")
    return choice


@torch.compiler.assume_constant_result  # torch.compile runs it once while tracing and keeps the answer
def resolve_backend(name: str, device: torch.device | str) -> str:
    """The concrete backend (``xformers | sdpa | math``) that ``name`` means on ``device``.

    ``auto`` picks xformers on CUDA when it imports and runs, SDPA otherwise (logged once with the reason). Asking for
    ``xformers`` where it cannot run raises :class:`AttentionBackendError`; an unknown name raises ``ValueError``.
    """
    device = torch.device(device)
    index = device.index if device.type == "cuda" else None
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _resolve(name, device.type, index)


def _low_precision_cpu(requested: str, chosen: str, q: torch.Tensor) -> str:
    """``auto`` on CPU with bf16/fp16 inputs (CPU autocast) means ``math``; anything else stays ``chosen``."""
    return _low_precision_choice(requested, chosen, q.device.type, q.dtype)


@torch.compiler.assume_constant_result  # a constant of the traced graph (its log line is no graph break)
def _low_precision_choice(requested: str, chosen: str, device_type: str, dtype: torch.dtype) -> str:
    if requested == "auto" and chosen == "sdpa" and device_type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        _log_once(("auto-cpu-low", dtype), "attention backend auto -> math for %s on cpu: PyTorch's CPU SDPA is slow "
                  "in reduced precision", dtype)
        return "math"
    return chosen


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                   scale: Optional[float] = None) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale)·V written out, for [..., L, d] tensors; the softmax runs in float32 at least."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    probs = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto", dropout_p: float = 0.0,
           scale: Optional[float] = None, layout: str = "bhld") -> torch.Tensor:
    """Attention output for queries/keys/values laid out as ``layout``.

    ``layout="bhld"`` (default, SDPA's): tensors and result are [B, heads, L, d]. ``layout="blhd"`` (xformers'):
    [B, L, heads, d] — the layout a fused qkv projection produces without a copy. ``scale`` defaults to 1/√d.
    """
    if layout not in ("bhld", "blhd"):
        raise ValueError(f"attend: layout must be 'bhld' or 'blhd', got {layout!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attend: q, k, v must be 4-D ({layout}), got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    chosen = _low_precision_cpu(backend, resolve_backend(backend, q.device), q)
    if chosen == "xformers":
        import xformers.ops as xops

        if layout == "bhld":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = xops.memory_efficient_attention(q, k, v, p=dropout_p, scale=scale)
        return out.transpose(1, 2) if layout == "bhld" else out
    if layout == "blhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if chosen == "sdpa" and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # CPU autocast: SDPA's reduced-precision CPU backward is slower than fp32's on small heads; run it in fp32
        # (outside autocast, which would cast the inputs back down)
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p, scale=scale)
        out = out.to(q.dtype)
    elif chosen == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    else:
        out = math_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2) if layout == "blhd" else out


class Attention(TimmAttention):
    """timm's multi-head self-attention (``qkv`` → heads → attention → ``proj``) with the core from :func:`attend`.

    ``self.backend`` holds the requested backend name (``auto | xformers | sdpa | math``); it is resolved against the
    input's device at each call (cached), so a model built on CPU and moved to CUDA picks xformers under ``auto``.
    """

    default_backend: str = "auto"

    def __init__(self, dim: int, num_heads: int = 8, *, backend: Optional[str] = None, **kwargs) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.backend = check_backend_name(backend or self.default_backend)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("fastlivt Attention runs full bidirectional self-attention; attn_mask/is_causal are not "
                             "supported")
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        backend = resolve_backend(self.backend, x.device)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if backend == "xformers":  # [B, N, heads, d] straight from the projection: no transpose copies
            q, k, v = qkv.unbind(2)
            q, k = self.q_norm(q), self.k_norm(k)
            out = attend(q, k, v, backend, dropout_p, self.scale, layout="blhd")
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            out = attend(q, k, v, _low_precision_cpu(self.backend, backend, q), dropout_p, self.scale).transpose(1, 2)
        x = self.norm(out.reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


_LAYERS: Dict[str, Type[Attention]] = {}


def attention_layer(backend: str = "auto") -> Type[Attention]:
    """The :class:`Attention` subclass whose instances default to ``backend`` (timm's ``attn_layer`` wants a class)."""
    check_backend_name(backend)
    if backend not in _LAYERS:
        name = f"Attention_{backend}"
        _LAYERS[backend] = type(name, (Attention,), {"default_backend": backend, "__module__": __name__})
        globals()[name] = _LAYERS[backend]  # importable by name (pickling a whole model works)
    return _LAYERS[backend]


def set_attention_backend(model: nn.Module, backend: str) -> int:
    """Switch every :class:`Attention` in ``model`` to ``backend`` (weights untouched); returns how many changed."""
    check_backend_name(backend)
    n = 0
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = backend
            n += 1
    return n


def attention_flops(batch: int, heads: int, length: int, head_dim: int) -> int:
    """Multiply-add FLOPs of one attention forward (QKᵀ and PV): 4·B·H·L²·d."""
    return 4 * batch * heads * length * length * head_dim


__all__ = ["BACKENDS", "Attention", "AttentionBackendError", "attend", "attention_layer", "math_attention",
           "resolve_backend", "set_attention_backend", "xformers_status", "attention_flops"]

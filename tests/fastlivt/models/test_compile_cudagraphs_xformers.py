"""CUDA-graph compile modes are refused until measured on a GPU; xformers' attention stays outside fullgraph blocks;
blocks that differ only in their drop-path rate share one compiled graph.

The xformers half runs on CPU against a stand-in with xformers' calling convention (``xformers.ops.
memory_efficient_attention(q, k, v, p=..., scale=...)`` on [B, N, heads, d] tensors, computed with torch's SDPA), so
the model takes its xformers branch: the blocks are compiled piece by piece, the attention core eager between them,
with no graph break, and the result equals the eager model's.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fastlivt.models.attention as attention_mod
import fastlivt.models.compile as compile_mod
from fastlivt.config import ConfigError
from fastlivt.models.compile import CompileChoice, compile_model, is_compiled, region_paths, resolve_compile
from fastlivt.models.vit import build_vit

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cuda_graph_modes_are_refused_with_the_reason(mode, device):
    with pytest.raises(ConfigError, match=f"run.compile_mode={mode} captures CUDA graphs, which are not yet measured"):
        resolve_compile("on", mode, torch.device(device), error=ConfigError)
    assert resolve_compile("on", "max-autotune-no-cudagraphs", torch.device(device)).mode == "max-autotune-no-cudagraphs"


def test_cli_refuses_reduce_overhead_in_one_line(tmp_path):
    cfg = tmp_path / "bft.yaml"
    cfg.write_text("run:\n  stage: finetune\n")
    proc = subprocess.run([sys.executable, "-m", "fastlivt", "finetune", "--config", str(cfg), "run.device=cpu",
                           "run.compile=on", "run.compile_mode=reduce-overhead", f"run.out={tmp_path / 'run'}",
                           "data.train=/nonexistent", "data.val=/nonexistent"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fastlivt: error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and "reduce-overhead captures CUDA graphs" in lines[0], proc.stderr[-2000:]


def _stand_in_memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
    """xformers' convention: [B, N, heads, d] in and out."""
    assert attn_bias is None and q.dim() == 4
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p,
                                         scale=scale)
    return out.transpose(1, 2)


@pytest.fixture
def xformers_stand_in(monkeypatch):
    calls = []
    ops = types.ModuleType("xformers.ops")

    def memory_efficient_attention(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return _stand_in_memory_efficient_attention(*args, **kwargs)

    ops.memory_efficient_attention = memory_efficient_attention
    package = types.ModuleType("xformers")
    package.ops, package.__version__ = ops, "stand-in"
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(attention_mod, "xformers_status", lambda device_type, device_index=None: (True, "stand-in"))
    attention_mod._resolve.cache_clear()
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    yield calls
    attention_mod._resolve.cache_clear()
    torch._dynamo.reset()


def test_xformers_attention_stays_eager_between_compiled_pieces(xformers_stand_in):
    torch.manual_seed(0)
    eager = build_vit("vit_tiny", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                      attention="xformers").train()
    compiled = build_vit("vit_tiny", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                         attention="xformers").train()
    compiled.load_state_dict(eager.state_dict())
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("fastlivt").addHandler(handler)
    try:
        regions = compile_model(compiled, CompileChoice(True, None, "test"))
    finally:
        logging.getLogger("fastlivt").removeHandler(handler)
    assert "blocks.0" not in regions and "blocks.0.attn.qkv" in regions and "blocks.1.mlp" in regions
    assert not is_compiled(compiled.blocks[0]) and not is_compiled(compiled.blocks[0].attn)
    assert all(is_compiled(compiled.get_submodule(r)) for r in regions)
    assert {"patch_embed", "head"} <= set(regions)
    assert set(region_paths(compiled)) - set(regions) == {"blocks.0", "blocks.1"}
    assert any("attention of 2 blocks" in m and "not been traced" in m for m in messages), messages

    x = torch.randn(3, 3, 16, 16)
    torch.manual_seed(1)
    ref = eager(x)
    ref.sum().backward()
    torch.manual_seed(1)
    out = compiled(x)
    out.sum().backward()
    assert xformers_stand_in and all(s[1:] == (17, 2, 16) for s in xformers_stand_in)  # [B, N, heads, d]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] >= 5


def test_sdpa_blocks_are_still_compiled_whole(monkeypatch):
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    model = build_vit("vit_tiny", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                      attention="sdpa")
    regions = compile_model(model, CompileChoice(True, None, "test"))
    assert {"blocks.0", "blocks.1"} <= set(regions)


def _block_graphs(drop_path: float) -> int:
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build_vit("vit_tiny", img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5,
                      attention="sdpa", drop_path=drop_path).train()
    compile_model(model, CompileChoice(True, None, "test"))
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    assert dict(counters["graph_break"]) == {}
    return counters["stats"]["unique_graphs"]


def test_blocks_with_different_drop_path_rates_share_one_graph(monkeypatch):
    from timm.layers import DropPath

    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    # rates 0, 1/30, 2/30, 0.1: block 0 holds an Identity (one graph of its own), blocks 1-3 one graph between them
    assert _block_graphs(0.1) == _block_graphs(0.0) + 1
    model = build_vit("vit_tiny", img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5,
                      drop_path=0.1)
    keys = set(model.state_dict())
    compile_model(model, CompileChoice(True, None, "test"))
    assert set(model.state_dict()) == keys  # the rate buffer is not persistent
    assert not any(isinstance(m, DropPath) for m in model.modules())
    torch._dynamo.reset()


def test_tensor_rate_drop_path_keeps_timm_statistics():
    from fastlivt.models.compile import TensorRateDropPath

    x = torch.ones(20000, 3)
    torch.manual_seed(0)
    y = TensorRateDropPath(0.25).train()(x)
    kept = (y[:, 0] != 0).float().mean().item()
    assert abs(kept - 0.75) < 0.02 and torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    assert torch.equal(TensorRateDropPath(0.25).eval()(x), x)
    assert torch.equal(TensorRateDropPath(1.0).train()(x), torch.zeros_like(x))

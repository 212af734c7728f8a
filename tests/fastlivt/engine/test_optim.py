"""Parameter groups and the peak learning rate: no weight decay on biases, norms, positions and tokens; MAE's layer
decay; the runtime applies each group's scale."""
from __future__ import annotations

import pytest

from fastlivt.config import TrainConfig
from fastlivt.engine.optim import param_groups, peak_lr
from fastlivt.engine.torch_runtime import TorchRuntime


def _cfg():
    cfg = TrainConfig()
    cfg.run.device = "cpu"
    return cfg


def tiny_vit(depth=3):
    from fastlivt.models.vit import build_vit

    return build_vit("vit_tiny", img_size=16, patch_size=4, num_classes=5, embed_dim=16, depth=depth, num_heads=2)


def test_peak_lr_is_blr_times_effective_batch_over_256():
    assert peak_lr(1.5e-4, None, 64, 16, 4) == pytest.approx(1.5e-4 * 4096 / 256)
    assert peak_lr(1e-3, 5e-3, 64, 16, 4) == 5e-3


def test_no_weight_decay_on_bias_norm_pos_tokens():
    model = tiny_vit()
    groups = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    wd = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert set(wd) == {n for n, p in model.named_parameters() if p.requires_grad}
    for n, d in wd.items():
        exempt = n.endswith(".bias") or "norm" in n or n in ("pos_embed", "cls_token")
        assert d == (0.0 if exempt else 0.05), n
    assert all(g["lr_scale"] == 1.0 for g in groups)


def test_layer_decay_scales_like_mae_param_groups_lrd():
    depth, ld = 3, 0.75
    model = tiny_vit(depth)
    groups = param_groups(model, 0.05, layer_decay=ld)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            # MAE util/lr_decay.py: embeddings are layer 0, blocks.i layer i+1, the rest (fc_norm, head) layer L+1
            if n in ("cls_token", "pos_embed") or n.startswith("patch_embed"):
                layer = 0
            elif n.startswith("blocks."):
                layer = int(n.split(".")[1]) + 1
            else:
                layer = depth + 1
            assert g["lr_scale"] == pytest.approx(ld ** (depth + 1 - layer)), n
            exempt = p.ndim == 1 or n in ("cls_token", "pos_embed")
            assert g["weight_decay"] == (0.0 if exempt else 0.05), n
            seen += 1
    assert seen == sum(1 for _ in model.parameters())
    # set_lr applies the scale on the optimizer that steps
    rt = TorchRuntime(_cfg())
    rt.prepare(model, groups, 1.0, (0.9, 0.99), 0.05)
    rt.set_lr(0.01)
    assert sorted(rt.lrs()) == pytest.approx(sorted(0.01 * g["lr_scale"] for g in groups))

"""One DeepSpeed process (world 1, CPU/gloo) training a tiny MAE with ``run.compile=on`` under ZeRO-2.

Run by tests/fastlivt/models/test_compile.py in a fresh interpreter (DeepSpeed's process group and accelerator are process-wide).
Prints one JSON line: losses, the graph breaks dynamo counted, the compiled regions, whether the optimizer that
DeepSpeed steps is torch's fused AdamW, and which blocks ended up compiled.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

import fastlivt.models.compile as compile_mod  # noqa: E402
from fastlivt.config import TrainConfig  # noqa: E402
from fastlivt.engine.ds_runtime import DeepSpeedRuntime  # noqa: E402
from fastlivt.engine.optim import param_groups  # noqa: E402
from fastlivt.models.mae import MaskedAutoencoderViT  # noqa: E402


def main() -> None:
    compile_mod.BACKEND = sys.argv[1] if len(sys.argv) > 1 else "aot_eager"
    torch.set_num_threads(1)
    cfg = TrainConfig()
    cfg.deepspeed = {"zero_optimization": {"stage": 2}}
    cfg.data.batch_size, cfg.optim.accum_iter = 4, 1
    cfg.run.device, cfg.run.amp, cfg.run.compile = "cpu", "fp32", "on"
    rt = DeepSpeedRuntime(cfg)
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                                 decoder_depth=1, decoder_num_heads=2, norm_pix_loss=True)
    engine = rt.prepare(model, param_groups(model, 0.05), 2e-3, (0.9, 0.95), 0.05)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(4):
        torch.manual_seed(step)  # the same masks every run
        with rt.autocast():
            loss, _, _ = engine(images)
        rt.backward(loss)
        rt.step()
        losses.append(float(loss))
    print(json.dumps({"losses": losses, "graph_breaks": compile_mod.graph_breaks(), "regions": rt.compile.regions,
                      "fused": bool(rt.optimizer.defaults.get("fused")), "zero_stage": rt.zero_stage,
                      "compiled": [compile_mod.is_compiled(b) for b in rt.unwrap().blocks]}))
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown (a native DeepSpeed/gloo thread can abort it)


if __name__ == "__main__":
    main()

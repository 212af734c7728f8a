"""One rank of the 2-process DDP check (run by tests/fastlivt/engine/test_torch_runtime.py under torchrun, gloo on CPU).

Trains a float64 MLP for 3 optimizer steps of 2 accumulated micro-batches through TorchRuntime; the global batch of
each step is 8 fixed samples, rank r taking samples r, r+2, ... Writes rank 0's final weights and, per micro-batch,
whether DDP would all-reduce that backward, to ``argv[1]``.
"""
import sys

import torch
from torch import nn

torch.set_num_threads(1)
from fastlivt.config import TrainConfig  # noqa: E402
from fastlivt.engine.torch_runtime import TorchRuntime  # noqa: E402


def main(out: str) -> None:
    cfg = TrainConfig()
    cfg.run.device, cfg.optim.accum_iter = "cpu", 2
    rt = TorchRuntime(cfg)
    torch.manual_seed(rt.rank)  # different initial weights per rank: DDP must broadcast rank 0's
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).double()
    model = rt.prepare(model, [{"params": list(model.parameters()), "weight_decay": 0.05}], 1e-2, (0.9, 0.95), 0.05)
    g = torch.Generator().manual_seed(1)
    data = torch.randn(3, 8, 6, generator=g, dtype=torch.float64)
    target = torch.randn(3, 8, 3, generator=g, dtype=torch.float64)
    syncs = []
    for s in range(3):
        x, y = data[s, rt.rank::rt.world], target[s, rt.rank::rt.world]  # 4 samples on this rank
        for m in range(2):
            with rt.autocast():
                syncs.append(bool(model.require_backward_grad_sync))
                loss = ((model(x[2 * m:2 * m + 2]) - y[2 * m:2 * m + 2]) ** 2).mean()
            rt.backward(loss)
            rt.step()
    if rt.is_main:
        torch.save({"state": rt.full_state_dict(), "syncs": syncs}, out)
    rt.barrier()


if __name__ == "__main__":
    main(sys.argv[1])

"""Stage 1, masked generative pretraining (MGP; paper §4.1, Alg. 1 lines 1-9): ``fastlivt pretrain --config X``.

The MAE of :mod:`fastlivt.models.mae` (75% of the patches removed per sample, the encoder on the visible 25% only,
MSE on the removed patches against per-patch normalised pixels) trained by the shared loop of
:mod:`fastlivt.engine.loop` with AdamW(0.9, 0.95), lr = blr x effective batch / 256, warmup + cosine per iteration.
Every ``run.vis_every`` epochs a PNG grid of reconstructions is written to ``<run.out>/recon/``; at the end the
encoder alone is exported to ``<run.out>/encoder.safetensors`` (timm ViT names), which BFT loads via ``model.init``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from fastlivt.data_prep.atomic import atomic_path
from fastlivt.config import ConfigError, TrainConfig, to_dict
from fastlivt.engine.run import Run
from fastlivt.logs import get_logger

log = get_logger(__name__)

ENCODER_EXPORT = "encoder.safetensors"


def write_png(array, path: Path) -> Path:
    """Write a uint8 HxWx3 array as PNG via a temporary name."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


class MGPTask:
    """The MGP stage for :func:`fastlivt.engine.loop.train`. Holds ``vis_images`` (the first micro-batch this process
    saw, kept for the reconstruction grids)."""

    name, stage = "mgp", "pretrain"

    def __init__(self) -> None:
        self.vis_images: Optional[torch.Tensor] = None

    def build_model(self, cfg: TrainConfig, manifest: Any) -> nn.Module:
        from fastlivt.models.mae import build_mae

        if cfg.model.img_size != cfg.data.img_size:
            raise ConfigError(f"model.img_size={cfg.model.img_size} differs from data.img_size={cfg.data.img_size}")
        return build_mae(cfg.model)

    def setup(self, run: Run) -> None:
        pass

    def forward(self, run: Run, images: torch.Tensor, labels: torch.Tensor):
        if self.vis_images is None:
            self.vis_images = images[:8].detach().cpu().clone()
        loss, _, _ = run.model(images, mask_ratio=run.cfg.model.mask_ratio)
        return loss, {}

    def after_step(self, run: Run) -> None:
        pass

    def end_of_epoch(self, run: Run, epoch: int) -> None:
        every, last = run.cfg.run.vis_every, epoch + 1 == run.cfg.run.epochs
        if self.vis_images is None or not (last or (every > 0 and (epoch + 1) % every == 0)):
            return
        from fastlivt.models.mae_vis import reconstruction_grid

        model = run.runtime.unwrap()
        with run.runtime.gathered(model):
            if run.runtime.is_main:
                images = self.vis_images.to(run.runtime.device)
                grid = reconstruction_grid(model, images, run.cfg.data.mean, run.cfg.data.std,
                                           mask_ratio=run.cfg.model.mask_ratio, seed=run.cfg.run.seed)
                path = write_png(grid, run.out / "recon" / f"epoch{epoch + 1:04d}.png")
                run.logger.note(f"reconstructions: {path}")

    def state_dict(self) -> Dict[str, Any]:
        return {"vis_images": None if self.vis_images is None else self.vis_images.cpu()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """A resumed run draws its grids from the same images as the interrupted one."""
        if state.get("vis_images") is not None:
            self.vis_images = state["vis_images"]

    def finish(self, run: Run) -> None:
        """Export the encoder (fp32 safetensors, consolidated across ZeRO shards) for BFT."""
        from fastlivt.models.mae import save_encoder

        state = run.runtime.full_state_dict()  # collective under DeepSpeed: every rank calls it
        if run.runtime.is_main:
            meta = dict(run.runtime.unwrap().export_metadata())
            meta.update(config=json.dumps(to_dict(run.cfg)), step=str(run.step), epoch=str(run.epoch))
            path = save_encoder(state, run.out / ENCODER_EXPORT, metadata=meta)
            run.summary["encoder"] = str(path)
            run.logger.note(f"encoder export: {path}")
        run.runtime.barrier()


def main(argv: Optional[List[str]] = None) -> int:
    from fastlivt.engine.stage_cli import run_stage

    return run_stage(argv, MGPTask(), "fastlivt pretrain", "Stage 1: masked generative pretraining (MGP).")

"""Stage 2, balanced fine-tuning (BFT; paper §4.2, Alg. 1 lines 10-20): ``fastlivt finetune --config X``.

A timm ViT classifier (global average pooling + fc_norm, head std 2e-5) initialised from the MGP encoder export
(``model.init``; position embeddings interpolated when the resolution changes), trained by the shared loop with
layer-wise lr decay (``optim.layer_decay``), drop path, AdamW(0.9, 0.99), warmup + cosine to ``optim.min_lr``, the
batch augmentation the loader applies (RandomErasing, Mixup/CutMix → :class:`fastlivt.targets.MixTarget`) and the
loss of :func:`fastlivt.losses.build_loss` (Bal-BCE by default: logit bias τ·(log π − log(1−π) + log(C−1)) from the
training manifest's class counts, training only). Optional EMA of the weights (timm ``ModelEmaV3``, ``run.ema``).

Every ``run.eval_every`` epochs (and after the last) the model is evaluated on ``data.val`` with raw logits: top-1,
top-5 and many/medium/few accuracy; the best top-1 is kept as checkpoint ``best`` and exported to
``best.safetensors``. At the end the weights go to ``model.safetensors`` (and ``model_ema.safetensors``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from fastlivt.config import ConfigError, TrainConfig, to_dict
from fastlivt.engine.checkpoint import save_safetensors
from fastlivt.engine.run import Run
from fastlivt.logs import get_logger

log = get_logger(__name__)

MODEL_EXPORT, EMA_EXPORT, BEST_EXPORT = "model.safetensors", "model_ema.safetensors", "best.safetensors"
EXPORT_FORMAT = "fastlivt-bft-classifier"


@torch.no_grad()
def predict(model: nn.Module, loader: Any, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw logits float32 [N, C] on CPU, labels [N]) of ``model`` over one pass of ``loader`` (this rank's part)."""
    was_training = model.training
    model.eval()
    outs, labels = [], []
    try:
        loader.set_epoch(0)
        for images, y in loader:
            with autocast():
                outs.append(model(images).float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not outs:
        raise ValueError("the evaluation loader yielded no batches (data.val empty, or drop_last with too few images?)")
    return torch.cat(outs), torch.cat(labels)


def gather(run: Run, array: np.ndarray, num_samples: int) -> np.ndarray:
    """This rank's per-sample ``array`` joined over all ranks in sample order.

    Rank r holds samples r, r + W, r + 2W, ... (the loader's rank-interleaved order, padded with repeats so that every
    rank has the same count); the first ``num_samples`` of the interleaving are the evaluation set.
    """
    if run.runtime.world == 1:
        return array
    parts: List[Any] = [None] * run.runtime.world
    torch.distributed.all_gather_object(parts, array)
    if len({len(p) for p in parts}) != 1:
        raise RuntimeError(f"evaluation: ranks hold different numbers of samples {[len(p) for p in parts]}")
    return np.stack(parts, axis=1).reshape(-1, *array.shape[1:])[:num_samples]


def accuracy_summary(top5: np.ndarray, labels: np.ndarray, class_counts: List[int]) -> Dict[str, Any]:
    """top1 / top5 (%) and many/medium/few accuracy (mean of per-class accuracies, %) from top-5 predictions."""
    from fastlivt.metrics import shot_accuracy

    shots = shot_accuracy(top5[:, 0], labels, class_counts)
    out = {"top1": float((top5[:, 0] == labels).mean() * 100), "top5": float((top5 == labels[:, None]).any(1).mean() * 100)}
    for k in ("overall", "many", "medium", "few"):
        if shots.get(k) is not None:
            out[k] = float(shots[k])
    return out


def check_not_test(cfg: TrainConfig) -> None:
    """``best`` is chosen on ``data.val``: refuse a converted *test* split there unless ``run.select_on_test=true``."""
    import json
    from pathlib import Path

    from fastlivt.data_prep.manifest import MANIFEST_NAME

    path = Path(cfg.data.val) / MANIFEST_NAME
    try:
        split = json.loads(path.read_text()).get("split")
    except (OSError, ValueError, AttributeError):
        return  # a missing or broken manifest is the loader's error to report, naming the file
    if split != "test":
        return
    if not cfg.run.select_on_test:
        raise ConfigError(f"data.val={cfg.data.val} is a converted 'test' split: 'best' would be chosen on the set it "
                          f"is reported on; set data.val to a validation split (converted with --split val), or "
                          f"data.val= (no selection, the last epoch), or run.select_on_test=true to allow it")
    log.warning("run.select_on_test=true: 'best' is chosen on the test split %s; its top-1 is not a held-out figure",
                cfg.data.val)


class BFTTask:
    """The BFT stage for :func:`fastlivt.engine.loop.train`. Holds the loss, the loader's batch augmentation (for
    the log: the loader applies it), the EMA model, the evaluation loader, the training class counts and the best
    top-1 so far."""

    name, stage = "bft", "finetune"

    def __init__(self) -> None:
        self.criterion: Optional[nn.Module] = None
        self.augment = None
        self.ema = None
        self.val_loader = None
        self.class_counts: List[int] = []
        self.best_top1 = float("-inf")

    def build_model(self, cfg: TrainConfig, manifest: Any) -> nn.Module:
        from fastlivt.models.vit import build_vit_from_config, load_encoder

        if cfg.model.img_size != cfg.data.img_size:
            raise ConfigError(f"model.img_size={cfg.model.img_size} differs from data.img_size={cfg.data.img_size}")
        model = build_vit_from_config(cfg.model, manifest.num_classes)
        if cfg.model.init:
            report = load_encoder(model, cfg.model.init)
            log.info("BFT starts from %s", report.summary())
        else:
            log.warning("model.init is not set: BFT starts from random weights (no MGP encoder)")
        return model

    def setup(self, run: Run) -> None:
        from fastlivt.losses import build_loss
        from fastlivt.models.compile import compile_criterion

        cfg = run.cfg
        self.class_counts = list(run.loader.manifest.class_counts)
        # the runtime divides each micro-batch's loss by the accumulation steps before backward: the loss's gradient
        # is weighted by that from the start (the fused loss writes it so in its one pass)
        self.criterion = build_loss(cfg.loss, self.class_counts, smoothing=cfg.data.smoothing,
                                    grad_scale=1.0 / run.runtime.accum_steps).to(run.runtime.device)
        self.criterion = compile_criterion(self.criterion, run.runtime.compile)
        self.augment = getattr(run.loader, "batch_augment", None)
        if self.augment is None and (cfg.data.mixup > 0 or cfg.data.cutmix > 0 or cfg.data.reprob > 0):
            raise ConfigError("data.mixup/cutmix/reprob are set but the training loader has no batch_augment")
        log.info("loss %s; batch augmentation %s", self.criterion, self.augment)
        if cfg.run.ema is not None:
            if run.runtime.partitions_parameters:
                raise ConfigError("run.ema is not supported under ZeRO-3 (the parameters are partitioned); unset it")
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(run.runtime.unwrap(), decay=cfg.run.ema)
        if cfg.data.val:
            check_not_test(cfg)
            self.val_loader = run.make_loader(cfg, "val", "eval", run.runtime)
        else:
            log.info("data.val is empty: no evaluation during fine-tuning and no 'best' checkpoint; the last epoch's "
                     "weights are the result (evaluate them on the test split)")

    def forward(self, run: Run, images: torch.Tensor, labels):
        """``labels``: hard labels, or the MixTarget of a batch the loader has augmented (``loader.batch_augment``)."""
        logits = run.model(images)
        return self.criterion(logits, labels), {}

    def after_step(self, run: Run) -> None:
        if self.ema is not None:
            self.ema.update(run.runtime.unwrap(), step=run.step)

    def evaluate(self, run: Run, model: nn.Module) -> Dict[str, Any]:
        logits, labels = predict(model, self.val_loader, run.runtime.autocast)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.numpy()
        n = self.val_loader.num_samples
        top5, labels_np = gather(run, top5, n), gather(run, labels.numpy(), n)
        return accuracy_summary(top5, labels_np, self.class_counts)

    def end_of_epoch(self, run: Run, epoch: int) -> None:
        every, last = run.cfg.run.eval_every, epoch + 1 == run.cfg.run.epochs
        if self.val_loader is None or not (last or (every > 0 and (epoch + 1) % every == 0)):
            return
        metrics = self.evaluate(run, run.model)
        if self.ema is not None:
            metrics.update({f"ema_{k}": v for k, v in self.evaluate(run, self.ema.module).items()})
        improved = metrics["top1"] > self.best_top1
        if improved:
            self.best_top1 = metrics["top1"]
        metrics["best_top1"] = self.best_top1
        run.logger.eval(run.step, epoch, metrics)
        run.summary["last_eval"] = metrics
        if improved:
            run.checkpointer.save("best")  # the train state stands at the next epoch's start
            self.export(run, BEST_EXPORT, run.runtime.full_state_dict())

    def export(self, run: Run, name: str, state: Dict[str, torch.Tensor]) -> None:
        if run.runtime.is_main:
            meta = {"format": EXPORT_FORMAT, "config": to_dict(run.cfg), "class_counts": self.class_counts,
                    "step": run.step, "epoch": run.epoch, "best_top1": self.best_top1}
            run.summary[name] = str(save_safetensors(state, run.out / name, meta))
        run.runtime.barrier()

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"best_top1": self.best_top1}
        if self.ema is not None:
            state["ema"] = {k: v.detach().cpu().clone() for k, v in self.ema.module.state_dict().items()}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best_top1 = float(state["best_top1"])
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("run.ema is set but the checkpoint holds no EMA weights (it was trained without EMA)")
            self.ema.module.load_state_dict(state["ema"])

    def finish(self, run: Run) -> None:
        self.export(run, MODEL_EXPORT, run.runtime.full_state_dict())
        if self.ema is not None:
            self.export(run, EMA_EXPORT, {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                                          for k, v in self.ema.module.state_dict().items()})


def main(argv: Optional[List[str]] = None) -> int:
    from fastlivt.engine.stage_cli import run_stage

    return run_stage(argv, BFTTask(), "fastlivt finetune",
                     "Stage 2: balanced fine-tuning (BFT) from an MGP encoder export.")

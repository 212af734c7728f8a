"""The training configuration: one :func:`~fastlivt.data_prep.config.section` per part of a run, gathered in
:class:`TrainConfig`.

Loading (YAML with ``_base_`` inheritance, then ``key=value`` overrides) and checking are
:mod:`fastlivt.data_prep.config`'s: an unknown key, a value of the wrong type or a choice outside its ``Literal`` is a
:class:`ConfigError` that names the dotted key (``optim.lr: expected float, got 'fast'``; ``loss.name: expected one
of ce, bce, bal_ce, bal_bce, got 'focal'``), raised when the config is loaded, before any data is touched.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from fastlivt.data_prep.config import ConfigError, from_dict, load_config, save_config, section, to_dict

__all__ = ["check_combinations", "ConfigError", "DataConfig", "LossConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig",
           "from_dict", "load_config", "save_config", "to_dict"]


@section
class DataConfig:
    """Where the converted data is and how it is loaded."""

    train: str = ""  # directory holding manifest.json (+ .beton / shards) of the training split
    val: str = ""  # directory of the evaluation split
    backend: Literal["ffcv", "dali", "torch"] = "ffcv"
    dali_device: Literal["auto", "cpu", "gpu"] = "auto"  # (gpu = nvJPEG 'mixed' decoding; an error without CUDA)
    sampler: Literal["instance", "class_balanced", "square_root", "progressive"] = "instance"
    img_size: int = 224
    batch_size: int = 64  # per device (micro-batch)
    workers: int = 2
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)
    rrc_scale: Tuple[float, float] = (0.2, 1.0)  # MGP uses (0.2, 1); BFT uses timm's (0.08, 1)
    auto_augment: Optional[str] = None  # e.g. rand-m9-mstd0.5-inc1 (BFT)
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.0
    reprob: float = 0.0
    eval_crop_pct: float = 0.875
    os_cache: bool = True
    batches_ahead: int = 3
    drop_last: bool = True


@section
class ModelConfig:
    arch: Literal["vit_tiny", "vit_small", "vit_base", "vit_large"] = "vit_base"
    embed_dim: int = 0  # 0 = the arch's width; non-zero overrides it (small CPU demos)
    depth: int = 0  # 0 = the arch's number of blocks
    num_heads: int = 0  # 0 = the arch's number of heads
    in_chans: int = 3
    patch_size: int = 16
    img_size: int = 224
    attention: Literal["auto", "xformers", "sdpa", "math"] = "auto"
    drop_path: float = 0.0
    global_pool: Literal["avg", "token"] = "avg"  # avg: mean of patch tokens + fc_norm
    # MGP
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    # BFT
    num_classes: int = 0  # 0 = take it from the manifest
    init: Optional[str] = None  # MGP encoder export (.safetensors) to start BFT from
    grad_checkpointing: bool = False


@section
class OptimConfig:
    blr: float = 1.5e-4  # base lr; lr = blr * effective_batch / 256
    lr: Optional[float] = None  # absolute lr (overrides blr)
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.95)
    layer_decay: Optional[float] = None  # BFT: 0.75
    warmup_epochs: float = 40.0
    clip_grad: Optional[float] = None
    accum_iter: int = 1


@section
class LossConfig:
    name: Literal["ce", "bce", "bal_ce", "bal_bce"] = "bal_bce"
    form: Literal["paper", "official"] = "paper"  # Bal-BCE bias form
    tau: float = 1.0
    fused: Literal["auto", "triton", "torch"] = "auto"
    add_log_c: bool = False  # Bal-CE: bias log(pi) + log(C) instead of log(pi)
    test_prior: Optional[List[float]] = None  # per-class test counts/probabilities (Thm 3); None = uniform


@section
class RunConfig:
    stage: Literal["pretrain", "finetune"] = "pretrain"
    epochs: int = 800
    out: str = "runs/default"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["bf16", "fp32"] = "bf16"  # (bf16 autocast on CUDA; on CPU only with cpu_bf16)
    cpu_bf16: bool = False  # with amp=bf16, autocast on CPU too (plain engine; fast on CPUs with AVX512-BF16 or AMX)
    compile: Union[Literal["auto", "on", "off"], bool] = "auto"  # auto | on | off (YAML reads on/off as true/false: both accepted); torch.compile
    # per block + patch embed/head/loss; auto = on CUDA only
    compile_mode: str = "default"  # Inductor mode: default | reduce-overhead (CUDA graphs) | max-autotune | ...
    ckpt_every_steps: int = 0  # 0 = only at each epoch end
    eval_every: int = 1  # epochs
    vis_every: int = 20  # epochs between reconstruction grids (MGP)
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit; tests and benchmarks)
    ema: Optional[float] = None  # EMA decay (BFT), e.g. 0.9999
    log_every: int = 20  # optimizer steps between CSV/TensorBoard rows
    progress: bool = True  # tqdm bar
    tensorboard: bool = True  # <run.out>/tb (an error if asked for and TensorBoard is missing)
    nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient: stop, or drop that step's update
    nonfinite_max_skips: int = 10  # skip: stop once this many optimizer steps in a row were non-finite
    select_on_test: bool = False  # allow data.val to be a converted *test* split ('best' chosen on the test set)


@section
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: Optional[Union[str, Dict[str, Any]]] = None  # path to a DeepSpeed JSON, or the JSON inline


def check_combinations(cfg: TrainConfig) -> None:
    """Refuse, as one :class:`ConfigError` naming the keys and the values that would work, the combinations of keys
    that cannot work together; called when a training run starts, before anything is built or written."""
    loss, run = cfg.loss, cfg.run
    if loss.test_prior is not None and loss.name not in ("bal_ce", "bal_bce"):
        raise ConfigError(f"loss.test_prior applies to loss.name=bal_ce or bal_bce, not {loss.name}; drop "
                          f"loss.test_prior or choose one of those losses")
    if loss.test_prior is not None and loss.name == "bal_bce" and loss.form == "official":
        raise ConfigError("loss.test_prior needs loss.form=paper with loss.name=bal_bce (the official-code form "
                          "log pi - log(1 - pi) has no test prior); set loss.form=paper or drop loss.test_prior")
    if loss.add_log_c and loss.name != "bal_ce":
        raise ConfigError(f"loss.add_log_c=true applies to loss.name=bal_ce only, not {loss.name}; set "
                          f"loss.add_log_c=false or loss.name=bal_ce")
    if loss.fused == "triton" and loss.name not in ("bce", "bal_bce"):
        raise ConfigError(f"loss.fused=triton applies to loss.name=bce or bal_bce (the softmax losses run in "
                          f"PyTorch), not {loss.name}; set loss.fused=auto or torch")
    if not 0.0 <= cfg.data.smoothing < 1.0:
        raise ConfigError(f"data.smoothing must lie in [0, 1), got {cfg.data.smoothing}")
    if cfg.model.img_size != cfg.data.img_size:
        raise ConfigError(f"model.img_size={cfg.model.img_size} differs from data.img_size={cfg.data.img_size}; "
                          f"set both to the same size")
    if run.nonfinite_max_skips < 1:
        raise ConfigError(f"run.nonfinite_max_skips must be >= 1, got {run.nonfinite_max_skips}")
    if cfg.deepspeed is not None and run.nonfinite == "skip":
        raise ConfigError("run.nonfinite=skip needs the plain engine (it drops a step inside torch's fused AdamW); "
                          "with a deepspeed entry use run.nonfinite=stop")
    if cfg.deepspeed is not None and run.cpu_bf16:
        raise ConfigError("run.cpu_bf16=true is for the plain engine (CPU autocast); with a deepspeed entry set "
                          "run.cpu_bf16=false")

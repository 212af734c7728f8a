"""Every config key takes effect: for each key of every section (enumerated from the dataclasses, so a new key without
an entry here fails), a non-default value changes the component built from the config, or the run — or the key is
in METADATA_ONLY with the reason it changes neither.

Each check builds what the key configures, the way the commands build it from the whole config section (see
``config_probes``): the loss and EMA through BFT's setup, the models through the tasks, the loaders through
``build_loader``, the runtime through ``build_runtime``, a conversion through ``convert``; the optimiser, schedule
and run keys through a tiny training run.
"""
from __future__ import annotations

import dataclasses
import shutil
import typing
from unittest import mock

import numpy as np
import pytest
import torch

from config_probes import (COUNTS, compile_probe, convert_probe, image_folder, loader_probe, model_probe, outcome_probe, run_probe, runtime_probe,
                           task_probe, tiny_train_config, with_keys, write_manifest)
from fastlivt.data_prep.config import ConvertConfig
from fastlivt.config import TrainConfig

# Keys that change no component and no result, each with the reason.
METADATA_ONLY = {
    "run.stage": "set by the command itself (fastlivt pretrain | finetune); recorded in checkpoints, where evaluate "
                 "refuses a pretrain checkpoint",
    "run.progress": "shows a tqdm progress bar, nothing else",
    "convert.workers": "number of decode/encode processes: the written files are the same for any number",
}

# key: (non-default value, probe, overrides of the baseline for this key). "{name}" in a value is a path made below.
KEYS = {
    # ---- data: the loaders
    "data.train": ("{data_copy}", loader_probe, {}),
    "data.val": ("{data}", loader_probe, {}),
    "data.backend": ("dali", loader_probe, {}),
    "data.dali_device": ("gpu", loader_probe, {"data.backend": "dali"}),  # no GPU here: an error, so it was read
    "data.sampler": ("class_balanced", loader_probe, {}),
    "data.img_size": (16, loader_probe, {}),
    "data.batch_size": (2, loader_probe, {}),
    "data.workers": (2, loader_probe, {"data.backend": "ffcv"}),
    "data.mean": ((0.1, 0.2, 0.3), loader_probe, {}),
    "data.std": ((0.5, 0.5, 0.5), loader_probe, {}),
    "data.rrc_scale": ((0.9, 1.0), loader_probe, {}),
    "data.auto_augment": ("rand-m9-mstd0.5-inc1", loader_probe, {}),
    "data.mixup": (0.8, loader_probe, {}),
    "data.cutmix": (1.0, loader_probe, {}),
    "data.smoothing": (0.1, loader_probe, {}),
    "data.reprob": (0.25, loader_probe, {}),
    "data.eval_crop_pct": (0.5, loader_probe, {"data.val": "{data}"}),
    "data.os_cache": (False, loader_probe, {"data.backend": "ffcv"}),
    "data.batches_ahead": (1, loader_probe, {"data.backend": "ffcv"}),
    "data.drop_last": (False, loader_probe, {"data.batch_size": 5}),
    # ---- model: the classifier and the masked autoencoder
    "model.arch": ("vit_small", model_probe, {"model.embed_dim": 0, "model.num_heads": 0}),
    "model.embed_dim": (32, model_probe, {}),
    "model.depth": (2, model_probe, {}),
    "model.num_heads": (4, model_probe, {}),
    "model.in_chans": (1, model_probe, {}),
    "model.patch_size": (2, model_probe, {}),
    "model.img_size": (16, model_probe, {}),
    "model.attention": ("math", model_probe, {}),
    "model.drop_path": (0.1, model_probe, {"model.depth": 2}),  # timm's rate rises over blocks from 0
    "model.global_pool": ("token", model_probe, {}),
    "model.mask_ratio": (0.5, run_probe, {"run.stage": "pretrain"}),
    "model.norm_pix_loss": (False, model_probe, {}),
    "model.decoder_embed_dim": (32, model_probe, {}),
    "model.decoder_depth": (2, model_probe, {}),
    "model.decoder_num_heads": (4, model_probe, {}),
    "model.num_classes": (7, model_probe, {}),
    "model.init": ("{encoder}", model_probe, {}),
    "model.grad_checkpointing": (True, model_probe, {}),
    # ---- loss: what BFT trains with
    "loss.name": ("ce", task_probe, {}),
    "loss.form": ("official", task_probe, {}),
    "loss.tau": (2.0, task_probe, {}),
    "loss.fused": ("torch", task_probe, {}),
    "loss.add_log_c": (True, task_probe, {"loss.name": "bal_ce"}),
    "loss.test_prior": ([1.0, 1.0, 2.0, 4.0], task_probe, {}),
    # ---- optim: parameter groups, optimizer, schedule (a tiny run)
    "optim.blr": (1e-3, run_probe, {}),
    "optim.lr": (1e-3, run_probe, {}),
    "optim.min_lr": (1e-4, run_probe, {}),
    "optim.weight_decay": (0.1, run_probe, {}),
    "optim.betas": ((0.8, 0.99), run_probe, {}),
    "optim.layer_decay": (0.75, run_probe, {}),
    "optim.warmup_epochs": (0.5, run_probe, {}),
    "optim.clip_grad": (0.01, run_probe, {}),
    "optim.accum_iter": (2, run_probe, {}),
    # ---- run
    "run.epochs": (3, run_probe, {}),
    "run.out": ("{tmp}/run2", run_probe, {}),
    "run.seed": (1, run_probe, {}),
    "run.device": ("cuda", run_probe, {}),  # without CUDA: an error, so it was read
    "run.amp": ("fp32", run_probe, {"run.cpu_bf16": True}),
    "run.cpu_bf16": (True, run_probe, {}),
    "run.compile": ("on", compile_probe, {}),  # auto stays eager on CPU
    "run.compile_mode": ("max-autotune-no-cudagraphs", compile_probe, {"run.compile": "on"}),
    "run.ckpt_every_steps": (1, run_probe, {}),
    "run.eval_every": (2, run_probe, {"data.val": "memory"}),
    "run.vis_every": (1, run_probe, {"run.stage": "pretrain"}),
    "run.max_steps": (2, run_probe, {}),
    "run.ema": (0.99, task_probe, {}),
    "run.log_every": (1, run_probe, {}),
    "run.tensorboard": (True, run_probe, {}),
    "run.nonfinite": ("skip", outcome_probe, {"optim.lr": 1e30}),  # diverges: stop ends the run, skip goes on
    "run.nonfinite_max_skips": (1, outcome_probe, {"run.nonfinite": "skip", "optim.lr": 1e30}),
    "run.select_on_test": (True, outcome_probe, {"data.val": "{test_split}"}),  # refused without it
    "deepspeed": ({"train_micro_batch_size_per_gpu": 4}, runtime_probe, {}),
    # ---- conversion
    "convert.source": ("cifar10", convert_probe, {}),
    "convert.root": ("{images_other}", convert_probe, {}),
    "convert.list": ("{images}/list.txt", convert_probe, {}),
    "convert.split": ("val", convert_probe, {}),
    "convert.imbalance_factor": (3.0, convert_probe, {}),
    "convert.seed": (1, convert_probe, {}),
    "convert.formats": (["ffcv"], convert_probe, {}),
    "convert.out": ("{tmp}/conv2", convert_probe, {}),
    "convert.on_error": ("fail", convert_probe, {}),
    "convert.max_resolution": (8, convert_probe, {}),
    "convert.jpeg_quality": (50, convert_probe, {}),
    "convert.write_mode": ("raw", convert_probe, {"convert.formats": ["ffcv"]}),
    "convert.compress_probability": (0.9, convert_probe, {"convert.formats": ["ffcv"], "convert.write_mode": "proportion"}),
    "convert.shard_size": (2, convert_probe, {}),
    "convert.num_classes": (5, convert_probe, {}),
}


def config_keys():
    """Every key of every section, as "section.key" (TrainConfig) or "convert.key" (ConvertConfig)."""
    keys = [f"convert.{f.name}" for f in dataclasses.fields(ConvertConfig)]
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(hints[f.name])]
        else:
            keys.append(f.name)
    return keys


def test_every_key_has_a_check_or_a_reason():
    keys = set(config_keys())
    assert not set(KEYS) & set(METADATA_ONLY)
    assert keys - set(KEYS) - set(METADATA_ONLY) == set(), "config keys without a check or a metadata reason"
    assert (set(KEYS) | set(METADATA_ONLY)) - keys == set(), "entries for keys that no longer exist"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from fastlivt.data_prep.convert import convert

    tmp = tmp_path_factory.mktemp("keys")
    paths = {"tmp": str(tmp), "images": str(image_folder(tmp / "images")),
             "images_other": str(image_folder(tmp / "images_other", counts=(3, 3, 3)))}
    data = tmp / "data"
    convert(ConvertConfig(source="imagefolder", root=str(tmp / "images_other"), formats=["ffcv", "dali"], out=str(data),
                          workers=0), progress=False)
    shutil.copytree(data, tmp / "data_copy")
    paths.update(data=str(data), data_copy=str(tmp / "data_copy"))
    from fastlivt.models.mae import MaskedAutoencoderViT
    from safetensors.torch import save_file

    torch.manual_seed(5)
    mae = MaskedAutoencoderViT(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16,
                               decoder_depth=1, decoder_num_heads=2)
    save_file({k: v.contiguous() for k, v in mae.state_dict().items()}, tmp / "encoder.safetensors")
    paths["encoder"] = str(tmp / "encoder.safetensors")
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    manifest = write_manifest(tmp / "memory", labels, len(COUNTS))
    paths["test_split"] = str(write_manifest(tmp / "test_split", labels, len(COUNTS), split="test").root)
    train_cfg = with_keys(tiny_train_config(tmp, ""), {"data.train": str(data), "data.backend": "torch",
                                                         "data.workers": 0})
    convert_cfg = ConvertConfig(source="imagefolder", root=paths["images"], formats=["dali"], out=str(tmp / "conv"),
                                workers=0)
    return {"paths": paths, "manifest": manifest, "train": train_cfg, "convert": convert_cfg, "baselines": {}}


def fill(value, paths):
    return value.format(**paths) if isinstance(value, str) else value


def build(env, key, overrides, value=None):
    """(probe input config, manifest) for ``key`` with the per-key overrides (and ``value`` when given)."""
    section = "convert" if key.startswith("convert.") else "train"
    strip = (lambda k: k[len("convert."):]) if section == "convert" else (lambda k: k)
    values = {strip(k): fill(v, env["paths"]) for k, v in overrides.items()}
    if value is not None:
        values[strip(key)] = fill(value, env["paths"])
    return with_keys(env[section], values)


@pytest.mark.parametrize("key", sorted(KEYS))
def test_non_default_value_changes_what_is_built(key, env):
    value, probe, overrides = KEYS[key]
    base_cfg = build(env, key, overrides)
    changed_cfg = build(env, key, overrides, value)
    assert base_cfg != changed_cfg, f"{key}={value!r} is the baseline value already"
    args = () if key.startswith("convert.") else (env["manifest"],)
    cache_key = (probe.__name__, repr(sorted(overrides.items())))
    if cache_key not in env["baselines"]:
        first = env["baselines"][cache_key] = probe(base_cfg, *args)
        assert not (isinstance(first, tuple) and first[0] == "error"), f"baseline of {probe.__name__} fails: {first}"
        if not overrides:  # once per probe: a random fingerprint could not tell a key's effect
            assert probe(base_cfg, *args) == first, f"{probe.__name__} is not deterministic"
    changed = probe(changed_cfg, *args)
    assert changed != env["baselines"][cache_key], f"{key}={value!r} changes nothing that {probe.__name__} builds"


def test_test_prior_changes_the_trained_bias(env):
    """Thm 3: with a test prior π^t, Bal-BCE's bias is τ((log π − log π^t) − (log(1−π) − log(1−π^t))); BFT trains with
    that bias (a short run through the loop), not with the uniform-prior one of Eq. 10."""
    from fastlivt.engine.finetune import BFTTask

    losses, original = [], BFTTask.setup

    def setup(self, run):
        original(self, run)
        losses.append(self.criterion)

    prior = [1.0, 1.0, 2.0, 4.0]
    for test_prior in (None, prior):
        cfg = with_keys(env["train"], {"loss.test_prior": test_prior, "loss.tau": 1.5, "run.max_steps": 1})
        with mock.patch.object(BFTTask, "setup", setup):
            result = run_probe(cfg, env["manifest"])
        assert result["step"] == 1, result
    pi, pt = np.array(COUNTS) / sum(COUNTS), np.array(prior) / sum(prior)
    uniform = 1.5 * (np.log(pi) - np.log1p(-pi) + np.log(len(COUNTS) - 1))
    thm3 = 1.5 * ((np.log(pi) - np.log(pt)) - (np.log1p(-pi) - np.log1p(-pt)))
    np.testing.assert_allclose(losses[0].scaled_bias.numpy(), uniform, rtol=1e-6)
    np.testing.assert_allclose(losses[1].scaled_bias.numpy(), thm3, rtol=1e-6)
    assert not np.allclose(uniform, thm3)

"""DeepSpeed: 2-process ZeRO-2 (MGP) and ZeRO-3 (BFT) runs on CPU/gloo, config derivation, the launcher, ViT-L/384.

Two launches (``torchrun``, then DeepSpeed's own launcher) run ``tests/helpers/ds_worker.py``: the first trains
uninterrupted runs and runs killed mid-training, the second resumes the killed ones in fresh processes. Checked here: losses fall,
ranks agree on the weights, DeepSpeed's optimizer holds and applies lr x lr_scale per group, resume is bit-exact (runtime
and the real training loop), the consolidated exports load into ``build_vit``, and no C++ op is built.
"""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastlivt.config import ConfigError, TrainConfig, load_config
from fastlivt.engine.ds_runtime import build_deepspeed_config, find_auto

REPO = Path(__file__).resolve().parents[3]
WORKER = REPO / "tests" / "helpers" / "ds_worker.py"
LAUNCH_TIMEOUT = 240  # seconds per 2-process launch; a DeepSpeed op build alone takes ~110-180 s here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd, env, log: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=LAUNCH_TIMEOUT)
    log.write_text(proc.stdout)
    assert proc.returncode == 0, f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stdout[-6000:]}"
    return time.perf_counter() - t0


@pytest.fixture(scope="session")
def ds(tmp_path_factory):
    """Run both launches once; return the output folder, the logs and the wall times."""
    root = tmp_path_factory.mktemp("deepspeed")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(root / "ext"),
               PYTHONUNBUFFERED="1")
    first = launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), str(WORKER), "--out", str(root)], env, root / "first.log")
    second = launch([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                     str(free_port()), "--no_local_rank", str(WORKER), "--out", str(root), "--resume"], env,
                    root / "second.log")
    return {"root": root, "times": (first, second), "logs": (root / "first.log").read_text() +
            (root / "second.log").read_text()}


def read(path: Path):
    return json.loads(path.read_text())


def same_tensors(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------- 2 processes
@pytest.mark.slow
@pytest.mark.parametrize("job", ["unit_mgp_zero2", "unit_bft_zero3"])
def test_runtime_trains_agrees_and_resumes_exactly(ds, job):
    d = ds["root"] / job
    full, resumed = read(d / "full.json"), read(d / "resumed.json")
    assert full["zero_stage"] == int(job[-1])
    losses = full["losses"]
    assert len(losses) == 6 and losses[-1] < 0.95 * losses[0] and min(losses[3:]) < min(losses[:3]), losses
    assert len(set(full["checksums"])) == 1 and len(set(resumed["checksums"])) == 1  # both ranks, same weights
    assert resumed["resumed_meta"]["step"] == 2  # the meta written with the checkpoint comes back
    assert same_tensors(load_file(d / "full.safetensors"), load_file(d / "resumed.safetensors"))
    assert (d / "ckpt" / "latest").read_text() == "step2" and not (d / "ckpt" / "step2.tmp").exists()


@pytest.mark.slow
@pytest.mark.parametrize("job", ["unit_mgp_zero2", "unit_bft_zero3"])
def test_layer_decay_lrs_survive_zero(ds, job):
    """DeepSpeed's optimizer holds lr x lr_scale per group, and its first AdamW update moves each weight by that lr."""
    r = read(ds["root"] / job / "full.json")
    scales = r["scales"]
    if job.startswith("unit_bft"):
        assert len(set(scales)) > 2  # real layer decay: several distinct scales
    assert r["group_lr_scale_in_optimizer"] == r["lr_scale_keys"]  # the groups' lr_scale entries survive ZeRO
    for step, lrs in enumerate(r["lrs"]):
        base = 2e-3 * (1.0 - 0.5 * step / 6)  # the worker's schedule
        assert lrs == pytest.approx([base * s for s in scales], rel=1e-12)
    # Adam's first step moves a weight by |w1 - w0 (1 - lr wd)| = lr |g| / (|g| + eps): its max over a group is that
    # group's lr (a layer-decay step away would be 25% off)
    assert r["applied"] == pytest.approx(r["expected_applied"], rel=5e-3)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["mgp", "bft"])
def test_training_loop_under_deepspeed_resumes_exactly(ds, stage):
    d = ds["root"] / f"loop_{stage}_zero{2 if stage == 'mgp' else 3}"
    a, b = read(d / "a.json"), read(d / "b.json")
    assert a["step"] == b["step"] == 6
    for r in (a, b):
        assert len({tuple(c) for c in r["checksums"]}) == 1, r["checksums"]  # ranks agree (ZeRO-2: local replicas too)
    assert same_tensors(load_file(d / "a_state.safetensors"), load_file(d / "b_state.safetensors"))
    export = "encoder.safetensors" if stage == "mgp" else "model.safetensors"
    assert same_tensors(load_file(d / "a" / export), load_file(d / "b" / export))
    with open(d / "b" / "train.csv") as f:
        steps = [int(float(row["step"])) for row in csv.DictReader(f)]
    assert steps == list(range(1, 7))  # each step logged once across the kill
    if stage == "bft":
        assert a["last_eval"] == b["last_eval"]
        assert len(set(a["lr_scales"])) > 2
    ckpts = d / "b" / "checkpoints"
    assert (ckpts / "last").is_dir() and not list(ckpts.glob("*.tmp")) and not list(ckpts.glob("*.old"))


@pytest.mark.slow
def test_consolidated_exports_load_into_build_vit(ds):
    from fastlivt.models.vit import build_vit, load_encoder

    kw = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)
    bft = load_file(ds["root"] / "loop_bft_zero3" / "a" / "model.safetensors")
    model = build_vit("vit_tiny", img_size=16, num_classes=10, **kw)
    model.load_state_dict(bft, strict=True)
    assert all(v.dtype == torch.float32 for v in bft.values())
    x = torch.randn(2, 3, 16, 16)
    assert torch.isfinite(model(x)).all()
    # the ZeRO-2 MGP encoder export starts a classifier at 16 px and (interpolated) at 32 px
    enc = ds["root"] / "loop_mgp_zero2" / "a" / "encoder.safetensors"
    for img in (16, 32):
        report = load_encoder(build_vit("vit_tiny", img_size=img, num_classes=10, **kw), enc)
        assert any(k.startswith("blocks.") for k in report.loaded)
        assert (report.interpolated is not None) == (img == 32)
    # the ZeRO-3 unit export equals the module weights it was gathered from: the full tensors, not shards
    unit = load_file(ds["root"] / "unit_bft_zero3" / "full.safetensors")
    ref = build_vit("vit_tiny", img_size=16, num_classes=5, **kw).state_dict()
    assert {k: tuple(v.shape) for k, v in unit.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.slow
def test_no_op_is_compiled(ds):
    ext = ds["root"] / "ext"
    assert not ext.exists() or not any(ext.iterdir()), list(ext.rglob("*"))[:5]
    for marker in ("Building extension", "ninja: ", "Loading extension module", "built successfully"):
        assert marker not in ds["logs"], marker
    assert max(ds["times"]) < 150, ds["times"]  # an op build alone takes ~110-180 s on these machines


# --------------------------------------------------------------------------------------------------- config
def cfg_with(ds_cfg, batch=32, accum=4, clip=None) -> TrainConfig:
    cfg = TrainConfig()
    cfg.deepspeed, cfg.data.batch_size, cfg.optim.accum_iter, cfg.optim.clip_grad = ds_cfg, batch, accum, clip
    return cfg


def test_batch_sizes_are_derived_and_checked():
    ds_cfg = build_deepspeed_config(cfg_with({"zero_optimization": {"stage": 2}}), world=8, use_cuda=False)
    assert (ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"],
            ds_cfg["train_batch_size"]) == (32, 4, 32 * 4 * 8)
    consistent = {"train_batch_size": 1024, "train_micro_batch_size_per_gpu": 32}
    assert build_deepspeed_config(cfg_with(consistent), world=8, use_cuda=False)["train_batch_size"] == 1024
    with pytest.raises(ConfigError, match="train_batch_size=512 disagrees.*1024"):
        build_deepspeed_config(cfg_with({"train_batch_size": 512}), world=8, use_cuda=False)


def test_auto_and_owned_keys_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"zero_optimization\.reduce_bucket_size is \"auto\""):
        build_deepspeed_config(cfg_with({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}), 2, False)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto"}))
    with pytest.raises(ConfigError, match=f"{path}.*train_micro_batch_size_per_gpu"):
        build_deepspeed_config(cfg_with(str(path)), 2, False)
    assert find_auto({"a": [1, {"b": "AUTO"}], "c": "x"}) == ["a.1.b"]
    with pytest.raises(ConfigError, match="'optimizer' is not allowed"):
        build_deepspeed_config(cfg_with({"optimizer": {"type": "AdamW"}}), 2, False)
    with pytest.raises(ConfigError, match="'scheduler' is not allowed"):
        build_deepspeed_config(cfg_with({"scheduler": {"type": "WarmupLR"}}), 2, False)
    with pytest.raises(ConfigError, match="not found: .*missing.json"):
        build_deepspeed_config(cfg_with(str(tmp_path / "missing.json")), 2, False)


def test_precision_and_clipping_come_from_the_yaml():
    zero3 = str(REPO / "configs" / "deepspeed" / "zero3.json")
    gpu = build_deepspeed_config(cfg_with(zero3, clip=1.0), world=8, use_cuda=True)
    assert gpu["gradient_clipping"] == 1.0  # optim.clip_grad wins over the JSON's value
    assert gpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and gpu["bf16"] == {"enabled": False}
    cpu = build_deepspeed_config(cfg_with(zero3), world=2, use_cuda=False)
    assert cpu["torch_autocast"]["enabled"] is False  # bf16 on CUDA only, as in the plain engine
    assert cpu["gradient_clipping"] == json.loads(Path(zero3).read_text())["gradient_clipping"]
    legacy = build_deepspeed_config(cfg_with({"bf16": {"enabled": True}}), world=1, use_cuda=True)
    assert legacy["bf16"]["enabled"] is False and legacy["torch_autocast"]["enabled"] is True


@pytest.mark.parametrize("name,stage", [("zero2.json", 2), ("zero3.json", 3)])
def test_shipped_deepspeed_jsons(name, stage):
    data = json.loads((REPO / "configs" / "deepspeed" / name).read_text())
    assert data["zero_optimization"]["stage"] == stage
    assert data["torch_autocast"]["enabled"] is True and data["gradient_clipping"] > 0
    assert not find_auto(data) and not {"optimizer", "scheduler", "train_batch_size"} & set(data)


# --------------------------------------------------------------------------------------------------- ViT-L/384
@pytest.mark.parametrize("dataset,drop_path", [("imagenet_lt", 0.1), ("inat18", 0.2)])
def test_vitl_384_config_builds_on_meta(dataset, drop_path):
    from fastlivt.models.vit import build_vit_from_config, count_params

    cfg = load_config(TrainConfig, REPO / "configs" / dataset / "bft_vitl_384.yaml")
    assert cfg.data.batch_size * cfg.optim.accum_iter * 8 == 1024  # Table 10's effective batch on 8 GPUs
    assert (cfg.model.arch, cfg.model.img_size, cfg.data.img_size) == ("vit_large", 384, 384)
    assert cfg.model.drop_path == drop_path and cfg.optim.layer_decay and cfg.model.grad_checkpointing
    ds_cfg = build_deepspeed_config(cfg, world=8, use_cuda=True)
    assert ds_cfg["zero_optimization"]["stage"] == 3 and ds_cfg["train_batch_size"] == 1024
    with torch.device("meta"):
        model = build_vit_from_config(cfg.model, num_classes=1000)
    # ViT-L/16 at 384 px, computed from the architecture: patch embedding, class token, 577 positions, 24 blocks of
    # (qkv 3D^2+3D, proj D^2+D, fc1 4D^2+4D, fc2 4D^2+D, 2 LayerNorms 4D), fc_norm 2D, head D x 1000 + 1000
    d = 1024
    expected = 3 * 16 * 16 * d + d + d + 577 * d + 24 * (12 * d * d + 13 * d) + 2 * d + d * 1000 + 1000
    assert count_params(model) == expected and 303e6 < expected < 306e6
    assert tuple(model.pos_embed.shape) == (1, 577, d) and model.grad_checkpointing


def test_position_embeddings_224_to_384():
    """14x14 grid (224 px) -> 24x24 (384 px): a linear function of the patch centre is carried over exactly inside the
    grid (cubic interpolation reproduces linear functions; the borders see clamped neighbours), class token kept."""
    from fastlivt.models.vit import interpolate_pos_embed

    def centres(n_old: int, n_new: int) -> torch.Tensor:  # new patch centres in old-grid index units (float64)
        return (torch.arange(n_new, dtype=torch.float64) + 0.5) * n_old / n_new - 0.5

    d = 8
    slope = torch.linspace(-1, 1, d, dtype=torch.float64)
    r, c = torch.meshgrid(torch.arange(14.0, dtype=torch.float64), torch.arange(14.0, dtype=torch.float64), indexing="ij")
    grid = (2.0 * r + 3.0 * c)[..., None] * slope  # [14, 14, d]
    cls = torch.randn(1, 1, d, dtype=torch.float64)
    pe = torch.cat([cls, grid.reshape(1, 196, d)], dim=1).float()
    out = interpolate_pos_embed(pe, 24)
    assert out.shape == (1, 1 + 24 * 24, d) and torch.equal(out[:, 0], pe[:, 0])
    rn, cn = torch.meshgrid(centres(14, 24), centres(14, 24), indexing="ij")
    ref = (2.0 * rn + 3.0 * cn)[..., None] * slope
    got = out[0, 1:].reshape(24, 24, d).double()
    inner = slice(4, 20)  # centres at least 2 old cells from the border
    assert torch.allclose(got[inner, inner], ref[inner, inner], atol=1e-4)


# --------------------------------------------------------------------------------------------------- launcher, bench
def test_launch_dry_run_builds_the_deepspeed_command(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    cmd = [sys.executable, "-m", "fastlivt", "launch", "--num_nodes", "2", "--num_gpus", "8", "--hostfile",
           str(hostfile), "--master_addr", "node1", "finetune", "--dry-run", "--config",
           "configs/imagenet_lt/bft_vitl_384.yaml", "run.epochs=1"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["deepspeed", "--num_nodes", "2", "--hostfile", str(hostfile), "--master_addr", "node1",
                                  "--num_gpus", "8", "--no_local_rank", "--module", "fastlivt", "finetune", "--config",
                                  "configs/imagenet_lt/bft_vitl_384.yaml", "run.epochs=1"]
    from fastlivt.engine.launch import main

    with pytest.raises(SystemExit, match="needs --config"):
        main(["--dry-run", "pretrain", "run.epochs=1"])
    with pytest.raises(SystemExit, match="hostfile not found"):
        main(["--dry-run", "--hostfile", str(tmp_path / "nope"), "pretrain", "--config", "x.yaml"])


def test_bench_rows_say_unavailable_on_cpu():
    from fastlivt.bench.deepspeed import run

    rows = run(quick=True, device=torch.device("cpu"))
    assert len(rows) == 4 and all(r.unavailable == "needs CUDA" and r.median is None for r in rows)

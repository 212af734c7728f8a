"""Typed configs: YAML + overrides, errors that name the key."""
import subprocess
import sys

import pytest

from fastlivt.data_prep.config import ConvertConfig
from fastlivt.config import ConfigError, TrainConfig, load_config, to_dict


def test_yaml_then_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("optim:\n  blr: 1.5e-4\n  betas: [0.9, 0.95]\nmodel:\n  arch: vit_small\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\nmodel:\n  patch_size: 4\n")
    cfg = load_config(TrainConfig, child, ["optim.blr=0.001", "data.mean=[0.1,0.2,0.3]", "run.epochs=3"])
    assert cfg.optim.blr == pytest.approx(1e-3)  # override beats file
    assert cfg.optim.betas == (0.9, 0.95)  # list in YAML -> tuple
    assert cfg.model.arch == "vit_small" and cfg.model.patch_size == 4  # inherited + own
    assert cfg.data.mean == (0.1, 0.2, 0.3)
    assert cfg.run.epochs == 3
    assert to_dict(cfg)["model"]["patch_size"] == 4


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.blr=fast", "optim.blr"),
        ("run.epochs=2.5", "run.epochs"),
        ("data.mean=[1,2]", "data.mean"),
        ("run.progress=maybe", "run.progress"),
        ("model.nope=1", "model.nope"),
        ("nosection.x=1", "nosection"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TrainConfig, None, [override])


def test_unknown_key_in_file_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("source: fmnist\nimbalance_factr: 100\n")
    with pytest.raises(ConfigError, match="imbalance_factr"):
        load_config(ConvertConfig, p)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nothere.yaml"):
        load_config(TrainConfig, tmp_path / "nothere.yaml")


def test_cli_lists_commands_and_rejects_unknown():
    ok = subprocess.run([sys.executable, "-m", "fastlivt", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "convert" in ok.stdout and "finetune" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "fastlivt", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "frobnicate" in bad.stderr


@pytest.mark.parametrize("override, message", [
    ("loss.name=focal", "loss.name: expected one of ce, bce, bal_ce, bal_bce, got 'focal'"),
    ("data.backend=webdataset", "data.backend: expected one of ffcv, dali, torch, got 'webdataset'"),
    ("run.amp=fp16", "run.amp: expected one of bf16, fp32, got 'fp16'"),
    ("model.arch=vit_huge", "model.arch: expected one of vit_tiny, vit_small, vit_base, vit_large, got 'vit_huge'"),
    ("deepspeed=5", "deepspeed: expected str or a mapping, got 5"),
    ("data.mean=[1,2]", "data.mean: expected 3 values, got [1, 2]"),
])
def test_choices_and_types_are_checked_at_load(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, [override])
    assert str(err.value) == message


def test_sections_check_values_when_built_or_replaced():
    import dataclasses

    from fastlivt.config import LossConfig

    with pytest.raises(ConfigError, match=r"^formats\[1\]: expected one of ffcv, dali, got 'tfrecord'$"):
        dataclasses.replace(ConvertConfig(), formats=["ffcv", "tfrecord"])
    with pytest.raises(ConfigError, match="fused: expected one of auto, triton, torch"):
        LossConfig(fused="cuda")
    cfg = load_config(TrainConfig, None, ["loss.test_prior=[1, 2, 3]"])
    assert cfg.loss.test_prior == [1.0, 2.0, 3.0] and dataclasses.asdict(cfg)["loss"]["test_prior"] == [1.0, 2.0, 3.0]

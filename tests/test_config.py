"""Typed configs: YAML + overrides, errors that name the key."""
import subprocess
import sys

import pytest

from fastlivt.config import ConfigError, ConvertConfig, TrainConfig, load_config, to_dict


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

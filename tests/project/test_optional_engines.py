"""FFCV, DALI, xformers and DeepSpeed stay optional: with all four unimportable (``tests/helpers/block_engines``, a
meta-path finder raising ``ModuleNotFoundError`` for them, as on a GPU image that lacks them), every other module of
fastlivt, fastlivt.kernels and fastlivt.data_prep import, the ``torch`` data backend trains a few BFT steps, and the
bench parts that use an engine write their rows or ``unavailable: <reason>`` rows naming the missing module."""
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("ffcv", "nvidia.dali", "xformers", "deepspeed")
# The FFCV backend's own modules, which import FFCV at module level (everything else imports an engine lazily).
ENGINE_MODULES = {"fastlivt.data.ffcv_ops": "ffcv", "fastlivt.data.ffcv_loader": "ffcv"}
COUNTS = [10, 6, 4, 2]

pytestmark = pytest.mark.timeout(240)


def _blocked_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "helpers" / "block_engines"), str(ROOT), env.get("PYTHONPATH", "")])
    env["FASTLIVT_BLOCK_MODULES"] = ",".join(BLOCKED)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_blocked_env(), capture_output=True, text=True,
                          timeout=200, **kw)


def _write_split(out: Path) -> Path:
    """A split in the converter's layout (webdataset tars of KEY.jpg + KEY.lbl, labels.npy, manifest.json), written
    by hand: the converter itself needs FFCV."""
    from fastlivt.data_prep.manifest import Manifest

    out.mkdir(parents=True)
    labels = np.repeat(np.arange(len(COUNTS)), COUNTS)
    rng = np.random.default_rng(0)
    with tarfile.open(out / "train-00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, label in enumerate(labels):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
            for ext, data in (("jpg", buf.getvalue()), ("lbl", np.int32(label).tobytes())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    np.save(out / "labels.npy", labels)
    Manifest(source="test", split="train", num_classes=len(COUNTS), class_names=[f"c{c}" for c in range(len(COUNTS))],
             class_counts=COUNTS, num_samples=len(labels), dali_shards=["train-00000.tar"],
             shard_sizes=[len(labels)]).save(out)
    return out


def test_the_blocker_blocks_what_is_installed():
    probe = "import importlib, sys\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n" \
            "        print(m, 'imports')\n    except ModuleNotFoundError as e:\n        print(m, 'blocked', e.name)\n"
    out = _run(["-c", probe, *BLOCKED, "ffcv.loader", "numpy"])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    for m in BLOCKED:
        assert importlib.util.find_spec(m) is not None, f"{m} is not installed here: blocking it proves nothing"
        assert f"{m} blocked {m}" in lines
    assert "ffcv.loader blocked ffcv" in lines
    assert "numpy imports" in lines


def test_every_module_but_the_ffcv_backend_imports_without_the_engines():
    script = (
        "import importlib, json, os, pathlib, sys\n"
        "failed = {}\n"
        "for pkg in ('fastlivt',):\n"
        "    for p in sorted(pathlib.Path(d, f) for d, _, fs in os.walk(pkg, followlinks=True) for f in fs\n"
        "                    if f.endswith('.py')):\n"
        "        parts = p.with_suffix('').parts\n"
        "        if parts[-1] == '__main__':\n"
        "            continue\n"
        "        name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)\n"
        "        try:\n"
        "            importlib.import_module(name)\n"
        "        except Exception as e:\n"
        "            failed[name] = [type(e).__name__, str(e), getattr(e, 'name', None) or '']\n"
        "print(json.dumps(failed))\n")
    out = _run(["-c", script])
    assert out.returncode == 0, out.stderr
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(failed) <= set(ENGINE_MODULES), f"modules that need an optional engine at import: {failed}"
    for name, (kind, msg, _) in failed.items():
        assert ENGINE_MODULES[name] in msg, (name, kind, msg)


def test_torch_backend_trains_without_the_engines(tmp_path):
    split = _write_split(tmp_path / "split")
    out = tmp_path / "run"
    config = tmp_path / "bft.yaml"
    config.write_text("run:\n  stage: finetune\n")
    args = ["-m", "fastlivt", "finetune", "--config", str(config), f"data.train={split}", f"data.val={split}",
            "data.backend=torch", "data.img_size=16", "data.batch_size=8", "data.workers=0", "data.auto_augment=rand-m9-mstd0.5-inc1",
            "data.mixup=0.8", "data.cutmix=1.0", "model.arch=vit_tiny", "model.patch_size=8", "model.embed_dim=32",
            "model.depth=1", "model.num_heads=2", "model.img_size=16", "model.attention=auto", "run.device=cpu",
            "run.epochs=2", "optim.warmup_epochs=1", "run.max_steps=3", "run.log_every=1", "run.progress=false", "run.tensorboard=false",
            "run.compile=off", "run.eval_every=0", f"run.out={out}", "loss.name=bal_bce"]
    res = _run(args)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = (out / "train.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,") and len(rows) >= 3, rows
    losses = [float(r.split(",")[rows[0].split(",").index("loss")]) for r in rows[1:]]
    assert all(np.isfinite(losses)), losses
    assert "torch loader: train/finetune" in res.stderr  # the backend that was asked for, not a fallback


@pytest.mark.parametrize("part,missing", [("data", "ffcv"), ("attention", "xformers"), ("deepspeed", None)])
def test_engine_bench_parts_write_rows_or_unavailable(tmp_path, part, missing):
    res = _run(["-m", "fastlivt", "bench", part, "--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    (result,) = tmp_path.glob("bench-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert rows and all(r["unavailable"] or r["median"] for r in rows)
    assert not [r for r in rows if (r["unavailable"] or "").startswith("error:")]
    if missing:  # the engine's rows say which module is missing; the rows that need no engine are measured
        assert any(missing in (r["unavailable"] or "") for r in rows), rows
        assert any(r["median"] for r in rows), rows


def test_convert_without_ffcv_is_a_one_line_error(tmp_path):
    (tmp_path / "src" / "c0").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "c0" / "a.jpg")
    res = _run(["-m", "fastlivt", "convert", "imagefolder", "--root", str(tmp_path / "src"), "--out",
                str(tmp_path / "out"), "--no-progress"])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("fastlivt: error: convert needs ffcv 1.0.2")
    assert not (tmp_path / "out").exists()

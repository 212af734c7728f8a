"""The README's first command, end to end on real Fashion-MNIST-LT (quick mode, two of the four losses)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_file(), reason="Debian's dataset-fashion-mnist is not installed")
def test_quick_demo_runs_every_stage_and_writes_the_table(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    cmd = [sys.executable, "-m", "fastlivt", "demo", "--quick", "--out", str(out), "--data", str(data),
           "--losses", "ce,bal_bce"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a successful command prints no traceback: not even one "ignored" in a finalizer (numba's, at loader changes)
    for noise in ("Traceback", "Exception ignored"):
        assert noise not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    # both splits converted and verifiable
    train = json.loads((data / "train" / "manifest.json").read_text())
    test = json.loads((data / "test" / "manifest.json").read_text())
    assert train["num_samples"] == sum(train["class_counts"]) and max(train["class_counts"]) == 100 * min(train["class_counts"])
    assert test["class_counts"] == [1000] * 10
    # the MGP export fed both fine-tunings, each evaluated on the 10k test images
    assert (out / "mgp" / "encoder.safetensors").is_file()
    res = json.loads((out / "results.json").read_text())
    assert set(res["results"]) == {"ce", "bal_bce"}
    for loss, m in res["results"].items():
        assert m["num_samples"] == 10000
        assert 0.0 <= m["overall"] <= 100.0 and 0.0 <= m["ece"] <= 100.0 and m["mce"] >= m["ece"] - 1e-9  # equal (1 ulp apart) when one bin holds every prediction
        acc = m["per_class_accuracy"]
        assert len(acc) == 10 and all(0.0 <= a <= 100.0 for a in acc if not math.isnan(a))
        # overall top-1 on a balanced test set is the mean of the per-class accuracies
        assert m["overall"] == pytest.approx(sum(acc) / 10, abs=0.02)
        assert (out / f"eval_{loss}" / "per_class.csv").is_file() and (out / f"eval_{loss}" / "reliability.png").is_file()
    table = (out / "results.md").read_text()
    assert "| ce |" in table and "| bal_bce |" in table and "Ankle boot (n=60)" in table
    # the Bal-BCE form the demo config chose is the one trained, recorded and shown
    import yaml

    form = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs/fmnist_lt/bft.yaml").read_text())["loss"]["form"]
    assert yaml.safe_load((out / "bft_bal_bce" / "config.yaml").read_text())["loss"]["form"] == form
    assert res["loss_form"] == form and f"Bal-BCE form {form}" in table
    assert (out / "results.png").stat().st_size > 0
    # a second run reuses the verified conversion instead of converting again, and redoes a corrupted one
    from fastlivt.demo import convert_split

    before = (data / "test" / "manifest.json").stat().st_mtime_ns
    assert convert_split("test", data / "test", None).num_samples == 10000
    assert (data / "test" / "manifest.json").stat().st_mtime_ns == before
    with open(data / "test" / "labels.npy", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert convert_split("test", data / "test", None).num_samples == 10000
    assert (data / "test" / "manifest.json").stat().st_mtime_ns != before


@pytest.mark.skipif(not FMNIST.is_file(), reason="Debian's dataset-fashion-mnist is not installed")
def test_proxy_split_holds_out_training_images_only(tmp_path):
    import numpy as np

    from fastlivt.data_prep.sources import read_fmnist
    from fastlivt.demo import PROXY_HOLDOUT, write_proxy_source

    root = write_proxy_source(tmp_path / "proxy")
    full = read_fmnist(FMNIST.parent, "train")
    pool, held = read_fmnist(root, "train"), read_fmnist(root, "test")
    assert np.bincount(held.labels, minlength=10).tolist() == [PROXY_HOLDOUT] * 10
    assert len(pool.labels) + len(held.labels) == len(full.labels)
    # every image of the full training set is in exactly one part (as (pixels, label) multisets), none from t10k
    key = lambda a, y: sorted(hash(img.tobytes() + bytes([lab])) for img, lab in zip(a, y))  # noqa: E731
    assert sorted(key(pool.array, pool.labels) + key(held.array, held.labels)) == key(full.array, full.labels)
    again = read_fmnist(write_proxy_source(tmp_path / "again"), "test")  # deterministic
    assert np.array_equal(again.labels, held.labels) and np.array_equal(again.array, held.array)


_PROXY_WRITER = "import sys; from pathlib import Path; from fastlivt.demo import write_proxy_source; " \
                "write_proxy_source(Path(sys.argv[1]))"


@pytest.mark.skipif(not FMNIST.is_file(), reason="Debian's dataset-fashion-mnist is not installed")
def test_two_runs_write_one_proxy_source_at_once(tmp_path):
    # two `fastlivt demo --proxy` runs sharing --data write the same files at the same time
    import os

    import numpy as np

    from fastlivt.data_prep.sources import read_fmnist
    from fastlivt.demo import write_proxy_source

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", _PROXY_WRITER, str(tmp_path / "shared")], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), results
    alone = write_proxy_source(tmp_path / "alone")
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == sorted(p.name for p in alone.iterdir())
    for split in ("train", "test"):
        shared, single = read_fmnist(tmp_path / "shared", split), read_fmnist(alone, split)
        assert np.array_equal(shared.labels, single.labels) and np.array_equal(shared.array, single.array)

"""`fastlivt convert` on every source kind, the long-tail rule (Table 8 counts) and Fashion-MNIST-LT."""
import json
from pathlib import Path

import numpy as np
import pytest

from convert_testdata import (check_outputs, ldam_subset, make_cifar, make_files, make_fmnist, read_fmnist_idx)
from fastlivt.data_prep.cli import main
from fastlivt.data_prep.longtail import select_longtail

FMNIST = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[2]


def run(args, capsys=None):
    rc = main([str(a) for a in args] + ["--no-progress"])
    return rc


@pytest.mark.parametrize("per_class, num_classes, factor, total", [
    (5000, 10, 100, 12406), (5000, 10, 10, 20431), (500, 100, 100, 10847), (500, 100, 10, 19573),
    (6000, 10, 100, 14886),
])
def test_table8_counts(per_class, num_classes, factor, total):
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(num_classes), per_class))
    keep = select_longtail(labels, num_classes, factor, seed=0)
    assert len(keep) == total
    counts = np.bincount(labels[keep], minlength=num_classes)
    assert counts[0] == per_class and counts[-1] == per_class // factor
    assert np.all(np.diff(counts) <= 0)
    # the very subset LDAM-DRW (and LiVT) draws with this seed
    assert np.array_equal(keep, ldam_subset(labels, num_classes, factor, seed=0))


def test_longtail_other_seed_changes_subset_not_counts():
    labels = np.repeat(np.arange(10), 50)
    a, b = select_longtail(labels, 10, 10, 0), select_longtail(labels, 10, 10, 1)
    assert len(a) == len(b) and set(a.tolist()) != set(b.tolist())
    assert np.array_equal(b, ldam_subset(labels, 10, 10, seed=1))


def _inat_json(path: Path, items, num_classes):
    images = [{"id": 100 + k, "file_name": rel, "width": 24, "height": 20} for k, (rel, _, _) in enumerate(items)]
    anns = [{"id": k, "image_id": 100 + k, "category_id": y} for k, (_, y, _) in enumerate(items)]
    cats = [{"id": c, "name": f"species_{c}", "supercategory": "Plantae"} for c in range(num_classes)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


@pytest.mark.parametrize("kind", ["imagefolder", "list", "inat", "cifar10", "cifar100", "fmnist"])
def test_every_source(kind, tmp_path):
    root, out = tmp_path / "raw", tmp_path / "out"
    extra = []
    if kind in ("imagefolder", "list", "inat"):
        items = make_files(root / ("train" if kind == "imagefolder" else "images"), [5, 4, 3])
        reference = [(y, px) for _, y, px in items]
        names = ["class_0", "class_1", "class_2"]
        if kind == "list":
            lst = tmp_path / "train.txt"
            # paths relative to --root; a leading '/' (as in some OLTR lists) is still relative
            lst.write_text("".join(f"{'/' if k % 2 else ''}images/{rel} {y}\n" for k, (rel, y, _) in enumerate(items)))
            extra = ["--list", lst]
            names = ["0", "1", "2"]
        if kind == "inat":
            js = tmp_path / "train2018.json"
            _inat_json(js, [(f"images/{rel}", y, px) for rel, y, px in items], 3)
            extra = ["--list", js]
            names = ["species_0", "species_1", "species_2"]
    elif kind.startswith("cifar"):
        data = make_cifar(root, kind, per_class=3 if kind == "cifar10" else 1)
        reference = data["train"]
        names = [f"c10_{c}" for c in range(10)] if kind == "cifar10" else [f"c100_{c}" for c in range(100)]
    else:
        reference = make_fmnist(root, per_class=3)["train"]
        names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
    rc = run([kind, "--root", root, *extra, "--formats", "ffcv,dali", "--out", out, "--write-mode", "raw",
              "--workers", "1", "--shard-size", "4", "--jpeg-quality", "95"])
    assert rc == 0
    m = check_outputs(out, reference)
    assert m["source"] == kind and m["split"] == "train" and m["class_names"] == names
    assert m["class_counts"] == np.bincount([y for y, _ in reference], minlength=len(names)).tolist()
    assert m["skipped"] == [] and m["imbalance_factor"] is None
    assert m["image"] == {"write_mode": "raw", "max_resolution": None, "jpeg_quality": 95}


def test_cifar10_longtail_end_to_end(tmp_path):
    """The CLI applies LDAM's subset rule: same images (by content) as the transcribed reference."""
    data = make_cifar(tmp_path / "raw", "cifar10", per_class=30)["train"]
    labels = np.array([y for y, _ in data])
    keep = ldam_subset(labels, 10, 10, seed=0)
    rc = run(["cifar10", "--root", tmp_path / "raw", "--imbalance-factor", "10", "--formats", "ffcv,dali",
              "--out", tmp_path / "out", "--write-mode", "raw", "--workers", "2", "--shard-size", "50"])
    assert rc == 0
    m = check_outputs(tmp_path / "out", [data[i] for i in keep])
    assert m["class_counts"] == [int(30 * 0.1 ** (c / 9)) for c in range(10)]
    assert m["imbalance_factor"] == 10 and m["num_samples"] == len(keep)
    # the written order is shuffled, not grouped by class
    assert not np.all(np.diff(np.load(tmp_path / "out" / "labels.npy")) >= 0)


@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (/usr/share/datasets/fashion-mnist)")
def test_fmnist_lt_from_debian(tmp_path, capsys):
    out = tmp_path / "fmnist_lt"
    rc = run(["fmnist", "--root", FMNIST, "--imbalance-factor", "100", "--formats", "ffcv,dali", "--out", out,
              "--write-mode", "raw"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "14886 images" in printed and "many/medium/few" in printed and "train.beton" in printed
    images, labels = read_fmnist_idx(FMNIST, "train")
    keep = ldam_subset(labels, 10, 100, seed=0)
    reference = [(labels[i], np.repeat(images[i][..., None], 3, axis=2)) for i in keep]
    m = check_outputs(out, reference, jpeg_tol=6.0)
    assert m["num_samples"] == 14886
    assert m["class_counts"] == [int(6000 * 0.01 ** (c / 9)) for c in range(10)]
    assert main(["--verify", str(out)]) == 0


@pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (/usr/share/datasets/fashion-mnist)")
def test_fmnist_test_split_from_config(tmp_path):
    """--config gives the settings; flags and key=value override them; the test split stays balanced."""
    out = tmp_path / "test"
    rc = run(["--config", REPO / "configs" / "fmnist_lt" / "convert.yaml", "shard_size=4000", "--split", "test",
              "--out", out, "--formats", "dali"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_samples"] == 10000 and m["class_counts"] == [1000] * 10 and m["imbalance_factor"] is None
    assert m["shard_sizes"] == [4000, 4000, 2000] and m["ffcv"] is None
    assert sorted(m["files"]) == sorted(m["dali_shards"] + m["dali_index"] + ["labels.npy"])

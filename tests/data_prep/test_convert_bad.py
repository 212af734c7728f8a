"""Bad input under --on-error skip and fail: skipped and recorded, or stopped with the file named and no output."""
import io
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from convert_testdata import check_outputs, save_jpeg, save_png, smooth_image
from fastlivt.data_prep.cli import main
from fastlivt.data_prep.config import ConfigError
from fastlivt.data_prep.sources import SourceError

H, W = 20, 24


def _convertibles(root: Path, rng) -> list:
    """Images that must be converted to RGB, with their reference RGB pixels computed here."""
    items = []
    gray = smooth_image(rng, H, W)[..., 0]
    save_png(root / "conv/gray.png", gray)
    items.append(("conv/gray.png", np.repeat(gray[..., None], 3, 2)))
    rgba = np.dstack([smooth_image(rng, H, W), rng.integers(0, 256, (H, W), dtype=np.uint8)])
    save_png(root / "conv/rgba.png", rgba)
    items.append(("conv/rgba.png", rgba[..., :3]))  # alpha dropped
    palette = (np.arange(16)[:, None] * rng.uniform(4, 15, 3) + rng.uniform(0, 60, 3)).astype(np.uint8)
    index = (smooth_image(rng, H, W)[..., 0] // 16).astype(np.uint8)
    p = Image.fromarray(index, mode="P")
    p.putpalette(palette.reshape(-1).tolist() + [0] * (768 - 48))
    p.info["transparency"] = 3
    p.save(root / "conv/palette.png", transparency=3)
    items.append(("conv/palette.png", palette[index]))
    deep = (smooth_image(rng, H, W)[..., 0].astype(np.uint16) * 257 + rng.integers(0, 257, (H, W))).astype(np.uint16)
    Image.fromarray(deep).save(root / "conv/deep16.png")
    items.append(("conv/deep16.png", np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, 2)))
    cmy = smooth_image(rng, H, W)
    Image.fromarray(np.dstack([cmy, np.zeros((H, W), np.uint8)]), mode="CMYK").save(root / "conv/cmyk.tif")
    items.append(("conv/cmyk.tif", 255 - cmy))  # K = 0: R,G,B = 255 - C,M,Y
    bilevel = smooth_image(rng, H, W)[..., 1] > 100
    Image.fromarray(bilevel).save(root / "conv/bilevel.png")
    items.append(("conv/bilevel.png", np.repeat(bilevel[..., None].astype(np.uint8) * 255, 3, 2)))
    Image.fromarray(smooth_image(rng, H, W)[..., 0]).save(root / "conv/gray.jpg", quality=95)
    items.append(("conv/gray.jpg", cv2.cvtColor(cv2.imread(str(root / "conv/gray.jpg")), cv2.COLOR_BGR2RGB)))
    Image.fromarray(smooth_image(rng, H, W)).convert("CMYK").save(root / "conv/cmyk.jpg", quality=95)
    items.append(("conv/cmyk.jpg", np.asarray(Image.open(root / "conv/cmyk.jpg").convert("RGB"))))
    items.append(("conv/rgb.jpg", save_jpeg(root / "conv/rgb.jpg", smooth_image(rng, H, W))))
    return items


def _bad(root: Path, rng) -> dict:
    """Bad files and list lines -> the words their reason must contain. All of class 3 is bad."""
    good_jpeg = io.BytesIO()
    Image.fromarray(smooth_image(rng, H, W)).save(good_jpeg, format="JPEG")
    good_png = io.BytesIO()
    Image.fromarray(smooth_image(rng, H, W)).save(good_png, format="PNG")
    (root / "bad").mkdir(parents=True)
    (root / "bad/truncated.jpg").write_bytes(good_jpeg.getvalue()[: len(good_jpeg.getvalue()) // 2])
    (root / "bad/truncated.png").write_bytes(good_png.getvalue()[: len(good_png.getvalue()) // 2])
    (root / "bad/zero.jpg").write_bytes(b"")
    (root / "bad/text.png").write_text("this is not an image\n" * 20)
    return {
        "bad/truncated.jpg 3": ("bad/truncated.jpg", "truncated or corrupt"),
        "bad/truncated.png 3": ("bad/truncated.png", "truncated or corrupt"),
        "bad/zero.jpg 3": ("bad/zero.jpg", "zero-byte"),
        "bad/text.png 3": ("bad/text.png", "not an image"),
        "bad/missing.jpg 3": ("bad/missing.jpg", "missing file"),
        "good/g0.png 7": ("good/g0.png", "out of range"),
        "good/g0.png": (":", "malformed line"),
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(5)
    good = []
    for k in range(6):
        px = smooth_image(rng, H, W)
        save_png(root / f"good/g{k}.png", px)
        good.append((f"good/g{k}.png", k % 3, px))
    conv = [(rel, k % 3, px) for k, (rel, px) in enumerate(_convertibles(root, rng))]
    bad = _bad(root, rng)
    return root, good + conv, bad


def _list(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _no_outputs(out: Path):
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == [], f"a failed conversion left {left}"


def test_skip_records_every_bad_input(dataset, tmp_path, capsys):
    root, ok, bad = dataset
    lines = [f"{rel} {y}" for rel, y, _ in ok] + list(bad)
    lst = _list(tmp_path / "train.txt", lines)
    out = tmp_path / "out"
    rc = main(["list", "--root", str(root), "--list", str(lst), "--num-classes", "4", "--formats", "ffcv,dali",
               "--out", str(out), "--write-mode", "raw", "--on-error", "skip", "--workers", "2", "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    m = check_outputs(out, [(y, px) for _, y, px in ok], jpeg_tol=12.0)
    assert m["class_counts"] == [5, 5, 5, 0]
    skipped = {s["path"]: s["reason"] for s in m["skipped"]}
    expected = {}
    for line, (rel, words) in bad.items():
        path = f"{lst}:{lines.index(line) + 1}" if rel == ":" else str(root / rel)
        expected[path] = words
    expected["class 3 (3)"] = "empty"
    assert set(skipped) == set(expected)
    for path, words in expected.items():
        assert words in skipped[path], (path, skipped[path])
    assert "(8 skipped)" in captured.out and "skipped: 8" in captured.out
    assert all(f"{path}: {skipped[path]}" in captured.out for path in expected)  # the printed summary


def _tar_jpegs(out: Path) -> set:
    import tarfile

    m = json.loads((out / "manifest.json").read_text())
    found = set()
    for shard in m["dali_shards"]:
        with tarfile.open(out / shard) as t:
            found |= {t.extractfile(x).read() for x in t.getmembers() if x.name.endswith(".jpg")}
    return found


def test_valid_rgb_jpeg_is_kept_as_is(dataset, tmp_path):
    """A source that already is an RGB JPEG of the right size goes into the shards byte for byte."""
    root, ok, _ = dataset
    lst = _list(tmp_path / "l.txt", ["conv/rgb.jpg 0", "conv/gray.jpg 1"])
    out = tmp_path / "out"
    assert main(["list", "--root", str(root), "--list", str(lst), "--formats", "dali", "--out", str(out),
                 "--workers", "0", "--no-progress"]) == 0
    jpegs = _tar_jpegs(out)
    assert (root / "conv/rgb.jpg").read_bytes() in jpegs
    assert (root / "conv/gray.jpg").read_bytes() not in jpegs  # grayscale: re-encoded as RGB


@pytest.mark.parametrize("which", range(7))
def test_fail_names_the_file_and_leaves_nothing(dataset, tmp_path, capsys, which):
    root, ok, bad = dataset
    line = list(bad)[which]
    rel, _ = bad[line]
    lst = _list(tmp_path / "train.txt", [f"{r} {y}" for r, y, _ in ok[:6]] + [line])
    out = tmp_path / "out"
    rc = main(["list", "--root", str(root), "--list", str(lst), "--num-classes", "4", "--formats", "ffcv,dali",
               "--out", str(out), "--on-error", "fail", "--workers", "1", "--shard-size", "2", "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    named = f"{lst}:7" if rel == ":" else str(root / rel)
    assert named in err and "--on-error fail" in err
    _no_outputs(out)


def test_empty_class_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for c in ("a", "c"):
        for k in range(2):
            save_png(tmp_path / "raw" / c / f"{k}.png", smooth_image(rng, H, W))
    (tmp_path / "raw" / "b").mkdir()
    (tmp_path / "raw" / "b" / "notes.txt").write_text("no images here")
    args = ["imagefolder", "--root", str(tmp_path / "raw"), "--formats", "ffcv", "--workers", "0", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "fail"), "--on-error", "fail"]) == 1
    assert str(tmp_path / "raw" / "b") in capsys.readouterr().err
    _no_outputs(tmp_path / "fail")
    assert main(args + ["--out", str(tmp_path / "skip"), "--on-error", "skip"]) == 0
    m = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    assert m["class_names"] == ["a", "b", "c"] and m["class_counts"] == [2, 0, 2]
    assert m["skipped"] == [{"path": str(tmp_path / "raw" / "b"), "reason": "class 1 (b) is empty: no images listed"}]


def test_inat_annotation_problems(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(3):
        save_png(tmp_path / "train_val2018" / f"{k}.png", smooth_image(rng, H, W))
    js = {"images": [{"id": k, "file_name": f"train_val2018/{k}.png"} for k in range(3)],
          "annotations": [{"id": 0, "image_id": 0, "category_id": 0}, {"id": 1, "image_id": 1, "category_id": 9}],
          "categories": [{"id": 0, "name": "x"}]}
    (tmp_path / "train2018.json").write_text(json.dumps(js))
    args = ["inat", "--root", str(tmp_path), "--list", str(tmp_path / "train2018.json"), "--formats", "dali",
            "--workers", "0", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "o"), "--on-error", "skip"]) == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert m["num_samples"] == 1 and set(reasons) == {"1.png", "2.png"}
    assert "category_id) 9 out of range" in reasons["1.png"] and "no annotation" in reasons["2.png"]
    assert main(args + ["--out", str(tmp_path / "f"), "--on-error", "fail"]) == 1
    _no_outputs(tmp_path / "f")


def test_convertible_images_pass_under_fail(dataset, tmp_path):
    root, ok, _ = dataset
    lst = _list(tmp_path / "l.txt", [f"{rel} {y}" for rel, y, _ in ok])
    out = tmp_path / "out"
    assert main(["list", "--root", str(root), "--list", str(lst), "--formats", "dali", "--out", str(out),
                 "--on-error", "fail", "--workers", "1", "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_samples"] == len(ok) and m["skipped"] == []


@pytest.mark.parametrize("args, words", [
    (["--formats", "ffcv,tfrecord"], "formats[1]: expected one of ffcv, dali, got 'tfrecord'"),  # checked at load
    (["--write-mode", "raw", "jpeg_quality=300"], "jpeg_quality=300"),
    (["shard_sizes=3"], "unknown key shard_sizes"),
    (["--imbalance-factor", "0.5"], "imbalance_factor=0.5"),
    (["--root", "/nonexistent/dir"], "/nonexistent/dir"),
])
def test_bad_settings_are_named(tmp_path, args, words):
    # a user's mistake is raised for the command line to report as one line (tests/fastlivt/test_cli.py)
    base = ["fmnist", "--root", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"]
    with pytest.raises((ConfigError, SourceError), match=re.escape(words)):
        main(base + args)
    assert not (tmp_path / "o").exists()


def test_cifar_label_out_of_range(tmp_path, capsys):
    import pickle

    from convert_testdata import make_cifar

    make_cifar(tmp_path / "raw", "cifar10", per_class=2)
    batch = tmp_path / "raw" / "cifar-10-batches-py" / "data_batch_1"
    d = pickle.loads(batch.read_bytes())
    d[b"labels"][0] = 12
    batch.write_bytes(pickle.dumps(d))
    args = ["cifar10", "--root", str(tmp_path / "raw"), "--formats", "dali", "--workers", "0", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "s"), "--on-error", "skip"]) == 0
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["skipped"] == [{"path": f"{batch}[0]", "reason": "label 12 out of range [0, 10)"}]
    assert m["num_samples"] == 19 and sum(m["class_counts"]) == 19
    assert main(args + ["--out", str(tmp_path / "f"), "--on-error", "fail"]) == 1
    assert f"{batch}[0]: label 12 out of range" in capsys.readouterr().err
    _no_outputs(tmp_path / "f")


def test_a_crashing_decode_process_is_named_not_waited_for():
    import os
    import signal

    from fastlivt.data_prep.decode import DecodeJob, WorkerDied, decode_all
    from fastlivt.data_prep.sources import Source

    class Crashing(Source):
        def read(self, i):
            if i == 37:  # as a decoder segfault on a corrupt file would
                os.kill(os.getpid(), signal.SIGKILL)
            return np.zeros((4, 4), np.uint8)

    src = Crashing("fmnist", 1, ["a"], [f"file{i}.jpg" for i in range(100)], np.zeros(100, np.int64))
    with pytest.raises(WorkerDied, match=r"decoding file37\.jpg$"):
        for _ in decode_all(DecodeJob(src, None, 90, True, None), list(range(100)), workers=2):
            pass

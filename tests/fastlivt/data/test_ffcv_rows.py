"""The ffcv backend's host part: FFCV's pipeline hands over each sample's stored bytes (raw pixels or JPEG) in one row
per sample, and the device part turns them into the shared crops — checked on .beton files of mixed write modes and
varied sizes against the bytes read straight from the file."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg

from fastlivt.config import TrainConfig, load_config
from fastlivt.data import build_loader
from fastlivt.data import device_crop as dc
from convert_testdata import beton_stored
from image_folders import no_numba_jit  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.timeout(600)
SIZES = [(30, 41), (52, 33), (41, 41), (36, 60), (60, 28), (33, 47), (45, 38), (28, 52), (50, 50)]


def _picture(rng, h, w):
    coarse = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    return np.clip(np.asarray(coarse, np.int16) + rng.integers(-10, 11, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A split of 18 images in 2 classes (two rounds of SIZES) converted with FFCV's 'proportion' mode: some rows
    raw, some JPEG."""
    from fastlivt.data_prep.cli import main

    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(4)
    for c in range(2):
        (root / "src" / f"c{c}").mkdir(parents=True)
        for k, (h, w) in enumerate(SIZES):
            Image.fromarray(_picture(rng, h, w)).save(root / "src" / f"c{c}" / f"{k}.png")
    out = root / "out"
    assert main(["imagefolder", "--root", str(root / "src"), "--formats", "ffcv", "--out", str(out), "--workers", "0",
                 "--write-mode", "proportion", "--compress-probability", "0.5", "--no-progress"]) == 0
    return out


def _rows(beton, jit: bool, workers: int):
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.compiler import Compiler
    from ffcv.reader import Reader
    from ffcv.transforms import ToTensor

    from fastlivt.data.ffcv_ops import StoredBytes, jpeg_max_bytes

    Compiler.set_enabled(jit)
    try:
        op = StoredBytes(jpeg_max_bytes(Reader(str(beton)), "image"))
        loader = Loader(str(beton), batch_size=4, num_workers=workers, order=OrderOption.SEQUENTIAL, drop_last=False,
                        pipelines={"image": [op, ToTensor()], "label": None})
        rows = torch.cat([r.clone() for (r,) in loader])
    finally:
        Compiler.set_enabled(True)
    return rows, op.layout()


@pytest.mark.parametrize("jit,workers", [(False, 1), (True, 2)])
def test_rows_hold_each_samples_stored_bytes(mixed, jit, workers):
    from fastlivt.data.ffcv_ops import HEADER_BYTES, JPG, RAW, row_header

    stored = beton_stored(mixed / "train.beton")
    modes = {mode for _, _, mode, _ in stored}
    assert modes == {RAW, JPG}  # the fixture really mixes the two
    rows, (max_h, max_w, row_bytes) = _rows(mixed / "train.beton", jit, workers)
    assert (max_h, max_w) == (60, 60) and rows.shape == (len(stored), row_bytes) and row_bytes % 8 == 0
    jpeg_max = max(data.size for _, _, mode, data in stored if mode == JPG)
    assert row_bytes == -(-(HEADER_BYTES + max(60 * 60 * 3, jpeg_max)) // 8) * 8
    header = row_header(rows)
    for i, (h, w, mode, data) in enumerate(stored):
        assert header[i].tolist() == [h, w, mode, data.size]
        payload = rows[i, HEADER_BYTES:].numpy()
        if mode == JPG:
            assert np.array_equal(payload[:data.size], data)
        else:
            pixels = payload[:max_h * max_w * 3].reshape(max_h, max_w, 3)[:h, :w]
            assert np.array_equal(pixels, data.reshape(h, w, 3))


def _cfg(out, *over):
    return load_config(TrainConfig, None, [f"data.train={out}", f"data.val={out}", "data.backend=ffcv",
                                           "data.img_size=24", "data.batch_size=5", "data.workers=1", "run.seed=2",
                                           "data.rrc_scale=[0.08,1.0]", *over])


def _references(beton):
    """Each row's image decoded on its own: raw pixels as stored, JPEGs by torchvision."""
    from fastlivt.data.ffcv_ops import JPG

    out = []
    for h, w, mode, data in beton_stored(beton):
        t = torch.from_numpy(data.copy())
        out.append(decode_jpeg(t) if mode == JPG else t.view(h, w, 3).permute(2, 0, 1).contiguous())
    return out


def _to_uint8(images):
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1) * 255
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1) * 255
    return (images * std + mean).round().to(torch.uint8)


def test_hand_over_only_yields_the_rows_with_the_draws_made(mixed):
    from fastlivt.data.ffcv_ops import row_header

    stored = beton_stored(mixed / "train.beton")
    with build_loader(_cfg(mixed, "data.auto_augment=rand-m9-mstd0.5-inc1"), "train", "finetune") as loader:
        loader.hand_over_only = True
        plan = loader.plan(0)
        rows = torch.cat([x.clone() for x, _ in loader])
    assert rows.dtype == torch.uint8 and rows.shape[0] == plan.size
    assert row_header(rows)[:, 3].tolist() == [stored[i][3].size for i in plan]  # the plan's samples, in order


def test_a_corrupt_jpeg_row_is_an_error_naming_the_file_and_row(mixed, tmp_path):
    """A decoder failure (on FFCV's epoch thread on the CPU) reaches the consumer as the error, naming the row."""
    import shutil

    from ffcv.reader import Reader

    from fastlivt.data.device_decode import UndecodableSample
    from fastlivt.data.ffcv_ops import JPG

    out = tmp_path / "corrupt"
    shutil.copytree(mixed, out)
    meta = Reader(str(out / "train.beton")).metadata["f0"]
    row = int(np.flatnonzero(meta["mode"] == JPG)[0])
    with open(out / "train.beton", "r+b") as f:
        f.seek(int(meta["data_ptr"][row]) + 3)  # keep the SOI marker: a JPEG whose segments are garbage
        f.write(b"\x00" * 64)
    with build_loader(_cfg(out), "val", "eval") as loader:
        with pytest.raises(UndecodableSample, match=rf"train.beton: row {row}: corrupt JPEG"):
            for _ in loader:
                pass


def test_the_rows_are_allocated_once_per_loader_and_reused_by_every_pass(mixed):
    """FFCV allocates every buffer anew per pass; the rows (B x row bytes per batch slot) are kept instead."""
    from fastlivt.data.ffcv_ops import StoredBytes

    with build_loader(_cfg(mixed), "val", "eval") as loader:
        node = loader.loader.graph.operation_to_node[loader.rows_op][0].id
        passes, rows_buffers, label_buffers = [], [], []
        for _ in range(2):
            images = []
            for x, _ in loader:
                images.append(x.clone())
                allocations = loader.loader._current.memory_allocations["operation"]  # this pass's buffers
            passes.append(torch.cat(images))
            rows_buffers.append(allocations[node])
            label_buffers.append([b for k, b in allocations.items() if k != node and b is not None])
    assert isinstance(loader.rows_op, StoredBytes)
    assert rows_buffers[0] is rows_buffers[1]  # the same memory in both passes
    assert label_buffers[0] and all(a is not b for a, b in zip(label_buffers[0], label_buffers[1]))  # FFCV's own
    assert torch.equal(passes[0], passes[1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_mixed_modes_give_the_shared_crops_of_each_samples_image(mixed, device):
    """Raw rows viewed as pixels (copied over on a GPU), JPEG rows decoded (nvJPEG on a GPU), both in one zero-padded
    batch: each batch equals the shared crop of its samples decoded one by one on the device, train and eval (the
    same padded extent: the batch's largest image)."""
    from ffcv.pipeline.compiler import Compiler

    from fastlivt.data.ffcv_ops import JPG

    Compiler.set_enabled(device == "cuda")  # numba's compile once, where the GPU test runs
    dev = torch.device(device)
    refs = [decode_jpeg(torch.from_numpy(data.copy()), device=dev) if mode == JPG else
            torch.from_numpy(data.copy()).view(h, w, 3).permute(2, 0, 1).to(dev)
            for h, w, mode, data in beton_stored(mixed / "train.beton")]
    for stage, which in (("pretrain", "train"), ("eval", "val")):
        with build_loader(_cfg(mixed), which, stage, device=device) as loader:
            plan = loader.plan(0)
            p = loader.sample_params(plan, loader.heights[plan], loader.widths[plan])  # epoch 0's, before the pass
            resize = loader.eval_resize()
            batches = [x.clone() for x, _ in loader]
        assert all(x.device.type == device for x in batches) and sum(x.shape[0] for x in batches) == plan.size
        for k, x in enumerate(batches):
            at = slice(5 * k, 5 * k + x.shape[0])
            images = [refs[i] for i in plan[at]]
            if stage == "eval":
                sizes = np.array([r.shape[1:] for r in images])
                expected = dc.resize_center_crop(images, sizes, resize, 24)
            else:
                expected = dc.crop_resize(images, p.windows[at], p.flip[at], 24)
            assert torch.equal(_to_uint8(x.cpu()), expected.cpu()), f"{stage} batch {k}"

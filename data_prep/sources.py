"""Readers of raw datasets in their own on-disk formats, one per SOURCE kind.

Every reader lists a split into a :class:`Source`: the name (path) and label of each listed sample, the class names,
and the problems found while listing (labels out of range, malformed lines, images without annotation), which the
conversion skips or fails on. ``Source.read(i)`` returns the raw content of sample ``i``: the file's bytes for image
files, or a ``uint8`` array (H×W grayscale or H×W×3 RGB) for array datasets (CIFAR pickles, Fashion-MNIST IDX).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np

log = logging.getLogger("fastlivt.data_prep.sources")

SOURCES = ("imagefolder", "list", "inat", "cifar10", "cifar100", "fmnist")
# File names that count as images in an image folder (torchvision's IMG_EXTENSIONS).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]


class SourceError(ValueError):
    """A source cannot be read at all (missing root, malformed list/JSON/pickle/IDX file)."""


@dataclass
class Source:
    """One split of a raw dataset, listed but not yet decoded.

    ``names[i]`` / ``labels[i]`` describe listed sample ``i`` (a path, or ``file[row]`` for array datasets);
    ``problems`` are the ``(path, reason)`` of listed entries that cannot become samples.
    """

    kind: str
    num_classes: int
    class_names: List[str]
    names: List[str]
    labels: np.ndarray  # int64, in [0, num_classes)
    problems: List[Tuple[str, str]] = field(default_factory=list)
    files: List[str] = field(default_factory=list)  # file paths (file sources), parallel to names
    array: Optional[np.ndarray] = None  # N×H×W or N×H×W×3 uint8 (array sources)
    class_paths: List[str] = field(default_factory=list)  # how to name class c in a report (e.g. its folder)

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> Union[bytes, np.ndarray]:
        """Raw content of sample ``i``: file bytes, or the uint8 pixel array. Missing files raise FileNotFoundError."""
        if self.array is not None:
            return self.array[i]
        with open(self.files[i], "rb") as f:
            return f.read()

    def class_path(self, c: int) -> str:
        if self.class_paths:
            return self.class_paths[c]
        return f"class {c} ({self.class_names[c]})"


def _in_range(names: List[str], raw_labels: List[int], num_classes: int, problems: List[Tuple[str, str]]) -> np.ndarray:
    """Mask of the entries whose label lies in [0, num_classes); the others are recorded as problems."""
    labels = np.asarray(raw_labels, dtype=np.int64)
    keep = (labels >= 0) & (labels < num_classes)
    for i in np.flatnonzero(~keep):
        problems.append((names[i], f"label {labels[i]} out of range [0, {num_classes})"))
    return keep


def _select(items: List[str], keep: np.ndarray) -> List[str]:
    return [x for x, k in zip(items, keep) if k]


# ------------------------------------------------------------------------------------------------ file sources
def _split_dir(root: Path, split: str) -> Path:
    """``root/split`` when it exists (a dataset with one folder per split), else ``root`` itself."""
    if (root / split).is_dir():
        log.info("imagefolder: reading split folder %s", root / split)
        return root / split
    return root


def read_imagefolder(root: Path, split: str, num_classes: Optional[int] = None) -> Source:
    """``root/[split/]class/image``: classes are the sub-folders in sorted order (torchvision's ImageFolder)."""
    base = _split_dir(root, split)
    classes = sorted(d.name for d in os.scandir(base) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SourceError(f"{base}: no class folders (expected ROOT/class/image files)")
    if num_classes is not None and num_classes != len(classes):
        raise SourceError(f"{base}: {len(classes)} class folders, but num_classes={num_classes} was given")
    names, labels, ignored = [], [], 0
    for c, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(base / cls, followlinks=True):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    names.append(os.path.join(dirpath, fn))
                    labels.append(c)
                else:
                    ignored += 1
    if ignored:
        log.info("imagefolder: ignored %d files without an image extension %s", ignored, IMAGE_EXTENSIONS)
    return Source("imagefolder", len(classes), classes, names, np.asarray(labels, dtype=np.int64), files=list(names),
                  class_paths=[str(base / cls) for cls in classes])


def read_list(root: Path, list_file: Path, num_classes: Optional[int] = None) -> Source:
    """Lines ``relpath label`` (ImageNet_LT_train.txt, Places_LT_train.txt, iNaturalist18_train.txt), paths relative
    to ``root`` (a leading '/' included)."""
    if not list_file.is_file():
        raise SourceError(f"list file not found: {list_file}")
    names, raw, problems = [], [], []
    with open(list_file) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            try:
                if len(parts) != 2:
                    raise ValueError
                y = int(parts[1])
            except ValueError:
                problems.append((f"{list_file}:{lineno}", f"malformed line {line!r} (expected 'relpath label')"))
                continue
            names.append(str(root / parts[0].lstrip("/")))
            raw.append(y)
    if not names and not problems:
        raise SourceError(f"{list_file}: no entries")
    if num_classes is None:
        num_classes = max(raw) + 1 if raw else 0
        log.info("list: num_classes not given, taking max label + 1 = %d from %s", num_classes, list_file)
    keep = _in_range(names, raw, num_classes, problems)
    names = _select(names, keep)
    return Source("list", num_classes, [str(c) for c in range(num_classes)], names,
                  np.asarray(raw, dtype=np.int64)[keep], problems, files=list(names))


def read_inat(root: Path, json_file: Path, num_classes: Optional[int] = None) -> Source:
    """iNaturalist 2018 COCO-style JSON: ``images`` (id, file_name), ``annotations`` (image_id, category_id),
    ``categories`` (id, name). Class index = rank of the category id (the identity for iNat18's ids 0..8141)."""
    if not json_file.is_file():
        raise SourceError(f"iNat JSON not found: {json_file}")
    try:
        data = json.loads(json_file.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{json_file}: not valid JSON ({e})") from e
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise SourceError(f"{json_file}: missing field {key!r} (a split without labels cannot be converted)")
    try:
        cats = sorted(data["categories"], key=lambda c: c["id"])
        cat_index = {c["id"]: i for i, c in enumerate(cats)}
        cat_names = [str(c.get("name", c["id"])) for c in cats]
        label_of = {a["image_id"]: a["category_id"] for a in data["annotations"]}
        images = [(im["id"], im["file_name"]) for im in data["images"]]
    except (KeyError, TypeError) as e:
        raise SourceError(f"{json_file}: malformed entry, missing field {e}") from e
    if num_classes is not None and num_classes != len(cats):
        raise SourceError(f"{json_file}: {len(cats)} categories, but num_classes={num_classes} was given")
    names, raw, problems = [], [], []
    for image_id, file_name in images:
        path = str(root / file_name.lstrip("/"))
        if image_id not in label_of:
            problems.append((path, f"image id {image_id} has no annotation"))
            continue
        cat = label_of[image_id]
        if cat not in cat_index:
            problems.append((path, f"label (category_id) {cat} out of range: not among {json_file.name}'s categories"))
            continue
        names.append(path)
        raw.append(cat_index[cat])
    return Source("inat", len(cats), cat_names, names, np.asarray(raw, dtype=np.int64), problems, files=list(names))


# ----------------------------------------------------------------------------------------------- array sources
def _unpickle(path: Path) -> Dict:
    if not path.is_file():
        raise SourceError(f"CIFAR batch not found: {path}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # pickle raises many types on corrupt input
        raise SourceError(f"{path}: not a CIFAR python pickle ({type(e).__name__}: {e})") from e
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def read_cifar(root: Path, split: str, kind: str) -> Source:
    """The python-pickle batches: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} or
    cifar-100-python/{train,test,meta}; ``root`` is that folder or its parent."""
    sub, label_key, meta_file, names_key = {
        "cifar10": ("cifar-10-batches-py", "labels", "batches.meta", "label_names"),
        "cifar100": ("cifar-100-python", "fine_labels", "meta", "fine_label_names"),
    }[kind]
    if (root / sub).is_dir():
        root = root / sub
    if split not in ("train", "test"):
        raise SourceError(f"{kind} has splits train|test, got {split!r}")
    if kind == "cifar10":
        batches = [f"data_batch_{k}" for k in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        batches = [split]
    meta = _unpickle(root / meta_file)
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    num_classes = 10 if kind == "cifar10" else 100
    if len(class_names) != num_classes:
        raise SourceError(f"{root / meta_file}: field {names_key!r} has {len(class_names)} names, "
                          f"expected {num_classes}")
    arrays, names, raw = [], [], []
    for b in batches:
        d = _unpickle(root / b)
        if "data" not in d or label_key not in d:
            raise SourceError(f"{root / b}: missing field 'data' or {label_key!r}")
        data = np.asarray(d["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(d[label_key]) != len(data):
            raise SourceError(f"{root / b}: field 'data' must be N×3072 uint8 with N labels, "
                              f"got {data.dtype} {data.shape}")
        arrays.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        names += [f"{root / b}[{i}]" for i in range(len(data))]
        raw += [int(y) for y in d[label_key]]
    images = np.ascontiguousarray(np.concatenate(arrays))
    problems: List[Tuple[str, str]] = []
    keep = _in_range(names, raw, num_classes, problems)
    return Source(kind, num_classes, class_names, _select(names, keep), np.asarray(raw, dtype=np.int64)[keep],
                  problems, array=images if keep.all() else images[keep])


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """An IDX file (gzip or plain): big-endian magic, dims, then uint8 data."""
    if not path.is_file():
        raise SourceError(f"IDX file not found: {path}")
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise SourceError(f"{path}: cannot read ({e})") from e
    if len(raw) < 4 + 4 * ndim or struct.unpack(">I", raw[:4])[0] != magic:
        raise SourceError(f"{path}: not an IDX file with magic {magic:#x}")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise SourceError(f"{path}: {data.size} bytes of data, header says {dims}")
    return data.reshape(dims)


def read_fmnist(root: Path, split: str) -> Source:
    """Fashion-MNIST IDX files ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]); 28×28 grayscale, 10 classes."""
    if split not in ("train", "test"):
        raise SourceError(f"fmnist has splits train|test, got {split!r}")
    prefix = "train" if split == "train" else "t10k"

    def find(stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (root / name).is_file():
                return root / name
        raise SourceError(f"{root}: no {stem}[.gz] (Debian: apt-get install dataset-fashion-mnist)")

    img_path, lbl_path = find(f"{prefix}-images-idx3-ubyte"), find(f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(img_path, 0x803, 3)
    raw = _read_idx(lbl_path, 0x801, 1).astype(np.int64)
    if len(images) != len(raw):
        raise SourceError(f"{img_path}: {len(images)} images but {lbl_path} has {len(raw)} labels")
    names = [f"{img_path}[{i}]" for i in range(len(images))]
    problems: List[Tuple[str, str]] = []
    keep = _in_range(names, raw.tolist(), 10, problems)
    return Source("fmnist", 10, list(FMNIST_CLASSES), _select(names, keep), raw[keep], problems,
                  array=images if keep.all() else images[keep])


def open_source(kind: str, root: str, split: str, list_file: Optional[str] = None,
                num_classes: Optional[int] = None) -> Source:
    """List ``split`` of the dataset at ``root`` in the format ``kind`` (one of :data:`SOURCES`)."""
    if kind not in SOURCES:
        raise SourceError(f"unknown source {kind!r}; expected one of {', '.join(SOURCES)}")
    rootp = Path(root)
    if not rootp.is_dir():
        raise SourceError(f"--root {root}: not a directory")
    if kind in ("list", "inat"):
        if not list_file:
            what = "relpath label lines" if kind == "list" else "iNat JSON"
            raise SourceError(f"source {kind} needs --list FILE ({what})")
        reader = read_list if kind == "list" else read_inat
        return reader(rootp, Path(list_file), num_classes)
    if list_file:
        raise SourceError(f"--list is only used by the list and inat sources, not {kind}")
    if kind == "imagefolder":
        return read_imagefolder(rootp, split, num_classes)
    if kind in ("cifar10", "cifar100"):
        return read_cifar(rootp, split, kind)
    return read_fmnist(rootp, split)

"""The manifest: the contract written once by ``data_prep`` and read by every later stage.

A converted split lives in one directory::

    DIR/manifest.json      this file's schema (below)
    DIR/labels.npy         int64 label of every written sample, in written order (sample i = beton row i = shard key i)
    DIR/<split>.beton      FFCV dataset (fields: image RGBImageField, label IntField), rows in written order
    DIR/<split>-00000.tar  DALI webdataset shards (KEY.jpg + KEY.lbl int32), KEY = f"{i:09d}", same order, split in
    DIR/<split>-00000.idx  consecutive runs of ``shard_size``; one wds2idx index per shard

Class priors for the losses and the many/medium/few groups for the metrics come from ``class_counts`` of the
*training* manifest, never recomputed ad hoc.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from fastlivt.data_prep.atomic import write_json_atomic

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LABELS_NAME = "labels.npy"


class ManifestError(ValueError):
    """A manifest is missing, malformed, or disagrees with the files beside it."""


@dataclass
class Manifest:
    source: str
    split: str
    num_classes: int
    class_names: List[str]
    class_counts: List[int]  # per class index, of the data written
    num_samples: int
    imbalance_factor: Optional[float] = None
    seed: int = 0
    format_version: int = FORMAT_VERSION
    image: Dict[str, Any] = field(default_factory=dict)  # write_mode, max_resolution, jpeg_quality
    ffcv: Optional[str] = None  # beton file name (relative to the manifest's directory)
    dali_shards: List[str] = field(default_factory=list)  # tar shard names, in sample order
    dali_index: List[str] = field(default_factory=list)  # .idx names, one per shard
    shard_sizes: List[int] = field(default_factory=list)  # samples in each shard
    files: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # name -> {"bytes": int, "sha256": str}
    skipped: List[Dict[str, str]] = field(default_factory=list)  # {"path": ..., "reason": ...}
    created: str = ""
    root: str = ""  # directory the manifest was read from (not serialised)

    # ---------------------------------------------------------------------------------------------- derived
    @property
    def priors(self) -> np.ndarray:
        counts = np.asarray(self.class_counts, dtype=np.float64)
        return counts / counts.sum()

    def path(self, name: str) -> Path:
        return Path(self.root) / name

    def labels(self) -> np.ndarray:
        """The label of every sample in written order (int64)."""
        p = self.path(LABELS_NAME)
        if not p.is_file():
            raise ManifestError(f"{p}: labels file missing")
        labels = np.load(p)
        if labels.shape != (self.num_samples,):
            raise ManifestError(f"{p}: {labels.shape[0]} labels, manifest says num_samples={self.num_samples}")
        return labels.astype(np.int64)

    # ---------------------------------------------------------------------------------------------- io
    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        return d

    def save(self, directory: Path) -> Path:
        """Write atomically (temp name + rename)."""
        return write_json_atomic(Path(directory) / MANIFEST_NAME, self.to_json())


REQUIRED = ("source", "split", "num_classes", "class_names", "class_counts", "num_samples")


def load_manifest(path: str | Path) -> Manifest:
    """Read ``path`` (a manifest.json or the directory holding it) and check its internal consistency."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (run `fastlivt convert` first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    for key in REQUIRED:
        if key not in data:
            raise ManifestError(f"{path}: missing field {key!r}")
    if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {data['format_version']} is newer than this fastlivt ({FORMAT_VERSION})")
    known = set(Manifest.__dataclass_fields__) - {"root"}
    unknown = set(data) - known
    if unknown:
        raise ManifestError(f"{path}: unknown field {sorted(unknown)[0]!r}")
    m = Manifest(**data, root=str(path.parent))
    if len(m.class_counts) != m.num_classes or len(m.class_names) != m.num_classes:
        raise ManifestError(f"{path}: class_counts/class_names must have num_classes={m.num_classes} entries")
    if sum(m.class_counts) != m.num_samples:
        raise ManifestError(f"{path}: class_counts sum to {sum(m.class_counts)}, num_samples is {m.num_samples}")
    return m


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def shot_groups(train_class_counts, many: int = 100, few: int = 20) -> Dict[str, np.ndarray]:
    """Class indices of the many (>100), medium (20-100) and few (<20) shot groups, from training counts."""
    counts = np.asarray(train_class_counts)
    return {
        "many": np.flatnonzero(counts > many),
        "medium": np.flatnonzero((counts <= many) & (counts >= few)),
        "few": np.flatnonzero(counts < few),
    }

"""Random access to the encoded images in a split's webdataset shards.

Sample i is the member ``f"{i:09d}.jpg"`` of shard j, where shards hold consecutive runs of samples (manifest
``shard_sizes``). The offset of every member's data comes from the shard's wds2idx index (lines
``jpg OFFSET SIZE NAME lbl ...`` after a ``v1.x COUNT`` header) or, when there is none, from the tar headers. The
shards are memory-mapped lazily in each process (safe under fork/spawn of loader workers).
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from fastlivt.data_prep.manifest import Manifest, ManifestError


def _offsets_from_idx(path: Path, first: int, count: int) -> Tuple[np.ndarray, np.ndarray]:
    lines = path.read_text().split("\n")
    head = lines[0].split()
    if len(head) != 2 or not head[0].startswith("v1") or int(head[1]) != count:
        raise ManifestError(f"{path}: unexpected index header {lines[0]!r} (expected 'v1.x {count}')")
    offsets, sizes = np.empty(count, np.int64), np.empty(count, np.int64)
    for k in range(count):
        fields = lines[1 + k].split()
        for e in range(0, len(fields), 4):  # groups of: ext offset size name
            if fields[e] == "jpg":
                if fields[e + 3] != f"{first + k:09d}.jpg":
                    raise ManifestError(f"{path}: entry {k} is {fields[e + 3]!r}, expected {first + k:09d}.jpg")
                offsets[k], sizes[k] = int(fields[e + 1]), int(fields[e + 2])
                break
        else:
            raise ManifestError(f"{path}: entry {k} has no jpg member")
    return offsets, sizes


def _offsets_from_tar(path: Path, first: int, count: int) -> Tuple[np.ndarray, np.ndarray]:
    offsets, sizes = np.full(count, -1, np.int64), np.empty(count, np.int64)
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                k = int(member.name[:-4]) - first
                if not 0 <= k < count:
                    raise ManifestError(f"{path}: member {member.name} is outside samples [{first}, {first + count})")
                offsets[k], sizes[k] = member.offset_data, member.size
    if (offsets < 0).any():
        raise ManifestError(f"{path}: no jpg for sample {first + int(np.flatnonzero(offsets < 0)[0])}")
    return offsets, sizes


class ShardReader:
    """``reader[i]`` -> the encoded image bytes of sample i as a uint8 numpy array (a copy)."""

    def __init__(self, manifest: Manifest):
        if not manifest.dali_shards:
            raise ManifestError(f"{manifest.root}: no DALI shards in the manifest (convert with --formats dali)")
        if len(manifest.shard_sizes) != len(manifest.dali_shards) or sum(manifest.shard_sizes) != manifest.num_samples:
            raise ManifestError(f"{manifest.root}: shard_sizes {manifest.shard_sizes} do not add up to "
                                f"num_samples={manifest.num_samples} over {len(manifest.dali_shards)} shards")
        self.paths: List[str] = [str(manifest.path(s)) for s in manifest.dali_shards]
        n = manifest.num_samples
        self.shard = np.repeat(np.arange(len(self.paths), dtype=np.int32), manifest.shard_sizes)
        self.offsets, self.sizes = np.empty(n, np.int64), np.empty(n, np.int64)
        first = 0
        for j, (path, count) in enumerate(zip(self.paths, manifest.shard_sizes)):
            idx = manifest.path(manifest.dali_index[j]) if j < len(manifest.dali_index) else None
            if idx is not None and idx.is_file():
                off, size = _offsets_from_idx(idx, first, count)
            else:
                off, size = _offsets_from_tar(Path(path), first, count)
            self.offsets[first:first + count], self.sizes[first:first + count] = off, size
            first += count
        self._maps: Dict[int, np.memmap] = {}
        self._pid = -1

    def __len__(self) -> int:
        return int(self.offsets.size)

    def _map(self, j: int) -> np.memmap:
        if self._pid != os.getpid():  # a forked worker re-opens its own maps
            self._maps, self._pid = {}, os.getpid()
        m = self._maps.get(j)
        if m is None:
            m = self._maps[j] = np.memmap(self.paths[j], dtype=np.uint8, mode="r")
        return m

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.offsets[i])
        return np.array(self._map(int(self.shard[i]))[start:start + int(self.sizes[i])])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["_pid"] = {}, -1
        return state


def encoded_size(encoded: np.ndarray) -> Tuple[int, int]:
    """(height, width) of an encoded image (a sample's bytes), read from its header without decoding."""
    from PIL import Image

    with Image.open(io.BytesIO(encoded.tobytes())) as im:
        return im.height, im.width

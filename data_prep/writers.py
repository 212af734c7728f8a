"""The two output formats, both written under temporary names that the conversion renames only when all is done.

* DALI: uncompressed webdataset tar shards. Sample ``i`` (global written index) is ``KEY.jpg`` + ``KEY.lbl`` (the
  label as int32 little-endian bytes) with ``KEY = f"{i:09d}"``; shard ``j`` holds samples ``[j*shard_size, ...)``;
  each shard gets the ``.idx`` index of DALI's own ``wds2idx`` (``fn.readers.webdataset(index_paths=...)``). Members are
  written exactly as Python's tarfile writes them (USTAR, fixed metadata), without its per-member overhead.
* FFCV: a ``.beton`` written by FFCV's ``DatasetWriter`` (fields ``image``: RGBImageField, ``label``: IntField)
  from the pixels the decode pool staged, row ``i`` = written sample ``i``, by :mod:`fastlivt.data_prep.beton_writer`.
"""
from __future__ import annotations

import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

TMP_SUFFIX = ".tmp"


def shard_name(split: str, j: int, ext: str) -> str:
    return f"{split}-{j:05d}.{ext}"


def beton_name(split: str) -> str:
    return f"{split}.beton"


def label_bytes(label: int) -> bytes:
    """A label as the 4 bytes of a little-endian int32 (read by DALI with dtypes INT32)."""
    return np.asarray([label], dtype="<i4").tobytes()


KEY_DIGITS = 9  # KEY = f"{i:09d}": every member name has the same length


def _ustar_template() -> Tuple[bytes, int]:
    """The USTAR header (by Python's tarfile) of a member ``KEY.ext``, with name, size and checksum left blank, and
    the checksum of those blank bytes. Every member differs only in those three fields."""
    info = tarfile.TarInfo("0" * KEY_DIGITS + ".jpg")
    info.mtime, info.mode = 0, 0o644  # fixed metadata: the same samples give byte-identical shards
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
    header[0:100] = bytes(100)  # name
    header[124:136] = bytes(12)  # size
    header[148:156] = b" " * 8  # checksum (counted as spaces)
    return bytes(header), sum(header)


_TEMPLATE, _TEMPLATE_SUM = _ustar_template()
BLOCK, RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE


def ustar_member(name: bytes, data: bytes) -> bytes:
    """A regular-file tar member (512-byte USTAR header, data, zero padding to 512 bytes), as tarfile writes it."""
    size = b"%011o\0" % len(data)
    header = bytearray(_TEMPLATE)
    header[0 : len(name)] = name
    header[124:136] = size
    header[148:156] = b"%06o\0 " % (_TEMPLATE_SUM + sum(name) + sum(size))
    return bytes(header) + data + bytes(-len(data) % BLOCK)


def _index_shard(tar: Path, idx: Path) -> None:
    from wds2idx import IndexCreator  # ships in the nvidia-dali wheel

    with IndexCreator(str(tar), str(idx), verbose=False) as creator:
        creator.create_index()


class ShardWriter:
    """Streams written samples, in written order, into consecutive webdataset tar shards of ``shard_size``."""

    def __init__(self, out: Path, split: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out, self.split, self.shard_size = Path(out), split, shard_size
        self.shards: List[str] = []  # final names, in sample order
        self.indexes: List[str] = []
        self.sizes: List[int] = []
        self.temporaries: List[Tuple[Path, Path]] = []  # (temporary path, final path) of every finished file
        self.count = 0
        self._file = None  # the open shard (a binary file)
        self._written = 0  # bytes in the open shard
        self._open_path: Optional[Path] = None
        self._indexer: Optional[ThreadPoolExecutor] = None
        self._pending: List[Future] = []

    def add(self, index: int, jpeg: bytes, label: int) -> None:
        """Append written sample ``index`` (must be the next one) as KEY.jpg + KEY.lbl."""
        if index != self.count:
            raise ValueError(f"shard samples must come in written order: expected {self.count}, got {index}")
        key = b"%09d" % index
        if len(key) != KEY_DIGITS:
            raise ValueError(f"sample index {index} does not fit a {KEY_DIGITS}-digit key")
        if self._file is None:
            self._open()
        chunk = ustar_member(key + b".jpg", jpeg) + ustar_member(key + b".lbl", label_bytes(label))
        self._file.write(chunk)
        self._written += len(chunk)
        self.count += 1
        self.sizes[-1] += 1
        if self.sizes[-1] == self.shard_size:
            self._close()

    def _open(self) -> None:
        final = self.out / shard_name(self.split, len(self.shards), "tar")
        self._open_path = final.with_name(final.name + TMP_SUFFIX)
        self._file = open(self._open_path, "wb")
        self._written = 0
        self.shards.append(final.name)
        self.sizes.append(0)

    def _close(self) -> None:
        """Finish the open shard and index it with DALI's wds2idx in the background (the index holds member
        offsets, not the tar's name, so the temporary tar can be indexed)."""
        end = 2 * BLOCK + (-(self._written + 2 * BLOCK) % RECORD)  # end-of-archive blocks, record padding
        self._file.write(bytes(end))
        self._file.close()
        self._file = None
        tar_tmp = self._open_path
        tar_final = self.out / self.shards[-1]
        idx_final = tar_final.with_suffix(".idx")
        idx_tmp = idx_final.with_name(idx_final.name + TMP_SUFFIX)
        if self._indexer is None:  # wds2idx mostly waits on GNU tar subprocesses: a thread overlaps them
            self._indexer = ThreadPoolExecutor(1)
        self._pending.append(self._indexer.submit(_index_shard, tar_tmp, idx_tmp))
        self.indexes.append(idx_final.name)
        self.temporaries += [(tar_tmp, tar_final), (idx_tmp, idx_final)]

    def finish(self) -> None:
        """Close the last shard and wait for every index."""
        if self._file is not None:
            self._close()
        for future in self._pending:
            future.result()
        self._pending = []
        if self._indexer is not None:
            self._indexer.shutdown()
            self._indexer = None

    def abort(self) -> None:
        """Stop after a failure: close an open shard and wait for running indexing; the caller removes the
        temporaries (all listed in ``temporaries``)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self.temporaries.append((self._open_path, self._open_path))
        if self._indexer is not None:
            self._indexer.shutdown(wait=True, cancel_futures=True)
            self._indexer = None


class StagedImages:
    """The indexed dataset FFCV's writer reads: written sample ``i`` -> (H×W×3 uint8 pixels, label).

    Pixels live in the decode workers' staging files (``files[file_ids[i]]`` at ``offsets[i]``). Each FFCV writer
    process maps the files once. Before returning sample ``i`` the global NumPy generator is seeded from
    ``(seed, i)``, so FFCV's 'proportion' mode makes the same raw/jpg choice for sample ``i`` in every run whichever
    worker encodes it.
    """

    def __init__(self, files: List[str], file_ids: np.ndarray, offsets: np.ndarray, shapes: np.ndarray,
                 labels: np.ndarray, seed: int, reseed: bool = True):
        self.files, self.file_ids, self.offsets, self.shapes = files, file_ids, offsets, shapes
        self.labels, self.seed, self.reseed = labels, seed, reseed
        self._maps: Dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, int]:
        fid = int(self.file_ids[i])
        if fid not in self._maps:
            self._maps[fid] = np.memmap(self.files[fid], dtype=np.uint8, mode="r")
        h, w = (int(v) for v in self.shapes[i])
        start = int(self.offsets[i])
        pixels = np.asarray(self._maps[fid][start : start + h * w * 3]).reshape(h, w, 3)
        if self.reseed:
            np.random.seed((self.seed * 1_000_003 + i) % (1 << 32))
        return pixels, int(self.labels[i])

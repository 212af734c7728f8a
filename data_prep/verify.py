"""``fastlivt convert --verify DIR``: re-hash a converted split against its manifest and say what differs."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Tuple

import numpy as np

from fastlivt.data_prep.manifest import LABELS_NAME, ManifestError, load_manifest, sha256_file


def verify(directory: str | Path, threads: int = 4) -> Tuple[List[str], int]:
    """Check every file the manifest in ``directory`` lists (size, then sha256) and the manifest's own counts.

    Returns the problems found (each names the file) and the number of files checked.
    """
    try:
        m = load_manifest(directory)
    except ManifestError as e:
        return [str(e)], 0
    problems: List[str] = []
    listed = ([m.ffcv] if m.ffcv else []) + list(m.dali_shards) + list(m.dali_index) + [LABELS_NAME]
    problems += [f"{name}: an output of the manifest without a size and sha256 in 'files'" for name in listed
                 if name not in m.files]
    if len(m.dali_shards) != len(m.dali_index) or len(m.dali_shards) != len(m.shard_sizes):
        problems.append(f"manifest: {len(m.dali_shards)} shards, {len(m.dali_index)} indexes, "
                        f"{len(m.shard_sizes)} shard sizes")
    if m.dali_shards and sum(m.shard_sizes) != m.num_samples:
        problems.append(f"manifest: shard sizes sum to {sum(m.shard_sizes)}, num_samples is {m.num_samples}")

    present, sized = [], []
    for name, meta in m.files.items():
        path = m.path(name)
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != meta.get("bytes"):
            problems.append(f"{name}: differs ({path.stat().st_size} bytes, manifest says {meta.get('bytes')})")
        else:
            present.append(name)
            sized.append(path)
    with ThreadPoolExecutor(max(1, threads)) as ex:
        digests = list(ex.map(sha256_file, sized))
    for name, digest in zip(present, digests):
        if digest != m.files[name].get("sha256"):
            recorded = str(m.files[name].get("sha256"))
            problems.append(f"{name}: differs (sha256 {digest[:16]}..., manifest says {recorded[:16]}...)")

    if not any(p.startswith(LABELS_NAME) for p in problems):
        try:
            counts = np.bincount(m.labels(), minlength=m.num_classes)
            if counts.tolist() != list(m.class_counts):
                problems.append(f"{LABELS_NAME}: class counts {counts.tolist()} differ from the manifest's "
                                "class_counts")
        except (ManifestError, ValueError) as e:
            problems.append(f"{LABELS_NAME}: {e}")
    return problems, len(m.files)

"""Small image-folder sources for the loader tests (``src/c<class>/<k>.jpg``), and FFCV's JIT switched off for a
test module (``from image_folders import no_numba_jit`` makes it autouse there)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import pytest
from PIL import Image


def _write(src: Path, counts: Sequence[int], sides: Tuple[int, int], seed: int, image, quality: int) -> None:
    rng = np.random.default_rng(seed)
    for c, n in enumerate(counts):
        (src / f"c{c}").mkdir(parents=True)
        for k in range(n):
            h, w = rng.integers(sides[0], sides[1], 2)
            Image.fromarray(image(rng, int(h), int(w))).save(src / f"c{c}" / f"{k}.jpg", quality=quality)


def noise_jpegs(src: Path, counts: Sequence[int], sides: Tuple[int, int], seed: int) -> None:
    """``counts[c]`` uniform-noise JPEGs in class c, each side drawn from ``[sides[0], sides[1])``."""
    _write(src, counts, sides, seed, lambda rng, h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 75)


def textured_jpegs(src: Path, counts: Sequence[int], sides: Tuple[int, int], seed: int) -> None:
    """``counts[c]`` JPEGs in class c of smooth colour fields plus noise (what RandAugment's ops act on visibly)."""
    def textured(rng, h, w):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        return np.clip(np.asarray(coarse, np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)

    _write(src, counts, sides, seed, textured, 95)


@pytest.fixture(autouse=True)
def no_numba_jit():
    """FFCV compiles every new Loader with numba (seconds each): off for the tests of the module that imports this."""
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)
    yield
    Compiler.set_enabled(True)

"""A synthetic image folder for measuring conversion speed: ``python -m fastlivt.data_prep.synthetic OUT --images N --size S``.

Writes ``OUT/class_XX/img_XXXXX.jpg``: ``N`` RGB JPEGs (quality 90) whose longest side is ``S`` pixels (the other
side ``3S/4``, alternating landscape and portrait), with smooth random content so that JPEG sizes are realistic,
spread evenly over ``--classes`` classes. The same seed gives the same files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import cv2
import numpy as np


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """H×W×3 uint8: a coarse random colour field upsampled to full size plus mild noise."""
    coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    img += rng.integers(-12, 13, img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder(out: Path, images: int, size: int, classes: int = 10, seed: int = 0, quality: int = 90) -> List[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(images):
        h, w = (size * 3 // 4, size) if k % 2 == 0 else (size, size * 3 // 4)
        path = out / f"class_{k % classes:02d}" / f"img_{k:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        bgr = cv2.cvtColor(synthetic_image(rng, h, w), cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(path), bgr, [int(cv2.IMWRITE_JPEG_QUALITY), quality]):
            raise OSError(f"could not write {path}")
        paths.append(path)
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlivt.data_prep.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=500, help="longest side in pixels")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = write_folder(args.out, args.images, args.size, args.classes, args.seed)
    print(f"wrote {len(paths)} JPEGs of longest side {args.size} px under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

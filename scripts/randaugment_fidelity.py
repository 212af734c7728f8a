"""Print the device RandAugment's fidelity to timm's PIL code per op and for the whole policy, as a Markdown table.

    python3 scripts/randaugment_fidelity.py [--config rand-m9-mstd0.5-inc1] [--images 256] [--size 64] [--seed 0]
                                            [--float32-geometry]

Each op row forces that op on every image (timm's magnitude noise, signs and a random bilinear/bicubic filter per
image); the 'pipeline' row applies the policy's own draws. Figures: max abs diff, % of values within 1 grey level,
mean abs diff, PSNR (:mod:`fastlivt.data.ra_fidelity`).
"""
from __future__ import annotations

import argparse

import torch

from fastlivt.data.ra_fidelity import fidelity_table, markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="rand-m9-mstd0.5-inc1")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float32-geometry", action="store_true", help="resample in float32 instead of float64")
    args = parser.parse_args()
    dtype = torch.float32 if args.float32_geometry else torch.float64
    print(markdown(fidelity_table(args.config, args.images, args.size, args.seed, geometry_dtype=dtype)))


if __name__ == "__main__":
    main()

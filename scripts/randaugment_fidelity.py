"""Print the device RandAugment's fidelity to timm's PIL code per op and for the whole policy, as a Markdown table.

    python3 scripts/randaugment_fidelity.py [--config rand-m9-mstd0.5-inc1] [--images 256] [--size 64] [--seed 0]
                                            [--float32-geometry]
    python3 scripts/randaugment_fidelity.py --time cpu|cuda [--batch 128] [--sizes 28,224]

Each op row forces that op on every image (timm's magnitude noise, signs and a random bilinear/bicubic filter per
image); the 'pipeline' row applies the policy's own draws. Figures: max abs diff, % of values within 1 grey level,
mean abs diff, PSNR (:mod:`fastlivt.data.ra_fidelity`). ``--time DEVICE`` prints instead the milliseconds per batch
on that device (best of 5, host draws included) and the number of aten operations a batch dispatches.
"""
from __future__ import annotations

import argparse

import torch

from fastlivt.data.ra_fidelity import fidelity_table, markdown, time_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="rand-m9-mstd0.5-inc1")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float32-geometry", action="store_true", help="resample in float32 instead of float64")
    parser.add_argument("--time", metavar="DEVICE", help="time a batch on DEVICE instead of measuring fidelity")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sizes", default="28,224")
    args = parser.parse_args()
    if args.time:
        for size in (int(s) for s in args.sizes.split(",")):
            t = time_batch(args.batch, size, torch.device(args.time), config=args.config)
            print(f"{args.time} B={args.batch} {size}px: {t['ms_per_batch']:.1f} ms/batch, "
                  f"{t['ops_per_batch']} aten ops/batch")
        return
    dtype = torch.float32 if args.float32_geometry else torch.float64
    print(markdown(fidelity_table(args.config, args.images, args.size, args.seed, geometry_dtype=dtype)))


if __name__ == "__main__":
    main()

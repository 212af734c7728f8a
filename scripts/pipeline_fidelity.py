"""Print the device pipeline's fidelity to torchvision's / timm's PIL pipeline, as a Markdown table.

    python3 scripts/pipeline_fidelity.py [--images 256] [--size 112] [--eval-resize 128] [--seed 0]

Rows: RandomResizedCrop + flip and eval Resize + CenterCrop, each with the batched products (accelerators) and the
per-sample kernel (the CPU), and the whole BFT image pipeline (crop + flip + timm's rand-m9-mstd0.5-inc1), each
against PIL with the same draws (:mod:`fastlivt.data.pipeline_fidelity`). Figures: max abs diff, % of values within 1
grey level, mean abs diff, PSNR.
"""
from __future__ import annotations

import argparse

from fastlivt.data.pipeline_fidelity import pipeline_table
from fastlivt.data.ra_fidelity import markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--eval-resize", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(markdown(pipeline_table(args.images, args.size, args.eval_resize, seed=args.seed)))


if __name__ == "__main__":
    main()

"""The ``fastlivt`` command: one sub-command per stage, each implemented where its stage lives.

Sub-commands are imported lazily so that ``fastlivt convert`` does not pay for importing DeepSpeed, and so that no
module imports the CLI (no import circles).
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "convert": ("data_prep.cli", "one-time conversion of a dataset to FFCV (.beton) and DALI (webdataset) formats"),
    "pretrain": ("fastlivt.engine.pretrain", "stage 1: masked generative pretraining (MGP)"),
    "finetune": ("fastlivt.engine.finetune", "stage 2: balanced fine-tuning (BFT)"),
    "evaluate": ("fastlivt.engine.evaluate", "top-1, many/medium/few, ECE/MCE of a checkpoint"),
    "bench": ("fastlivt.bench.cli", "throughput harness: data | attention | model | loss | step | all"),
    "demo": ("fastlivt.demo", "the embedded Fashion-MNIST-LT demo (convert -> MGP -> BFT x4 losses -> evaluate)"),
    "checkpoint": ("fastlivt.engine.checkpoint_cli", "info | export: what a training checkpoint holds; its weights as safetensors"),
    "launch": ("fastlivt.engine.launch", "build and run the DeepSpeed launcher command for pretrain/finetune"),
}


def usage() -> str:
    lines = ["usage: fastlivt COMMAND [options]   (fastlivt COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastlivt: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

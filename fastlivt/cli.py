"""The ``fastlivt`` command: one sub-command per stage, each implemented where its stage lives.

Sub-commands are imported lazily so that ``fastlivt convert`` does not pay for importing DeepSpeed, and so that no
module imports the CLI (no import circles).

A user's mistake — a bad config key or value, a missing config, manifest, input file or checkpoint, an encoder export
that does not fit — is printed as one line ``fastlivt: error: ...`` on stderr and exits with status 2, without a
traceback; ``--debug`` (anywhere on the command line) or ``FASTLIVT_DEBUG=1`` shows the traceback instead. Any other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import List, Optional

# The exceptions that report a user's mistake, as "module:Class". They are looked up among the modules already
# imported (an exception of a class whose module was never imported cannot have been raised), so the CLI imports
# none of them itself.
USER_ERRORS = (
    "fastlivt.data_prep.config:ConfigError",  # unknown key, wrong type, value outside its choices, config file not found
    "fastlivt.data_prep.manifest:ManifestError",  # data.train/data.val/--data without a (valid) converted split
    "fastlivt.models.vit:EncoderLoadError",  # model.init missing or not an encoder export that fits
    "fastlivt.models.attention:AttentionBackendError",  # model.attention=xformers where it cannot run
    "fastlivt.data_prep.sources:SourceError",  # a dataset source that cannot be listed
    "fastlivt.data_prep.atomic:DiskFullError",  # a write that ran out of space (names the file and the free space)
    "fastlivt.engine.run_lock:RunDirBusyError",  # run.out owned by another live run
    "fastlivt.engine.nonfinite:NonFiniteError",  # a run stopped on a NaN/inf loss or gradient (names the last good checkpoint)
    "builtins:FileNotFoundError",  # a missing input: --checkpoint, --resume without a checkpoint, a DeepSpeed JSON
    "builtins:NotADirectoryError",
    "builtins:IsADirectoryError",
    "builtins:PermissionError",
)
DEBUG_FLAG, DEBUG_ENV = "--debug", "FASTLIVT_DEBUG"


def is_user_error(exc: BaseException) -> bool:
    for spec in USER_ERRORS:
        module, name = spec.split(":")
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False

COMMANDS = {
    "convert": ("fastlivt.data_prep.cli", "one-time conversion of a dataset to FFCV (.beton) and DALI (webdataset) formats"),
    "pretrain": ("fastlivt.engine.pretrain", "stage 1: masked generative pretraining (MGP)"),
    "finetune": ("fastlivt.engine.finetune", "stage 2: balanced fine-tuning (BFT)"),
    "evaluate": ("fastlivt.engine.evaluate", "top-1, many/medium/few, ECE/MCE of a checkpoint"),
    "bench": ("fastlivt.bench.cli", "throughput harness: data | attention | model | loss | step | all"),
    "demo": ("fastlivt.demo", "the embedded Fashion-MNIST-LT demo (convert -> MGP -> BFT x4 losses -> evaluate)"),
    "checkpoint": ("fastlivt.engine.checkpoint_cli", "info | export: what a training checkpoint holds; its weights as safetensors"),
    "launch": ("fastlivt.engine.launch", "build and run the DeepSpeed launcher command for pretrain/finetune"),
}


def usage() -> str:
    lines = ["usage: fastlivt [--debug] COMMAND [options]   (fastlivt COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", f"A mistake in the input is one line 'fastlivt: error: ...' (exit 2); {DEBUG_FLAG} or {DEBUG_ENV}=1 "
              "shows its traceback."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastlivt: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except Exception as e:
        if debug or not is_user_error(e):
            raise
        print(f"fastlivt: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``fastlivt pretrain`` and ``fastlivt finetune`` commands: a config and overrides in, :func:`train`, a JSON
summary line out. The stage modules (:mod:`fastlivt.engine.pretrain`, :mod:`fastlivt.engine.finetune`) hold only
their :class:`~fastlivt.engine.loop.Task` and call :func:`run_stage` from their ``main``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from fastlivt.config import TrainConfig, load_config
from fastlivt.engine.loop import Task, train
from fastlivt.logs import get_logger

log = get_logger(__name__)


def parse_args(argv: List[str], prog: str, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="training YAML (configs/<dataset>/{mgp,bft}.yaml)")
    p.add_argument("--resume", action="store_true", help="continue exactly from <run.out>/checkpoints/last")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.epochs=1 data.batch_size=32")
    # the DeepSpeed launcher appends --local_rank=N (LOCAL_RANK is also set in the environment)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_stage(argv: Optional[List[str]], task: Task, prog: str, description: str) -> int:
    """Parse ``argv``, load the config, train ``task`` (``run.stage`` follows the command), print the summary."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv), prog, description)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if cfg.run.stage != task.stage:
        log.info("run.stage=%s in %s; running %s as asked by the command", cfg.run.stage, args.config, task.stage)
        cfg.run.stage = task.stage
    run = train(cfg, task, resume=args.resume)
    if run.runtime.is_main:
        print(json.dumps({"out": str(run.out), "step": run.step, **run.summary}, default=str))
    return 0

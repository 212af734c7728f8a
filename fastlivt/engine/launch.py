"""``fastlivt launch``: build (and run) the DeepSpeed launcher command for MGP or BFT.

    fastlivt launch [--num_gpus N] [--num_nodes N] [--hostfile F] [--master_addr A] [--master_port P] [--include S]
                    [--dry-run] pretrain|finetune --config X [key=value ...]

becomes

    deepspeed [--num_nodes N] [--hostfile F] [--master_addr A] [--master_port P] [--include S] --num_gpus N
              --no_local_rank --module fastlivt pretrain|finetune --config X [key=value ...]

Each launched process runs ``python -m fastlivt <stage> ...``; the stage engine sees the ``deepspeed:`` section of the
config (a ``deepspeed=configs/deepspeed/zero2.json`` override sets it from the command line) and trains under
``deepspeed.initialize``. ``--no_local_rank`` is passed because the rank comes from the environment (LOCAL_RANK), not
from a ``--local_rank`` argument. ``--dry-run`` (before or after the stage) prints the command instead of running it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from typing import List, Optional

STAGES = ("pretrain", "finetune")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlivt launch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_gpus", type=int, default=None, help="GPUs per node (default: all visible)")
    p.add_argument("--num_nodes", type=int, default=None, help="number of nodes (default: every host in --hostfile)")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile: one 'hostname slots=N' line per node")
    p.add_argument("--master_addr", default=None, help="address of the rank-0 node (multi-node)")
    p.add_argument("--master_port", type=int, default=None, help="rendezvous port (DeepSpeed's default: 29500)")
    p.add_argument("--include", default=None, help="DeepSpeed --include, e.g. 'node1:0,1@node2:0'")
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    p.add_argument("stage", choices=STAGES, help="pretrain (MGP) or finetune (BFT)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="--config X [key=value ...], passed to the stage")
    return p


def build_command(args: argparse.Namespace) -> List[str]:
    """The ``deepspeed`` launcher command line for ``args`` (see the module docstring)."""
    if "--config" not in args.rest and not any(a.startswith("--config=") for a in args.rest):
        raise SystemExit(f"fastlivt launch: {args.stage} needs --config FILE.yaml")
    for name in ("num_gpus", "num_nodes", "master_port"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"fastlivt launch: --{name} must be >= 1, got {value}")
    if args.hostfile is not None and not os.path.isfile(args.hostfile):
        raise SystemExit(f"fastlivt launch: hostfile not found: {args.hostfile}")
    cmd = ["deepspeed"]
    for name in ("num_nodes", "hostfile", "master_addr", "master_port", "include", "num_gpus"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name}", str(value)]
    cmd += ["--no_local_rank", "--module", "fastlivt", args.stage, *args.rest]
    return cmd


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if "--dry-run" in args.rest:  # also accepted after the stage: it is never a stage option
        args.rest = [a for a in args.rest if a != "--dry-run"]
        args.dry_run = True
    cmd = build_command(args)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    exe = shutil.which("deepspeed")
    if exe is None:
        raise SystemExit("fastlivt launch: the 'deepspeed' launcher is not on PATH (pip install deepspeed)")
    sys.stdout.flush()
    os.execv(exe, [exe, *cmd[1:]])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

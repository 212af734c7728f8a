"""Elastic resume on CPU (gloo): a run killed mid-epoch on 2 processes continues on 1, and one killed on 1 continues on
2 — plain engine (MGP), DeepSpeed ZeRO-2 (MGP) and ZeRO-3 (BFT) — plus ``fastlivt checkpoint info|export``. BFT's task
state across a change of world size is z3_bft's; the plain engine's BFT resume (same world) is the in-process loop
test's (tests/fastlivt/engine/test_loop.py), so the worker's torch_bft case is not launched here.

Three launches of ``tests/helpers/elastic_worker.py`` (2 processes, 1, 2) run all cases. Checked: the samples read
across the interrupted and the continued run are exactly the epoch's plan (no sample twice, none skipped); the weights and Adam
moments after the reshard equal the checkpoint's, gathered; the accumulation keeps the effective batch; the loss goes
on finite and close; the export of the final checkpoint equals the final weights.
"""
from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_doubles import FMNIST

REPO = Path(__file__).resolve().parents[3]
WORKER = REPO / "tests" / "helpers" / "elastic_worker.py"
CASES = ("torch_mgp", "z2_mgp", "z3_bft")
MICRO, EFFECTIVE, N = 8, 32, 96
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not FMNIST.is_dir(), reason=f"Fashion-MNIST not at {FMNIST}")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(root / "ext"),
               PYTHONUNBUFFERED="1")
    for i, (nproc, phases) in enumerate([(2, "crash:2to1"), (1, "resume:2to1,crash:1to2"), (2, "resume:1to2")]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), str(WORKER), "--phases", phases, "--out", str(root), "--cases", ",".join(CASES)]
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=400)
        (root / f"launch{i}.log").write_text(proc.stdout)
        assert proc.returncode == 0, f"launch {i} ({phases}) failed:\n{proc.stdout[-6000:]}"
    return root


def epoch_order(epoch: int, seed: int = 0) -> list:
    """The test loader's order of ``epoch`` (tests/helpers/engine_doubles.MemoryLoader: a permutation seeded by (seed, epoch))."""
    return torch.randperm(N, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def losses(path: Path) -> dict:
    with open(path) as f:
        return {int(float(r["step"])): float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")}


@pytest.mark.parametrize("direction", ["2to1", "1to2"])
@pytest.mark.parametrize("case", CASES)
def test_elastic_resume_reads_the_rest_of_the_plan_with_the_checkpoint_state(elastic, case, direction):
    d = elastic / direction / case
    crash, resume = json.loads((d / "crash.json").read_text()), json.loads((d / "resume.json").read_text())
    old, new = crash["world"], resume["world"]
    assert (old, new) == ((2, 1) if direction == "2to1" else (1, 2))
    info = crash["info"]
    epoch, consumed, end = info["epoch"], info["samples_consumed"], info["epoch_samples"]
    assert info["world_size"] == old and info["engine"] == ("torch" if case.startswith("torch") else
                                                            f"deepspeed zero-{case[1]}")
    assert 0 < consumed < end == N  # killed mid-epoch
    # samples: the interrupted run's reads up to the checkpoint + the continued run's reads of that epoch = the plan
    before = [i for reads in crash["reads"] for e, b in reads[: consumed // (MICRO * old)] if e == epoch for i in b]
    after = [i for reads in resume["reads"] for e, b in reads if e == epoch for i in b]
    assert len(before) == consumed and sorted(before + after) == sorted(epoch_order(epoch)[:end])
    assert len(set(before + after)) == end  # no sample read twice within the epoch
    later = [i for reads in resume["reads"] for e, b in reads if e == epoch + 1 for i in b]
    assert sorted(later) == sorted(epoch_order(epoch + 1))  # the next epoch is whole on the new world size
    # effective batch kept: accumulation EFFECTIVE / (MICRO x new world); the schedule ran to its end
    assert resume["accum"] == EFFECTIVE // (MICRO * new) and resume["step"] == 2 * N // EFFECTIVE
    # weights and Adam moments after the reshard = the checkpoint's, gathered
    ref, loaded = load_file(d / "ref.safetensors"), load_file(d / "loaded.safetensors")
    weights = {k for k in ref if "::" not in k}
    assert weights and all(torch.equal(ref[k], loaded[k]) for k in weights)
    moments = load_file(d / "universal.safetensors") if case.startswith("z") else \
        {k: v for k, v in ref.items() if "::" in k}
    assert len(moments) >= 2 * 10
    for k, v in moments.items():
        assert torch.equal(v.reshape(loaded[k].shape), loaded[k]), k
    if case.endswith("bft"):
        assert len(set(resume["lr_scales"])) > 2  # layer-decay groups survive the (universal) load
    # the loss goes on: finite, and the first continued step close to the last one before the checkpoint
    curve = losses(d / "train.csv")
    step = info["step"]
    assert all(math.isfinite(v) for v in curve.values()) and max(curve) == resume["step"]
    assert abs(curve[step + 1] - curve[step]) < 0.5 * abs(curve[step]), (curve[step], curve[step + 1])


@pytest.mark.parametrize("case", ["torch_mgp", "z3_bft", "z2_mgp"])
def test_checkpoint_info_and_export(elastic, case, tmp_path, capsys):
    from fastlivt.engine.checkpoint_cli import main

    d = elastic / "1to2" / case
    out = tmp_path / "w.safetensors"
    assert main(["export", str(d), str(out)]) == 0
    exported, final = load_file(out), load_file(d / "final.safetensors")
    params = [k for k in exported if k in final]
    assert params and all(torch.equal(exported[k], final[k]) for k in params)
    capsys.readouterr()
    assert main(["info", "--json", str(d)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["world_size"] == 2 and summary["step"] == 2 * N // EFFECTIVE and summary["epoch"] == 2
    assert summary["samples_consumed"] == 0 and summary["accum"] == 2
    assert summary["engine"] == ("torch" if case.startswith("torch") else f"deepspeed zero-{case[1]}")
    if case == "z3_bft":  # a BFT export (gathered from ZeRO-3 shards) is a classifier export that fastlivt evaluate
        # reads; the command is wired
        from fastlivt.engine.evaluate import read_classifier

        state, cfg, _ = read_classifier(out)
        assert cfg.run.stage == "finetune" and "head.weight" in state
        proc = subprocess.run([sys.executable, "-m", "fastlivt", "checkpoint", "info", str(d)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "samples_consumed" in proc.stdout, proc.stderr[-2000:]

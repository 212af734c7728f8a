"""The CLI reports a user's mistake as one line ``fastlivt: error: ...`` and exit status 2, without a traceback
(``--debug`` or FASTLIVT_DEBUG=1 shows it); a bug keeps its traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BFT = str(ROOT / "configs/fmnist_lt/bft.yaml")


def fastlivt(*args: str, env_extra=None, code: str = ""):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("FASTLIVT_DEBUG", None)
    env.update(env_extra or {})
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "fastlivt", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def error_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith("fastlivt: error: ")]


@pytest.mark.parametrize("args, message", [
    (["finetune", "--config", BFT, "loss.name=focal"],
     "fastlivt: error: loss.name: expected one of ce, bce, bal_ce, bal_bce, got 'focal'"),
    (["finetune", "--config", "/nonexistent/bft.yaml"], "fastlivt: error: config file not found: /nonexistent/bft.yaml"),
    (["finetune", "--config", BFT, "run.device=cpu", "data.train=/nonexistent/train", "run.out={tmp}/run"],
     "fastlivt: error: /nonexistent/train: no manifest"),
    (["evaluate", "--checkpoint", "/nonexistent/model.safetensors", "--data", "/nonexistent/val"],
     "fastlivt: error: --checkpoint: no such file /nonexistent/model.safetensors"),
])
def test_user_mistake_is_one_line_and_exit_2(args, message, tmp_path):
    res = fastlivt(*[a.format(tmp=tmp_path) for a in args])
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith(message), res.stderr
    assert res.stderr.rstrip().splitlines()[-1] == lines[0]  # the last thing the user sees


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how):
    args = ["finetune", "--config", BFT, "loss.name=focal"] + (["--debug"] if how == "flag" else [])
    res = fastlivt(*args, env_extra={"FASTLIVT_DEBUG": "1"} if how == "env" else None)
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "ConfigError: loss.name: expected one of" in res.stderr
    assert not error_lines(res.stderr)


def test_a_bug_keeps_its_traceback():
    # a sub-command that fails by a programming error (not a user's mistake) is not reduced to one line
    code = ("import sys, fastlivt.cli as cli, fastlivt.demo as demo\n"
            "demo.main = lambda argv: {}['missing']\n"
            "sys.exit(cli.main(sys.argv[1:]))")
    res = fastlivt("demo", code=code)
    assert res.returncode == 1 and "Traceback" in res.stderr and "KeyError: 'missing'" in res.stderr
    assert not error_lines(res.stderr)

"""The CLI reports a user's mistake as one line ``fastlivt: error: ...`` and exit status 2, without a traceback
(``--debug`` or FASTLIVT_DEBUG=1 shows it); a bug keeps its traceback.

The table of mistakes goes through ``fastlivt.cli.main`` in this process (each case a fresh interpreter would only
repeat the start-up); the process-level behaviour (exit status, the last line on stderr, the printed traceback) is
checked once per entry point in a subprocess: ``python -m fastlivt``, ``python -m fastlivt.data_prep``, ``--debug``, a bug."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BFT = str(ROOT / "configs/fmnist_lt/bft.yaml")
CONVERT = str(ROOT / "configs/fmnist_lt/convert.yaml")


def fastlivt(*args: str, env_extra=None, code: str = "", module: str = "fastlivt"):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("FASTLIVT_DEBUG", None)
    env.update(env_extra or {})
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def error_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith("fastlivt: error: ")]


def in_process(args, capsys, monkeypatch):
    """``fastlivt ARGS`` through ``fastlivt.cli.main`` here: (exit status, stderr)."""
    from fastlivt import cli

    monkeypatch.delenv("FASTLIVT_DEBUG", raising=False)
    capsys.readouterr()
    rc = cli.main(list(args))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["finetune", "--config", BFT, "loss.name=focal"],
     "fastlivt: error: loss.name: expected one of ce, bce, bal_ce, bal_bce, got 'focal'"),
    (["finetune", "--config", "/nonexistent/bft.yaml"], "fastlivt: error: config file not found: /nonexistent/bft.yaml"),
    (["finetune", "--config", BFT, "run.device=cpu", "data.train=/nonexistent/train", "run.out={tmp}/run"],
     "fastlivt: error: /nonexistent/train: no manifest"),
    (["evaluate", "--checkpoint", "/nonexistent/model.safetensors", "--data", "/nonexistent/val"],
     "fastlivt: error: --checkpoint: no such file /nonexistent/model.safetensors"),
    (["convert", "--config", CONVERT, "bogus_key=1", "out={tmp}/o"],
     "fastlivt: error: unknown key bogus_key (section ConvertConfig has: source, root,"),
    (["convert", "--config", CONVERT, "write_mode=png", "out={tmp}/o"],
     "fastlivt: error: write_mode: expected one of jpg, raw, proportion, got 'png'"),
    (["convert", "--config", CONVERT, "jpeg_quality=300", "out={tmp}/o"],
     "fastlivt: error: invalid conversion settings: jpeg_quality=300 (expected 1..100)"),
    (["convert", "--config", "/nonexistent/convert.yaml"],
     "fastlivt: error: config file not found: /nonexistent/convert.yaml"),
    (["convert", "fmnist", "--root", "/nonexistent/raw", "--out", "{tmp}/o"],
     "fastlivt: error: --root /nonexistent/raw: not a directory"),
    (["convert", "list", "--root", "{tmp}", "--list", "/nonexistent/train.txt", "--out", "{tmp}/o"],
     "fastlivt: error: list file not found: /nonexistent/train.txt"),
])
def test_user_mistake_is_one_line_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
    rc, err = in_process([a.format(tmp=tmp_path) for a in args], capsys, monkeypatch)
    assert rc == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(message), err
    assert err.rstrip().splitlines()[-1] == lines[0]  # the last thing the user sees


def test_python_m_fastlivt_reports_a_mistake_in_one_line_without_a_traceback(tmp_path):
    res = fastlivt("finetune", "--config", BFT, "run.device=cpu", "data.train=/nonexistent/train",
                   f"run.out={tmp_path}/run")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("fastlivt: error: /nonexistent/train: no manifest"), res.stderr
    assert res.stderr.rstrip().splitlines()[-1] == lines[0]


def test_python_m_data_prep_reports_a_mistake_like_fastlivt_convert(tmp_path):
    res = fastlivt("--config", CONVERT, "bogus_key=1", f"out={tmp_path}/o", module="fastlivt.data_prep")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines() == error_lines(res.stderr)
    assert len(error_lines(res.stderr)) == 1 and "unknown key bogus_key" in res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("how", ["flag", "env"])
@pytest.mark.parametrize("command, error", [
    (["finetune", "--config", BFT, "loss.name=focal"], "ConfigError: loss.name: expected one of"),
    (["convert", "--config", CONVERT, "loss.name=focal"], "ConfigError: unknown key loss"),
])
def test_debug_raises_the_error_instead_of_one_line(how, command, error, monkeypatch, capsys):
    from fastlivt import cli

    args = command + (["--debug"] if how == "flag" else [])
    monkeypatch.delenv("FASTLIVT_DEBUG", raising=False)
    if how == "env":
        monkeypatch.setenv("FASTLIVT_DEBUG", "1")
    with pytest.raises(Exception) as e:
        cli.main(args)
    assert f"{type(e.value).__name__}: {e.value}".startswith(error)
    assert not error_lines(capsys.readouterr().err)


def test_debug_flag_prints_the_traceback_of_python_m_fastlivt():
    res = fastlivt("finetune", "--config", BFT, "loss.name=focal", "--debug")
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "ConfigError: loss.name: expected one of" in res.stderr
    assert not error_lines(res.stderr)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_of_python_m_data_prep(how):
    args = ["--config", CONVERT, "bogus_key=1"] + (["--debug"] if how == "flag" else [])
    res = fastlivt(*args, env_extra={"FASTLIVT_DEBUG": "1"} if how == "env" else None, module="fastlivt.data_prep")
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "ConfigError: unknown key bogus_key" in res.stderr
    assert not error_lines(res.stderr)


def test_a_bug_keeps_its_traceback():
    # a sub-command that fails by a programming error (not a user's mistake) is not reduced to one line
    code = ("import sys, fastlivt.cli as cli, fastlivt.demo as demo\n"
            "demo.main = lambda argv: {}['missing']\n"
            "sys.exit(cli.main(sys.argv[1:]))")
    res = fastlivt("demo", code=code)
    assert res.returncode == 1 and "Traceback" in res.stderr and "KeyError: 'missing'" in res.stderr
    assert not error_lines(res.stderr)

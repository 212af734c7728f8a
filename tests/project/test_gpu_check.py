"""scripts/gpu_check.sh: its plan (priority order, limits within the window, compiled kernel tests), its refusal to
start without pydantic, the checker of its output, and the test set-up's TRITON_INTERPRET rule."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ORDER = ["env", "tests-kernel", "bench-loss", "bench-compiled", "bench-data", "bench-deepspeed"]


def _plan(**env) -> list:
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PLAN_ONLY": "1", **env})
    assert proc.returncode == 0, proc.stderr
    steps = []
    for line in proc.stdout.splitlines():
        name, limit, interpret, cmd = line.split(" ", 3)
        steps.append((name, int(limit), interpret, cmd))
    return steps


def test_gpu_plan_keeps_the_order_fits_330_s_and_runs_the_kernel_compiled():
    steps = _plan()
    assert [s[0] for s in steps] == ORDER
    assert sum(s[1] for s in steps) <= 330, steps
    assert all(s[2] == "TRITON_INTERPRET=0" for s in steps)
    tests = dict((s[0], s[3]) for s in steps)["tests-kernel"]
    assert "-m cuda" in tests and "tests/kernels/test_bal_bce.py" in tests
    # the device data pipeline's CUDA tests too: crop and RandAugment, which need nothing the GPU image lacks
    assert "tests/fastlivt/data/test_device_crop.py" in tests and "test_device_randaugment.py" in tests
    assert all("--device cuda" in s[3] for s in steps if s[0].startswith("bench-"))


def test_cpu_dry_run_plan_is_the_same_steps_on_the_cpu_within_6_minutes():
    steps = _plan(DRY_RUN="cpu")
    assert [s[0] for s in steps] == ORDER
    assert sum(s[1] for s in steps) <= 360
    assert all("--device cpu" in s[3] for s in steps if s[0].startswith("bench-"))
    assert all(s[2] == "TRITON_INTERPRET=1" for s in steps)


def test_no_pydantic_and_no_wheel_folder_stops_before_any_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_WHEELS": str(tmp_path / "no-wheels"),
           "PYTHONPATH": str(ROOT / "tests" / "helpers" / "block_engines"), "FASTLIVT_BLOCK_MODULES": "pydantic"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 2
    assert f"the wheel folder {tmp_path / 'no-wheels'} is missing" in proc.stderr
    assert "bash scripts/gpu_wheels.sh" in proc.stderr and "pydantic does not import" in proc.stderr
    assert "=== " not in proc.stdout  # no step started


def _out(tmp_path: Path, log_text: str, rows: list) -> Path:
    out = tmp_path / "out"
    (out / "loss").mkdir(parents=True)
    (out / "summary.txt").write_text("=== [0 s] bench-loss (limit 60 s): python3 -m fastlivt bench loss\n"
                                     "    bench-loss: ok\n")
    (out / "bench-loss.log").write_text(log_text)
    (out / "loss" / "bench-2026-01-01-cpu.json").write_text(json.dumps({"rows": rows}))
    return out


def _verify(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/gpu_check_verify.py", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_verifier_fails_on_a_traceback_an_error_row_or_no_rows(tmp_path):
    good = {"unavailable": None, "median": 1.0}
    assert _verify(_out(tmp_path / "a", "fine\n", [good, {"unavailable": "needs CUDA", "median": None}])).returncode == 0
    bad = _verify(_out(tmp_path / "b", "Traceback (most recent call last):\n  ...\nImportError: x\n", [good]))
    assert bad.returncode == 1 and "Traceback" in bad.stdout
    assert _verify(_out(tmp_path / "c", "fine\n", [])).returncode == 1
    errors = _verify(_out(tmp_path / "d", "fine\n", [{"unavailable": "error: KeyError: 1", "median": None}]))
    assert errors.returncode == 1 and "error rows" in errors.stdout


def _conftest_sets(cuda: bool) -> str:
    code = ("import os, runpy, torch\n"
            f"torch.cuda.is_available = lambda: {cuda}\n"
            "runpy.run_path('tests/conftest.py')\n"
            "print(os.environ.get('TRITON_INTERPRET', 'unset'))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_the_interpreter_is_set_only_where_there_is_no_cuda_device():
    assert _conftest_sets(cuda=False) == "1"
    assert _conftest_sets(cuda=True) == "unset"  # a GPU runs the compiled kernel

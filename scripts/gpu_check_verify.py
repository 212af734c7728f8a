"""Check a gpu_check.sh output folder: every step ended "ok", no log holds a Traceback or an ImportError, the kernel
tests passed, the environment step printed the GEMM peaks, and every bench part wrote rows (measured, or
``unavailable: <reason>``, never ``error: ...``). Prints one line per step; exit 1 on any failure.
    python3 scripts/gpu_check_verify.py OUT
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

BAD = re.compile(r"Traceback \(most recent call last\)|ImportError|ModuleNotFoundError")


def verify(out: Path) -> list:
    problems = []
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").is_file() else ""
    steps = re.findall(r"^=== \[\d+ s\] (\S+) \(limit", summary, flags=re.M)
    if not steps:
        return [f"{out}/summary.txt: no step ran"]
    for name in steps:
        ended = re.search(rf"^    {re.escape(name)}: (.*)$", summary, flags=re.M)
        log = out / f"{name}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        notes = []
        if not ended or ended.group(1) != "ok":
            notes.append(f"ended: {ended.group(1) if ended else 'never'}")
        bad = BAD.search(text)
        if bad:
            notes.append(f"log has {bad.group(0)!r}")
        detail = ""
        if name == "env":
            peaks = re.findall(r"^GEMM peak .*$", text, flags=re.M)
            detail = f"{len(peaks)} GEMM peaks"
            if len(peaks) < 2:
                notes.append("no GEMM peak printed")
        elif name.startswith("tests-"):
            passed = re.search(r"(\d+) passed", text)
            detail = passed.group(0) if passed else "no test passed"
            if not passed or re.search(r"\d+ (failed|error)", text):
                notes.append("tests did not all pass")
        elif name.startswith("bench-"):
            files = sorted((out / name[len("bench-"):]).glob("bench-*.json"))
            rows = json.loads(files[-1].read_text())["rows"] if files else []
            measured = [r for r in rows if not r["unavailable"]]
            errors = [r for r in rows if (r["unavailable"] or "").startswith("error:")]
            detail = f"{len(rows)} rows ({len(measured)} measured, {len(rows) - len(measured)} unavailable)"
            if not rows:
                notes.append("no rows written")
            if errors:
                notes.append(f"error rows: {[r['unavailable'][:120] for r in errors]}")
        print(f"{name:16s} {'FAIL: ' + '; '.join(notes) if notes else 'ok'}  {detail}")
        problems += [f"{name}: {n}" for n in notes]
    return problems


if __name__ == "__main__":
    problems = verify(Path(sys.argv[1]))
    print("gpu_check_verify:", "FAILED: " + " | ".join(problems) if problems else "every step ok, rows written")
    sys.exit(1 if problems else 0)

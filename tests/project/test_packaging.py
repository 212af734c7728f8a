"""One top-level name: the folders kernels/ and data_prep/ are the packages fastlivt.kernels and fastlivt.data_prep.

The wheel holds ``fastlivt/`` (with ``fastlivt/kernels`` and ``fastlivt/data_prep`` as real files) and nothing else at
the top, so it installs into a fresh environment beside distributions that own top-level ``kernels`` and
``data_prep`` without touching their files; an editable install imports the same names. No module, test or script
imports the old top-level names, and the folders refuse to be imported under them (a second copy of every module).
"""
from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[2]
MOVED = ("kernels", "data_prep")  # folders at the top of the repository, imported only as fastlivt.<name>


def _env() -> Dict[str, str]:
    """The environment of a child that must see only its own interpreter's site-packages (no checkout on the path)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", PIP_NO_INPUT="1")
    return env


def _run(cmd: List[str], cwd: Path, env=None) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _source_copy(dest: Path) -> Path:
    """What the build reads (links kept as links), so that building leaves no build/ or egg-info in the checkout."""
    dest.mkdir()
    for name in ("fastlivt", *MOVED):
        shutil.copytree(ROOT / name, dest / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    return dest


def _dummy_wheel(out: Path, dist: str, package: str) -> Path:
    """A one-package wheel of another distribution that owns the top-level ``package``."""
    files = {f"{package}/__init__.py": f"OWNER = {dist!r}\n",
             f"{dist}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n",
             f"{dist}-1.0.dist-info/WHEEL":
                 "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for name, text in files.items()]
    files[f"{dist}-1.0.dist-info/RECORD"] = "\n".join(record + [f"{dist}-1.0.dist-info/RECORD,,"]) + "\n"
    path = out / f"{dist}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
    return path


def _venv(path: Path) -> Path:
    """A fresh environment that sees the base interpreter's distributions (torch, pip) below its own site-packages."""
    _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", path], cwd=path.parent)
    return path / "bin" / "python"


def _install(python: Path, *args, cwd: Path) -> str:
    out = _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", *args], cwd=cwd)
    return out.stdout + out.stderr


def _records(python: Path, cwd: Path) -> Dict[str, set]:
    """Distribution -> the files its RECORD in the environment's own site-packages lists."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([python, "-c", code], cwd=cwd).stdout.strip())
    return {d.name.split("-")[0]: {line.split(",")[0] for line in (d / "RECORD").read_text().splitlines() if line}
            for d in site.glob("*.dist-info")}


PROBE = ("import json, sys, kernels, data_prep, fastlivt, fastlivt.kernels.launch, fastlivt.data_prep.manifest\n"
         "print(json.dumps({'kernels': kernels.OWNER, 'data_prep': data_prep.OWNER, 'fastlivt': fastlivt.__file__,\n"
         "    'launch': fastlivt.kernels.launch.__file__, 'manifest': fastlivt.data_prep.manifest.__file__}))\n")


def _probe(python: Path, cwd: Path) -> Dict[str, str]:
    return json.loads(_run([python, "-c", PROBE], cwd=cwd).stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(source copy, fastlivt wheel, the two other distributions' wheels)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = _source_copy(tmp / "src")
    wheels = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, src], cwd=tmp)
    (wheel,) = wheels.glob("fastlivt-*.whl")
    others = [_dummy_wheel(wheels, "other_kernels", "kernels"), _dummy_wheel(wheels, "other_prep", "data_prep")]
    return src, wheel, others


def test_wheel_holds_one_top_level_package_with_kernels_and_data_prep_as_real_files(built):
    _, wheel, _ = built
    with zipfile.ZipFile(wheel) as whl:
        infos = {i.filename: i for i in whl.infolist()}
        assert {name.split("/")[0] for name in infos} == {"fastlivt", "fastlivt-0.1.0.dist-info"}
        assert whl.read("fastlivt-0.1.0.dist-info/top_level.txt").decode().split() == ["fastlivt"]
        for folder in MOVED:
            sources = sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
            assert len(sources) >= 5, folder
            for path in sources:
                name = f"fastlivt/{path.relative_to(ROOT).as_posix()}"
                assert name in infos, f"{name} missing from {wheel.name}"
                assert (infos[name].external_attr >> 16) & 0o170000 != 0o120000, f"{name} is a link in the wheel"
                assert whl.read(name) == path.read_bytes(), name


def test_wheel_installs_beside_distributions_owning_kernels_and_data_prep(built, tmp_path):
    _, wheel, others = built
    python = _venv(tmp_path / "venv")
    _install(python, *others, cwd=tmp_path)
    theirs = (tmp_path / "venv").glob("lib/python*/site-packages/kernels/__init__.py")
    (their_init,) = theirs
    before = their_init.read_bytes()
    log = _install(python, wheel, cwd=tmp_path)
    assert not re.search(r"(?i)overwrit|clobber|conflict|already exists", log), log
    # pip installs over another distribution's files without a word: the RECORDs and their file are the proof
    records = _records(python, tmp_path)
    ours = records["fastlivt"]
    for other in ("other_kernels", "other_prep"):
        assert not ours & records[other], f"fastlivt's wheel writes files of {other}: {sorted(ours & records[other])}"
    assert their_init.read_bytes() == before
    found = _probe(python, tmp_path)
    assert (found["kernels"], found["data_prep"]) == ("other_kernels", "other_prep")
    site = str(their_init.parents[1])
    for key in ("fastlivt", "launch", "manifest"):  # from the environment's own site-packages, not a checkout
        assert found[key].startswith(site + os.sep), (key, found[key], site)
    assert found["launch"].endswith(os.path.join("fastlivt", "kernels", "launch.py"))


def test_editable_install_imports_the_same_names(built, tmp_path):
    src, _, others = built
    python = _venv(tmp_path / "venv")
    _install(python, *others, cwd=tmp_path)
    _install(python, "--use-pep517", "-e", src, cwd=tmp_path)  # PEP 660 (setuptools builds the editable wheel)
    found = _probe(python, tmp_path)
    assert (found["kernels"], found["data_prep"]) == ("other_kernels", "other_prep")
    assert found["launch"] == str(src / "fastlivt" / "kernels" / "launch.py")
    assert found["manifest"] == str(src / "fastlivt" / "data_prep" / "manifest.py")


def _python_files() -> List[Path]:
    walked = [Path(d, f) for top in ("fastlivt", "tests", "scripts")
              for d, _, files in os.walk(ROOT / top, followlinks=True) for f in files]
    return sorted(p for p in walked if p.suffix == ".py" and "__pycache__" not in p.parts)


def _old_names(path: Path) -> List[str]:
    """Lines of ``path`` that import, or name as a dotted string, a module under the old top-level names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        elif isinstance(node, ast.Constant) and re.fullmatch(r"[A-Za-z_]\w*[.:][\w.:]+", str(node.value)):
            names = [str(node.value)]  # a dotted name for importlib, monkeypatch or a "module:attribute" table
        elif isinstance(node, (ast.List, ast.Tuple, ast.Call)):  # ["-m", "data_prep"], f(..., module="data_prep")
            items = node.elts if not isinstance(node, ast.Call) else [*node.args, *[k.value for k in node.keywords]]
            words = [i.value if isinstance(i, ast.Constant) else None for i in items]
            names = [str(w) for prev, w in zip([None, *words], words) if prev == "-m"]
            if isinstance(node, ast.Call):
                names += [str(k.value.value) for k in node.keywords
                          if k.arg == "module" and isinstance(k.value, ast.Constant)]
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if re.split(r"[.:]", n)[0] in MOVED]
    return found


def test_nothing_imports_the_old_top_level_names():
    files = _python_files()
    assert any(p.parts[-3:] == ("fastlivt", "kernels", "bal_bce_op.py") for p in files)  # the links are followed
    bad = [line for path in files for line in _old_names(path)]
    assert not bad, "import these as fastlivt.kernels / fastlivt.data_prep: " + "; ".join(bad)
    texts = [*sorted((ROOT / "scripts").glob("*.sh")), ROOT / "README.md"]
    shell = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in texts
             for m in re.finditer(r"(?m)(-m|\bimport|\bfrom) (kernels|data_prep)\b", p.read_text())]
    assert not shell, shell


def test_the_detector_sees_an_old_name(tmp_path, monkeypatch):
    planted = tmp_path / "planted.py"
    planted.write_text("import os\nfrom data_prep.atomic import write_json_atomic\nPATCH = 'kernels.launch.LAUNCHES'\n"
                       "from fastlivt.kernels import launch\nTEXT = 'the kernels.'\n"
                       "CMD = ['python', '-m', 'data_prep']\n"
                       "run(module='kernels', name='kernels')\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _old_names(planted) == ["planted.py:2: data_prep.atomic", "planted.py:3: kernels.launch.LAUNCHES",
                                   "planted.py:6: data_prep", "planted.py:7: kernels"]


@pytest.mark.parametrize("name", MOVED)
def test_the_folders_refuse_their_old_top_level_name(name):
    env = {**_env(), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert f"ImportError: import fastlivt.{name}, not {name}:" in out.stderr, out.stderr


def test_data_prep_under_fastlivt_does_not_import_torch():
    code = ("import sys, fastlivt.data_prep.manifest, fastlivt.data_prep.config\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')))")
    out = _run([sys.executable, "-c", code], cwd=ROOT, env={**_env(), "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout

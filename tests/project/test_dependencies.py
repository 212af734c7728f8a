"""setup.py declares every distribution that fastlivt (fastlivt.kernels and fastlivt.data_prep included) imports.

The import closure is read with ``ast`` (``import`` and ``from ... import`` at module level and inside functions;
relative imports are the project's own). Each imported top-level name is the standard library
(``sys.stdlib_module_names``), the project's own package, or maps to a distribution (:data:`DISTRIBUTION` where
the names differ) that ``setup()`` receives in ``install_requires`` or an extra. A name imported at module level by a
module outside the optional engines' own modules must be in ``install_requires`` (the package must import without
the extras). The map is checked against the installed distributions' own metadata, and every ``install_requires``
entry is used somewhere.
"""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import runpy
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[2]
OWN = ("fastlivt",)  # kernels/ and data_prep/ are read through the links fastlivt/kernels, fastlivt/data_prep
# Import name -> distribution, where they differ.
DISTRIBUTION = {"cv2": "opencv-python", "yaml": "pyyaml", "PIL": "pillow", "nvidia.dali": "nvidia-dali-cuda130",
                "wds2idx": "nvidia-dali-cuda130"}
# Namespace packages shared by many distributions: the import name is taken one level deeper.
NAMESPACES = ("nvidia",)
# Submodules of a declared distribution that import another one.
IMPLIED = {"torch.utils.tensorboard": "tensorboard"}
# The optional engines' own modules, which import their engine at module level by design.
ENGINE_MODULES = {"fastlivt/data/ffcv_ops.py", "fastlivt/data/ffcv_loader.py"}


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _req_name(requirement: str) -> str:
    return _norm(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])


@pytest.fixture(scope="module")
def setup_kwargs():
    captured = {}
    original = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = original
    return captured


def imports() -> List[Tuple[str, str, bool]]:
    """(module name, file relative to the root, at module level) for every absolute import of the package."""
    found = []

    def visit(node, path: str, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, path, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and not child.level and child.module:
                found.extend((f"{child.module}.{a.name}", path, top) for a in child.names)
            visit(child, path, inner)

    for package in OWN:
        walked = [Path(d, f) for d, _, files in os.walk(ROOT / package, followlinks=True) for f in files]
        for path in sorted(p for p in walked if p.suffix == ".py"):
            visit(ast.parse(path.read_text(), filename=str(path)), str(path.relative_to(ROOT)), True)
    return found


def distribution_of(name: str) -> str:
    """The distribution that provides ``name`` ("" for the standard library and the project's own packages)."""
    for prefix, dist in IMPLIED.items():
        if name == prefix or name.startswith(prefix + "."):
            return dist
    parts = name.split(".")
    top = ".".join(parts[:2]) if parts[0] in NAMESPACES else parts[0]
    if parts[0] in sys.stdlib_module_names or parts[0] in OWN:
        return ""
    return _norm(DISTRIBUTION.get(top, top))


def test_every_import_is_declared(setup_kwargs):
    core = {_req_name(r) for r in setup_kwargs["install_requires"]}
    extras = {_req_name(r) for reqs in setup_kwargs["extras_require"].values() for r in reqs}
    missing: Dict[str, Set[str]] = {}
    not_core: Dict[str, Set[str]] = {}
    for name, path, top in imports():
        dist = distribution_of(name)
        if not dist:
            continue
        if dist not in core | extras:
            missing.setdefault(dist, set()).add(path)
        elif top and dist not in core and path not in ENGINE_MODULES:
            not_core.setdefault(dist, set()).add(path)
    assert not missing, f"imported but not declared in setup.py: {missing}"
    assert not not_core, f"imported at module level but only an extra (the package must import without it): {not_core}"
    assert "pydantic" in core  # fastlivt.data_prep.config, imported by fastlivt.config


def test_every_required_distribution_is_imported(setup_kwargs):
    used = {distribution_of(name) for name, _, _ in imports()}
    unused = {_req_name(r) for r in setup_kwargs["install_requires"]} - used
    assert not unused, f"install_requires entries that no module imports: {unused}"


def test_import_name_map_matches_the_installed_metadata():
    """Each import name the test maps (or takes as its own distribution name) is provided by that distribution,
    as the installed distributions' RECORDs say."""
    provided = importlib.metadata.packages_distributions()
    checked = 0
    for name in sorted({n for n, _, _ in imports()}):
        dist = distribution_of(name)
        parts = name.split(".")
        if not dist or dist in IMPLIED.values():
            continue
        owners = {_norm(d) for d in provided.get(parts[0], [])}
        if owners:  # installed here
            assert dist in owners, f"{name}: mapped to {dist}, but installed by {owners}"
            checked += 1
    assert checked >= 10


def test_a_missing_declaration_is_caught(setup_kwargs):
    """The check itself: dropping pydantic from install_requires is seen."""
    core = {_req_name(r) for r in setup_kwargs["install_requires"]} - {"pydantic"}
    used = {distribution_of(name) for name, path, top in imports() if top and path not in ENGINE_MODULES}
    assert "pydantic" in used - core

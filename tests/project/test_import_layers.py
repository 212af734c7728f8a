"""The import graph of fastlivt: no module import cycle, and the packages depend one way.

Every module is parsed with ``ast``; an edge a -> b is any ``import`` or ``from ... import`` in a, at module level or
inside a function, relative imports resolved, to the deepest module of the three packages the name reaches
(``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``). A parent package's
``__init__`` that Python runs on the way to a submodule is not an edge of its own; ``fastlivt/__init__.py`` imports
nothing, so the bottom layers pay nothing for sitting under the ``fastlivt`` name. The folders ``kernels/`` and
``data_prep/`` are read through the links ``fastlivt/kernels`` and ``fastlivt/data_prep``, as Python imports them.

Allowed directions: fastlivt.data_prep imports nothing else of fastlivt; fastlivt.kernels nothing else of fastlivt;
fastlivt.engine neither fastlivt.bench nor fastlivt.demo; fastlivt.models and fastlivt.data not fastlivt.engine.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Dict, Iterable, List, Set

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fastlivt",)


def module_files(root: Path, packages: Iterable[str]) -> Dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the ``packages`` folders of ``root`` (links followed)."""
    modules = {}
    for package in packages:
        found = [Path(d, f) for d, _, files in os.walk(root / package, followlinks=True) for f in files]
        for path in sorted(p for p in found if p.suffix == ".py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _deepest_module(name: str, modules: Dict[str, Path]) -> str:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def imported_modules(module: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The modules of ``modules`` that ``module`` (at ``path``) imports anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(_deepest_module(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                if node.level > len(parts):
                    raise ValueError(f"{path}: relative import beyond the top-level package (line {node.lineno})")
                anchor = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                found.add(_deepest_module(f"{base}.{alias.name}", modules) or _deepest_module(base, modules))
    found.discard("")
    found.discard(module)
    return found


def import_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> Dict[str, Set[str]]:
    modules = module_files(root, packages)
    return {m: imported_modules(m, p, modules) for m, p in modules.items()}


def import_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative), each sorted, sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return sorted(cycles)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def edges_into(graph: Dict[str, Set[str]], sources: Iterable[str], targets: Iterable[str]) -> List[str]:
    """``"a -> b"`` for every import of a module under ``targets`` by a module under ``sources`` (package prefixes)."""
    sources, targets = tuple(sources), tuple(targets)
    return sorted(f"{a} -> {b}" for a, imported in graph.items() if any(_within(a, s) for s in sources)
                  for b in imported if any(_within(b, t) for t in targets))


def test_no_import_cycle_among_modules():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def edges_out_of(graph: Dict[str, Set[str]], package: str) -> List[str]:
    """``"a -> b"`` for every import by a module under ``package`` of a module of the graph outside it."""
    return [edge for edge in edges_into(graph, [package], graph) if not _within(edge.split(" -> ")[1], package)]


def test_fastlivt_init_imports_nothing():
    init = ROOT / "fastlivt" / "__init__.py"
    imports = [n for n in ast.walk(ast.parse(init.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not imports, "fastlivt/__init__.py runs before fastlivt.data_prep and fastlivt.kernels: keep it import-free"


def test_data_prep_imports_nothing_else_of_fastlivt():
    graph = import_graph()
    bad = edges_out_of(graph, "fastlivt.data_prep")
    assert not bad, "fastlivt.data_prep must stand alone: " + ", ".join(bad)
    assert "fastlivt.data_prep.atomic" in graph["fastlivt.data_prep.manifest"]  # edges inside it are seen


def test_kernels_import_nothing_else_of_fastlivt():
    graph = import_graph()
    bad = edges_out_of(graph, "fastlivt.kernels")
    assert not bad, "fastlivt.kernels must stand alone: " + ", ".join(bad)
    assert "fastlivt.kernels.launch" in graph["fastlivt.kernels.bal_bce_op"]


def test_engine_imports_neither_bench_nor_demo():
    bad = edges_into(import_graph(), ["fastlivt.engine"], ["fastlivt.bench", "fastlivt.demo"])
    assert not bad, "fastlivt.engine sits below bench and demo: " + ", ".join(bad)


def test_models_and_data_do_not_import_engine():
    bad = edges_into(import_graph(), ["fastlivt.models", "fastlivt.data"], ["fastlivt.engine"])
    assert not bad, "fastlivt.models and fastlivt.data sit below fastlivt.engine: " + ", ".join(bad)


def test_graph_holds_function_level_and_package_imports_of_the_tree():
    graph = import_graph()
    assert {"fastlivt", "fastlivt.data_prep", "fastlivt.kernels", "fastlivt.data.registry",
            "fastlivt.kernels.launch"} <= set(graph)
    assert "fastlivt.bench.compiled" in graph["fastlivt.bench.model"]  # imported inside run()
    assert "fastlivt.data" in graph["fastlivt.engine.build"]  # `from fastlivt.data import build_loader`, in a function
    assert "fastlivt.data.device_decode" in graph["fastlivt.data.torch_loader"]  # `from fastlivt.data import device_decode`


def _write_package(root: Path, files: Dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_detector_finds_a_planted_cycle_through_a_function_level_relative_import(tmp_path):
    _write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def late():\n    from . import a\n    return a\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/d.py": "from ..c import something\nfrom .. import e\nimport json\n",
        "pkg/e.py": "from pkg.sub import d\n",
    })
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert graph["pkg.sub.d"] == {"pkg.c", "pkg.e"}  # json is outside the packages
    assert import_cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.e", "pkg.sub.d"]]
    assert edges_into(graph, ["pkg.sub"], ["pkg.e", "pkg.a"]) == ["pkg.sub.d -> pkg.e"]


def test_detector_passes_an_acyclic_package(tmp_path):
    _write_package(tmp_path, {"pkg/__init__.py": "from pkg.a import x\n", "pkg/a.py": "from pkg import b\n",
                              "pkg/b.py": "import os\n"})
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg"] == {"pkg.a"} and import_cycles(graph) == []

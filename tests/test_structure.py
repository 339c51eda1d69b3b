"""The shape of pipeline/ and recipes/: modules and functions small enough to read whole, short argument
lists, and library modules that import without cycles, each on its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "recipes")
MODULES = sorted(p for package in PACKAGES for p in (ROOT / package).glob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS = 450, 60, 6


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [node for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Named parameters as ruff's PLR0913 counts them: not `self`/`cls`, not *args or **kwargs."""
    names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
    return len(names) - (names[:1] in (["self"], ["cls"]))


@pytest.mark.parametrize("path", MODULES, ids=relative)
def test_modules_functions_and_argument_lists_are_short(path):
    lines = len(path.read_text().splitlines())
    assert lines < MAX_MODULE_LINES, f"{relative(path)} has {lines} lines: split it by subject"
    long = {f.name: n for f in functions(path) if (n := f.end_lineno - f.lineno + 1) > MAX_FUNCTION_LINES}
    assert not long, f"{relative(path)}: functions over {MAX_FUNCTION_LINES} lines: {long}"
    wide = {f.name: n for f in functions(path) if (n := parameters(f)) > MAX_PARAMETERS}
    assert not wide, f"{relative(path)}: functions with more than {MAX_PARAMETERS} parameters: {wide}"


def imports_at_load(path: Path) -> set[str]:
    """The pipeline modules a pipeline module imports when it is loaded (imports inside functions wait)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
        elif isinstance(node, ast.ImportFrom) and node.module == "pipeline":
            found |= {a.name for a in node.names if (ROOT / "pipeline" / f"{a.name}.py").exists()}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            found.add(node.module.split(".")[1])
    return found


def test_no_import_cycles_in_pipeline():
    graph = {p.stem: imports_at_load(p) for p in (ROOT / "pipeline").glob("*.py")}
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        path.append(module)
        for other in sorted(graph.get(module, ())):
            visit(other)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


@pytest.mark.slow
def test_each_pipeline_module_imports_on_its_own():
    names = sorted(f"pipeline.{p.stem}" for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__init__")
    failed = {}
    for name in names:  # one fresh interpreter each: a cycle shows only when a module is imported first
        result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        if result.returncode:
            failed[name] = result.stderr.strip().splitlines()[-1:]
    assert not failed

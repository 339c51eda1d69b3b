"""The shape of pipeline/ and recipes/: modules and functions small enough to read whole, short argument lists,
`train` telling the story of a run, library modules that import without cycles (each on its own), recipe helpers
used through their public names, no code written twice, comments that say why (no timings, which go stale)."""

from __future__ import annotations

import ast
import io
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "recipes")
MODULES = sorted(p for package in PACKAGES for p in (ROOT / package).glob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_PARAMETERS = 450, 60, 6
PIPELINE, RECIPES = ROOT / "pipeline", ROOT / "recipes"
RECIPE_MODULES = sorted(RECIPES.glob("*.py"))
MAX_TRAIN_LINES = 45


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [
        node
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


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
            cycle = path[path.index(module) :] + [module]
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
        result = subprocess.run(
            [sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        if result.returncode:
            failed[name] = result.stderr.strip().splitlines()[-1:]
    assert not failed


# ---------------------------------------------------------------- the loop and the building of a run


def functions_by_name(name: str) -> dict[str, ast.FunctionDef]:
    tree = ast.parse((PIPELINE / name).read_text())
    return {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def length(node: ast.FunctionDef) -> int:
    return node.end_lineno - node.lineno + 1


def test_train_tells_the_story_and_building_is_elsewhere():
    loop = functions_by_name("loop.py")
    assert length(loop["train"]) <= MAX_TRAIN_LINES
    assert not {"setup", "make_loaders", "make_run_dir", "make_metrics"} & set(loop), "building a run is build.py's"
    for step in ("train_epoch", "log_line", "end_epoch", "finish"):
        assert [a.arg for a in loop[step].args.args][:2] == ["run", "state"], step


# ---------------------------------------------------------------- recipes/


def private_uses(tree: ast.Module) -> list[str]:
    """Private names taken from another recipes module: `from recipes.x import _name` or `x._name` where x is a
    recipes module imported by name (the helper modules themselves are private to the package, their names not)."""
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "recipes":
            for alias in node.names:
                if node.module == "recipes":
                    modules.add(alias.asname or alias.name)
                elif alias.name.startswith("_"):
                    found.append(f"from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_recipe_module_uses_another_ones_private_names():
    uses = {m.name: found for m in RECIPE_MODULES if (found := private_uses(ast.parse(m.read_text())))}
    assert not uses, f"private names used across modules (make them public where they live): {uses}"


TIMING = re.compile(r"\b\d[\d,.]*\s?(?:ms|us|µs|s|sec|seconds)\b|\bfaster\b|\bmeasured\b")


def comments_and_docstrings(source: str) -> list[tuple[int, str]]:
    texts = [
        (t.start[0], t.string)
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                texts.append((node.body[0].lineno, doc))
    return texts


def test_comments_quote_no_timings():
    quoted = [
        f"{m.name}:{line}: {TIMING.search(text).group(0)!r}"
        for m in RECIPE_MODULES
        for line, text in comments_and_docstrings(m.read_text())
        if TIMING.search(text)
    ]
    assert not quoted, (
        "comments or docstrings that quote timings (say why instead; history goes in commits):\n" + "\n".join(quoted)
    )


ROW = re.compile(r"^D\d+ (\S+):(\d+)-(\d+) ~ (\S+):(\d+)-(\d+)(.*)$")


def only_items_of_a_list(path: Path, first: int, last: int) -> bool:
    """Lines `first`-`last` hold nothing but the items of an argument list, one a line, as `ruff format` lays out a
    call too long for one line (`nn.ReLU(),`, `name="digits",`): two such lists of the same shape declare, they do
    not repeat logic."""
    lines = path.read_text().splitlines()[first - 1 : last]
    code = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return all(line.endswith((",", "(", "[", "{")) or line in (")", "]", "}") for line in code)


@pytest.mark.skipif(shutil.which("duplicates") is None, reason="the `duplicates` command is not on PATH")
def test_no_code_written_twice():
    out = subprocess.run(
        ["duplicates", "--repo", str(RECIPES), "--seconds", "60", "--most", "50"],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    rows = [ROW.match(line) for line in out.splitlines()[1:] if ROW.match(line)]
    repeated = [
        row.group(0)
        for row in rows
        if not (
            "shape" in row.group(7)
            and only_items_of_a_list(RECIPES / row.group(1), int(row.group(2)), int(row.group(3)))
            and only_items_of_a_list(RECIPES / row.group(4), int(row.group(5)), int(row.group(6)))
        )
    ]
    assert out.startswith("no duplicates") or (rows and not repeated), out

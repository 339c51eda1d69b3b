"""The shape of recipes/: modules and functions small enough to read whole, shared helpers used through their
public names, no code written twice, comments that say why (no timings, which go stale)."""

import ast
import io
import re
import shutil
import subprocess
import tokenize
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
MODULES = sorted(RECIPES.glob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 60


def test_modules_and_functions_are_small():
    long_modules = {m.name: n for m in MODULES if (n := len(m.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    long_functions = {f"{m.name}:{node.name}": node.end_lineno - node.lineno + 1
                      for m in MODULES for node in ast.walk(ast.parse(m.read_text()))
                      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES}
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


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
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_")):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_recipe_module_uses_another_ones_private_names():
    uses = {m.name: found for m in MODULES if (found := private_uses(ast.parse(m.read_text())))}
    assert not uses, f"private names used across modules (make them public where they live): {uses}"


TIMING = re.compile(r"\b\d[\d,.]*\s?(?:ms|us|µs|s|sec|seconds)\b|\bfaster\b|\bmeasured\b")


def comments_and_docstrings(source: str) -> list[tuple[int, str]]:
    texts = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
             if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                texts.append((node.body[0].lineno, doc))
    return texts


def test_comments_quote_no_timings():
    quoted = [f"{m.name}:{line}: {TIMING.search(text).group(0)!r}"
              for m in MODULES for line, text in comments_and_docstrings(m.read_text()) if TIMING.search(text)]
    assert not quoted, "comments or docstrings that quote timings (say why instead; history goes in commits):\n" + \
        "\n".join(quoted)


@pytest.mark.skipif(shutil.which("duplicates") is None, reason="the `duplicates` command is not on PATH")
def test_no_code_written_twice():
    out = subprocess.run(["duplicates", "--repo", str(RECIPES), "--seconds", "60"], capture_output=True, text=True,
                         timeout=300).stdout
    assert out.startswith("no duplicates"), out

"""The loop and the building of a run stay readable: `train` tells the story, no function in them is long or
takes a long argument list (loop state travels as one object), and no module grows past a few hundred lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"
MODULES = ("loop.py", "build.py", "run_folder.py", "runs.py")
MAX_ARGS, MAX_FUNCTION_LINES, MAX_MODULE_LINES, MAX_TRAIN_LINES = 6, 60, 450, 45


def functions(name: str) -> dict[str, ast.FunctionDef]:
    tree = ast.parse((PIPELINE / name).read_text())
    return {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def length(node: ast.FunctionDef) -> int:
    return node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("name", MODULES)
def test_no_long_argument_lists(name):
    wide = {f: n for f, node in functions(name).items()
            if (n := len(node.args.posonlyargs + node.args.args + node.args.kwonlyargs)) > MAX_ARGS}
    assert not wide, f"pipeline/{name}: functions with more than {MAX_ARGS} parameters: {wide}"


@pytest.mark.parametrize("name", ("loop.py", "build.py"))
def test_short_functions_and_modules(name):
    text = (PIPELINE / name).read_text()
    assert len(text.splitlines()) < MAX_MODULE_LINES, f"pipeline/{name} has {len(text.splitlines())} lines"
    long = {f: length(node) for f, node in functions(name).items() if length(node) > MAX_FUNCTION_LINES}
    assert not long, f"pipeline/{name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_train_tells_the_story_and_building_is_elsewhere():
    loop = functions("loop.py")
    assert length(loop["train"]) <= MAX_TRAIN_LINES
    assert not {"setup", "make_loaders", "make_run_dir", "make_metrics"} & set(loop), "building a run is build.py's"
    for step in ("train_epoch", "log_line", "end_epoch", "finish"):
        assert [a.arg for a in loop[step].args.args][:2] == ["run", "state"], step

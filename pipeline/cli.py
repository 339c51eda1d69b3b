"""Command-line entry points: argv `key=value` overrides -> checked config -> train or prepare.

Errors people can fix (config, missing data) print one message and exit 2, before any work. --help and a
config error answer before torch, datasets or accelerate are imported: the recipe (which needs them) is
imported only once the command line has passed the checks that do not depend on it.
"""

from __future__ import annotations

import ast
import gc
import os
import signal
import sys
import time
from pathlib import Path

from pipeline import config, console, overrides
from pipeline.errors import PipelineError

USAGE = """usage: accelerate launch launch/{script}.py [--config FILE.yaml] [recipe=NAME] [key.sub=value ...]
       python launch/{script}.py [--config FILE.yaml] [recipe=NAME] [key.sub=value ...]

{what}

Overrides are OmegaConf dotlist items, e.g.
  recipe=mnist_cnn data.root=/data trainer.epochs=3 trainer.batch_size=128 optimizer.lr=3e-4 tracking=none

Recipes (default: digits):
{recipes}

Show every key of a recipe with its value: python launch/train.py recipe=NAME --print-config
Other tools' output (W&B, Accelerate, warnings) goes to <run>/console.log; --verbose (or PIPELINE_VERBOSE=1)
shows it on the terminal too, with the run's extra details.
A task kept as a file (`recipe:` and any keys; the command line wins over it, it over the recipe's defaults):
  python launch/train.py recipe=NAME trainer.epochs=3 --print-config > my_task.yaml
  python launch/train.py --config my_task.yaml optimizer.lr=3e-4
"""


def usage(script: str, what: str) -> str:
    folder = Path(__file__).resolve().parent.parent / "recipes"
    lines = [f"  {file.stem:<22} {description(file)}" for file in sorted(folder.glob("[!_]*.py"))]
    return USAGE.format(script=script, what=what, recipes="\n".join(lines))


def description(file: Path) -> str:
    """A recipe's `description=` read from its source, not imported (that would import torch): the string
    given to the call that makes `recipe`, else the first line of the module's docstring."""
    try:
        tree = ast.parse(file.read_text())
    except (OSError, SyntaxError, ValueError) as e:  # a broken recipe must not hide the others
        return f"(fails to load: {e})"
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(getattr(t, "id", None) == "recipe" for t in node.targets)
            and isinstance(node.value, ast.Call)
        ):
            for keyword in node.value.keywords:
                if keyword.arg == "description" and isinstance(keyword.value, ast.Constant):
                    return str(keyword.value.value)
    return (ast.get_docstring(tree) or "").partition("\n")[0].partition(": ")[2]


def read(argv: list[str]):
    """`[--config FILE] key=value ...` -> (dotlist, preset), checked as far as it can be without the recipe."""
    argv, path = overrides.take_preset(argv)
    preset = overrides.load_preset(path) if path else None
    dotlist = overrides.split_argv(argv)
    overrides.check_early(dotlist, preset)
    return dotlist, preset


def parse(argv: list[str]):
    """`[--config FILE] key=value ...` -> (recipe, checked config)."""
    dotlist, preset = read(argv)
    from pipeline.recipe_contract import load_recipe

    try:
        recipe = load_recipe(overrides.recipe_name(dotlist, preset))
    except config.ConfigError as e:
        if preset is None or config.given(dotlist, "recipe") is not None:
            raise
        raise config.ConfigError(f"--config {preset.path}: {e}") from None  # the file's `recipe:`
    return recipe, config.build(dotlist, recipe, preset)


def main(script: str, what: str, run, parse_argv=parse, help_text: str | None = None) -> None:
    """`parse_argv(argv)` -> (recipe, cfg, *more); `run(recipe, cfg, *more)` does the work. `help_text`: what
    --help prints (default: the usage of a script that takes a recipe)."""
    argv = sys.argv[1:]
    if any(a in ("-h", "--help", "help") for a in argv):
        print(help_text or usage(script, what))
        return
    show = "--print-config" in argv
    if "--verbose" in argv:
        os.environ[console.VERBOSE_ENV] = "1"  # read where the run decides what the terminal shows
    argv = [a for a in argv if a not in ("--print-config", "--verbose")]
    try:
        recipe, cfg, *more = parse_argv(argv)
        if show:
            print(config.to_yaml(cfg))
            return
        # The modules and the config loaded so far live as long as the command: out of the garbage collector's
        # sight, its full passes do not walk their half a million objects (one fell in prepare's listing of the
        # raw files on process 0, while every other process waited, and one more at exit).
        gc.freeze()
        run(recipe, cfg, *more)
    except PipelineError as e:  # each carries its exit code and how the command says it
        exit_once(f"{e.prefix}{e}", e.exit_code)
    except KeyboardInterrupt:
        # A second Ctrl-C during training, or one before it started: stopped where it was, as asked.
        exit_once(f"{script}: interrupted (Ctrl-C); nothing was saved since the last checkpoint", 128 + signal.SIGINT)
    finally:
        leave_process_group()


# How long the other processes of a machine wait for its first one to print the shared message.
SAY_GRACE_S = 10.0


def exit_once(message: str, code: int) -> None:
    """Exit with `code` after an error every process of a launch meets alike: the first process of each
    machine prints the message, once. The others wait for it (torch's launcher stops all processes as soon
    as one has exited, and would stop the first one before it printed) and are stopped by the launcher, or
    exit on their own after SAY_GRACE_S where no launcher stops them. The process group is left first, so
    a process stopped while it waits holds no group."""
    leave_process_group()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
    else:
        time.sleep(SAY_GRACE_S)
    sys.exit(code)


def leave_process_group() -> None:
    """Every exit of a multi-process command leaves its process group first: a gloo group still alive
    when the interpreter shuts down aborts the process now and then (SIGABRT, "terminate called without
    an active exception") instead of exiting with the code the error chose. A run that ended normally
    has already left it (Accelerator.end_training)."""
    distributed = sys.modules.get("torch.distributed")  # never imported (e.g. --help): nothing to leave
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()

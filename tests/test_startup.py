"""Commands that only print (help, a config error, a sweep's dry run, a comparison) answer without importing
torch, datasets, accelerate, torchmetrics or wandb, whose imports take seconds."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from conftest import ROOT, cli, command, common, environment, free_port, ok
from test_compare import write_run

HEAVY = ("torch", "datasets", "accelerate", "torchmetrics", "wandb")


def run(script: str, *args, cwd=ROOT) -> tuple[subprocess.CompletedProcess, set[str]]:
    """launch/<script>.py as a user runs it, and the top-level packages it imported (`-X importtime`)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "launch" / f"{script}.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", out.stderr, re.M))
    return out, {name for name in imported if name in HEAVY}


@pytest.mark.parametrize("script", ["train", "prepare", "evaluate", "predict", "compare", "sweep", "bench"])
def test_help_imports_no_torch(script):
    out, heavy = run(script, "--help")
    assert out.returncode == 0 and f"launch/{script}.py" in out.stdout
    assert not heavy, f"launch/{script}.py --help imported {sorted(heavy)}"


@pytest.mark.parametrize(
    "args, says",
    [
        (["trainer.epoch=3"], "unknown config key 'trainer.epoch'"),
        (["trainer.epochs=abc"], "trainer.epochs"),
        (["optimizer.name=adamx"], "choose one of: sgd, adam"),
        (["tracking=wandbx"], "choose one of:"),
        (["trainer.epochs=0"], "bad value trainer.epochs=0: must be >= 1"),
        (["scheduler.name=onecycle", "scheduler.warmup_steps=5"], "onecycle has its own warmup"),
        (["--config", "missing.yaml"], "--config missing.yaml: does not exist"),
        (["--config", "bad.yaml"], "--config bad.yaml: unknown config key 'trainer.epoch'"),
        (["data.eval_fraction=1.5"], "bad value data.eval_fraction=1.5: must be between 0 and 1"),
        (["model.init=glorot"], "bad value model.init='glorot'; choose one of: default"),
        (["data.num_shards=many"], "data.num_shards"),
        (["recipe=digit"], "unknown recipe 'digit' (no module recipes.digit); available recipes: clouds, digits"),
        (["--config", "other.yaml"], "--config other.yaml: unknown recipe 'nosuch'"),
        (["data.foo=1"], "unknown config key 'data.foo'; valid keys under 'data': cache_dir, download, eval_fraction"),
        (
            ["recipe=image_folder", "data.imag_size=3"],
            "unknown config key 'data.imag_size'; valid keys under 'data': augment, cache_dir, channels",
        ),
        (
            ["recipe=time_series", "model.targt=level"],
            "unknown config key 'model.targt'; valid keys under 'model': cell, hidden_size, init, num_layers, target",
        ),
    ],
)
def test_config_error_imports_no_torch(tmp_path, args, says):
    (tmp_path / "bad.yaml").write_text("recipe: digits\ntrainer:\n  epoch: 3\n")
    (tmp_path / "other.yaml").write_text("recipe: nosuch\n")
    out, heavy = run("train", *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert says in out.stderr and "Traceback" not in out.stderr
    assert not heavy, f"a config error imported {sorted(heavy)}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "other.yaml"]  # nothing written


def test_sweep_dry_run_and_compare_import_no_torch(tmp_path):
    out, heavy = run("sweep", "--dry-run", "recipe=water_potability", "optimizer.lr=1e-3,3e-3", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.count("launch/train.py") == 2 and not heavy, (out.stderr[-2000:], heavy)
    typo, heavy = run("sweep", "--dry-run", "optimizer.lr=1e-3,3e-3", "trainer.epoch=2", cwd=tmp_path)
    assert typo.returncode == 2 and "trainer.epoch" in typo.stderr and not heavy
    write_run(tmp_path / "a", 0.1, {"eval/loss": 0.5}, [{"step": 1, "eval/loss": 0.5}])
    write_run(tmp_path / "b", 0.2, {"eval/loss": 0.4}, [{"step": 1, "eval/loss": 0.4}])
    out, heavy = run("compare", tmp_path / "a", tmp_path / "b", cwd=tmp_path)
    assert out.returncode == 0 and "0.4" in out.stdout and not heavy, (out.stderr[-2000:], heavy)


@pytest.mark.parametrize("options", [[], ["--multi_gpu", "--num_processes", "2"]], ids=["one", "two"])
def test_run_passes_accelerate_what_it_would_warn_about(tmp_path, options):
    # No `accelerate config` file (HF_HOME is empty): launch/run.py passes launch/accelerate/default.yaml.
    processes = 2 if options else 1
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "run.py"),
            *options,
            "--main_process_port",
            str(free_port()),
            str(ROOT / "launch" / "train.py"),
            "trainer.epoch=3",
        ],
        cwd=tmp_path,
        env=environment(processes, {"HF_HOME": str(tmp_path / "hf")}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "unknown config key 'trainer.epoch'" in out.stderr, out.stderr[-2000:]
    assert "defaults used instead" not in out.stderr and "--num_processes" not in out.stderr, out.stderr


def test_tracker_choices_are_accelerates():
    from accelerate.utils import LoggerType

    from pipeline import config

    assert list(config.TRACKERS) == [t.value for t in LoggerType if t is not LoggerType.ALL]


@pytest.mark.slow
def test_quiet_console_and_verbose(workdir):
    # W&B offline, and not told to be silent: WANDB_SILENT empty (as a blank scheduler variable) means unset.
    args = common(workdir, "tracking=wandb", "trainer.epochs=1", "trainer.max_steps=3", "trainer.log_every=1")
    quiet = ok(cli([*args, "run_name=quiet"], cwd=workdir, env={"WANDB_SILENT": ""}))
    terminal = quiet.stdout + quiet.stderr
    assert "wandb:" not in terminal and "Traceback" not in terminal, terminal
    run = workdir / "runs" / "digits" / "quiet"
    where = re.search(r"^W&B: offline; upload with: wandb sync (\S+)$", quiet.stdout, re.M)
    assert where and (workdir / where[1]).is_dir() or Path(where[1]).is_dir(), quiet.stdout
    log = (run / "console.log").read_text()
    assert "wandb: Tracking run with wandb" in log and "wandb sync" in log
    # The first log line comes before the speed is measured: it says no speed rather than `0 samples/s`.
    first = next(line for line in quiet.stdout.splitlines() if line.startswith("epoch 1 step"))
    assert "samples/s" not in first, quiet.stdout
    assert re.search(r"^data: train 1,437 rows \(\d+ steps/epoch\), eval 360 rows; all in memory$", quiet.stdout, re.M)
    assert "budget" not in quiet.stdout  # the arithmetic is in summary.json and --verbose
    assert "budget" in json.loads((run / "summary.json").read_text())["data"]["train"]["why"]

    loud = ok(cli([*args, "run_name=loud", "--verbose"], cwd=workdir, env={"WANDB_SILENT": ""}))
    assert "wandb: Tracking run with wandb" in loud.stderr, loud.stderr[-3000:]
    assert re.search(r"^data: train in memory: .* <= budget", loud.stdout, re.M), loud.stdout
    assert "wandb: Tracking run" in (workdir / "runs" / "digits" / "loud" / "console.log").read_text()


@pytest.mark.slow
def test_progress_bar_per_epoch_on_a_terminal(workdir):
    # stderr a terminal (a pseudo-terminal here), stdout a pipe: bars on the terminal, the epochs' lines in stdout.
    parent, child = os.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    env = {k: v for k, v in environment().items() if k != "TQDM_DISABLE"}
    proc = subprocess.Popen(
        command(common(workdir, "trainer.epochs=2")),
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=child,
        text=True,
    )
    os.close(child)
    drawn = b""
    with contextlib.suppress(OSError):  # EIO once the process has closed the terminal
        while chunk := os.read(parent, 65536):
            drawn += chunk
    out, _ = proc.communicate(timeout=300)
    os.close(parent)
    assert proc.returncode == 0, out[-3000:]
    bar = drawn.decode(errors="replace")
    assert re.search(r"epoch 1/2: +\d+%\|.*samples/s", bar) and "epoch 2/2:" in bar, bar[-2000:]
    assert "100%" in bar and "<" in bar  # percentage, and time left as elapsed<remaining
    assert "epoch 1/2 eval/loss" in out and "epoch 2/2 eval/loss" in out
    assert "step" not in out.replace("steps/epoch", "").replace("steps ", ""), out  # no plain step lines


def test_wandb_switch_variables(monkeypatch):
    from pipeline import tracking
    from pipeline.errors import ConfigError

    monkeypatch.setenv("WANDB_SILENT", "")
    tracking.check_wandb_env()
    assert "WANDB_SILENT" not in os.environ
    monkeypatch.setenv("WANDB_QUIET", "loud")
    with pytest.raises(ConfigError, match="WANDB_QUIET='loud' is not a yes/no value"):
        tracking.check_wandb_env()


def test_quiet_holds_other_output_until_the_run_folder_exists(tmp_path, capfd):
    import logging

    from pipeline import console

    # A handler made before the run holds the stream itself (as datasets' does from its import); W&B and
    # Python's warnings write to whatever sys.stderr is at the time.
    logger = logging.getLogger("test_startup.tool")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    try:
        with console.quiet():
            logger.warning("a tool's warning")
            print("wandb: a banner", file=sys.stderr)
            print("the run's own line")
            console.attach(tmp_path)
            logger.warning("after the folder")
        with pytest.raises(ValueError), console.quiet():  # a failed start shows what was held: it may explain it
            logger.warning("said before the failure")
            raise ValueError("failed")
    finally:
        logger.removeHandler(handler)
    out, err = capfd.readouterr()
    assert out == "the run's own line\n" and err == "said before the failure\n", (out, err)
    log = (tmp_path / "console.log").read_text()
    assert log == "a tool's warning\nwandb: a banner\nafter the folder\n"


def test_recipe_keys_file_lists_every_recipes_keys():
    """recipes/keys.json, which names a typo in a recipe's own keys before torch is imported, is each recipe's
    built config. After changing a recipe's keys: UPDATE_RECIPE_KEYS=1 pytest tests/test_startup.py -k recipe_keys"""
    from pipeline import config, overrides
    from pipeline.recipe_contract import load_recipe

    built = {name: overrides.recipe_keys(config.build([], load_recipe(name))) for name in overrides.recipe_names()}
    if os.environ.get("UPDATE_RECIPE_KEYS"):
        overrides.RECIPE_KEYS.write_text(json.dumps(built, indent=1) + "\n")
    assert json.loads(overrides.RECIPE_KEYS.read_text()) == built, (
        "recipes/keys.json is stale: UPDATE_RECIPE_KEYS=1 pytest tests/test_startup.py -k recipe_keys"
    )

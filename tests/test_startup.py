"""Commands that only print (help, a config error, a sweep's dry run, a comparison) answer without importing
torch, datasets, accelerate, torchmetrics or wandb, whose imports take seconds."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT, environment, free_port
from test_compare import write_run

HEAVY = ("torch", "datasets", "accelerate", "torchmetrics", "wandb")


def run(script: str, *args, cwd=ROOT) -> tuple[subprocess.CompletedProcess, set[str]]:
    """launch/<script>.py as a user runs it, and the top-level packages it imported (`-X importtime`)."""
    out = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "launch" / f"{script}.py"), *map(str, args)],
                         cwd=cwd, capture_output=True, text=True, timeout=120)
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)$", out.stderr, re.M))
    return out, {name for name in imported if name in HEAVY}


@pytest.mark.parametrize("script", ["train", "prepare", "evaluate", "predict", "compare", "sweep", "bench"])
def test_help_imports_no_torch(script):
    out, heavy = run(script, "--help")
    assert out.returncode == 0 and f"launch/{script}.py" in out.stdout
    assert not heavy, f"launch/{script}.py --help imported {sorted(heavy)}"


@pytest.mark.parametrize("args, says", [
    (["trainer.epoch=3"], "unknown config key 'trainer.epoch'"),
    (["trainer.epochs=abc"], "trainer.epochs"),
    (["optimizer.name=adamx"], "choose one of: sgd, adam"),
    (["tracking=wandbx"], "choose one of:"),
    (["trainer.epochs=0"], "bad value trainer.epochs=0: must be >= 1"),
    (["scheduler.name=onecycle", "scheduler.warmup_steps=5"], "onecycle has its own warmup"),
    (["--config", "missing.yaml"], "--config missing.yaml: does not exist"),
    (["--config", "bad.yaml"], "--config bad.yaml: unknown config key 'trainer.epoch'"),
])
def test_config_error_imports_no_torch(tmp_path, args, says):
    (tmp_path / "bad.yaml").write_text("recipe: digits\ntrainer:\n  epoch: 3\n")
    out, heavy = run("train", *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert says in out.stderr and "Traceback" not in out.stderr
    assert not heavy, f"a config error imported {sorted(heavy)}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written


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
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "run.py"), *options, "--main_process_port",
                          str(free_port()), str(ROOT / "launch" / "train.py"), "trainer.epoch=3"], cwd=tmp_path,
                         env=environment(processes, {"HF_HOME": str(tmp_path / "hf")}), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "unknown config key 'trainer.epoch'" in out.stderr, out.stderr[-2000:]
    assert "defaults used instead" not in out.stderr and "--num_processes" not in out.stderr, out.stderr


def test_tracker_choices_are_accelerates():
    from accelerate.utils import LoggerType

    from pipeline import config

    assert list(config.TRACKERS) == [t.value for t in LoggerType if t is not LoggerType.ALL]

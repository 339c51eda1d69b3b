"""Shared fixtures: real data in its original formats, and runners for the real CLI entry points."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent


def cli(args: list[str], cwd: Path, processes: int = 1, script: str = "train", timeout: int = 600,
        env: dict | None = None, launcher: str = "python") -> subprocess.CompletedProcess:
    """Runs launch/<script>.py as a user would: `python`, or `accelerate launch` (always for >1 process)."""
    return subprocess.run(command(args, processes, script, launcher), cwd=cwd, env=environment(processes, env),
                          capture_output=True, text=True, timeout=timeout)


def command(args: list[str], processes: int = 1, script: str = "train", launcher: str = "python") -> list[str]:
    if processes == 1 and launcher == "accelerate":
        cmd = [str(BIN / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "launch" / f"{script}.py")]
    elif processes == 1:
        cmd = [sys.executable, str(ROOT / "launch" / f"{script}.py")]
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(ROOT / "launch" / f"{script}.py")]
    return cmd + args


def environment(processes: int = 1, env: dict | None = None) -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TQDM_DISABLE": "1",
            "OMP_NUM_THREADS": "1" if processes > 1 else os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def run_dirs(output_dir: Path, recipe: str) -> list[Path]:
    base = Path(output_dir) / recipe
    return sorted(p for p in base.iterdir() if p.is_dir()) if base.exists() else []


def summary(output_dir: Path, recipe: str) -> dict:
    """The summary.json of the only run of `recipe` under `output_dir`."""
    runs = run_dirs(output_dir, recipe)
    assert len(runs) == 1, f"expected one run of {recipe}, found {runs}"
    return json.loads((runs[0] / "summary.json").read_text())


def write_mnist_raw(root: Path, name: str = "MNIST", n: int | None = None) -> Path:
    """The real MNIST test set written as both the train and the t10k raw files (gzipped IDX)."""
    src = SHARED_DATA / "mnist-test"
    raw = root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for kind in ("images-idx3", "labels-idx1"):
        for split in ("train", "t10k"):
            shutil.copy(src / f"t10k-{kind}-ubyte.gz", raw / f"{split}-{kind}-ubyte.gz")
    return root


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    return write_mnist_raw(tmp_path_factory.mktemp("mnist"))


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A fresh working directory with `runs/` and `cache/` inside."""
    return tmp_path


def common(workdir: Path, *extra: str) -> list[str]:
    """Overrides that keep a test's outputs inside its own directory."""
    return [f"output_dir={workdir / 'runs'}", f"data.cache_dir={workdir / 'cache'}", "tracking=none", *extra]

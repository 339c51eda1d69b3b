"""Shared fixtures: real data in its original formats, and runners for the real CLI entry points."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Small real data sets in their original formats, inside the repo so a fresh clone tests anywhere.
TEST_DATA = ROOT / "tests" / "data"
BIN = Path(sys.executable).parent
# Tests run on the CPU, in this process and in the ones it starts; only tests marked `gpu` get the
# host's devices back (see `environment`). Set before anything initialises CUDA.
HOST_CUDA_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def cli(
    args: list[str],
    cwd: Path,
    processes: int = 1,
    script: str = "train",
    timeout: int = 600,
    env: dict | None = None,
    launcher: str = "python",
    gpu: bool = False,
) -> subprocess.CompletedProcess:
    """Runs launch/<script>.py as a user would: `python`, or `accelerate launch` (always for >1 process);
    on the CPU unless `gpu`."""
    return subprocess.run(
        command(args, processes, script, launcher),
        cwd=cwd,
        env=environment(processes, env, gpu),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def command(args: list[str], processes: int = 1, script: str = "train", launcher: str = "python") -> list[str]:
    """launcher: `python` (one process; else `accelerate`), `accelerate` (`accelerate launch`) or `run`
    (launch/run.py: `accelerate launch` that passes the training's exit code on)."""
    launch = (
        [sys.executable, str(ROOT / "launch" / "run.py")] if launcher == "run" else [str(BIN / "accelerate"), "launch"]
    )
    if processes == 1 and launcher == "python":
        return [sys.executable, str(ROOT / "launch" / f"{script}.py"), *args]
    return [*launch, *launch_flags(processes), str(ROOT / "launch" / f"{script}.py"), *args]


def launch_flags(processes: int, machines: int = 1, rank: int = 0, port: int | str | None = None) -> list[str]:
    """`accelerate launch`'s flags for `processes` processes in all on `machines` (this one `rank`, the first at
    127.0.0.1:`port`), without fp16/bf16 or dynamo: every choice given, so no `accelerate config` file is read."""
    flags = ["--num_processes", str(processes), "--num_machines", str(machines)]
    flags += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        flags += ["--multi_gpu", "--main_process_port", str(port or free_port())]
    if machines > 1:
        flags += ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"]
    return flags


def environment(processes: int = 1, env: dict | None = None, gpu: bool = False) -> dict:
    """The runs' environment: offline W&B, no progress bars, and the CPU unless `gpu` (a GPU host would
    otherwise put every process of a CPU test, and every "machine" of one, on cuda:0)."""
    base = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1" if processes > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
    }
    base.pop("CUDA_VISIBLE_DEVICES", None)
    if not gpu:
        base["CUDA_VISIBLE_DEVICES"] = ""
    elif HOST_CUDA_VISIBLE_DEVICES is not None:
        base["CUDA_VISIBLE_DEVICES"] = HOST_CUDA_VISIBLE_DEVICES
    return {**base, **(env or {})}


@functools.cache
def cuda_devices() -> int:
    """The host's CUDA devices, counted in a child process (this one is pinned to the CPU)."""
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
        env=environment(gpu=True),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def needs_gpus(count: int = 1) -> None:
    """Skips a `gpu` test, saying why, on a host with fewer than `count` CUDA devices."""
    found = cuda_devices()
    if found < count:
        pytest.skip(
            f"needs {count} CUDA device{'s' if count > 1 else ''}; torch.cuda.device_count() is {found} on this host"
        )


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
    src = TEST_DATA / "mnist-test"
    raw = root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for kind in ("images-idx3", "labels-idx1"):
        for split in ("train", "t10k"):
            shutil.copy(src / f"t10k-{kind}-ubyte.gz", raw / f"{split}-{kind}-ubyte.gz")
    return root


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    return write_mnist_raw(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> tuple[Path, dict, Path]:
    """A real two-epoch digits run through the CLI, shared by the tests that read a finished run and write only
    beside it (evaluations/, predictions): (its folder, its summary, the working folder of runs/ and cache/)."""
    workdir = tmp_path_factory.mktemp("digits-run")
    ok(cli(common(workdir, "trainer.epochs=2"), cwd=workdir))
    run = run_dirs(workdir / "runs", "digits")[0]
    return run, json.loads((run / "summary.json").read_text()), workdir


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A fresh working directory with `runs/` and `cache/` inside."""
    return tmp_path


def common(workdir: Path, *extra: str) -> list[str]:
    """Overrides that keep a test's outputs inside its own directory."""
    return [f"output_dir={workdir / 'runs'}", f"data.cache_dir={workdir / 'cache'}", "tracking=none", *extra]


def rss_anon(pid: int) -> int:
    """A process's private anonymous memory in bytes (RssAnon: heap and tensors, not mapped files)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone
        return 0
    return next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("RssAnon:")), 0)


def peak_rss_anon(proc: subprocess.Popen, every: float = 0.02) -> int:
    """Waits for `proc` and returns the highest RssAnon seen in any one of it and its child processes
    (those of `accelerate launch`), sampled every `every` seconds."""
    import time

    import psutil

    peak = 0
    while proc.poll() is None:
        try:
            pids = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            break
        peak = max([peak, *(rss_anon(pid) for pid in pids)])
        time.sleep(every)
    return peak

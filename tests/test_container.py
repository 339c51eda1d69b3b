"""What a container or a cluster pod does to a run: `launch/run.py` as PID 1, file modes on a shared
filesystem, a small /dev/shm, the launcher's process count, and a HOME that is not writable."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import command, common, environment

from pipeline import checkpoint, files


def unshare_or_skip(*flags: str) -> list[str]:
    """`unshare FLAGS` as a command prefix, or a skip saying why this host does not allow it."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare")
    probe = subprocess.run(["unshare", *flags, "true"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(
            f"unshare {' '.join(flags)} is not permitted here (needs root or user namespaces): {probe.stderr.strip()}"
        )
    return ["unshare", *flags]


# ---------------------------------------------------------------- launch/run.py as PID 1 (the image's entrypoint)


def as_pid_1(workdir: Path, processes: int, args: list[str]) -> list[str]:
    # A new PID namespace makes run.py PID 1, as a container's entrypoint is: the kernel drops every signal
    # PID 1 has no handler for.
    return [*unshare_or_skip("--pid", "--fork", "--mount-proc"), *command(args, processes, launcher="run")]


def signal_pid_1_after_first_log_line(workdir: Path, processes: int, args: list[str], sig: int):
    cmd = as_pid_1(workdir, processes, args)
    proc = subprocess.Popen(
        cmd, cwd=workdir, env=environment(processes), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = workdir / "runs" / "digits" / "job" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.05)
    pid_1 = psutil.Process(proc.pid).children()[0].pid  # unshare --fork's child: PID 1 inside
    # From outside the namespace, as `docker stop` / the kubelet send it.
    psutil.Process(pid_1).send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return cmd, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_to_run_py_as_pid_1_saves_exits_143_and_resumes(workdir, processes):
    args = common(workdir, "trainer.epochs=2", "trainer.log_every=5", "run_name=job")
    cmd, stopped = signal_pid_1_after_first_log_line(workdir, processes, args, signal.SIGTERM)
    run_dir = workdir / "runs" / "digits" / "job"
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert stopped.stderr.count("stopped on SIGTERM after step") == 1, stopped.stderr[-3000:]
    assert checkpoint.latest(run_dir) and not (run_dir / "summary.json").exists()
    resumed = subprocess.run(cmd, cwd=workdir, env=environment(processes), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint.folder(run_dir)}" in resumed.stdout
    assert (run_dir / "summary.json").exists() and (run_dir / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigint_to_run_py_as_pid_1_reaches_the_training(workdir, processes):
    # run.py passes SIGINT on and waits; the training decides what it means (save and exit 130, or
    # Python's KeyboardInterrupt). Before, run.py died of it first and took the training down unsaved.
    args = common(workdir, "trainer.epochs=2", "trainer.log_every=5", "run_name=job")
    _, stopped = signal_pid_1_after_first_log_line(workdir, processes, args, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert 'launch/run.py", line' not in stopped.stderr, stopped.stderr[-3000:]  # the launcher did not die of it
    saved = checkpoint.latest(workdir / "runs" / "digits" / "job") is not None
    assert saved or 'pipeline/loop.py", line' in stopped.stderr, stopped.stderr[-3000:]  # the training got it


# ---------------------------------------------------------------- file modes on a shared filesystem


def unreadable_by_others(folder: Path) -> list[str]:
    """Files under `folder` whose mode is not what umask 022 gives a new file (0644)."""
    return [
        f"{oct(p.stat().st_mode & 0o777)} {p.relative_to(folder)}"
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.stat().st_mode & 0o777 != 0o644
    ]


@pytest.mark.slow
def test_weights_checkpoints_and_shards_are_as_readable_as_the_other_files(workdir):
    # safetensors writes through a temporary file of mode 0600 and renames it: teammates on a shared
    # filesystem could read a run's metrics but not its weights.
    import os

    args = common(workdir, "trainer.epochs=1", "trainer.log_every=5", "run_name=job")
    run_dir = workdir / "runs" / "digits" / "job"
    proc = subprocess.Popen(
        command(args),
        cwd=workdir,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.umask(0o022),
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.05)
    proc.terminate()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert unreadable_by_others(checkpoint.latest(run_dir)) == []
    finished = subprocess.run(
        command(args),
        cwd=workdir,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert (run_dir / "model.safetensors").exists() and (run_dir / "best.safetensors").exists()
    assert unreadable_by_others(run_dir) == []
    assert unreadable_by_others(workdir / "cache") == []


def test_weights_take_the_mode_the_umask_gives_any_file(tmp_path):
    import os

    import torch
    from safetensors.torch import save_file

    previous = os.umask(0o027)
    try:
        save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
        (tmp_path / "config.yaml").write_text("x: 1\n")
        files.as_umask_allows([tmp_path / "model.safetensors"])
    finally:
        os.umask(previous)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {
        "model.safetensors": "0o640",
        "config.yaml": "0o640",
    }


# ---------------------------------------------------------------- a small /dev/shm (Docker's default is 64 MB)


def test_shared_memory_need_counts_workers_prefetch_and_batch_bytes(tmp_path):
    import torch

    from pipeline import batching, tensor_rows

    rows = tensor_rows.Rows(
        {"image": torch.zeros(100, 3, 10, 10, dtype=torch.uint8), "label": torch.zeros(100, dtype=torch.int64)}
    )
    per_batch = 16 * (300 + 8)
    workers = batching.loader(rows, 16, train=True, seed=0, num_workers=2)
    assert batching.shared_memory_need(workers) == batching.SHM_MARGIN * 2 * 2 * per_batch
    assert batching.shared_memory_need(batching.loader(rows, 16, train=False, seed=0)) == 0
    batching.check_shared_memory([workers])  # /dev/shm of this host holds that much
    batching.check_shared_memory([workers], shm=tmp_path / "absent")  # no /dev/shm (macOS): nothing to check


@pytest.mark.slow
def test_a_small_dev_shm_with_workers_stops_with_a_message_not_a_hang(workdir):
    # A tmpfs of 64 KB on /dev/shm in a mount namespace of its own; digits batches of 1,024 rows are
    # 72 KB: not one fits.
    mount = 'mount -t tmpfs -o size=64k tmpfs /dev/shm && exec "$@"'
    args = common(workdir, "trainer.epochs=1", "trainer.batch_size=1024", "data.num_workers=2", "data.in_memory=false")
    cmd = [*unshare_or_skip("--mount"), "sh", "-c", mount, "sh", *command(args)]
    result = subprocess.run(cmd, cwd=workdir, env=environment(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--shm-size" in result.stderr and "data.num_workers=0" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- the launcher's process count on the CPU


def launch_on_cpu(workdir: Path, launcher: list[str], *options: str) -> subprocess.CompletedProcess:
    from conftest import ROOT, free_port

    args = common(workdir, "trainer.epochs=1", "trainer.max_steps=2")
    cmd = [
        *launcher,
        *options,
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        "1",
        str(ROOT / "launch" / "train.py"),
        *args,
    ]
    return subprocess.run(cmd, cwd=workdir, env=environment(2), capture_output=True, text=True, timeout=600)


def accelerate_launch() -> list[str]:
    from conftest import BIN

    return [str(BIN / "accelerate"), "launch"]


def run_py() -> list[str]:
    import sys

    from conftest import ROOT

    return [sys.executable, str(ROOT / "launch" / "run.py")]


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher, options",
    [
        (accelerate_launch, ("--config_file", "launch/accelerate/cpu.yaml", "--num_processes", "2")),
        (run_py, ("--config_file", "launch/accelerate/cpu.yaml", "--num_processes", "2")),
        (run_py, ("--cpu", "--num_processes", "2")),
    ],
    ids=["accelerate-cpu.yaml", "run.py-cpu.yaml", "run.py-cpu"],
)
def test_asking_for_two_cpu_processes_starts_two(workdir, launcher, options):
    from conftest import ROOT

    options = tuple(str(ROOT / o) if o.endswith(".yaml") else o for o in options)
    result = launch_on_cpu(workdir, launcher(), *options)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes=2 device=cpu" in result.stdout, result.stdout[-3000:]


@pytest.mark.slow
def test_one_process_started_for_two_asked_is_a_warning(workdir):
    # Plain `accelerate launch --cpu --num_processes 2`: Accelerate's one-process launcher; it still
    # trains, on one process, and says so.
    result = launch_on_cpu(workdir, accelerate_launch(), "--cpu", "--num_processes", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes=1 device=cpu" in result.stdout
    assert "was asked for more than one process" in result.stdout and "processes=1." in result.stdout


# ---------------------------------------------------------------- any uid: a HOME this user cannot write


def with_read_only_home(workdir: Path, args: list[str], env: dict) -> subprocess.CompletedProcess:
    # A read-only tmpfs over HOME, as an image's HOME is to a uid it was not built for (root would write
    # into a 0555 folder anyway).
    home = workdir / "home"
    home.mkdir()
    mount = 'mount -t tmpfs -o ro,size=64k tmpfs "$HOME" && exec "$@"'
    cmd = [*unshare_or_skip("--mount"), "sh", "-c", mount, "sh", *command(args)]
    unset = (
        "XDG_CACHE_HOME",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "MPLCONFIGDIR",
        "HF_HOME",
        "TORCH_HOME",
        "WANDB_DIR",
        "WANDB_DATA_DIR",
        "WANDB_CACHE_DIR",
        "WANDB_CONFIG_DIR",
    )
    environ = {k: v for k, v in environment().items() if k not in unset}
    return subprocess.run(
        cmd, cwd=workdir, env={**environ, **env, "HOME": str(home)}, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_a_home_nobody_can_write_stops_wandb_before_any_work(workdir):
    # W&B would stage the model artifact under ~/.local/share/wandb and fail after the whole training.
    args = [a for a in common(workdir, "trainer.epochs=1") if a != "tracking=none"]
    result = with_read_only_home(workdir, args, {})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "WANDB_DATA_DIR" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not (workdir / "runs").exists()


@pytest.mark.slow
def test_a_home_nobody_can_write_trains_to_the_end_with_the_image_variables(workdir):
    # What launch/CLUSTER.md tells an image to set (writable folders outside HOME); datasets and torch
    # need nothing there, matplotlib only warns without MPLCONFIGDIR.
    args = [a for a in common(workdir, "trainer.epochs=1") if a != "tracking=none"]
    writable = {
        name: str(workdir / "state" / name.lower())
        for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "MPLCONFIGDIR")
    }
    result = with_read_only_home(workdir, args, writable)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: digits" in result.stdout and "Matplotlib created a temporary" not in result.stderr

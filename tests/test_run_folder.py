"""The run folder: one writer at a time (pipeline/lock.py), a refusal that reaches every process, and no empty
folder left by a start that failed. Also two builds of the same shards at once, which need no lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, cli, command, common, environment, free_port, launch_flags

from pipeline import lock, shard_store
from pipeline.errors import ConfigError

HOLD = """
import sys, time
from pathlib import Path
from pipeline import lock, shard_store
held = lock.take(Path(sys.argv[1]), "run x")
print("held", flush=True)
time.sleep(600)
"""


def holder(path) -> subprocess.Popen:
    """Another process holding the lock file `path` until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_named_and_a_dead_ones_lock_is_taken_over(tmp_path):
    path = tmp_path / lock.NAME
    proc = holder(path)
    try:
        with pytest.raises(ConfigError) as refused:
            lock.take(path, "run x")
        assert f"run x is being written by pid {proc.pid} on host {socket.gethostname()} since " in str(refused.value)
        assert "run_name=<new name>" in str(refused.value)
    finally:
        proc.kill()
        proc.wait()
    # SIGKILLed: no handler removed its file, but the kernel ended its lock.
    assert json.loads(path.read_text())["pid"] == proc.pid
    notes = []
    held = lock.take(path, "run x", say=notes.append)
    assert len(notes) == 1 and notes[0].startswith(
        f"note: run x was locked by pid {proc.pid} on host {socket.gethostname()} since "
    )
    assert notes[0].endswith(", which no longer runs; this process takes the lock over")
    assert json.loads(path.read_text())["pid"] == os.getpid()
    held.release()
    assert not path.exists()
    held.release()  # twice is harmless


def test_a_lock_whose_holder_cannot_be_shown_gone_is_refused(tmp_path):
    path = tmp_path / lock.NAME
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        here = socket.gethostname()
        # Written by a live process on this host, whose flock this filesystem did not keep: refused.
        path.write_text(
            json.dumps(
                {"host": here, "pid": sleeper.pid, "since": "then", "process_start": lock.process_start(sleeper.pid)}
            )
        )
        with pytest.raises(ConfigError, match=f"pid {sleeper.pid} on host {here} since then: it is running"):
            lock.take(path, "run x")
        # The same pid with another start time: the pid was reused by a newer process, the holder is gone.
        path.write_text(
            json.dumps(
                {
                    "host": here,
                    "pid": sleeper.pid,
                    "since": "then",
                    "process_start": lock.process_start(sleeper.pid) - 1,
                }
            )
        )
        notes = []
        lock.take(path, "run x", say=notes.append).release()
        assert "now belongs to a newer process" in notes[0]
    finally:
        sleeper.kill()
        sleeper.wait()
    # Another host's lock: this host cannot tell whether that run still writes.
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    with pytest.raises(ConfigError) as refused:
        lock.take(path, "run x")
    assert "pid 1 on host elsewhere since then: that is another host" in str(refused.value)
    assert "remove the lock file" in str(refused.value) and str(path) in str(refused.value)
    assert path.exists()  # left for its user to judge


def test_a_requeued_slurm_job_takes_over_its_earlier_attempts_lock(tmp_path, monkeypatch):
    path = tmp_path / lock.NAME
    path.write_text(json.dumps({"host": "node7", "pid": 1, "since": "then", "slurm_job": "77", "slurm_restart": 0}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same attempt, on another node: not provably gone
    with pytest.raises(ConfigError, match="pid 1 on host node7 since then: that is another host"):
        lock.take(path, "run x")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # Slurm requeued it: the attempt on node7 has ended
    notes = []
    held = lock.take(path, "run x", say=notes.append)
    assert "was an earlier attempt of Slurm job 77, which Slurm requeued" in notes[0]
    assert json.loads(path.read_text())["slurm_restart"] == 1
    held.release()


def wait_for_lock(run_dir, proc: subprocess.Popen, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            return json.loads((run_dir / lock.NAME).read_text())
        except (OSError, ValueError):
            time.sleep(0.1)
    raise AssertionError(f"no lock in {run_dir} (exit {proc.poll()})")


@pytest.mark.slow
def test_a_second_command_on_a_live_run_is_refused(workdir):
    args = common(workdir, "trainer.epochs=200", "run_name=live")
    run_dir = workdir / "runs" / "digits" / "live"
    live = subprocess.Popen(
        command(args), cwd=workdir, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        held = wait_for_lock(run_dir, live)
        assert held["pid"] == live.pid and held["host"] == socket.gethostname()
        second = cli(args, cwd=workdir, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert (
            f"error: run {run_dir} is being written by pid {live.pid} on host {held['host']} since "
            f"{held['since']}" in second.stderr
        )
        assert "Traceback" not in second.stderr and "resuming" not in second.stdout
        assert live.poll() is None  # the live run goes on
    finally:
        live.send_signal(signal.SIGTERM)  # saves a checkpoint and exits 143, giving the lock back
        _, err = live.communicate(timeout=300)
    assert live.returncode == 143, err[-3000:]
    assert not (run_dir / lock.NAME).exists()


@pytest.mark.slow
def test_a_dead_runs_lock_is_taken_over_and_an_error_gives_it_back(workdir):
    run_dir = workdir / "runs" / "digits" / "stale"
    run_dir.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run_dir / lock.NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "then"}))
    # Diverges at its first log line: an error after training started.
    result = cli(common(workdir, "optimizer.lr=1e30", "trainer.log_every=1", "run_name=stale"), cwd=workdir)
    assert result.returncode == 3, result.stderr[-3000:]
    assert (
        f"note: run {run_dir} was locked by pid {dead.pid} on host {socket.gethostname()} since then, which no "
        f"longer runs; this process takes the lock over"
    ) in result.stdout + result.stderr
    assert not (run_dir / lock.NAME).exists()


@pytest.mark.slow
def test_a_finished_run_gives_its_lock_back(digits_run):
    run, _, _ = digits_run
    assert (run / "summary.json").exists() and not (run / lock.NAME).exists()


@pytest.mark.slow
def test_a_failed_start_leaves_no_run_folder_and_keeps_an_earlier_one(workdir):
    # The batch is found larger than the data only after the run folder was made.
    result = cli(common(workdir, "trainer.batch_size=65536", "run_name=big"), cwd=workdir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "trainer.batch_size=65536 is larger than the train split" in result.stderr
    assert not (workdir / "runs" / "digits" / "big").exists()
    # A folder that was there before (an earlier attempt's, with a person's notes) stays.
    earlier = workdir / "runs" / "digits" / "earlier"
    earlier.mkdir()
    (earlier / "notes.txt").write_text("mine")
    result = cli(common(workdir, "trainer.batch_size=65536", "run_name=earlier"), cwd=workdir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (earlier / "notes.txt").read_text() == "mine" and not (earlier / lock.NAME).exists()


def two_machines(workdir, args: list[str], timeout: int = 240) -> list[subprocess.CompletedProcess]:
    """Two "machines" on this host (one process each), launched by launch/run.py, which exits with the
    training process's own code."""
    port, procs = str(free_port()), []
    for rank in (0, 1):
        cmd = [
            sys.executable,
            str(ROOT / "launch" / "run.py"),
            *launch_flags(2, machines=2, rank=rank, port=port),
            str(ROOT / "launch" / "train.py"),
            *args,
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=workdir,
                env=environment(2),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return results


@pytest.mark.slow
def test_a_refusal_on_the_main_process_stops_every_machine_with_it(workdir):
    finished = workdir / "runs" / "digits" / "done"
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text("{}")
    started = time.time()
    machines = two_machines(workdir, common(workdir, "run_name=done"))
    took = time.time() - started
    for machine in machines:
        # Each machine's own process stops with the main process's message, exit 2 (not a gloo or
        # timeout traceback on the machine that did not check).
        assert machine.returncode == 2, machine.stderr[-3000:]
        assert machine.stderr.count(f"error: run {finished} already finished") == 1, machine.stderr[-3000:]
        assert "Traceback" not in machine.stderr
    print(f"both machines exited 2 in {took:.0f} s")


SAVE = """
import os, sys, time
from pathlib import Path
import datasets
from pipeline import shard_store
out, go = Path(sys.argv[1]), Path(sys.argv[2])
rows = datasets.Dataset.from_dict({"x": list(range(2_000_000))})
splits = datasets.DatasetDict({"train": rows, "eval": rows.select(range(1000))})
go.with_name(f"ready-{os.getpid()}").touch()  # imports done: the test starts both builds at once
while not go.exists():
    time.sleep(0.01)
started = time.time()
shard_store._save(splits, {"n": 1}, out, shard_store.Saving(4))
print(started, time.time(), flush=True)
"""


@pytest.mark.slow
def test_two_builds_of_the_same_shards_at_once_leave_one_intact_folder(tmp_path):
    # Each build writes a folder of its own and renames it into place; the second rename fails on the first's
    # complete folder, which both then use. So two prepares of one fingerprint waste work but never race.
    out, go = tmp_path / "cache" / "fp", tmp_path / "go"
    builds = [
        subprocess.Popen(
            [sys.executable, "-c", SAVE, str(out), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for _ in range(2)
    ]
    deadline = time.time() + 240
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    spans = []
    for build in builds:
        stdout, stderr = build.communicate(timeout=300)
        assert build.returncode == 0, stderr[-3000:]
        spans.append([float(t) for t in stdout.split()])
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, f"the builds did not overlap: {spans}"
    assert shard_store.check_shards(out, full=True) > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["fp"]  # no temporary folder left

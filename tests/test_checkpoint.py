"""Checkpoints and resume: a run killed at any moment continues, on 1 or 2 processes, exactly where it was."""

import json
import subprocess
import time

import psutil
import pytest
from conftest import cli, command, common, environment, ok, run_dirs
from safetensors.torch import load_file

from pipeline import checkpoint


def start_and_wait_for_checkpoint(args: list[str], cwd, run_dir, processes: int, min_step: int,
                                  logged_past_it: bool = False):
    """Starts a run and returns it once a checkpoint of `min_step` or later is complete (and, with
    `logged_past_it`, once the run has logged a step after that checkpoint)."""
    proc = subprocess.Popen(command(args, processes), cwd=cwd, env=environment(processes),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        newest = checkpoint.latest(run_dir)
        step = checkpoint.position(newest)["step"] if newest else -1
        if step >= min_step and (not logged_past_it or last_logged_step(run_dir) > step):
            break
        time.sleep(0.005)
    return proc


def last_logged_step(run_dir) -> int:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    steps = [json.loads(x)["step"] for x in lines if x.endswith("}")]
    return max(steps, default=-1)


def kill_after_checkpoint(args: list[str], cwd, run_dir, processes: int, min_step: int) -> None:
    """Kills a run (and every process it started) hard once a checkpoint of `min_step` or later is
    complete: no handler runs, as after a node failure."""
    proc = start_and_wait_for_checkpoint(args, cwd, run_dir, processes, min_step, logged_past_it=True)
    tree = psutil.Process(proc.pid)
    for p in tree.children(recursive=True) + [tree]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.communicate()
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"


def same_result(run_dir, reference_dir) -> None:
    again = json.loads((run_dir / "summary.json").read_text())
    whole = json.loads((reference_dir / "summary.json").read_text())
    assert again["steps"] == whole["steps"] and again["num_processes"] == whole["num_processes"]
    # Same data order, weights, optimizer moments and RNG: the same numbers, not just close ones.
    assert again["eval/loss"] == pytest.approx(whole["eval/loss"], rel=1e-9)
    a, b = load_file(run_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in b)
    assert not checkpoint.folder(run_dir).exists()  # a finished run keeps its weights, not its checkpoints
    # The local record reads like one uninterrupted run: lines logged after the checkpoint were dropped.
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (reference_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], sorted(x)) for x in lines] == [(x["step"], sorted(x)) for x in reference]
    for x, y in zip(lines, reference):
        assert {k: pytest.approx(v, rel=1e-9) for k, v in x.items() if isinstance(v, float)} == {
            k: v for k, v in y.items() if isinstance(v, float)}


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_killed_or_terminated_run_resumes_exactly(workdir, processes):
    args = ["trainer.epochs=4", "trainer.log_every=5", "checkpoint.every_steps=10", "checkpoint.keep=2"]
    ok(cli(common(workdir, *args, "run_name=whole"), cwd=workdir, processes=processes))
    whole_dir = workdir / "runs" / "digits" / "whole"
    assert json.loads((whole_dir / "summary.json").read_text())["steps"] == 4 * 44  # digits: 44 steps an epoch

    # SIGKILL in the second epoch, between checkpoints: resumes from the newest complete one.
    run_dir = workdir / "runs" / "digits" / "killed"
    killed = common(workdir, *args, "run_name=killed")
    kill_after_checkpoint(killed, workdir, run_dir, processes, min_step=60)
    kept = [p.name for p in checkpoint.complete(run_dir)]
    assert 1 <= len(kept) <= 2, kept  # older ones pruned (keep=2)
    # Killed between checkpoints: steps after the newest one were logged, and will be trained again.
    assert last_logged_step(run_dir) > checkpoint.position(checkpoint.latest(run_dir))["step"]
    resumed = ok(cli(killed, cwd=workdir, processes=processes))
    assert f"resuming from {run_dir / 'checkpoints' / kept[-1]}" in resumed.stdout
    same_result(run_dir, whole_dir)

    # SIGTERM (a scheduler's warning; to the launcher, which passes it on): all processes stop after the
    # same step at the next log line, save there and exit non-zero; the same command resumes.
    run_dir = workdir / "runs" / "digits" / "terminated"
    terminated = common(workdir, *args, "run_name=terminated")
    proc = start_and_wait_for_checkpoint(terminated, workdir, run_dir, processes, min_step=44)
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (run_dir / "summary.json").exists(), err[-3000:]
    if processes == 1:
        assert proc.returncode == 143
    assert err.count("stopped on SIGTERM after step") == 1, err[-3000:]
    step = checkpoint.position(checkpoint.latest(run_dir))["step"]
    assert step % 5 == 0 or step % 44 == 0  # a log-line step, where the processes compare flags
    ok(cli(terminated, cwd=workdir, processes=processes))
    same_result(run_dir, whole_dir)
    assert len(run_dirs(workdir / "runs", "digits")) == 3


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    root = checkpoint.folder(tmp_path)
    for name, complete in [("step-00000010", True), ("step-00000200", False), (".tmp-step-00000300", False),
                           ("step-00000020", True)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / checkpoint.STATE_FILE).write_text(json.dumps({"step": int(name[5:])}))
    assert checkpoint.latest(tmp_path) == root / "step-00000020"
    assert checkpoint.latest(tmp_path / "nothing") is None


def test_starting_over_a_checkpointed_run_is_refused(workdir):
    run_dir = workdir / "runs" / "digits" / "job"
    (checkpoint.folder(run_dir) / "step-00000044").mkdir(parents=True)
    (checkpoint.folder(run_dir) / "step-00000044" / checkpoint.STATE_FILE).write_text("{}")
    out = cli(common(workdir, "run_name=job", "checkpoint.resume=false"), cwd=workdir)
    assert out.returncode == 2 and "checkpoint.resume=false" in out.stderr and "Traceback" not in out.stderr
    assert (checkpoint.folder(run_dir) / "step-00000044").exists()  # nothing destroyed
    (checkpoint.folder(run_dir) / "step-00000044" / checkpoint.STATE_FILE).write_text('{"num_processes": 2}')
    other = cli(common(workdir, "run_name=job"), cwd=workdir)
    assert other.returncode == 2 and "saved by 2 processes and this run has 1" in other.stderr
    assert "--num_processes 2" in other.stderr
    bad = cli(common(workdir, "checkpoint.keep=-1"), cwd=workdir)
    assert bad.returncode == 2 and "checkpoint.keep" in bad.stderr

"""Checkpoints and resume: a run killed at any moment continues, on 1 or 2 processes, exactly where it was."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import psutil
import pytest
from conftest import cli, command, common, environment, ok, run_dirs
from omegaconf import OmegaConf
from safetensors.torch import load_file

from pipeline import checkpoint, fingerprints, runinfo


def start_and_wait_for_checkpoint(
    args: list[str], cwd, run_dir, processes: int, min_step: int, logged_past_it: bool = False
):
    """Starts a run and returns it once a checkpoint of `min_step` or later is complete (and, with
    `logged_past_it`, once the run has logged a step after that checkpoint)."""
    # Unbuffered: what a run printed before it is killed reaches the pipe.
    proc = subprocess.Popen(
        command(args, processes),
        cwd=cwd,
        env=environment(processes, {"PYTHONUNBUFFERED": "1"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        newest = checkpoint.complete(run_dir)[-1:]  # renamed into place: complete (no hashing each poll)
        step = checkpoint.position(newest[0])["step"] if newest else -1
        if step >= min_step and (not logged_past_it or last_logged_step(run_dir) > step):
            break
        time.sleep(0.005)
    return proc


def last_logged_step(run_dir) -> int:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    steps = [json.loads(x)["step"] for x in lines if x.endswith("}")]
    return max(steps, default=-1)


def kill_after_checkpoint(args: list[str], cwd, run_dir, processes: int, min_step: int) -> str:
    """Kills a run (and every process it started) hard once a checkpoint of `min_step` or later is
    complete: no handler runs, as after a node failure. Returns what it printed."""
    proc = start_and_wait_for_checkpoint(args, cwd, run_dir, processes, min_step, logged_past_it=True)
    return kill(proc, run_dir)


def kill(proc: subprocess.Popen, run_dir) -> str:
    """SIGKILL to a run and every process it started; returns what it printed."""
    try:
        tree = psutil.Process(proc.pid)
        processes = tree.children(recursive=True) + [tree]
    except psutil.NoSuchProcess:  # it ended (or a child did) while the tree was read
        processes = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    out, _ = proc.communicate()
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"
    return out


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
            k: v for k, v in y.items() if isinstance(v, float)
        }


@pytest.mark.slow
# Both data paths (whole tensors in memory; batches read from the memory-mapped shards) and process counts;
# tests/test_elastic.py resumes each path on another count too.
@pytest.mark.parametrize("processes, in_memory", [(1, "true"), (2, "false")])
def test_a_killed_or_terminated_run_resumes_exactly(workdir, processes, in_memory):
    args = [
        "trainer.epochs=4",
        "trainer.log_every=5",
        "checkpoint.every_steps=10",
        "checkpoint.keep=2",
        f"data.in_memory={in_memory}",
    ]
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
    for name, complete in [
        ("step-00000010", True),
        ("step-00000200", False),
        (".tmp-step-00000300", False),
        ("step-00000020", True),
    ]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / checkpoint.STATE_FILE).write_text(json.dumps({"step": int(name[5:])}))
    assert checkpoint.latest(tmp_path) == root / "step-00000020"
    assert checkpoint.latest(tmp_path / "nothing") is None


@pytest.mark.slow
def test_starting_over_a_checkpointed_run_is_refused(workdir):
    run_dir = workdir / "runs" / "digits" / "job"
    (checkpoint.folder(run_dir) / "step-00000044").mkdir(parents=True)
    (checkpoint.folder(run_dir) / "step-00000044" / checkpoint.STATE_FILE).write_text('{"step": 44}')
    out = cli(common(workdir, "run_name=job", "checkpoint.resume=false"), cwd=workdir)
    assert out.returncode == 2 and "checkpoint.resume=false" in out.stderr and "Traceback" not in out.stderr
    assert (checkpoint.folder(run_dir) / "step-00000044").exists()  # nothing destroyed
    state = checkpoint.folder(run_dir) / "step-00000044" / checkpoint.STATE_FILE
    state.write_text('{"step": 44, "num_processes": 2}')
    other = cli(common(workdir, "run_name=job"), cwd=workdir)
    # Another process count is no reason to refuse (tests/test_elastic.py): the checkpoint is taken, and
    # refused only because this one holds no weights.
    assert "resuming a checkpoint saved by 2 processes on 1: each process takes its own RNG state" in other.stdout
    assert other.returncode == 2 and "does not fit the model" in other.stderr, other.stderr[-3000:]
    assert "Traceback" not in other.stderr
    bad = cli(common(workdir, "checkpoint.keep=-1"), cwd=workdir)
    assert bad.returncode == 2 and "checkpoint.keep" in bad.stderr


# ---------------------------------------------------------------- resume integrity and damaged checkpoints

# digits: 44 steps an epoch. A checkpoint every 10 steps, the newest 2 kept.
ARGS = ["trainer.epochs=2", "trainer.log_every=5", "checkpoint.every_steps=10", "checkpoint.keep=2"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run with ARGS: the numbers every resumed run must reproduce."""
    workdir = tmp_path_factory.mktemp("whole")
    ok(cli(common(workdir, *ARGS, "run_name=whole"), cwd=workdir))
    return workdir / "runs" / "digits" / "whole"


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A working directory (runs/ and cache/) whose run `job` stopped on SIGTERM with two checkpoints."""
    workdir = tmp_path_factory.mktemp("interrupted")
    run_dir = workdir / "runs" / "digits" / "job"
    proc = start_and_wait_for_checkpoint(common(workdir, *ARGS, "run_name=job"), workdir, run_dir, 1, min_step=20)
    proc.terminate()
    proc.communicate(timeout=120)
    assert proc.returncode == 143 and len(checkpoint.complete(run_dir)) == 2
    return workdir


def copy_of(interrupted, workdir):
    """The interrupted run in this test's own working directory; returns its run directory."""
    shutil.copytree(interrupted, workdir, dirs_exist_ok=True)
    return workdir / "runs" / "digits" / "job"


def cut(path) -> None:
    """Truncates a file to half its size, as a full disk or a killed copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_a_fresh_record(workdir, whole):
    run_dir = workdir / "runs" / "digits" / "job"
    args = common(workdir, *ARGS[:-1], "checkpoint.keep=0", "run_name=job")  # no checkpoint to resume from
    proc = subprocess.Popen(
        command(args), cwd=workdir, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and last_logged_step(run_dir) < 10:
        time.sleep(0.005)
    kill(proc, run_dir)
    assert last_logged_step(run_dir) >= 10
    out = ok(cli(args, cwd=workdir))
    assert "resuming" not in out.stdout
    same_result(run_dir, whole)  # the record has each step once, as in an uninterrupted run


@pytest.mark.slow
def test_resuming_with_other_training_values_is_refused_and_harmless_changes_are_allowed(workdir, interrupted, whole):
    run_dir = copy_of(interrupted, workdir)
    saved = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    trained = OmegaConf.load(checkpoint.latest(run_dir) / checkpoint.CONFIG_FILE)
    other = cli(common(workdir, *ARGS, "run_name=job", "optimizer.lr=0.5", "trainer.batch_size=16"), cwd=workdir)
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-3000:]
    assert f"optimizer.lr: {trained.optimizer.lr} in the checkpoint, 0.5 now" in other.stderr
    assert f"trainer.batch_size: {trained.trainer.batch_size} in the checkpoint, 16 now" in other.stderr
    assert "run_name=<new name>" in other.stderr and "config.yaml" in other.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == saved  # nothing changed

    # Where it is written, logged and kept cannot change the numbers: allowed. Files a person put in
    # checkpoints/ survive the pruning to the newest 1 and the finished run's clean-up.
    (checkpoint.folder(run_dir) / "notes.txt").write_text("mine")
    (checkpoint.folder(run_dir) / "step-00000099").mkdir()  # looks like ours, but has no state
    again = ok(
        cli(
            common(workdir, *ARGS[:-1], "checkpoint.keep=1", "run_name=job", "trainer.log_every=7", "tracking=wandb"),
            cwd=workdir,
        )
    )
    assert "resuming from" in again.stdout
    a, b = load_file(run_dir / "model.safetensors"), load_file(whole / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in b)
    assert sorted(p.name for p in checkpoint.folder(run_dir).iterdir()) == ["notes.txt", "step-00000099"]
    assert (checkpoint.folder(run_dir) / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(workdir, interrupted, whole):
    run_dir = copy_of(interrupted, workdir)
    older, newest = checkpoint.complete(run_dir)
    cut(newest / "model.safetensors")
    out = ok(cli(common(workdir, *ARGS, "run_name=job"), cwd=workdir))
    assert f"warning: checkpoint {newest} is damaged (model.safetensors has" in out.stdout
    assert f"resuming from {older}" in out.stdout
    same_result(run_dir, whole)  # exactly the uninterrupted run's numbers and record


@pytest.mark.slow
def test_without_an_intact_checkpoint_the_run_stops_and_can_start_over(workdir, interrupted, whole):
    run_dir = copy_of(interrupted, workdir)
    older, newest = checkpoint.complete(run_dir)
    cut(newest / "optimizer.bin")
    cut(older / checkpoint.STATE_FILE)
    args = common(workdir, *ARGS, "run_name=job")
    stopped = cli(args, cwd=workdir)
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert f"checkpoint {newest} is damaged: optimizer.bin has" in stopped.stderr
    assert f"checkpoint {older} is damaged: {checkpoint.STATE_FILE} has" in stopped.stderr
    assert "checkpoint.resume=false" in stopped.stderr and newest.exists() and older.exists()
    # The command the message gives starts the run over: the damaged checkpoints are set aside.
    over = ok(cli([*args, "checkpoint.resume=false"], cwd=workdir))
    assert "set aside as damaged-step-" in over.stdout and "resuming" not in over.stdout
    same_result(run_dir, whole)  # a fresh record, not the killed attempt's lines plus the new ones


@pytest.mark.slow
def test_each_damaged_file_is_named(workdir, interrupted):
    """Every file of a real checkpoint is checked against its manifest before anything is loaded."""
    run_dir = copy_of(interrupted, workdir)
    newest = checkpoint.latest(run_dir)
    assert checkpoint.damage(newest) is None
    names = sorted(p.name for p in newest.iterdir())
    assert {
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        checkpoint.STATE_FILE,
        checkpoint.CONFIG_FILE,
        checkpoint.MANIFEST,
    } <= set(names), names
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", checkpoint.STATE_FILE):
        original = (newest / name).read_bytes()
        cut(newest / name)
        assert checkpoint.damage(newest).startswith(f"{name} has "), name
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0xFF
        (newest / name).write_bytes(bytes(flipped))  # same size, other content
        assert checkpoint.damage(newest).startswith(f"{name} differs"), name
        (newest / name).write_bytes(original)
    # Accelerate skips an unreadable RNG state with an info log; here it is said plainly.
    cut(newest / "random_states_0.pkl")
    assert "would not repeat the same numbers" in checkpoint.damage(newest)
    assert checkpoint.latest(run_dir) != newest
    cut(newest / checkpoint.MANIFEST)
    assert checkpoint.damage(newest).startswith(f"{checkpoint.MANIFEST} is unreadable")


def test_only_the_pipelines_own_folders_are_removed(tmp_path):
    root = checkpoint.folder(tmp_path)
    for name in ("step-00000010", "damaged-step-00000020", ".tmp-step-00000030"):
        (root / name).mkdir(parents=True)
        (root / name / checkpoint.STATE_FILE).write_text("{}")
    (root / "step-00000040").mkdir()  # no state: not ours
    (root / "step-5").mkdir()
    (root / "step-5" / checkpoint.STATE_FILE).write_text("{}")  # not our name
    (root / "notes.txt").write_text("mine")
    checkpoint.remove_all(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step-00000040", "step-5"]
    for p in list(root.iterdir()):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (root / "step-00000010").mkdir()
    (root / "step-00000010" / checkpoint.STATE_FILE).write_text("{}")
    checkpoint.remove_all(tmp_path)
    assert not root.exists()  # emptied: the folder goes too


@pytest.mark.slow
def test_ctrl_c_saves_like_sigterm_and_resumes_exactly(workdir, whole):
    run_dir = workdir / "runs" / "digits" / "job"
    args = common(workdir, *ARGS, "run_name=job")
    proc = start_and_wait_for_checkpoint(args, workdir, run_dir, 1, min_step=10)
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Ctrl-C: stopping at the next log line and saving a checkpoint" in out
    assert err.count("stopped on Ctrl-C after step") == 1 and "Traceback" not in err, err[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "preempted"
    ok(cli(args, cwd=workdir))
    same_result(run_dir, whole)


def test_a_second_ctrl_c_stops_at_once():
    stop = checkpoint.StopSignal(say=lambda message: None)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # Python runs the handler at the next instruction of the main thread
        assert stop.received and stop.interrupted
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------- resume on the same data only


def prices_csv(folder, rows: int = 300):
    """A small regression table for recipe=tabular: price linear in area, plus noise."""
    rng = np.random.default_rng(0)
    area = rng.uniform(30, 150, rows)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"area": area.round(2), "price": (2.5 * area + rng.normal(0, 25, rows)).round(2)}).to_csv(
        folder / "prices.csv", index=False
    )
    return folder / "prices.csv"


def tabular_args(workdir, *extra: str) -> list[str]:
    # data.root + a relative data.file: the raw file is named relative to the root, so a copy of the
    # working folder has the same fingerprint. 16 steps an epoch (trainer.min_steps_per_epoch halves the batch to
    # 15); enough epochs that the kill comes first.
    return common(
        workdir,
        "recipe=tabular",
        f"data.root={workdir / 'data'}",
        "data.file=prices.csv",
        "data.target=price",
        "trainer.batch_size=30",
        "trainer.epochs=40",
        "trainer.log_every=1",
        "checkpoint.every_steps=4",
        "run_name=job",
        *extra,
    )


@pytest.fixture(scope="module")
def killed_tabular(tmp_path_factory):
    """A working folder (data/, runs/, cache/) whose tabular run `job` was killed after a checkpoint."""
    workdir = tmp_path_factory.mktemp("killed-tabular")
    prices_csv(workdir / "data")
    run_dir = workdir / "runs" / "tabular" / "job"
    kill_after_checkpoint(tabular_args(workdir), workdir, run_dir, 1, min_step=4)
    assert checkpoint.latest(run_dir)
    return workdir


def copy_of_tabular(killed, workdir):
    shutil.copytree(killed, workdir, dirs_exist_ok=True)  # copy2: the raw file keeps its time
    return workdir / "runs" / "tabular" / "job"


def files_of(folder) -> dict:
    """The run's files, not run.lock (a killed run leaves it; the next command takes it over and gives it back)."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "run.lock"}


@pytest.mark.slow
def test_resume_on_a_changed_csv_is_refused_unless_allowed(workdir, killed_tabular):
    run_dir = copy_of_tabular(killed_tabular, workdir)
    saved = checkpoint.position(checkpoint.latest(run_dir))["data"]
    assert saved["raw"].keys() == {"prices.csv"} and saved["raw_files"] == 1
    csv = workdir / "data" / "prices.csv"
    table = pd.read_csv(csv)
    table.loc[0, "price"] += 1  # one label
    table.to_csv(csv, index=False)
    before = files_of(run_dir)
    refused = cli(tabular_args(workdir), cwd=workdir)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "the data changed since checkpoint" in refused.stderr
    assert (
        f"raw files changed: prices.csv (the shards' fingerprint changed from {saved['fingerprint']} to "
        in refused.stderr
    )
    assert "run_name=<new name>" in refused.stderr and "checkpoint.allow_data_change=true" in refused.stderr
    assert files_of(run_dir) == before  # nothing resumed, nothing rewritten

    allowed = ok(cli(tabular_args(workdir, "checkpoint.allow_data_change=true", "trainer.max_steps=10"), cwd=workdir))
    assert "on other data (checkpoint.allow_data_change=true): raw files changed: prices.csv" in allowed.stdout
    record = json.loads((run_dir / "run.json").read_text())
    [change] = record["data_changes"]
    assert change["from"] == saved["fingerprint"] and change["to"] == record["data"]["fingerprint"] != change["from"]
    assert change["allowed_by"] == "checkpoint.allow_data_change=true" and "prices.csv" in change["change"]
    assert record["status"] == "finished" and "raw" not in record["data"]


@pytest.mark.slow
def test_a_checkpoint_saved_before_data_records_resumes_with_a_note(workdir, killed_tabular):
    run_dir = copy_of_tabular(killed_tabular, workdir)
    newest = checkpoint.latest(run_dir)
    state = checkpoint.position(newest)
    del state["data"]  # as an older version saved it, with its manifest
    (newest / checkpoint.STATE_FILE).write_text(json.dumps(state))
    (newest / checkpoint.MANIFEST).unlink()
    checkpoint.write_manifest(newest)
    out = ok(cli(tabular_args(workdir, "trainer.max_steps=10"), cwd=workdir))
    assert f"note: checkpoint {newest} was saved before checkpoints recorded their data" in out.stdout
    assert f"resuming from {newest}" in out.stdout


def test_a_data_change_is_named_by_file_and_by_count_past_the_listed_files(tmp_path, monkeypatch):
    from test_tabular import parse

    csv = prices_csv(tmp_path / "data")
    recipe, cfg = parse(tmp_path, csv, "data.target=price")
    before = runinfo.data_identity(recipe, cfg, tmp_path / "cache" / fingerprints.fingerprint(recipe, cfg))
    assert before["fingerprint"] == fingerprints.fingerprint(recipe, cfg) and before["raw"].keys() == {"prices.csv"}
    csv.write_text(csv.read_text() + "50.0,125.0\n")
    after = runinfo.data_identity(recipe, cfg, tmp_path / "cache" / fingerprints.fingerprint(recipe, cfg))
    assert runinfo.data_change(before, after).startswith("raw files changed: prices.csv (the shards' fingerprint")
    monkeypatch.setattr(runinfo, "RAW_LISTED", 0)  # a folder of more raw files than a checkpoint lists
    unlisted = runinfo.data_identity(recipe, cfg, tmp_path / "cache" / "x")
    assert "raw" not in unlisted
    assert runinfo.data_change({**before, "raw_digest": "0"}, unlisted).endswith(
        "the raw files differ (1 files then, 1 now)"
    )
    same = {**after, "fingerprint": "y"}
    assert "the raw files are the same" in runinfo.data_change(after, same)

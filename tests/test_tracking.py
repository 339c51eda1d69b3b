"""Tracking: W&B offline without a key (no prompt, no network), and the local run record."""

import json
import os
import subprocess
import sys
import time

import pytest
import wandb
from accelerate.state import AcceleratorState
from conftest import ROOT, cli, common, ok, run_dirs

from pipeline import cli as pipeline_cli
from pipeline import files, tracking
from pipeline.loop import train


def test_wandb_offline_run_gets_resolved_config_and_metrics(workdir, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_TAGS", "WANDB_NOTES", "WANDB_JOB_TYPE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(workdir))  # no ~/.netrc: not logged in
    monkeypatch.setenv("NETRC", str(workdir / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(workdir / "wandb-config"))
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-7")  # a sweep's group wins over tracking.group
    seen = {"logged": [], "defined": [], "artifacts": []}
    real_init = wandb.init

    def init(*args, **kwargs):  # the real wandb.init; we only keep what its run is given
        run = real_init(*args, **kwargs)
        real_log, real_define, real_artifact, real_finish = run.log, run.define_metric, run.log_artifact, run.finish

        def log(values, *a, **k):
            seen["logged"].append(dict(values))
            return real_log(values, *a, **k)

        def define_metric(name, *a, **k):
            seen["defined"].append((name, k.get("summary")))
            return real_define(name, *a, **k)

        def log_artifact(artifact, *a, **k):
            seen["artifacts"].append(artifact)
            return real_artifact(artifact, *a, **k)

        def finish(*a, **k):  # the labels as the run holds them, while it is still open
            seen["labels"] = (list(run.tags), run.group, run.notes, run.job_type)
            return real_finish(*a, **k)

        run.log, run.define_metric, run.log_artifact, run.finish = log, define_metric, log_artifact, finish
        seen["run"] = run
        return run

    monkeypatch.setattr(wandb, "init", init)
    _, cfg = pipeline_cli.parse(
        [
            "trainer.epochs=2",
            "tracking=wandb",
            "project=tests",
            "tracking.tags=[baseline]",
            "tracking.group=mine",
            "tracking.notes=first try",
            "tracking.log_model=true",
            f"output_dir={workdir / 'runs'}",
            f"data.cache_dir={workdir / 'cache'}",
        ]
    )
    try:
        summary = train(cfg)
    finally:
        AcceleratorState._reset_state(True)

    run = seen["run"]
    assert run.settings.mode == "offline"
    assert run.project == "tests" or run.settings.project == "tests"
    config = dict(run.config)
    assert config["recipe"] == "digits" and config["trainer"]["epochs"] == 2
    assert config["optimizer"] == {
        "name": "adam",
        "lr": 0.001,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
    }
    # The runtime the run resolved, as run.json records it: what runs are filtered by.
    run_dir = run_dirs(workdir / "runs", "digits")[0]
    record = json.loads((run_dir / "run.json").read_text())
    runtime = config["runtime"]
    assert runtime["num_processes"] == 1 and runtime["device"] == "cpu" and runtime["mixed_precision"] == "no"
    assert runtime["compile"] is False and runtime["git"] == record["git"]
    # The labels: tags and notes from the config (beside the recipe's tag), the group from WANDB_RUN_GROUP.
    assert seen["labels"] == (["digits", "baseline"], "sweep-7", "first try", "train")
    evals = [v for v in seen["logged"] if "eval/accuracy" in v]
    assert len(evals) == 2 and evals[-1]["eval/accuracy"] == summary["eval/accuracy"]
    assert any("train/loss" in v for v in seen["logged"])
    # The summary keeps the best eval/accuracy (the monitored metric) beside its last value.
    assert ("eval/accuracy", "max,last") in seen["defined"]
    # Speed and times, as summary.json has them.
    final = {k: v for values in seen["logged"] for k, v in values.items()}
    assert final["train/samples_per_s"] == summary["train/samples_per_s"] > 0
    assert final["time/total_s"] == summary["time/total_s"] and final["time/first_step_s"] > 0
    # The confusion matrix as W&B's chart and the per-class numbers as a table, from the final evaluation.
    chart, table = final["eval/confusion_matrix"], final["eval/per_class"]
    cells = chart.table.data
    assert len(cells) == 100 and sum(c[2] for c in cells) == summary["eval/samples"] == 360
    assert table.columns == ["class", "precision", "recall", "f1", "support"]
    assert [r[0] for r in table.data] == [str(d) for d in range(10)] and sum(r[4] for r in table.data) == 360
    hits = sum(c[2] for c in cells if c[0] == c[1])
    assert hits / 360 == pytest.approx(summary["eval/accuracy"], abs=1e-6)
    # tracking.log_model=true: the final and best weights (and what rebuilds the model) as one artifact.
    (artifact,) = [a for a in seen["artifacts"] if a.type == "model"]  # W&B keeps each table as one too
    assert artifact.name.startswith(f"model-{run.id}")
    assert set(artifact.manifest.entries) == {"model.safetensors", "best.safetensors", "config.yaml", "meta.json"}
    # The same values in the local record, and the offline run on disk for a later `wandb sync`.
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [v for v in lines if "eval/accuracy" in v][-1]["eval/accuracy"] == summary["eval/accuracy"]
    assert not any(k.startswith(("time/", "train/samples_per_s")) for v in lines for k in v)  # timings: summary.json
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert not (run_dir / "wandb_id").exists()  # offline attempts are runs of their own


def test_wandb_labels_come_from_the_config_unless_wandb_variables_are_set(monkeypatch, tmp_path):
    for var in tracking.WANDB_ENV.values():
        monkeypatch.delenv(var, raising=False)
    args = ["tracking=wandb", "tracking.tags=[a,b]", "tracking.group=g", "tracking.notes=n", "tracking.job_type=eval"]
    _, cfg = pipeline_cli.parse(args)

    def labels():
        init = tracking.trackers(cfg, tmp_path, mode="offline")[1]["wandb"]
        return {k: init.get(k) for k in tracking.WANDB_ENV}

    assert labels() == {"tags": ["digits", "a", "b"], "group": "g", "notes": "n", "job_type": "eval"}
    assert pipeline_cli.parse([])[1].tracking.group is None  # grouped by the recipe by default:
    assert tracking.wandb_labels(pipeline_cli.parse([])[1]) == {
        "tags": ["digits"],
        "group": "digits",
        "job_type": "train",
    }
    # wandb.init reads its variables itself, and an argument would win over them: where one is set, none is given.
    for var in tracking.WANDB_ENV.values():
        monkeypatch.setenv(var, "x")
    assert labels() == {"tags": None, "group": None, "notes": None, "job_type": None}
    # `tracking=none` stays the short form of tracking.name, beside the other tracking keys.
    assert pipeline_cli.parse(["tracking.tags=[a]", "tracking=none"])[1].tracking.name.name == "none"


def test_online_attempts_of_a_run_share_one_wandb_run(monkeypatch, tmp_path):
    # Only the arguments for wandb.init are built here, for a given mode: an online run needs a network.
    _, cfg = pipeline_cli.parse(["tracking=wandb"])
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = tracking.trackers(cfg, run_dir, mode="online")[1]["wandb"]
    again = tracking.trackers(cfg, run_dir, resumed_step=40, mode="online")[1]["wandb"]  # the requeued job
    assert first["resume"] == "allow" and first["id"] == again["id"] == (run_dir / "wandb_id").read_text().strip()
    other = tmp_path / "other"
    other.mkdir()
    assert tracking.trackers(cfg, other, mode="online")[1]["wandb"]["id"] != first["id"]
    # Other processes neither choose nor write an id; an explicit WANDB_RUN_ID is left to wandb.
    assert "id" not in tracking.trackers(cfg, tmp_path, main=False, mode="online")[1]["wandb"]
    assert not (tmp_path / "wandb_id").exists()
    monkeypatch.setenv("WANDB_RUN_ID", "mine")
    assert "id" not in tracking.trackers(cfg, tmp_path, mode="online")[1]["wandb"]
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_ID")
    assert "id" not in tracking.trackers(cfg, tmp_path)[1]["wandb"] and not (tmp_path / "wandb_id").exists()


def mode_seen_by_a_fresh_process(home, **env) -> str:
    """wandb_mode() without the server check, in a new process (wandb keeps a login for its process)."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "WANDB_SILENT": "true",
        "PYTHONPATH": str(ROOT),
        "CUDA_VISIBLE_DEVICES": "",
        **env,
    }
    code = "from pipeline import tracking; print(tracking.wandb_mode(verify=False))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def netrc(home, host: str) -> None:
    (home / ".netrc").write_text(f"machine {host}\n  login user\n  password {'a' * 40}\n")
    (home / ".netrc").chmod(0o600)


@pytest.mark.slow
def test_mode_follows_login(tmp_path):
    from wandb.sdk.lib.urls import DEFAULT_BASE_URL  # wandb 0.31: https://api.forge.coreweave.com

    assert mode_seen_by_a_fresh_process(tmp_path) == "offline"
    assert mode_seen_by_a_fresh_process(tmp_path, WANDB_API_KEY="x" * 40) == "online"
    # `wandb login` writes a netrc entry for wandb's configured host; an entry for another host is no login.
    netrc(tmp_path, "wandb.example.com")
    assert mode_seen_by_a_fresh_process(tmp_path) == "offline"
    assert mode_seen_by_a_fresh_process(tmp_path, WANDB_BASE_URL="https://wandb.example.com") == "online"
    netrc(tmp_path, DEFAULT_BASE_URL.removeprefix("https://"))
    assert mode_seen_by_a_fresh_process(tmp_path) == "online"
    netrc(tmp_path, "api.wandb.ai")  # an older `wandb login`: wandb 0.31 reads it for its default host too
    assert mode_seen_by_a_fresh_process(tmp_path) == "online"
    assert mode_seen_by_a_fresh_process(tmp_path, WANDB_MODE="disabled") == "disabled"


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.slow
def test_bad_key_or_no_network_stops_before_training(workdir, processes):
    # This machine has no network: the login check fails as it would for a wrong key, within seconds.
    started = time.perf_counter()
    result = cli(
        common(workdir, "trainer.epochs=1", "tracking=wandb"),
        cwd=workdir,
        processes=processes,
        launcher="run",
        env={"WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "HOME": str(workdir)},
    )
    seconds = time.perf_counter() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("error: W&B rejected the login from WANDB_API_KEY or could not be reached") == 1
    assert "WANDB_MODE=offline" in result.stderr and "tracking=none" in result.stderr
    assert "Traceback" not in result.stderr
    assert seconds < 60 + 30 * (processes - 1), seconds  # was 107 s of wandb.init retries, then a traceback
    # Checked before any work: no run directory, no shards prepared.
    assert run_dirs(workdir / "runs", "digits") == []
    assert not (workdir / "cache").exists()


def test_tracking_none_makes_no_wandb_run(workdir):
    ok(cli(common(workdir, "trainer.epochs=1", "trainer.max_steps=2"), cwd=workdir))
    run_dir = run_dirs(workdir / "runs", "digits")[0]
    assert not (run_dir / "wandb").exists()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `folder`, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = folder.glob("events.out.tfevents.*")  # add_hparams writes its own beside, one folder down
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_run_writes_the_metrics_and_the_config(workdir):
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extras (pip install -e '.[dev]')")
    args = [a for a in common(workdir, "trainer.epochs=2", "trainer.log_every=5") if a != "tracking=none"]
    ok(cli([*args, "tracking=TensorBoard", "project=tests"], cwd=workdir))
    (run_dir,) = run_dirs(workdir / "runs", "digits")
    scalars = tensorboard_scalars(run_dir / "tests")  # Accelerate's layout: <logging_dir = run>/<project>/
    done = json.loads((run_dir / "summary.json").read_text())
    record = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The same evaluations, at the same steps, as the local record (which every run keeps).
    evals = [(v["step"], v["eval/accuracy"]) for v in record if "eval/accuracy" in v]
    assert len(evals) == 2 and [s for s, _ in scalars["eval/accuracy"]] == [s for s, _ in evals]
    assert scalars["eval/accuracy"][-1][1] == pytest.approx(done["eval/accuracy"], rel=1e-6)
    assert len(scalars["train/loss"]) == len([v for v in record if "train/loss" in v]) > 2
    # The resolved config as TensorBoard hparams (flattened: its hparams take no nested values).
    (hparams,) = (run_dir / "tests").glob("*/hparams.yml")
    text = hparams.read_text()
    assert "optimizer.name: adam" in text and "trainer.epochs: 2" in text and "recipe: digits" in text
    assert not (run_dir / "wandb").exists()


def test_tracker_without_its_package_stops_with_the_install_command(workdir):
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    installed = {t.value for t in get_available_trackers()}
    missing = [t.value for t in LoggerType if t is not LoggerType.ALL and t.value not in installed]
    if not missing:
        pytest.skip("every tracker Accelerate knows is installed here")
    name = "mlflow" if "mlflow" in missing else missing[0]
    args = [a for a in common(workdir, "trainer.epochs=1") if a != "tracking=none"]
    result = cli([*args, f"tracking={name}"], cwd=workdir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: tracking={name} needs the {name} package" in result.stderr
    assert f"pip install {tracking.PIP_PACKAGE.get(name, name)}" in result.stderr and "tracking=none" in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing was trained or recorded: no config, record, weights or checkpoints anywhere.
    assert not [p for p in (workdir / "runs").rglob("*") if p.is_file()]


def strict_json(text: str):
    """json.loads refusing the NaN/Infinity tokens Python writes by default (they are not JSON)."""

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null_and_read_by_compare(tmp_path):
    from pipeline import compare

    run = tmp_path / "runs" / "tabular" / "a"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("recipe: tabular\n")
    record = tracking.LocalRecord(run)
    record.log({"eval/mse": float("inf"), "eval/r2": float("nan"), "eval/mae": 2.5, "epoch": 1}, step=3)
    record.finish()
    files.write_json(
        run / "summary.json",
        {
            "eval/mse": float("inf"),
            "eval/r2": float("nan"),
            "eval/per": [1.0, float("-inf")],
            "best": {"v": float("nan")},
        },
    )
    line = strict_json((run / "metrics.jsonl").read_text())
    assert line == {"step": 3, "eval/mse": None, "eval/r2": None, "eval/mae": 2.5, "epoch": 1}
    assert strict_json((run / "summary.json").read_text()) == {
        "eval/mse": None,
        "eval/r2": None,
        "eval/per": [1.0, None],
        "best": {"v": None},
    }
    header, rows = compare.table([compare.read_run(run)], ["eval/mse", "eval/r2"])
    assert compare.markdown(header, rows).splitlines()[-1].startswith("| a | done | - | - |")

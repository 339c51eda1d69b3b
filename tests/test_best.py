"""Best weights, early stopping and the run record: best.safetensors is the monitored best epoch's, early
stopping ends 1 or N processes at the same epoch, a resumed run keeps both, run.json says how a run ended."""

import json
import subprocess

import pytest
import torch
from conftest import ROOT, cli, common, ok, run_dirs
from safetensors.torch import load_file
from test_checkpoint import kill_after_checkpoint

from pipeline import checkpoint, config
from pipeline import recipe as recipes
from pipeline.best import Best
from pipeline.config import ConfigError

# Digits with 5 optimizer steps an epoch (1,437 train rows / 256). eval/loss falls epoch after epoch, so
# watching it with mode=max makes epoch 1 the best and every later epoch "no better": the best weights
# are not the final ones, and patience=1 stops the run after epoch 2.
FIRST_IS_BEST = ["checkpoint.monitor=eval/loss", "checkpoint.mode=max", "trainer.batch_size=256"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # digits prepared once for the whole module


def args(workdir, cache, *extra):
    return common(workdir, f"data.cache_dir={cache}", *extra)


def metrics_lines(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_early_stopping_keeps_the_best_epoch_on_1_and_2_processes(workdir, cache):
    summaries = {}
    for processes in (1, 2):
        result = ok(cli(args(workdir, cache, *FIRST_IS_BEST, "trainer.epochs=5", "trainer.early_stopping_patience=1",
                             f"run_name=p{processes}"), cwd=workdir, processes=processes))
        assert result.stdout.count("stopping early after epoch 2") == 1  # said once, by the main process
        run_dir = workdir / "runs" / "digits" / f"p{processes}"
        s = summaries[processes] = json.loads((run_dir / "summary.json").read_text())
        assert (s["epochs"], s["steps"]) == (2, 10)  # stopped after 2 of 5 epochs
        assert s["stopped_early"] is True
        assert s["stopped_early/reason"].startswith("eval/loss did not improve for 1 evaluation (best ")
        assert (s["best/epoch"], s["best/step"], s["best/mode"]) == (1, 5, "max")
        # The best value is epoch 1's evaluation as the local record logged it.
        first_eval = next(x for x in metrics_lines(run_dir) if "eval/loss" in x)
        assert s["best/eval/loss"] == first_eval["eval/loss"] == pytest.approx(s["best/eval/loss"])
        assert not checkpoint.folder(run_dir).exists()  # finished normally: final weights, no checkpoints

        best, final = load_file(run_dir / "best.safetensors"), load_file(run_dir / "model.safetensors")
        assert best.keys() == final.keys()
        assert not all(best[k].equal(final[k]) for k in best)  # epoch 1's weights, not epoch 2's
        # Plain module keys: they load into the recipe's own model as it is built.
        cfg = config.build([], recipes.load("digits"))
        recipes.load("digits").model(cfg, {}).load_state_dict(best, strict=True)

        record = json.loads((run_dir / "run.json").read_text())
        assert (record["status"], record["exit_code"], record["num_processes"]) == ("finished", 0, processes)
        assert f"run_name=p{processes}" in record["argv"]
    check_run_record(json.loads((workdir / "runs" / "digits" / "p1" / "run.json").read_text()))
    one, two = summaries[1], summaries[2]
    assert {k: v for k, v in one.items() if k.startswith(("best/", "stopped"))}.keys() == {
        k for k in two if k.startswith(("best/", "stopped"))}
    assert one["best/eval/loss"] == pytest.approx(two["best/eval/loss"], rel=1e-5)
    assert one["stopped_early/reason"][:40] == two["stopped_early/reason"][:40]


@pytest.mark.slow
def test_a_resumed_run_keeps_the_best_so_far_and_the_patience_count(workdir, cache):
    # 11 steps an epoch (batch 128), patience 2: epoch 1 is best, epochs 2 and 3 are not -> stops after 3 of 5.
    # Killed during epoch 3, the resume must know both epoch 1's value and that epoch 2 already missed.
    train = ["checkpoint.monitor=eval/loss", "checkpoint.mode=max", "trainer.epochs=5", "trainer.batch_size=128",
             "trainer.early_stopping_patience=2", "trainer.log_every=2"]
    ok(cli(args(workdir, cache, *train, "run_name=whole"), cwd=workdir))
    whole = json.loads((workdir / "runs" / "digits" / "whole" / "summary.json").read_text())
    assert (whole["epochs"], whole["best/epoch"], whole["stopped_early"]) == (3, 1, True)

    run_dir = workdir / "runs" / "digits" / "killed"
    killed = args(workdir, cache, *train, "run_name=killed")
    kill_after_checkpoint(killed, workdir, run_dir, 1, min_step=22)  # the checkpoint after epoch 2
    saved = checkpoint.position(checkpoint.latest(run_dir))
    assert (saved["epoch"], saved["best"]["epoch"], saved["best"]["stale"]) == (3, 1, 1)
    resumed = ok(cli(killed, cwd=workdir))
    assert "resuming from" in resumed.stdout
    again = json.loads((run_dir / "summary.json").read_text())
    for key in ("epochs", "steps", "best/epoch", "best/step", "stopped_early", "stopped_early/reason"):
        assert again[key] == whole[key], key
    assert again["best/eval/loss"] == pytest.approx(whole["best/eval/loss"], rel=1e-9)
    best, reference = load_file(run_dir / "best.safetensors"), load_file(workdir / "runs/digits/whole/best.safetensors")
    assert all(best[k].equal(reference[k]) for k in reference)
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["status"], record["attempt"]) == ("finished", 2)
    assert record["first_started"] <= record["started"] <= record["ended"]
    assert record["resumed_from"].endswith("step-00000022")


def check_run_record(record: dict) -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert record["git"]["sha"] == head and record["git"]["source"] == "git"
    assert isinstance(record["git"]["dirty"], bool)
    assert record["versions"]["torch"] == torch.__version__.split("+")[0]
    assert set(record["versions"]) == {"python", "torch", "accelerate", "datasets"}
    assert record["argv"][0].endswith("launch/train.py")
    assert (record["status"], record["exit_code"], record["error"]) == ("finished", 0, None)
    assert (record["device"], record["mixed_precision"], record["compile"]) == ("cpu", "no", False)
    assert record["started"] <= record["ended"] and record["host"]


@pytest.mark.slow
def test_run_record_on_failures(workdir, cache):
    # A monitored key the evaluation does not report: exit 2 at the first evaluation, naming the real ones.
    bad = cli(args(workdir, cache, "trainer.epochs=2", "trainer.batch_size=256", "checkpoint.monitor=eval/acc",
                   "run_name=badkey"), cwd=workdir)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert "checkpoint.monitor=eval/acc is not a metric" in bad.stderr and "eval/accuracy, eval/f1_macro" in bad.stderr
    record = json.loads((workdir / "runs" / "digits" / "badkey" / "run.json").read_text())
    assert (record["status"], record["exit_code"]) == ("failed", 2) and "eval/acc" in record["error"]

    nan = cli(args(workdir, cache, "optimizer.lr=1e30", "trainer.log_every=5", "run_name=nan"), cwd=workdir)
    assert nan.returncode == 3, nan.stderr[-3000:]
    record = json.loads((workdir / "runs" / "digits" / "nan" / "run.json").read_text())
    assert (record["status"], record["exit_code"]) == ("diverged", 3) and "training diverged" in record["error"]
    assert len(run_dirs(workdir / "runs", "digits")) == 2


def test_early_stopping_and_monitor_values_are_checked():
    digits = recipes.load("digits")
    for value in (0, -1):
        with pytest.raises(ConfigError, match=f"trainer.early_stopping_patience={value}: must be >= 1"):
            config.build([f"trainer.early_stopping_patience={value}"], digits)
    with pytest.raises(ConfigError, match="checkpoint.monitor='accuracy'.*checkpoint.monitor=eval/loss"):
        config.build(["checkpoint.monitor=accuracy"], digits)
    with pytest.raises(ConfigError, match="choose one of: auto, max, min"):
        config.build(["checkpoint.mode=maximum"], digits)
    assert config.build(["checkpoint.mode=MIN"], digits).checkpoint.mode.name == "min"


class OneProcess:
    num_processes = 1


def test_the_default_monitor_and_mode_follow_the_metrics():
    digits = recipes.load("digits")
    best = Best.of(config.build([], digits))
    assert best.update({"eval/loss": 0.5, "eval/accuracy": 0.8}, 10, 1, OneProcess())
    assert (best.monitor, best.mode) == ("eval/accuracy", "max")
    assert not best.update({"eval/loss": 0.4, "eval/accuracy": 0.8}, 20, 2, OneProcess())  # equal is no better
    assert (best.value, best.epoch, best.stale, best.stopped_early) == (0.8, 1, 1, None)
    regression = Best.of(config.build(["trainer.early_stopping_patience=1"], digits))
    assert regression.update({"eval/loss": 2.0, "eval/mse": 4.0}, 10, 1, OneProcess())
    assert (regression.monitor, regression.mode) == ("eval/loss", "min")
    assert not regression.update({"eval/loss": 2.5, "eval/mse": 3.0}, 20, 2, OneProcess())
    assert regression.stopped_early == "eval/loss did not improve for 1 evaluation (best 2 at epoch 1)"
    assert Best(None, None, None).update({"eval/mse": 4.0, "eval/accuracy": 0.1, "eval/loss": 1.0}, 1, 1,
                                         OneProcess())
    mse = Best.of(config.build(["checkpoint.monitor=eval/mse"], digits))
    mse.update({"eval/mse": 4.0, "eval/loss": 1.0}, 1, 1, OneProcess())
    assert mse.mode == "min"

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
from pipeline.best import Best
from pipeline.errors import ConfigError
from pipeline.recipe_contract import load_recipe

# watching it with mode=max makes epoch 1 the best and every later epoch "no better": the best weights are
# not the final ones, and patience 2 stops the run after epoch 3 of 5.
FIRST_IS_BEST = [
    "checkpoint.monitor=eval/loss",
    "checkpoint.mode=max",
    "trainer.batch_size=128",
    "trainer.epochs=5",
    "trainer.early_stopping_patience=2",
    "trainer.log_every=2",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # digits prepared once for the whole module


def args(workdir, cache, *extra):
    return common(workdir, f"data.cache_dir={cache}", *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    """The one-process run the other runs are compared with."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = ok(cli(args(workdir, cache, *FIRST_IS_BEST, "run_name=p1"), cwd=workdir))
    return workdir / "runs" / "digits" / "p1", result


def metrics_lines(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read(path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_early_stopping_keeps_the_best_epoch_on_1_and_2_processes(workdir, cache, uninterrupted):
    one_dir, one_result = uninterrupted
    two_result = ok(cli(args(workdir, cache, *FIRST_IS_BEST, "run_name=p2"), cwd=workdir, processes=2))
    two_dir = workdir / "runs" / "digits" / "p2"
    for processes, run_dir, result in ((1, one_dir, one_result), (2, two_dir, two_result)):
        assert result.stdout.count("stopping early after epoch 3") == 1  # said once, by the main process
        s = read(run_dir / "summary.json")
        assert (s["epochs"], s["steps"]) == (3, 33)  # stopped after 3 of 5 epochs
        assert s["stopped_early"] is True
        assert s["stopped_early/reason"].startswith("eval/loss did not improve for 2 evaluations (best ")
        assert (s["best/epoch"], s["best/step"], s["best/mode"]) == (1, 11, "max")
        # The best value is epoch 1's evaluation as the local record logged it.
        assert s["best/eval/loss"] == next(x["eval/loss"] for x in metrics_lines(run_dir) if "eval/loss" in x)
        assert not checkpoint.folder(run_dir).exists()  # finished normally: final weights, no checkpoints

        best, final = load_file(run_dir / "best.safetensors"), load_file(run_dir / "model.safetensors")
        assert best.keys() == final.keys()
        assert not all(best[k].equal(final[k]) for k in best)  # epoch 1's weights, not epoch 3's
        # Plain module keys: they load into the recipe's own model as it is built.
        digits = load_recipe("digits")
        digits.model(config.build([], digits), {}).load_state_dict(best, strict=True)

        record = read(run_dir / "run.json")
        assert (record["status"], record["exit_code"], record["num_processes"]) == ("finished", 0, processes)
        assert "trainer.early_stopping_patience=2" in record["argv"]
    check_run_record(read(one_dir / "run.json"))
    one, two = read(one_dir / "summary.json"), read(two_dir / "summary.json")
    for key in ("best/epoch", "best/step", "stopped_early", "epochs", "steps"):
        assert one[key] == two[key], key
    assert one["best/eval/loss"] == pytest.approx(two["best/eval/loss"], rel=1e-5)


@pytest.mark.slow
def test_a_resumed_run_keeps_the_best_so_far_and_the_patience_count(workdir, cache, uninterrupted):
    # Killed during epoch 3, the resume must know both epoch 1's value and that epoch 2 already missed:
    # a run that forgot either would call epoch 3 the best, or go on to epoch 4.
    whole_dir, _ = uninterrupted
    whole = read(whole_dir / "summary.json")
    run_dir = workdir / "runs" / "digits" / "killed"
    killed = args(workdir, cache, *FIRST_IS_BEST, "run_name=killed")
    kill_after_checkpoint(killed, workdir, run_dir, 1, min_step=22)  # the checkpoint after epoch 2
    saved = checkpoint.position(checkpoint.latest(run_dir))
    assert (saved["epoch"], saved["best"]["epoch"], saved["best"]["stale"]) == (3, 1, 1)
    resumed = ok(cli(killed, cwd=workdir))
    assert "resuming from" in resumed.stdout
    again = read(run_dir / "summary.json")
    for key in ("epochs", "steps", "best/epoch", "best/step", "stopped_early", "stopped_early/reason"):
        assert again[key] == whole[key], key
    assert again["best/eval/loss"] == pytest.approx(whole["best/eval/loss"], rel=1e-9)
    best, reference = load_file(run_dir / "best.safetensors"), load_file(whole_dir / "best.safetensors")
    assert all(best[k].equal(reference[k]) for k in reference)
    record = read(run_dir / "run.json")
    assert (record["status"], record["attempt"]) == ("finished", 2)
    assert record["first_started"] <= record["started"] <= record["ended"]
    assert record["resumed_from"].endswith("step-00000022")


@pytest.mark.slow
def test_the_summary_evaluate_and_predict_use_the_best_weights_unless_told_final(uninterrupted):
    run_dir, result = uninterrupted
    s = read(run_dir / "summary.json")
    first, last = [x for x in metrics_lines(run_dir) if "eval/loss" in x][::2]  # epochs 1 and 3
    # Scored on epoch 1's weights (the best), evaluated again at the end: epoch 1's numbers, not epoch 3's.
    assert s["weights"] == "best" and s["eval/loss"] == pytest.approx(first["eval/loss"], rel=1e-6)
    assert s["eval/accuracy"] == pytest.approx(first["eval/accuracy"], abs=1e-6) and s["eval/loss"] != last["eval/loss"]
    line = next(x for x in result.stdout.splitlines() if x.startswith("done: "))
    assert f"weights: best (epoch 1 of 3, eval/loss {s['best/eval/loss']:.4f}) eval/accuracy=" in line
    workdir = run_dir.parent.parent.parent
    ok(cli([f"run={run_dir}"], cwd=workdir, script="evaluate"))
    ok(cli([f"run={run_dir}", "weights=final"], cwd=workdir, script="evaluate"))
    reported, final = read(run_dir / "evaluations" / "eval.json"), read(run_dir / "evaluations" / "eval-final.json")
    assert reported["weights"] == "best.safetensors"
    assert reported["eval/loss"] == pytest.approx(s["eval/loss"], rel=1e-6)
    assert final["weights"] == "model.safetensors" and final["eval/loss"] == pytest.approx(last["eval/loss"], rel=1e-6)
    from pipeline import predict

    assert predict.parse_argv([f"run={run_dir}", f"input={run_dir}"])[2].weights == "best"


@pytest.mark.slow
def test_checkpoint_weights_final_reports_and_evaluates_the_last_steps_weights(workdir, cache):
    from pipeline import runs

    result = ok(
        cli(
            args(
                workdir,
                cache,
                "checkpoint.monitor=eval/loss",
                "checkpoint.mode=max",
                "trainer.epochs=2",
                "trainer.batch_size=256",
                "checkpoint.weights=final",
                "run_name=final",
            ),
            cwd=workdir,
        )
    )
    run_dir = workdir / "runs" / "digits" / "final"
    s, last = read(run_dir / "summary.json"), [x for x in metrics_lines(run_dir) if "eval/loss" in x][-1]
    assert (s["weights"], s["best/epoch"]) == ("final", 1) and s["eval/loss"] == last["eval/loss"]
    assert "samples/s weights: final eval/accuracy=" in result.stdout
    assert runs.parse_argv([f"run={run_dir}"])[2].weights == "final"


def test_the_done_line_says_the_weights_then_test_then_averages_before_classes():
    from pipeline.report import summary_line

    per_class = {f"{split}/f1/{c}": 0.5 for split in ("eval", "test") for c in ("cat", "dog", "owl")}
    summary = {
        "recipe": "image_folder",
        "epochs": 11,
        "steps": 99,
        "train/samples_per_s": 10.0,
        "run_dir": "r",
        "weights": "best",
        "eval/loss": 0.3,
        "eval/samples": 30,
        "eval/accuracy": 0.97,
        **per_class,
        "eval/f1_micro": 0.97,
        "eval/f1_macro": 0.96,
        "test/loss": 0.4,
        "test/accuracy": 0.9,
        "test/f1_macro": 0.89,
        "best/eval/accuracy": 0.97,
        "best/epoch": 9,
    }
    assert summary_line(summary) == (
        "done: image_folder 11 epochs 99 steps 10 samples/s weights: best (epoch 9 of 11, eval/accuracy 0.9700) "
        "test/accuracy=0.9000 test/f1_macro=0.8900 eval/accuracy=0.9700 eval/f1_macro=0.9600 test/loss=0.4000 "
        "eval/loss=0.3000 eval/f1_micro=0.9700 test/f1/cat=0.5000 -> r"
    )
    assert "samples/s weights: final test/accuracy=0.9000" in summary_line({**summary, "weights": "final"})
    # Counts as a person writes them: one epoch, thousands grouped.
    assert summary_line({**summary, "epochs": 1, "steps": 2430}).startswith("done: image_folder 1 epoch 2,430 steps ")


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
    bad = cli(
        args(
            workdir,
            cache,
            "trainer.epochs=2",
            "trainer.batch_size=256",
            "checkpoint.monitor=eval/acc",
            "run_name=badkey",
        ),
        cwd=workdir,
    )
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
    digits = load_recipe("digits")
    for value in (0, -1):
        with pytest.raises(ConfigError, match=f"trainer.early_stopping_patience={value}: must be >= 1"):
            config.build([f"trainer.early_stopping_patience={value}"], digits)
    with pytest.raises(ConfigError, match="checkpoint.monitor='accuracy'.*checkpoint.monitor=eval/loss"):
        config.build(["checkpoint.monitor=accuracy"], digits)
    with pytest.raises(ConfigError, match="choose one of: auto, max, min"):
        config.build(["checkpoint.mode=maximum"], digits)
    assert config.build(["checkpoint.mode=MIN"], digits).checkpoint.mode.name == "min"
    # A sample count is no score: monitoring it is refused, and the choices offered are the metrics alone.
    counted = Best.of(config.build(["checkpoint.monitor=eval/samples"], digits))
    with pytest.raises(ConfigError, match=r"eval/samples is not a metric.*choose one of: eval/loss, eval/accuracy$"):
        counted.update({"eval/loss": 0.5, "eval/samples": 360, "eval/accuracy": 0.8}, 10, 1, OneProcess())


class OneProcess:
    num_processes = 1


def test_the_default_monitor_and_mode_follow_the_metrics():
    digits = load_recipe("digits")
    best = Best.of(config.build([], digits))
    assert best.update({"eval/loss": 0.5, "eval/accuracy": 0.8}, 10, 1, OneProcess())
    assert (best.monitor, best.mode) == ("eval/accuracy", "max")
    assert not best.update({"eval/loss": 0.6, "eval/accuracy": 0.8}, 20, 2, OneProcess())  # equal is no better
    assert (best.value, best.epoch, best.stale, best.stopped_early) == (0.8, 1, 1, None)
    # ... unless its eval/loss is lower: a tie of a coarse metric goes to the better-fitted model.
    assert best.update({"eval/loss": 0.4, "eval/accuracy": 0.8}, 30, 3, OneProcess())
    assert (best.value, best.epoch, best.stale, best.loss) == (0.8, 3, 0, 0.4)
    assert Best.of(config.build([], digits), best.state()).loss == 0.4  # kept in checkpoints
    regression = Best.of(config.build(["trainer.early_stopping_patience=1"], digits))
    assert regression.update({"eval/loss": 2.0, "eval/mse": 4.0}, 10, 1, OneProcess())
    assert (regression.monitor, regression.mode) == ("eval/loss", "min")
    assert not regression.update({"eval/loss": 2.5, "eval/mse": 3.0}, 20, 2, OneProcess())
    assert regression.stopped_early == "eval/loss did not improve for 1 evaluation (best 2 at epoch 1)"
    assert Best(None, None, None).update({"eval/mse": 4.0, "eval/accuracy": 0.1, "eval/loss": 1.0}, 1, 1, OneProcess())
    mse = Best.of(config.build(["checkpoint.monitor=eval/mse"], digits))
    mse.update({"eval/mse": 4.0, "eval/loss": 1.0}, 1, 1, OneProcess())
    assert mse.mode == "min"

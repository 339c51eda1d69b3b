"""End-of-run pictures: curves.png and, for classifiers, confusion_matrix.png, drawn from a real run's records."""

import json

import pytest
from accelerate.state import AcceleratorState
from conftest import common, run_dirs
from matplotlib.image import imread

from pipeline import cli as pipeline_cli
from pipeline import plots
from pipeline.loop import train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One real digits run of 2 epochs (a few seconds), trained in this process."""
    workdir = tmp_path_factory.mktemp("plots")
    _, cfg = pipeline_cli.parse(common(workdir, "trainer.epochs=2"))
    try:
        summary = train(cfg)
    finally:
        AcceleratorState._reset_state(True)
    return run_dirs(workdir / "runs", "digits")[0], summary


def test_a_finished_classifier_run_draws_its_curves_and_confusion_matrix(digits_run):
    run_dir, summary = digits_run
    for name in ("curves.png", "confusion_matrix.png"):
        path = run_dir / name
        assert path.read_bytes()[:8] == PNG
        height, width, _ = imread(path).shape  # a whole image PNG readers decode
        assert height > 300 and width > 300
    # The matrix drawn is the reported weights' evaluation (its title says which): every eval sample counted
    # once, the diagonal its accuracy.
    assert plots.which_weights(summary) == f"{summary['weights']} weights" + (
        f" (epoch {summary['best/epoch']})" if summary["weights"] == "best" else ""
    )
    assert plots.which_weights({"weights": "final", "best/epoch": 1}) == "final weights"
    matrix = summary["eval/confusion_matrix"]
    assert len(matrix) == len(matrix[0]) == 10
    assert sum(map(sum, matrix)) == summary["eval/samples"] == summary["data"]["eval"]["rows"] == 360
    assert sum(matrix[i][i] for i in range(10)) / 360 == pytest.approx(summary["eval/accuracy"], abs=1e-6)
    assert json.loads((run_dir / "summary.json").read_text())["eval/confusion_matrix"] == matrix
    # The curves come from the local record: one point per epoch for the train loss and each eval metric.
    train_loss, evals = plots.per_epoch(plots.read_lines(run_dir / "metrics.jsonl"), [str(d) for d in range(10)])
    assert sorted(train_loss) == [1, 2] and set(evals) == {"eval/loss", "eval/accuracy", "eval/f1_macro"}
    assert evals["eval/accuracy"][2] == summary["eval/accuracy"]


def test_a_picture_that_fails_is_one_line_and_the_others_are_still_drawn(digits_run, monkeypatch):
    run_dir, summary = digits_run
    (run_dir / "curves.png").unlink()

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts\ndetails")

    monkeypatch.setattr(plots, "confusion_matrix", broken)
    said = []
    written = plots.write(run_dir, summary, [str(d) for d in range(10)], say=said.append)
    assert written == [run_dir / "curves.png"] and (run_dir / "curves.png").read_bytes()[:8] == PNG
    assert said == ["plots: confusion_matrix.png was not written (RuntimeError: no fonts)"]

"""launch/compare.py: the table of differing config keys and results, its CSV, the curves, and bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cli, common, environment, ok


def compare(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "compare.py"), *map(str, args)],
        cwd=cwd,
        env=environment(env=env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def parse(markdown: str) -> tuple[list[str], list[list[str]]]:
    lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.strip().splitlines()]
    assert set(lines[1]) == {"---"}, markdown
    return lines[0], lines[2:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Two real digits runs, one epoch each, that differ in optimizer.lr only."""
    work = tmp_path_factory.mktemp("compare")
    for name, lr in (("fast", "0.01"), ("slow", "0.003")):
        ok(
            cli(
                ["recipe=digits", "trainer.epochs=1", f"optimizer.lr={lr}", f"run_name={name}", *common(work)], cwd=work
            )
        )
    return work


@pytest.mark.slow
def test_table_of_real_runs(trained):
    out = ok(compare("runs/digits/*", "--csv", "table.csv", cwd=trained))
    assert "compare: wrote the table as CSV to table.csv" in out.stderr  # the table alone on stdout
    header, rows = parse(out.stdout)
    assert header[:3] == ["run", "status", "optimizer.lr"]  # the one key that differs; never output_dir etc.
    assert header[3:] == [
        "eval/loss",
        "eval/accuracy",
        "eval/f1_macro",
        "best/eval/accuracy",
        "best/epoch",
        "stopped_early",
        "samples/s",
        "duration_s",
    ]
    assert [r[:3] for r in rows] == [["fast", "done", "0.01"], ["slow", "done", "0.003"]]
    for row in rows:
        summary = json.loads((trained / "runs" / "digits" / row[0] / "summary.json").read_text())
        assert float(row[4]) == pytest.approx(summary["eval/accuracy"], rel=1e-3)
        assert row[7:9] == ["1", "False"]
        assert float(row[9].replace(",", "")) == pytest.approx(summary["train/samples_per_s"], abs=1)
    with open(trained / "table.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == header and [r[:3] for r in table[1:]] == [r[:3] for r in rows]
    assert float(table[1][4]) == json.loads((trained / "runs/digits/fast/summary.json").read_text())["eval/accuracy"]

    chosen = ok(
        compare(trained / "runs/digits/fast", trained / "runs/digits/slow", "--metrics", "eval/accuracy", cwd=trained)
    )
    assert parse(chosen.stdout)[0] == [
        "run",
        "status",
        "optimizer.lr",
        "eval/accuracy",
        "best/eval/accuracy",
        "best/epoch",
        "stopped_early",
        "samples/s",
        "duration_s",
    ]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_plot_of_real_runs(trained):
    ok(compare("runs/digits/*", "--plot", "acc.png", "--metric", "eval/accuracy", cwd=trained))
    assert (trained / "acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = compare("runs/digits/*", "--plot", "x.png", "--metric", "eval/nothing", cwd=trained)
    assert missing.returncode == 2 and "eval/nothing" in missing.stderr and "eval/accuracy" in missing.stderr


def write_run(path: Path, lr: float, summary: dict | None, lines: list[dict]) -> Path:
    path.mkdir(parents=True)
    config = {
        "recipe": "digits",
        "output_dir": str(path.parent),
        "run_name": path.name,
        "data": {"cache_dir": str(path / "cache"), "root": "data"},
        "optimizer": {"lr": lr, "betas": [0.9, 0.99]},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_unfinished_run_shows_its_last_values(tmp_path):
    write_run(
        tmp_path / "done",
        0.1,
        {"eval/loss": 0.5, "eval/accuracy": 0.9, "train/samples_per_s": 100.0, "time/total_s": 12.34},
        [{"step": 10, "eval/accuracy": 0.9}],
    )
    write_run(
        tmp_path / "crashed",
        0.2,
        None,
        [{"step": 5, "train/loss": 1.0}, {"step": 5, "eval/accuracy": 0.7}, {"step": 9, "train/loss": 0.8}],
    )
    out = ok(compare(tmp_path / "crashed", tmp_path / "done", cwd=tmp_path))
    header, rows = parse(out.stdout)
    assert header == ["run", "status", "optimizer.lr", "eval/loss", "eval/accuracy", "samples/s", "duration_s"]
    assert rows == [
        ["crashed", "unfinished", "0.2", "-", "0.7", "-", "-"],
        ["done", "done", "0.1", "0.5", "0.9", "100", "12.3"],
    ]


def test_not_a_run_folder_exits_2(tmp_path):
    write_run(tmp_path / "run", 0.1, {"eval/loss": 0.5}, [])
    (tmp_path / "notes").mkdir()
    bad = compare(tmp_path / "run", tmp_path / "notes", cwd=tmp_path)
    assert bad.returncode == 2 and "notes: not a run folder" in bad.stderr and not bad.stdout
    nothing = compare(tmp_path / "absent*", cwd=tmp_path)
    assert nothing.returncode == 2 and "matches no folder" in nothing.stderr


def test_plot_without_matplotlib_says_how_to_install(tmp_path):
    write_run(tmp_path / "run", 0.1, {"eval/loss": 0.5}, [{"step": 1, "eval/loss": 0.5}])
    hidden = tmp_path / "hide"  # a matplotlib that fails to import, as where it is not installed
    (hidden / "matplotlib").mkdir(parents=True)
    (hidden / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib')\n")
    out = compare(tmp_path / "run", "--plot", "x.png", cwd=tmp_path, env={"PYTHONPATH": f"{hidden}:{ROOT}"})
    assert out.returncode == 2 and "pip install matplotlib" in out.stderr


def test_damaged_records_are_named_and_the_rest_compared(tmp_path):
    write_run(tmp_path / "done", 0.1, {"eval/loss": 0.5}, [{"step": 10, "eval/loss": 0.5}])
    # A run killed while writing a line: the last one is cut short; another whose summary.json was cut.
    killed = write_run(tmp_path / "killed", 0.2, None, [{"step": 5, "eval/loss": 0.9}])
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "eval/lo')
    damaged = write_run(tmp_path / "damaged", 0.3, None, [{"step": 5, "eval/loss": 0.7}])
    (damaged / "summary.json").write_text('{"eval/loss": 0.')
    out = ok(compare(*(tmp_path / n for n in ("done", "killed", "damaged")), cwd=tmp_path))
    header, rows = parse(out.stdout)
    assert [row[:2] + [row[header.index("eval/loss")]] for row in rows] == [
        ["done", "done", "0.5"],
        ["killed", "unfinished", "0.9"],
        ["damaged", "unfinished", "0.7"],
    ]
    assert f"{killed / 'metrics.jsonl'} line 2 cannot be read" in out.stderr and "left out" in out.stderr
    assert f"{damaged / 'summary.json'} cannot be read" in out.stderr and "Traceback" not in out.stderr

    (damaged / "config.yaml").write_text("optimizer: {lr: [0.3\n")
    bad = compare(tmp_path / "done", damaged, cwd=tmp_path)
    assert bad.returncode == 2 and f"{damaged / 'config.yaml'} cannot be read" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_outputs_into_a_folder_or_a_missing_one(tmp_path):
    write_run(tmp_path / "run", 0.1, {"eval/loss": 0.5}, [{"step": 1, "eval/loss": 0.5}])
    (tmp_path / "out").mkdir()
    folder = compare(tmp_path / "run", "--csv", tmp_path / "out", cwd=tmp_path)
    assert folder.returncode == 2 and "--csv" in folder.stderr and "is a folder; name a file in it" in folder.stderr
    assert "Traceback" not in folder.stderr
    ok(compare(tmp_path / "run", "--csv", tmp_path / "new" / "table.csv", cwd=tmp_path))
    assert (tmp_path / "new" / "table.csv").read_text().startswith("run,status")
    if importlib.util.find_spec("matplotlib") is not None:
        ok(compare(tmp_path / "run", "--plot", tmp_path / "plots" / "loss.png", cwd=tmp_path))
        assert (tmp_path / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
        wrong = compare(tmp_path / "run", "--plot", tmp_path / "loss.txt", cwd=tmp_path)
        assert wrong.returncode == 2 and "--plot" in wrong.stderr and "Traceback" not in wrong.stderr

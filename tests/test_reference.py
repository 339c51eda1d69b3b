"""launch/reference.py: the generic recipes on public data written as files, beside baselines fitted on the
same split read back from the run's own shards; its runs and data stay in --work, outside the repository."""

import json
import subprocess
import sys

import datasets
import pytest
from conftest import ROOT, cli, environment, ok

SCRIPT = str(ROOT / "launch" / "reference.py")


@pytest.mark.slow
def test_quick_tables_row_beside_its_baselines(tmp_path):
    work, out = tmp_path / "work", tmp_path / "reference.md"
    result = ok(
        subprocess.run(
            [sys.executable, SCRIPT, "--quick", "--only", "tables", "--work", str(work), "--out", str(out)],
            cwd=tmp_path,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    )
    (row,) = json.loads((work / "reference.json").read_text())
    assert row["name"] == "iris" and row["metric"] == "eval/accuracy"
    # Both runs finished and scored; scikit-learn's baselines beat chance (1/3) by far on the same 30 rows.
    for run in row["runs"].values():
        assert "error" not in run and 0 <= run["value"] <= 1 and run["rows"] == [120, 30], run
    # Beside the final weights' score, the best epoch's (what checkpoint.weights=best reports), read from the run.
    epoch, best = row["runs"]["default"]["best_epoch"]
    assert 1 <= epoch <= 20 and 0 <= best <= 1
    assert set(row["baselines"]) == {"logistic / ridge", "gradient boosting"}
    assert all(b["value"] >= 0.8 for b in row["baselines"].values()), row["baselines"]
    # The baselines read the default run's shards: its eval split, the rows the run's metric counted.
    shards = datasets.load_from_disk(row["runs"]["default"]["shards"])
    assert (shards["train"].num_rows, shards["eval"].num_rows) == (120, 30)
    table = out.read_text()
    assert table in result.stdout
    assert "| iris | 120/30 | accuracy | " in table and "| logistic / ridge | gradient boosting |" in table
    assert (work / "data" / "iris" / "iris.csv").read_text().startswith("sepal length (cm),")


def test_work_inside_the_repository_is_refused(tmp_path):
    inside = ROOT / "reference-work-test"
    result = subprocess.run(
        [sys.executable, SCRIPT, "--work", str(inside)],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "inside the repository" in result.stderr and "Fix: --work /tmp/reference" in result.stderr
    assert not inside.exists()


@pytest.mark.slow
def test_image_set_scored_on_a_test_folder_apart(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from launch.reference import image_baselines
    from launch.reference_data import digits_images

    (tmp_path / "digits").mkdir()
    args = digits_images(tmp_path / "digits")
    # A fifth of each class in the test folder, the rest in train; every image once, none in both.
    files = {split: sorted((tmp_path / "digits" / split).rglob("*.png")) for split in ("train", "test")}
    per_class = {
        split: {c: sum(f.parent.name == c for f in found) for c in map(str, range(10))}
        for split, found in files.items()
    }
    assert len(files["train"]) + len(files["test"]) == 1797 and len(files["test"]) == 360
    assert all(
        abs(per_class["test"][c] - 0.2 * (per_class["train"][c] + per_class["test"][c])) <= 1 for c in per_class["test"]
    )
    assert not {f.name for f in files["train"]} & {f.name for f in files["test"]}
    ok(cli([*args, f"data.cache_dir={tmp_path / 'cache'}"], tmp_path, script="prepare"))
    (shards,) = (tmp_path / "cache" / "image_folder").iterdir()
    data = datasets.load_from_disk(str(shards))
    assert data["test"].num_rows == 360 and data["train"].num_rows + data["eval"].num_rows == 1437
    # The baselines fit the train split and score the test split (360 images): far above chance (0.1).
    found = image_baselines(str(shards))
    assert set(found) == {"logistic", "gradient boosting"}
    assert all(0.9 <= value <= 1 for value, _ in found.values()), found


def test_table_sets_write_as_a_user_would_and_prepare(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from launch.reference_data import ENTRIES
    from pipeline import cli as pipeline_cli
    from pipeline import shard_store

    written = {}
    for entry in (e for e in ENTRIES if e.family == "tables"):
        (tmp_path / entry.name).mkdir()
        written[entry.name] = entry.write(tmp_path / entry.name)
    # Four class tables and five regression tables, each one CSV with its header, as published.
    expected = {
        "iris": (150, "species"),
        "wine": (178, "cultivar"),
        "breast_cancer": (569, "diagnosis"),
        "water_potability": (3275, "Potability"),
        "diabetes": (442, "progression"),
        "grunfeld": (220, "invest"),
        "engel": (235, "foodexp"),
        "fair": (6366, "affairs"),
        "randhie": (20190, "mdvis"),
    }
    assert set(written) == set(expected)
    for name, (rows, target) in expected.items():
        args = written[name]
        assert args[0] == "recipe=tabular" and args[2] == f"data.target={target}", args
        path = tmp_path / name / args[1].rsplit("/", 1)[-1]
        assert args[1] == f"data.file={path}" and path.exists()
        lines = path.read_text().splitlines()
        assert len(lines) == rows + 1 and target in lines[0].split(","), (name, lines[0])
    # grunfeld's firm is written as text: the recipe one-hots it and infers a regression on invest.
    recipe, cfg = pipeline_cli.parse([*written["grunfeld"], f"data.cache_dir={tmp_path / 'cache'}"])
    _, meta = shard_store.open_shards(shard_store.prepare(recipe, cfg, log=lambda *a: None))
    assert meta["task"] == "regression" and meta["categorical"] == ["firm"]
    assert meta["numbers"] == ["value", "capital", "year"] and len(meta["categories"]["firm"]) == 11

"""recipe=tabular: a table of one's own trains with no code; the task is inferred and said; text columns are
one-hot; statistics come from the train rows and travel with the run (predict uses them)."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, cli, common, environment, launch_flags, ok, run_dirs
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import cli as pipeline_cli
from pipeline import shard_store, tensor_rows
from pipeline.errors import ConfigError, DataError
from recipes import _table_cells, _table_statistics, _tables
from recipes._table_cells import Column

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def sklearn_csv(folder: Path, load, target: str, name: str) -> Path:
    """A scikit-learn table as a user writes it: its measurements, and its target as the class names."""
    frame = load(as_frame=True)
    table = frame.data.assign(**{target: np.asarray(frame.target_names)[frame.target]})
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / name, index=False)
    return folder / name


def cancer_csv(folder: Path) -> Path:
    """scikit-learn's breast cancer set (569 rows, 30 measurements) with its target as the words."""
    return sklearn_csv(folder, load_breast_cancer, "diagnosis", "cancer.csv")


def iris_csv(folder: Path) -> Path:
    """scikit-learn's iris set: 150 rows, 4 measurements and the species by name."""
    return sklearn_csv(folder, load_iris, "species", "iris.csv")


def houses(folder: Path, n: int = 600, seed: int = 0) -> Path:
    """A regression table: price linear in two numbers and a text column, plus noise (R^2 ~0.9)."""
    rng = np.random.default_rng(seed)
    area, rooms = rng.uniform(30, 150, n), rng.integers(1, 6, n).astype(float)
    town = rng.choice(["north", "south", "east"], n)
    price = 2.5 * area + 12 * rooms + np.select([town == "north", town == "south"], [40, -25], 0) + rng.normal(0, 25, n)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"area": area.round(2), "rooms": rooms, "town": town, "price": price.round(2)}).to_csv(
        folder / "houses.csv", index=False
    )
    return folder / "houses.csv"


def parse(workdir: Path, path: Path, *args: str):
    return pipeline_cli.parse(
        [
            "recipe=tabular",
            f"data.root={path.parent}",
            f"data.file={path.name}",
            f"data.cache_dir={workdir / 'cache'}",
            *args,
        ]
    )


def prepared(workdir: Path, path: Path, *args: str):
    recipe, cfg = parse(workdir, path, *args)
    splits, meta = shard_store.open_shards(shard_store.prepare(recipe, cfg, log=lambda *a: None))
    return {name: tensor_rows.columns(split) for name, split in splits.items()}, meta


def held_out(rows: int, stratify: np.ndarray | None = None) -> np.ndarray:
    """The row numbers the recipe holds out (data.eval_fraction 0.2, data.split_seed 0)."""
    columns = {"row": np.arange(rows)}
    features = {"row": datasets.Value("int64")}
    if stratify is not None:
        columns["label"], features["label"] = stratify, datasets.ClassLabel(num_classes=int(stratify.max()) + 1)
    split = datasets.Dataset.from_dict(columns, features=datasets.Features(features)).train_test_split(
        test_size=0.2, seed=0, stratify_by_column="label" if stratify is not None else None
    )
    return np.asarray(split["test"]["row"])


@pytest.mark.slow
def test_breast_cancer_csv_trains_with_no_code_and_predicts(workdir):
    path = cancer_csv(workdir / "data")
    result = ok(
        cli(
            common(workdir, "recipe=tabular", f"data.file={path}", "data.target=diagnosis"), cwd=workdir, env=ONE_THREAD
        )
    )
    assert "data: task binary, inferred from the target 'diagnosis' (2 values: benign, malignant)" in result.stdout
    assert "30 number columns -> 'diagnosis' (binary)" in result.stdout
    [run] = run_dirs(workdir / "runs", "tabular")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval/samples"] == 114 and summary["eval/accuracy"] >= 0.95, summary
    matrix = summary["eval/confusion_matrix"]  # rows the true classes: benign, malignant
    assert sum(map(sum, matrix)) == 114 and (matrix[0][0] + matrix[1][1]) / 114 == pytest.approx(
        summary["eval/accuracy"], abs=1e-6
    )
    assert (run / "confusion_matrix.png").exists() and (run / "curves.png").exists()

    # The same CSV, labels and all, predicted with the stored statistics: the held-out rows score as in the run.
    ok(cli([f"run={run}", f"input={path}", f"output={workdir / 'out.csv'}"], cwd=workdir, script="predict"))
    table, truth = pd.read_csv(workdir / "out.csv"), pd.read_csv(path)["diagnosis"]
    assert list(table.columns) == ["line", "class", "p(malignant)"] and len(table) == 569
    rows = held_out(569, (truth == "malignant").to_numpy().astype(int))
    accuracy = (table["class"].to_numpy()[rows] == truth.to_numpy()[rows]).mean()
    assert accuracy == pytest.approx(summary["eval/accuracy"], abs=1e-6)


@pytest.mark.slow
def test_regression_csv_reaches_the_least_squares_r2(workdir):
    path = houses(workdir / "data")
    result = ok(
        cli(
            common(workdir, "recipe=tabular", f"data.file={path}", "data.target=price", "trainer.epochs=40"),
            cwd=workdir,
            env=ONE_THREAD,
        )
    )
    assert "task regression, inferred from the target 'price'" in result.stdout
    assert "2 number columns, 1 categorical (one-hot): town -> 'price' (regression)" in result.stdout
    [run] = run_dirs(workdir / "runs", "tabular")
    summary = json.loads((run / "summary.json").read_text())

    # Ordinary least squares on the same train rows (numbers + one-hot town + intercept), scored on the same
    # held-out rows, in the same units.
    table = pd.read_csv(path)
    x = np.column_stack([table[["area", "rooms"]], pd.get_dummies(table["town"]).to_numpy(float)])
    rows = held_out(len(table))
    train = np.setdiff1d(np.arange(len(table)), rows)
    coef, *_ = np.linalg.lstsq(x[train], table["price"].to_numpy()[train], rcond=None)
    y = table["price"].to_numpy()[rows]
    r2 = 1 - ((y - x[rows] @ coef) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert summary["eval/r2"] == pytest.approx(r2, abs=0.02), (summary["eval/r2"], r2)
    assert summary["eval/mse"] > 100  # the price's units, not standardized ones

    ok(cli([f"run={run}", f"input={path}", f"output={workdir / 'out.csv'}"], cwd=workdir, script="predict"))
    predicted = pd.read_csv(workdir / "out.csv")["price"].to_numpy()[rows]
    assert ((predicted - y) ** 2).mean() == pytest.approx(summary["eval/mse"], rel=1e-4)


@pytest.mark.slow
def test_regression_default_reaches_the_ridge_r2_with_its_final_weights(workdir):
    # scikit-learn's diabetes table (442 rows, 10 numbers) as a CSV: a small, noisy, mostly linear target.
    frame = load_diabetes(as_frame=True).frame.rename(columns={"target": "progression"})
    (workdir / "data").mkdir()
    frame.to_csv(workdir / "data" / "diabetes.csv", index=False)
    args = ("recipe=tabular", f"data.file={workdir / 'data' / 'diabetes.csv'}", "data.target=progression")
    result = ok(cli(common(workdir, *args, "checkpoint.weights=final"), cwd=workdir, env=ONE_THREAD))
    assert "model: hidden layers [32] for regression (model.hidden=null: by task)" in result.stdout
    summary = json.loads((run_dirs(workdir / "runs", "tabular")[0] / "summary.json").read_text())
    assert summary["weights"] == "final"

    # A ridge regression on standardized columns, fitted on the same train rows, scored on the same eval rows.
    rows = held_out(len(frame))
    train = np.setdiff1d(np.arange(len(frame)), rows)
    x, y = frame.drop(columns="progression").to_numpy(), frame["progression"].to_numpy()
    ridge = make_pipeline(StandardScaler(), Ridge()).fit(x[train], y[train]).score(x[rows], y[rows])
    assert summary["eval/r2"] >= ridge - 0.02, (summary["eval/r2"], ridge)


def test_task_inference_one_hot_and_train_only_statistics(workdir):
    path = houses(workdir / "data", n=60)
    splits, meta = prepared(workdir, path, "data.target=price")
    assert meta["task"] == "regression" and meta["categorical"] == ["town"]
    assert meta["feature_names"] == ["area", "rooms", "town=east", "town=north", "town=south"]
    train = splits["train"]["features"].double().numpy()
    assert np.allclose(train[:, :2].mean(0), 0, atol=1e-5) and set(np.unique(train[:, 2:])) == {0.0, 1.0}
    assert np.allclose(splits["train"]["label"].double().mean(), 0, atol=1e-5)  # the target standardized too

    _, meta = prepared(workdir, path, "data.target=rooms")  # 5 whole-number values: classes
    assert meta["task"] == "multiclass" and meta["class_names"] == ["1", "2", "3", "4", "5"]
    _, meta = prepared(workdir, path, "data.target=rooms", "data.task=regression")
    assert meta["task"] == "regression"
    _, meta = prepared(workdir, path, "data.target=town", "data.features=[area,price]")
    assert meta["task"] == "multiclass" and meta["numbers"] == ["area", "price"]


def test_parquet_reads_as_the_same_table(workdir):
    path = houses(workdir / "data", n=60)
    pd.read_csv(path).to_parquet(workdir / "data" / "houses.parquet")
    from_csv, _ = prepared(workdir, path, "data.target=price")
    from_parquet, meta = prepared(workdir, workdir / "data" / "houses.parquet", "data.target=price")
    assert meta["categorical"] == ["town"]
    for split in ("train", "eval"):
        assert (from_csv[split]["features"] == from_parquet[split]["features"]).all()


def test_mistakes_are_named(workdir, monkeypatch):
    path = houses(workdir / "data", n=60)
    recipe, cfg = parse(workdir, path)
    with pytest.raises(
        ConfigError,
        match="needs the column to predict: data.target=<column name>; .* has the columns area, rooms, town, price",
    ):
        recipe.raw_files(cfg)
    with pytest.raises(DataError, match="(?s)no column 'cost' in its header.*set data.target= data.features="):
        prepared(workdir, path, "data.target=cost")
    with pytest.raises(DataError, match=r"no column 'Price' \(did you mean 'price'\?\) in its header"):
        prepared(workdir, path, "data.target=Price")
    with pytest.raises(DataError, match=r"no column 'twn' \(did you mean 'town'\?\) in its header"):
        prepared(workdir, path, "data.target=price", "data.features=[area,rooms,twn]")
    with pytest.raises(DataError, match="data.task=regression, but the target column 'town' holds text"):
        prepared(workdir, path, "data.target=town", "data.task=regression")
    with pytest.raises(DataError, match="data.task=binary, but the target column 'rooms' has 5 values"):
        prepared(workdir, path, "data.target=rooms", "data.task=binary")
    with pytest.raises(ConfigError, match="data.class_names has 2 names, but the target 'town' has 3 values"):
        prepared(workdir, path, "data.target=town", "data.class_names=[a,b]")
    with pytest.raises(ConfigError, match="bad value"):
        parse(workdir, path, "data.target=price", "data.impute=mode")
    # An identifier column left in is no category: named, with the way to leave it out (the limit is 256; 20 here,
    # for a small table).
    monkeypatch.setattr(_table_statistics, "MAX_CATEGORIES", 20)
    table = pd.read_csv(path).assign(customer=[f"c{i:04d}" for i in range(60)])
    path = workdir / "data" / "ids.csv"
    table.to_csv(path, index=False)
    with pytest.raises(DataError, match="'customer' has 48 different texts in the train rows"):
        prepared(workdir, path, "data.target=price", "data.eval_fraction=0.2")


# ---------------------------------------------------------------- the Arrow fast path reads what the checks read

HEADER = "area,rooms,town,price\n"
CLEAN = {  # files Arrow reads in one pass: the same table and line numbers as cell by cell
    "plain": HEADER + "50.5,2,north,180\n70,3,south,210.25\n",
    "empty cells where values are filled": HEADER + "50.5,,north,180\n,3,,210.25\n",
    "quoted cells, CRLF, no last newline": HEADER.replace("\n", "\r\n") + '"50.5",2,"north",180\r\n70,3,south,1e2',
    "a byte-order mark": "\ufeff" + HEADER + "50.5,2,north,180\n70,3,south,210.25\n",
}
CHECKED = {  # files that need the checks' verdict: read cell by cell (refused, or cleaned as the checks clean)
    "a blank line": HEADER + "50.5,2,north,180\n\n70,3,south,210.25\n",
    "a row of empty cells": HEADER + "50.5,2,north,180\n,,,\n70,3,south,210.25\n",
    "spaces around cells": HEADER + " 50.5 ,2, north,180\n70,3,south,210.25\n",
    "a quoted newline": HEADER + '50.5,2,"no\nrth",180\n70,3,south,210.25\n',
    "nan and inf": HEADER + "nan,2,north,180\n70,inf,south,210.25\n",
    "a missing target": HEADER + "50.5,2,north,\n70,3,south,210.25\n",
    "text in a number column": HEADER + "50.5,two,north,180\n70,3,south,210.25\n",
    "a short row": HEADER + "50.5,2,north\n70,3,south,210.25\n",
    "spaces in the header": "area, rooms,town,price\n50.5,2,north,180\n70,3,south,210.25\n",
}
COLUMNS = [
    Column("area", "number", True),
    Column("rooms", "number", True),
    Column("town", "category", True),
    Column("price", "number"),
]


def read_both(tmp_path: Path, text: str):
    """(Arrow's table or its refusal, the checks' table or error), for one file."""
    from types import SimpleNamespace

    path = tmp_path / "houses.csv"
    path.write_bytes(text.encode())
    cfg = SimpleNamespace(data=SimpleNamespace(drop_bad_rows=False))
    fast = _table_cells.read_clean(path, COLUMNS)
    try:
        checked = _tables._read_checked(cfg, path, COLUMNS, header=True, rename="", source="data.file")[0]
    except DataError as e:
        checked = e
    return fast, checked


@pytest.mark.parametrize("case", CLEAN)
def test_clean_files_read_by_arrow_as_the_checks_read_them(tmp_path, case):
    fast, checked = read_both(tmp_path, CLEAN[case])
    assert fast is not None, "expected the fast path"
    pd.testing.assert_frame_equal(fast, checked)
    assert list(fast.attrs["lines"]) == list(checked.attrs["lines"]) == [2, 3]


@pytest.mark.parametrize("case", CHECKED)
def test_files_that_need_a_verdict_are_left_to_the_checks(tmp_path, case):
    fast, _ = read_both(tmp_path, CHECKED[case])
    assert fast is None


# ---------------------------------------------------------------- table defects that would silently change the model


def test_a_name_the_header_gives_twice_is_refused_on_every_reader(workdir):
    """Both CSV readers and Parquet took the first of two same-named columns and never read the second."""
    path = houses(workdir / "data", n=60)
    table = pd.read_csv(path)
    doubled = "area,rooms,area,town,price\n" + "".join(
        f"{r.area},{r.rooms},{r.area * 2},{r.town},{r.price}\n" for r in table.itertuples()
    )
    clean, checked = workdir / "data" / "twice.csv", workdir / "data" / "twice-checked.csv"
    clean.write_text(doubled)
    checked.write_text(doubled.replace("\n", "\n\n", 3))  # a blank line: read cell by cell
    assert _table_cells.read_clean(checked, COLUMNS) is None
    parquet = workdir / "data" / "twice.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table(
            [table.area, table.rooms, table.area * 2, table.town, table.price],
            names=["area", "rooms", "area", "town", "price"],
        ),
        parquet,
    )
    for file in (clean, checked, parquet):
        with pytest.raises(
            DataError,
            match=rf"(?s){file.name}: the header names 1 column more than once: 'area' at "
            r"columns 1, 3\. Only the first.*Fix: give every column its own name",
        ):
            prepared(workdir, file, "data.target=price")
        with pytest.raises(DataError, match="'area' at columns 1, 3"):  # named features too
            prepared(workdir, file, "data.target=price", "data.features=[area,rooms]")
    # A name given twice that is not read changes nothing: the table trains as before.
    _, meta = prepared(workdir, clean, "data.target=price", "data.features=[rooms,town]")
    assert meta["numbers"] == ["rooms"]


def test_the_target_among_the_features_is_refused(workdir):
    path = houses(workdir / "data", n=60)
    with pytest.raises(
        ConfigError,
        match=r"(?s)data.target=price is also among data.features=\['area', 'price'\]: "
        r"the model would be given the answer .*label leak.*Fix: remove price",
    ):
        prepared(workdir, path, "data.target=price", "data.features=[area,price]")


def test_a_target_with_one_class_is_refused(workdir):
    path = houses(workdir / "data", n=60)
    pd.read_csv(path).assign(sold="yes", rooms=3).to_csv(path, index=False)
    for target, task in (("sold", "auto"), ("rooms", "auto"), ("rooms", "multiclass"), ("sold", "multiclass")):
        with pytest.raises(
            DataError,
            match=rf"houses.csv: the target column '{target}' has one value in all 60 rows "
            rf"\({target}=(yes|3)\), so there is nothing to classify",
        ):
            prepared(workdir, path, f"data.target={target}", f"data.task={task}", "data.features=[area]")


def big_target(folder: Path, n: int = 200, scale: float = 1e20) -> Path:
    """A regression table whose target is near 1e20: its squared errors are beyond float32's 3.4e38."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=n)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"x": x, "y": scale * (3 * x + rng.normal(size=n))}).to_csv(folder / "big.csv", index=False)
    return folder / "big.csv"


@pytest.mark.slow
def test_metrics_of_a_target_near_float32s_limit_are_finite_json(workdir):
    from test_tracking import strict_json

    path = big_target(workdir / "data")
    ok(
        cli(
            common(workdir, "recipe=tabular", f"data.file={path}", "data.target=y", "trainer.epochs=1"),
            cwd=workdir,
            env=ONE_THREAD,
        )
    )
    run = run_dirs(workdir / "runs", "tabular")[0]
    summary = strict_json((run / "summary.json").read_text())
    lines = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/mse" in line for line in lines)
    # The errors are ~1e20, so the mse is ~1e40: finite in float64, inf (and r2 nan) in float32.
    assert 1e39 < summary["eval/mse"] < 1e43, summary
    assert -10 < summary["eval/r2"] < 1 and 1e19 < summary["eval/mae"] < 1e21, summary


def test_an_unscaled_target_whose_squares_overflow_float32_is_refused(workdir):
    path = big_target(workdir / "data", n=60)
    with pytest.raises(
        DataError,
        match=r"(?s)big.csv: the target column 'y' reaches .*e\+20, and with "
        r"data.standardize=false .*Fix: leave data.standardize=true",
    ):
        prepared(workdir, path, "data.target=y", "data.standardize=false")
    _, meta = prepared(
        workdir, big_target(workdir / "small", n=60, scale=1e6), "data.target=y", "data.standardize=false"
    )
    assert meta["y_std"] == 1.0


def test_shards_whose_meta_or_checksums_parse_but_have_the_wrong_shape_are_named(workdir):
    import hashlib

    path = houses(workdir / "data", n=60)
    recipe, cfg = parse(workdir, path, "data.target=price")
    shards = shard_store.prepare(recipe, cfg, log=lambda *a: None)
    sums_file = shards / shard_store.CHECKSUM_FILE
    sums = json.loads(sums_file.read_text())
    # meta.json rewritten as a list, its checksum with it: it passes the size and hash checks.
    meta = shards / shard_store.META_FILE
    meta.write_text(json.dumps([json.loads(meta.read_text())]))
    sums[shard_store.META_FILE] = {"size": meta.stat().st_size, "sha256": hashlib.sha256(meta.read_bytes()).hexdigest()}
    sums_file.write_text(json.dumps(sums))
    with pytest.raises(DataError, match=rf"(?s)damaged shard file {meta}: it holds a JSON list.*Fix: rm -r"):
        shard_store.open_shards(shards)
    sums_file.write_text(json.dumps(list(sums)))
    with pytest.raises(DataError, match=rf"damaged shard file {sums_file}: the list of checksums parses, but not"):
        shard_store.open_shards(shards)


# Two epochs of the training loader of a real run's setup, each global batch gathered from every process, checked
# against the train split's rows: printed as one line of JSON.
EPOCHS = """
import json
import torch
from pipeline import build, cli, shard_store, tensor_rows

def run(recipe, cfg):
    run = build.setup(cfg, recipe)
    splits, _ = shard_store.open_shards(shard_store.prepare(recipe, cfg, log=lambda *a: None))
    train = torch.unique(tensor_rows.columns(splits["train"])["features"], dim=0)
    epochs = []
    for epoch in (1, 2):
        run.batch_order.epoch = epoch
        rows = torch.cat([run.accelerator.gather(b["features"]) for b in run.train_loader])
        epochs.append({"rows": rows.tolist(), "distinct": len(torch.unique(rows, dim=0)),
                       "all": torch.equal(torch.unique(rows, dim=0), train)})
    run.accelerator.print(json.dumps({"batch": cfg.trainer.batch_size, "run_batch": run.cfg.trainer.batch_size,
                                      "steps": run.steps_per_epoch, "train": len(train), "epochs": epochs}))

cli.main("train", "", run)
"""


def loader_epochs(workdir: Path, processes: int, *args: str) -> tuple[dict, str]:
    script = workdir / "epochs.py"
    script.write_text(EPOCHS)
    launch = (
        [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            *launch_flags(processes),
        ]
        if processes > 1
        else [sys.executable]
    )
    result = ok(
        subprocess.run(
            [*launch, str(script), *common(workdir / f"p{processes}", *args)],
            cwd=workdir,
            env=environment(processes, {"PYTHONPATH": str(ROOT)}),
            capture_output=True,
            text=True,
            timeout=300,
        )
    )
    return json.loads(result.stdout.splitlines()[-1]), result.stdout


@pytest.mark.slow
def test_a_150_row_table_trains_on_every_row_each_epoch_on_1_or_2_processes(workdir):
    path = iris_csv(workdir / "data")
    # 120 train rows: a batch of 64 would make one step and leave 56 rows out of every epoch. Halved to 16, the
    # ragged last step of 8 is completed by the epoch's first 8 rows, so all 120 train.
    args = ("recipe=tabular", f"data.file={path}", "data.target=species", "trainer.min_steps_per_epoch=8")
    one, log = loader_epochs(workdir, 1, *args)
    assert (
        "data: trainer.batch_size 64 -> 16: the 120 train rows make 8 steps an epoch "
        "(trainer.min_steps_per_epoch=8)" in log
    )
    assert (one["run_batch"], one["steps"]) == (16, 8)
    for epoch in one["epochs"]:
        assert len(epoch["rows"]) == 128 and epoch["all"] and epoch["rows"][120:] == epoch["rows"][:8]
    assert one["epochs"][0]["rows"] != one["epochs"][1]["rows"]  # a new order each epoch
    # Two processes serve the same global batches in the same order: each trains half of every one.
    two, _ = loader_epochs(workdir, 2, *args)
    assert (two["run_batch"], two["steps"]) == (16, 8) and two["epochs"] == one["epochs"]


def test_the_batch_halves_to_the_steps_asked_as_far_as_the_processes_allow(workdir):
    from pipeline import batch_sizes

    _, cfg = parse(workdir, workdir / "t.csv", "data.target=y")
    said = []
    assert batch_sizes.fit_batch(cfg, 120, 1, said.append).trainer.batch_size == 4
    assert cfg.trainer.batch_size == 64  # the config given is left as it was
    assert batch_sizes.fit_batch(cfg, 5000, 1, said.append) is cfg and len(said) == 1  # 79 steps: nothing to do
    # 8 processes cannot split a batch below 8: 15 steps, and the log says why not 16.
    assert batch_sizes.fit_batch(cfg, 120, 8, said.append).trainer.batch_size == 8
    assert said[-1] == (
        "data: trainer.batch_size 64 -> 8: the 120 train rows make 15 steps an epoch "
        "(trainer.min_steps_per_epoch=16); fewer than 16: a smaller batch would not split into "
        "8 process(es) x 1 accumulation step(s)"
    )
    _, off = parse(workdir, workdir / "t.csv", "data.target=y", "trainer.min_steps_per_epoch=0")
    assert batch_sizes.fit_batch(off, 120, 1, said.append) is off


def test_number_like_classes_read_as_written(workdir, capsys):
    # A target written 0, 1, 2 (read as numbers, with room for empty cells) names its classes "0", "1", "2".
    rng = np.random.default_rng(0)
    folder = workdir / "data"
    folder.mkdir()
    pd.DataFrame(
        {"a": rng.normal(size=90).round(3), "b": rng.normal(size=90).round(3), "kind": np.arange(90) % 3}
    ).to_csv(folder / "kinds.csv", index=False)
    _, meta = prepared(workdir, folder / "kinds.csv", "data.target=kind")
    assert meta["class_names"] == ["0", "1", "2"]
    said = capsys.readouterr().out
    assert "(3 values: 0, 1, 2)" in said and "0.0" not in said, said

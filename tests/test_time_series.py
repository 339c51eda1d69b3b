"""recipe=time_series: a series CSV of one's own, by header name; its grid (order, duplicates, off-grid and missing
timestamps, empty values), the horizon, and predictions from a run that give back its eval metrics."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cli, common, ok, run_dirs

from pipeline import cli as pipeline_cli
from pipeline import runs, shard_store, tensor_rows
from pipeline.errors import ConfigError, DataError

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
NAMES = ("data.time_column=date", "data.value_column=load")


def write_series(path: Path, n: int = 600, start: str = "2024-03-01 00:00") -> Path:
    """Hourly load with a daily pattern plus noise, a header `date,load` and an unrelated column."""
    rng = np.random.default_rng(1)
    t = np.arange(n)
    load = 50 + 20 * np.sin(2 * np.pi * t / 24) + rng.normal(0, 2, n)
    time = pd.date_range(start, periods=n, freq="h").strftime("%Y-%m-%d %H:%M")
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"site": "A", "date": time, "load": load.round(3)}).to_csv(path, index=False)
    return path


def edit_rows(path: Path, change) -> None:
    """Rewrites the CSV after `change(table)` (a DataFrame of strings, so cells stay as written)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    change(table).to_csv(path, index=False)


def prepare(workdir: Path, path: Path, *args: str, recipe: str = "time_series"):
    """The prepared splits (whole-column tensors) and meta, built in this process."""
    recipe_, cfg = pipeline_cli.parse(
        [
            f"recipe={recipe}",
            f"data.root={path.parent}",
            f"data.file={path.name}",
            f"data.cache_dir={workdir / 'cache'}",
            *NAMES,
            *args,
        ]
    )
    splits, meta = shard_store.open_shards(shard_store.prepare(recipe_, cfg, log=lambda *a: None))
    return {name: tensor_rows.columns(split)["value"] for name, split in splits.items()}, meta


def refused(workdir: Path, path: Path, *args: str) -> str:
    with pytest.raises(DataError) as error:
        prepare(workdir, path, *args)
    message = str(error.value)
    assert str(path.resolve()) in message and "Fix:" in message, message
    return message


def units(splits: dict, meta: dict) -> np.ndarray:
    """Both parts back in the value's units, in time order."""
    return torch.cat([splits["train"], splits["eval"]]).double().numpy() * meta["std"] + meta["mean"]


# ---------------------------------------------------------------- the grid


def test_columns_by_name_and_rows_in_any_order(workdir):
    path = write_series(workdir / "d" / "load.csv")
    splits, meta = prepare(workdir, path)
    assert (len(splits["train"]), len(splits["eval"])) == (480, 120)
    assert meta["step"] == str(pd.Timedelta("1h")) and meta["steps_missing"] == 0
    assert (meta["train_end"], meta["eval_start"]) == ("2024-03-20 23:00:00", "2024-03-21 00:00:00")
    assert np.allclose(units(splits, meta), pd.read_csv(path)["load"], atol=1e-4)
    # The train part alone sets the scale: its values have mean 0 and std 1, the eval part's do not.
    assert abs(splits["train"].double().mean().item()) < 1e-6
    assert splits["train"].double().std().item() == pytest.approx(1, abs=1e-6)

    # Rows pasted together out of order: the same series.
    edit_rows(path, lambda t: t.sample(frac=1, random_state=0))
    shuffled, _ = prepare(workdir, path)
    assert torch.equal(shuffled["train"], splits["train"]) and torch.equal(shuffled["eval"], splits["eval"])


def test_missing_timestamps_and_empty_values_are_interpolated_within_each_part(workdir):
    path = write_series(workdir / "d" / "load.csv")
    raw = pd.read_csv(path)["load"].to_numpy()
    # Rows 100-101 left out (two missing hours), an empty value at 300 and at the last train hour (479).
    edit_rows(
        path, lambda t: t.drop(index=[100, 101]).assign(load=lambda x: x["load"].mask(x.index.isin([300, 479]), ""))
    )
    splits, meta = prepare(workdir, path)
    values = units(splits, meta)
    assert len(values) == 600 and meta["steps_missing"] == 2 and meta["values_filled"] == 2
    assert values[100] == pytest.approx(raw[99] + (raw[102] - raw[99]) / 3, rel=1e-5)
    assert values[300] == pytest.approx((raw[299] + raw[301]) / 2, rel=1e-5)
    # The last train hour takes the last train value, not a blend with the first eval value (the future).
    assert values[479] == pytest.approx(raw[478], rel=1e-5)

    # data.missing_steps=skip closes the series up over the missing hours instead.
    splits, meta = prepare(workdir, path, "data.missing_steps=skip")
    assert len(units(splits, meta)) == 598 and meta["steps_missing"] == 2


def test_duplicate_timestamps_are_refused_or_averaged(workdir):
    path = write_series(workdir / "d" / "load.csv")
    edit_rows(path, lambda t: pd.concat([t, t.iloc[[7]].assign(load="100")]))  # line 602 repeats line 9's hour
    message = refused(workdir, path)
    assert "1 timestamp given more than once: 2024-03-01 07:00:00 (lines 9, 602)" in message
    assert "data.duplicates=mean" in message
    splits, meta = prepare(workdir, path, "data.duplicates=mean")
    raw = pd.read_csv(path)["load"].to_numpy()
    assert units(splits, meta)[7] == pytest.approx((raw[7] + 100) / 2, rel=1e-5)


def test_timestamps_off_the_grid_and_long_gaps_are_refused(workdir):
    path = write_series(workdir / "d" / "load.csv")
    edit_rows(path, lambda t: t.assign(date=t["date"].where(t.index != 40, "2024-03-02 16:20")))
    message = refused(workdir, path)
    assert "1 timestamp off the series' grid of one step every 0 days 01:00:00" in message
    assert "line 42 (2024-03-02 16:20:00)" in message
    write_series(path)
    later = (pd.to_datetime(pd.read_csv(path)["date"]) + pd.Timedelta(days=365)).dt.strftime("%Y-%m-%d %H:%M")
    edit_rows(path, lambda t: t.assign(date=t["date"].where(t.index < 300, later)))  # a year missing
    assert "more than half of the series" in refused(workdir, path)


def test_mixed_utc_offsets_are_refused_naming_the_first_rows_that_differ(workdir):
    path = write_series(workdir / "d" / "load.csv", start="2024-03-30 00:00")
    # Central European time: +01:00 until 2024-03-31 02:00, +02:00 after (rows 0-49 / 50-).
    local = pd.date_range("2024-03-30 00:00", periods=600, freq="h", tz="UTC").tz_convert("Europe/Berlin")
    edit_rows(path, lambda t: t.assign(date=local.strftime("%Y-%m-%d %H:%M%z")))
    message = refused(workdir, path)
    assert (
        "column 'date' mixes UTC offsets: line 2 '2024-03-30 01:00+0100' (UTC+01:00), then line 27 "
        "'2024-03-31 03:00+0200' (UTC+02:00)"
    ) in message
    assert "convert the column to one offset, e.g. UTC" in message
    # Some with an offset, some without (pandas reads those as NaT: they were "not a timestamp").
    edit_rows(path, lambda t: t.assign(date=t["date"].where(t.index < 20, t["date"].str[:16])))
    assert "line 2 '2024-03-30 01:00+0100' (UTC+01:00), then line 22 '2024-03-30 21:00' (no offset)" in refused(
        workdir, path
    )
    # One offset throughout is one clock: prepared as before.
    edit_rows(path, lambda t: t.assign(date=local.tz_convert("UTC").strftime("%Y-%m-%d %H:%M+00:00")))
    splits, meta = prepare(workdir, path)
    assert meta["step"] == "0 days 01:00:00" and len(splits["train"]) + len(splits["eval"]) == 600


def test_named_columns_and_sizes_are_checked(workdir):
    path = write_series(workdir / "d" / "load.csv")
    message = refused(workdir, path, "data.value_column=kwh")
    assert "no column 'kwh'" in message and "data.time_column= data.value_column=" in message
    with pytest.raises(ConfigError, match="data.horizon=0"):
        prepare(workdir, path, "data.horizon=0")
    recipe, cfg = pipeline_cli.parse(
        ["recipe=time_series", f"data.root={path.parent}", "data.file=load.csv", "data.time_column=date"]
    )
    with pytest.raises(ConfigError, match="both data.time_column= and data.value_column="):
        recipe.prepare(cfg)
    # Each part must hold a window and the value `horizon` steps after it: 120 eval steps hold 100 + 20.
    prepare(workdir, path, "data.window=100", "data.horizon=20")
    assert "at least 601 are needed" in refused(workdir, path, "data.window=100", "data.horizon=21")


def test_horizon_picks_the_value_that_many_steps_after_the_window():
    from recipes.time_series import Windows, transform

    windows = Windows(torch.arange(50, dtype=torch.float32), window=10, horizon=4)
    assert len(windows) == 50 - 10 - 4 + 1
    batch = transform(windows.__getitems__([0, 36]), False, {})
    assert batch["window"][1, :, 0].tolist() == list(range(36, 46))
    assert batch["target"].tolist() == [13, 49] and batch["last"].tolist() == [9, 45]


# ---------------------------------------------------------------- calendar frequencies


def write_calendar(path: Path, freq: str, n: int, drop: tuple[int, ...] = (), empty: tuple[int, ...] = ()) -> Path:
    """A trend plus a yearly season at calendar dates (`freq`: a pandas alias), as written by hand: `2020-01-01`;
    rows `drop` left out, values `empty` left empty."""
    t = np.arange(n)
    value = 100 + 0.5 * t + 10 * np.sin(2 * np.pi * t / 12) + np.random.default_rng(3).normal(0, 1, n)
    table = pd.DataFrame(
        {
            "date": pd.date_range("1990-01-01", periods=n, freq=freq).strftime("%Y-%m-%d"),
            "load": value.round(3).astype(str),
        }
    )
    table.loc[list(empty), "load"] = ""
    path.parent.mkdir(parents=True, exist_ok=True)
    table.drop(index=list(drop)).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    "freq, gap_steps", [("MS", 1), ("ME", 1), ("QS-JAN", 1), ("YS-JAN", 1), ("B", 1), ("W-SUN", 1)]
)
def test_calendar_frequencies_are_inferred_and_a_missing_step_is_one_step(workdir, freq, gap_steps):
    path = write_calendar(workdir / "d" / "load.csv", freq, 120, drop=(50,), empty=(7, 90))
    splits, meta = prepare(workdir, path)
    assert meta["freq"] == freq and meta["steps_missing"] == gap_steps and meta["values_filled"] == 2
    assert len(splits["train"]) + len(splits["eval"]) == 120
    raw = pd.to_numeric(pd.read_csv(workdir / "d" / "load.csv")["load"])  # row 50 left out: the file's row 49 is 49
    assert units(splits, meta)[50] == pytest.approx((raw[49] + raw[50]) / 2, rel=1e-4)


def test_data_freq_sets_the_grid_and_a_date_off_it_is_refused(workdir):
    path = write_calendar(workdir / "d" / "load.csv", "MS", 120)
    # Month starts are also days: data.freq=D puts them on a daily grid, with the days between missing.
    assert "more than half of the series" in refused(workdir, path, "data.freq=D")
    with pytest.raises(ConfigError, match="data.freq=monthly: not a frequency pandas knows"):
        prepare(workdir, path, "data.freq=monthly")
    edit_rows(path, lambda t: t.assign(date=t["date"].where(t.index != 30, "1992-07-15")))
    message = refused(workdir, path)
    assert "1 timestamp off the series' grid of one step every month start (MS)" in message
    assert "line 32 (1992-07-15" in message and "data.freq=" in message


def test_an_untrained_change_model_is_the_naive_forecast(workdir):
    from recipes.time_series import Windows, transform

    path = write_series(workdir / "d" / "load.csv")
    recipe, cfg = pipeline_cli.parse(
        [
            "recipe=time_series",
            f"data.root={path.parent}",
            "data.file=load.csv",
            *NAMES,
            f"data.cache_dir={workdir / 'cache'}",
            "data.horizon=3",
        ]
    )
    splits, meta = shard_store.open_shards(shard_store.prepare(recipe, cfg, log=lambda *a: None))
    assert cfg.model.target.name == "change" and meta["window"] == 24 and meta["change_std"] > 0
    batch = transform(
        Windows(tensor_rows.columns(splits["eval"])["value"], meta["window"], 3).__getitems__(range(94)), False, meta
    )
    metrics = recipe.metrics(cfg, meta)[""]
    with torch.no_grad():
        outputs = recipe.model(cfg, meta)(batch["window"])
    assert torch.equal(outputs, batch["last"])
    metrics.update(*recipe.predictions(outputs, batch)[""])
    scores = metrics.compute()
    assert scores["mse"] == scores["naive_mse"] and scores["mse"] > 0
    # model.target=level forecasts the value itself: untrained, it is not the naive forecast.
    _, level = pipeline_cli.parse(["recipe=time_series", "model.target=level"])
    with torch.no_grad():
        assert not torch.allclose(recipe.model(level, meta)(batch["window"]), batch["last"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "freq, n, last, past", [("MS", 96, "1997-12-01", "1998-01-01"), ("YE-DEC", 60, "2049-12-31", "2050-12-31")]
)
def test_monthly_and_yearly_files_train_and_predict_at_calendar_dates(workdir, freq, n, last, past):
    """Real dates, one left out; a short series: the default window is half its eval part (96 months: 20 held
    out, window 10; 60 years: 12, window 6)."""
    path = write_calendar(workdir / "d" / "load.csv", freq, n, drop=(20,))
    result = ok(
        cli(
            common(
                workdir,
                "recipe=time_series",
                f"data.root={path.parent}",
                "data.file=load.csv",
                *NAMES,
                "trainer.epochs=2",
            ),
            cwd=workdir,
            env=ONE_THREAD,
        )
    )
    assert f"one step every {'month start' if freq == 'MS' else 'year end'} ({freq}) (inferred" in result.stdout
    [run] = run_dirs(workdir / "runs", "time_series")
    meta = runs.read_meta(run)
    assert meta["freq"] == freq and meta["steps_missing"] == 1 and meta["eval_end"].startswith(last)
    summary = json.loads((run / "summary.json").read_text())
    held_out = n - int(n * 0.8)
    assert meta["window"] == held_out // 2 and summary["eval/samples"] == held_out - meta["window"]

    result = ok(
        cli(
            [f"run={run}", f"input={path}", f"output={workdir / 'out.csv'}"],
            cwd=workdir,
            script="predict",
            env=ONE_THREAD,
        )
    )
    out = pd.read_csv(workdir / "out.csv")
    # One forecast per window ending in the file (the left-out row filled in), each at the calendar date it is for.
    assert len(out) == n - meta["window"] + 1 and out["date"].iloc[-1].startswith(past)
    expected = pd.date_range("1990-01-01", periods=n + 1, freq=freq)[meta["window"] :].strftime("%Y-%m-%d")
    assert [d[:10] for d in out["date"]] == list(expected)


# ---------------------------------------------------------------- predictions


@pytest.mark.slow
def test_predictions_on_the_eval_part_give_back_the_runs_eval_metrics(workdir):
    path = write_series(workdir / "d" / "load.csv")
    ok(
        cli(
            common(
                workdir,
                "recipe=time_series",
                f"data.root={path.parent}",
                "data.file=load.csv",
                *NAMES,
                "data.window=12",
                "data.horizon=3",
                "model.cell=gru",
                "trainer.epochs=2",
            ),
            cwd=workdir,
            env=ONE_THREAD,
        )
    )
    [run] = run_dirs(workdir / "runs", "time_series")
    summary = json.loads((run / "summary.json").read_text())
    meta = runs.read_meta(run)
    assert summary["eval/samples"] == 120 - 12 - 3 + 1

    # The eval part as a user would have it: the same CSV format, from the first eval hour on.
    table = pd.read_csv(path)
    recent = table[pd.to_datetime(table["date"]) >= pd.Timestamp(meta["eval_start"])]
    recent.to_csv(workdir / "recent.csv", index=False)
    result = ok(
        cli(
            [f"run={run}", f"input={workdir / 'recent.csv'}", f"output={workdir / 'out.csv'}"],
            cwd=workdir,
            script="predict",
            env=ONE_THREAD,
        )
    )
    assert "predicted: 109 inputs" in result.stdout
    out = pd.read_csv(workdir / "out.csv")
    assert list(out.columns) == ["date", "naive", "forecast"] and len(out) == 120 - 12 + 1
    # Each row is the forecast FOR its time (last observed + 3 hours); the last one is past the file's end.
    assert out["date"].iloc[0] == "2024-03-21 14:00:00" and out["date"].iloc[-1] == "2024-03-26 02:00:00"
    actual = pd.Series(table["load"].to_numpy(), index=pd.to_datetime(table["date"]))
    scored = out[pd.to_datetime(out["date"]) <= actual.index[-1]]
    truth = actual[pd.to_datetime(scored["date"])].to_numpy()
    assert len(scored) == summary["eval/samples"]
    assert np.mean((scored["forecast"] - truth) ** 2) == pytest.approx(summary["eval/mse"], rel=1e-4)
    assert np.mean(np.abs(scored["forecast"] - truth)) == pytest.approx(summary["eval/mae"], rel=1e-4)
    assert np.mean((scored["naive"] - truth) ** 2) == pytest.approx(summary["eval/naive_mse"], rel=1e-4)

    # Fewer rows than the window: how many are needed.
    recent.iloc[:5].to_csv(workdir / "short.csv", index=False)
    recipe, cfg, _ = runs.load_run(run, [])
    with pytest.raises(
        DataError, match="5 time steps, but the run's model reads windows of data.window=12: at least 12 are needed"
    ):
        recipe.read_inputs(cfg, meta, workdir / "short.csv")


def test_stored_statistics_scale_other_data_as_the_run_did(workdir):
    """data.statistics (what launch/evaluate.py sets for other data): the run's mean and std, not this data's."""
    path = write_series(workdir / "data" / "load.csv")
    run_meta = workdir / "meta.json"
    run_meta.write_text(json.dumps({"mean": 10.0, "std": 4.0}))
    splits, meta = prepare(workdir, path, f"data.statistics={run_meta}")
    assert (meta["mean"], meta["std"]) == (10.0, 4.0)
    raw = pd.read_csv(path)["load"].to_numpy()
    assert units(splits, meta) == pytest.approx(raw, abs=1e-5)
    run_meta.write_text(json.dumps({"mean": 10.0}))
    with pytest.raises(DataError, match="holds no std: it is not the meta.json of a run of this recipe"):
        prepare(workdir, path, f"data.statistics={run_meta}")

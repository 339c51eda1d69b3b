"""time_series: forecast one value of a series `data.horizon` steps after a window of `data.window` steps, RNN|LSTM|GRU.

Raw file: data.file (from the current folder, or absolute), a CSV of timestamps and values. By default the
first column is the timestamp and the second the value (a header row is optional); data.time_column=
data.value_column= pick columns of a header row by name instead. data.horizon=1 forecasts the next step;
data.horizon=4 the value 4 steps after the window's last one (the steps in between are not given to the model).
python launch/train.py recipe=time_series data.file=load.csv data.time_column=date data.value_column=load
python launch/predict.py run=runs/time_series/<run> input=last_days.csv  # one forecast per window in the file

The series is put in time order (rows may come in any order) on one regular grid: the step is the most common
gap between timestamps. An empty value, and a missing timestamp (a whole number of steps skipped), are filled by
the straight line between their neighbours (data.missing_steps=skip instead lets windows run across a missing
timestamp, as if its neighbours were one step apart). A timestamp off that grid, or one given twice (unless
data.duplicates=mean), stops prepare naming its lines. The last data.eval_fraction of the time is held out;
values are scaled by the train part's mean and std, and the metrics are reported in the value's units, beside
those of the naive forecast (the last observed value).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection
from torchmetrics.wrappers import LambdaInputTransformer

from pipeline.config import ConfigError, ModelConfig
from pipeline.data import DataError
from pipeline.recipe import Recipe
from recipes import _tables as tables
from recipes._table_cells import Column

Cell = Enum("Cell", "rnn lstm gru")
Duplicates = Enum("Duplicates", "refuse mean")  # what a timestamp given twice means
MissingSteps = Enum("MissingSteps", "interpolate skip")  # what a timestamp left out of the grid means


@dataclass
class SeriesData(tables.CsvData):
    # Columns of a header row by name; empty: the first column is the timestamp, the second the value.
    time_column: str = ""
    value_column: str = ""
    window: int = 24  # steps the model sees
    horizon: int = 1  # the forecast is for the value this many steps after the window's last step
    duplicates: Duplicates = Duplicates.refuse  # mean: average the readings of a timestamp given twice
    missing_steps: MissingSteps = MissingSteps.interpolate  # skip: the series closes up over a missing timestamp


@dataclass
class ForecasterConfig(ModelConfig):
    cell: Cell = Cell.lstm
    hidden_size: int = 32
    num_layers: int = 2


# ---------------------------------------------------------------- reading a series


def columns(cfg) -> list[Column]:
    """The timestamp and value columns: named by the header, or the first two by position (names for messages)."""
    return [Column(cfg.data.time_column or "timestamp", "time"),
            Column(cfg.data.value_column or "value", empty_ok=True)]


def by_name(cfg) -> bool:
    return bool(cfg.data.time_column or cfg.data.value_column)


def raw_files(cfg) -> list[Path]:
    time, value = (c.name for c in columns(cfg))
    if by_name(cfg):
        expected = f"a CSV with a header row naming the columns {time} (a timestamp) and {value} (a number)"
    else:
        expected = ("a CSV whose first column is a timestamp (2016-01-01 00:15:00) and second column the value, one "
                    "row per time step (a header row is optional)")
    fix = "or data.time_column= data.value_column= to pick columns of a header by name"
    return tables.with_statistics(cfg, [tables.raw_file(cfg, expected, fix)])


def read_table(cfg, path: Path, enough, what: str, source: str = "data.root / data.file") -> tuple[pd.DataFrame, dict]:
    """The CSV's timestamp and value columns, cell by cell checked (recipes/_tables.read); `source`: what names
    the file, for messages."""
    if by_name(cfg) and not (cfg.data.time_column and cfg.data.value_column):
        raise ConfigError("give both data.time_column= and data.value_column= (columns of the header by name), or "
                          "neither (the first column is the timestamp, the second the value)")
    return tables.read(cfg, path, columns(cfg), enough, what, header=True if by_name(cfg) else None,
                rename="data.time_column= data.value_column=", source=source)


def on_grid(cfg, table: pd.DataFrame, path: Path, step: pd.Timedelta | None = None) -> tuple[pd.Series, dict]:
    """The values in time order on one regular grid of `step` (default: the most common gap), with missing
    timestamps inserted (unless data.missing_steps=skip); empty values stay NaN here (see `filled`)."""
    time, value = (c.name for c in columns(cfg))
    lines = np.asarray(table.attrs["lines"])
    order = np.argsort(table[time].to_numpy(), kind="stable")  # rows of a file pasted together out of order
    times, values, lines = pd.DatetimeIndex(table[time].to_numpy()[order]), table[value].to_numpy()[order], lines[order]
    twice = times.duplicated(keep=False)
    if twice.any() and cfg.data.duplicates.name == "refuse":
        shown = "; ".join(f"{t} (lines {', '.join(map(str, lines[times == t]))})"
                          for t in times[twice].unique()[:tables.SHOWN])
        raise DataError(f"{path}: {plural(times[twice].nunique(), 'timestamp')} given more than once: {shown}."
                        f"\nFix: keep one row per timestamp, or add data.duplicates=mean to average their values.")
    series = pd.Series(values, index=times).groupby(level=0).mean()  # one row per timestamp (a no-op if unique)
    step = step if step is not None else common_step(series.index, path)
    since = series.index.to_numpy() - series.index.to_numpy()[0]  # timedelta64 in the index's own unit
    off = since % step.to_timedelta64() != np.timedelta64(0)
    if off.any():
        shown = ", ".join(f"line {lines[times == t][0]} ({t})" for t in series.index[off][:tables.SHOWN])
        raise DataError(f"{path}: {plural(int(off.sum()), 'timestamp')} off the series' grid of one step every "
                        f"{step} from {series.index[0]}: {shown}.\nFix: resample the series to one step (e.g. pandas "
                        f"DataFrame.resample), or remove those rows.")
    grid = pd.date_range(series.index[0], series.index[-1], freq=step)
    inserted = len(grid) - len(series)
    if inserted and cfg.data.missing_steps.name == "skip":
        print(f"data: {path} skips {inserted} of {len(grid)} time steps (one every {step}); windows run across "
              f"them (data.missing_steps=skip)")
        return series, {"step": str(step), "steps_missing": inserted}
    if inserted > len(series):  # more invented than read: interpolating would make up most of the series
        raise DataError(f"{path}: its {len(series)} timestamps, one step every {step}, span {len(grid)} steps from "
                        f"{grid[0]} to {grid[-1]}: {inserted} steps are missing, more than half of the series.\n"
                        f"Fix: train on the part without the long gap (or on each part as its own series), or "
                        f"resample the series to a coarser step.")
    if inserted:
        print(f"data: {path} skips {inserted} of {len(grid)} time steps (one every {step}); their values are "
              f"interpolated")
    # A meter that skipped a reading: the straight line between its neighbours, not a drop to zero.
    return series.reindex(grid), {"step": str(step), "steps_missing": inserted}


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def common_step(index: pd.DatetimeIndex, path: Path) -> pd.Timedelta:
    gaps, counts = np.unique(np.diff(index.to_numpy()), return_counts=True)
    if not len(gaps):
        raise DataError(f"{path}: a single timestamp; a series needs at least two to have a step.\nFix: add rows.")
    return pd.Timedelta(gaps[np.argmax(counts)])


def filled(part: pd.Series) -> pd.Series:
    """Missing values interpolated within `part` alone, so no value from after it reaches into it."""
    return part.interpolate(limit_direction="both")


def scale(values: np.ndarray, stats: dict) -> np.ndarray:
    """Values as the model sees them, by the train part's mean and std: for the splits in prepare() and for new
    series in read_inputs(), always with the run's stored statistics."""
    return ((np.asarray(values, dtype=np.float64) - stats["mean"]) / stats["std"]).astype(np.float32)


# ---------------------------------------------------------------- preparation


def time_split(rows: int, fraction: float) -> tuple[int, int]:
    """The train and eval lengths: the last `fraction` of the time is held out."""
    cut = int(rows * (1 - fraction))
    return cut, rows - cut


def check_sizes(cfg) -> None:
    for key in ("window", "horizon"):
        if cfg.data[key] < 1:
            raise ConfigError(f"data.{key}={cfg.data[key]}: it counts time steps, so it must be at least 1.")


def prepare(cfg):
    check_sizes(cfg)
    path, window, horizon, fraction = raw_files(cfg)[0], cfg.data.window, cfg.data.horizon, cfg.data.eval_fraction
    span = window + horizon  # steps one training example covers: the window, then the value forecast

    def enough(n):
        return min(time_split(n, fraction)) >= span

    what = (f"with data.eval_fraction={fraction}, each part at least data.window + data.horizon = {span} steps long "
            f"(or use a smaller data.window)")
    table, report = read_table(cfg, path, enough, what)
    series, grid = on_grid(cfg, table, path)
    tables.require_rows(path, len(series), enough,
                        f"(time steps, after merging duplicates) to split into train and eval {what}")
    cut = time_split(len(series), fraction)[0]
    train, evaluation = filled(series.iloc[:cut]), filled(series.iloc[cut:])
    # Scaled by the train part alone: the future must not leak into the past through the scaler.
    stats = tables.stored_statistics(cfg, ("mean", "std")) or {"mean": float(train.mean()), "std": float(train.std())}
    tables.require_spread(path, {columns(cfg)[1].name: stats["std"]}, len(train))
    features = datasets.Features({"value": datasets.Value("float32")})

    def split(part: pd.Series) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"value": scale(part.to_numpy(), stats)}, features=features)

    meta = {**stats, "window": window, "horizon": horizon, **grid, **report,
            "train_start": str(train.index[0]), "train_end": str(train.index[-1]),
            "eval_start": str(evaluation.index[0]), "eval_end": str(evaluation.index[-1])}
    return datasets.DatasetDict(train=split(train), eval=split(evaluation)), meta


class Windows(torch.utils.data.Dataset):
    """Every window of `window` consecutive steps of one series with the value `horizon` steps after its last
    step, cut per batch: nothing is stored twice. A row: the window's values, then that value."""

    def __init__(self, series: torch.Tensor, window: int, horizon: int = 1):
        self.series, self.window, self.horizon, self.device = series, window, horizon, series.device
        self.offsets = torch.cat([torch.arange(window), torch.tensor([window + horizon - 1])]).to(series.device)

    def __len__(self):
        return max(len(self.series) - self.window - self.horizon + 1, 0)

    def __getitems__(self, starts: list[int]) -> dict[str, torch.Tensor]:
        starts = torch.as_tensor(starts, device=self.series.device)
        return {"series": self.series[starts[:, None] + self.offsets]}

    __getitem__ = __getitems__

    def to(self, device) -> Windows:
        return Windows(self.series.to(device), self.window, self.horizon)


def windows(columns, meta, split):
    return Windows(columns["value"], meta["window"], meta.get("horizon", 1))


def transform(batch, train, meta):
    """Training and evaluation batches hold `series` (the window, then the target); new inputs only `window`."""
    if "series" in batch:
        series = batch["series"]
        return {"window": series[:, :-1, None], "target": series[:, -1], "last": series[:, -2]}
    window = batch["window"]
    return {"window": window[:, :, None], "last": window[:, -1]}


# ---------------------------------------------------------------- model, loss, metrics


class Forecaster(nn.Module):
    def __init__(self, cell: str = "lstm", hidden_size: int = 32, num_layers: int = 2):
        super().__init__()
        rnn = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(1, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, window):
        out, _ = self.rnn(window)
        return self.head(out[:, -1]).squeeze(1)


def model(cfg, meta: dict) -> Forecaster:
    # What the dataset, read_inputs, predicted and metrics read from a run's meta.json; checked first, as evaluate
    # and predict build the model before anything else.
    tables.check_meta(meta, {"mean": tables.NUMBER, "std": tables.NUMBER, "window": int}, {"horizon": int, "step": str})
    return Forecaster(cfg.model.cell.name, cfg.model.hidden_size, cfg.model.num_layers)


def mse(outputs, batch):
    return nn.functional.mse_loss(outputs, batch["target"])


def predictions(outputs, batch):
    # Two forecasts side by side, the model's and the naive "same as the last step", scored alike.
    return {"": (torch.stack([outputs, batch["last"]], dim=1), batch["target"])}


def metrics(cfg, meta):
    mean, std = meta["mean"], meta["std"]

    def units(scaled):
        return scaled * std + mean

    def scored(metric, column):
        return LambdaInputTransformer(metric, transform_pred=lambda both: units(both[:, column]),
                                      transform_target=units)

    return {"": MetricCollection({"mse": scored(MeanSquaredError(), 0), "mae": scored(MeanAbsoluteError(), 0),
                                  "naive_mse": scored(MeanSquaredError(), 1),
                                  "naive_mae": scored(MeanAbsoluteError(), 1)})}


# ---------------------------------------------------------------- prediction


def read_inputs(cfg, meta: dict, path: Path) -> tuple[dict, dict]:
    """A series in the training CSV's format -> one forecast per window that ends in it: the last one forecasts
    past the file's end; the earlier ones can be checked against the values the file holds."""
    window, horizon = meta["window"], meta.get("horizon", 1)
    table, _ = read_table(cfg, path, lambda n: n >= 1, "", source="input=")
    require_window(path, len(table), window)
    # The run's step (a run prepared before the step was kept in meta: the input's own most common gap).
    step = pd.Timedelta(meta["step"]) if "step" in meta else None
    series, grid = on_grid(cfg, table, path, step)  # gaps filled and scaled as the run's own data was
    step = pd.Timedelta(grid["step"])
    require_window(path, len(series), window)  # duplicates merged
    values = filled(series).to_numpy()
    scaled = np.lib.stride_tricks.sliding_window_view(scale(values, meta), window)
    ends = series.index[window - 1:]
    return {columns(cfg)[0].name: [str(t) for t in ends + horizon * step],
            "naive": values[window - 1:]}, {"window": np.ascontiguousarray(scaled)}


def require_window(path: Path, steps: int, window: int) -> None:
    if steps < window:
        raise DataError(f"{path}: {plural(steps, 'time step')}, but the run's model reads windows of data.window="
                        f"{window}: at least {window} are needed.\nFix: give at least the last {window} steps of the "
                        f"series (more give one forecast per window that ends in the file).")


def predicted(outputs, meta):
    """The model's forecast in the value's units (the naive one comes with the ids, from the input itself)."""
    return {"forecast": outputs.double().numpy() * meta["std"] + meta["mean"]}


recipe = Recipe(
    name="time_series",
    description="a CSV of timestamps and values, data.window steps -> the value data.horizon steps later, "
                "RNN|LSTM|GRU, MSE, Adam 1e-3; naive last-value forecast alongside",
    prepare=prepare, raw_files=raw_files, data_config=SeriesData, dataset=windows,
    model=model,
    model_config=ForecasterConfig, activation="tanh",
    inputs=("window",), targets=("target", "last"),
    transform=transform, loss=mse, predictions=predictions, metrics=metrics,
    read_inputs=read_inputs, predicted=predicted,
    # data.root ".": data.file is a path from the current folder (or absolute), as for recipe=tabular
    defaults={"data": {"root": ".", "eval_fraction": 0.2},
              "trainer": {"epochs": 10, "batch_size": 32, "eval_batch_size": 256, "log_every": 100},
              "optimizer": {"name": "adam", "lr": 1e-3}},
)

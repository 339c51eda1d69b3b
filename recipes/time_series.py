"""time_series: forecast one value of a series `data.horizon` steps after a window of `data.window` steps, RNN|LSTM|GRU.

Raw file: data.file (from the current folder, or absolute), a CSV of timestamps and values. By default the
first column is the timestamp and the second the value (a header row is optional); data.time_column=
data.value_column= pick columns of a header row by name instead. data.horizon=1 forecasts the next step;
data.horizon=4 the value 4 steps after the window's last one (the steps in between are not given to the model).
python launch/train.py recipe=time_series data.file=load.csv data.time_column=date data.value_column=load
python launch/predict.py run=runs/time_series/<run> input=last_days.csv  # one forecast per window in the file

The series is put in time order (rows may come in any order) on one regular grid: a fixed step (15 minutes, an
hour, a day) or a calendar one (business day, week, month start/end, quarter, year), inferred from the
timestamps or set by data.freq= (recipes/_series.py). An empty value, and a missing timestamp (a step of the
grid left out), are filled by the straight line between their neighbours (data.missing_steps=skip instead lets
windows run across a missing timestamp, as if its neighbours were one step apart). A timestamp off that grid, or
one given twice (unless data.duplicates=mean), stops prepare naming its lines. The last data.eval_fraction of the
time is held out; values are scaled by the train part's mean and std, and the metrics are reported in the value's
units, beside those of the naive forecast (the last observed value).

model.target=change (default): the model reads its window relative to the window's last value and forecasts the
change from it, both scaled by the train part's changes over data.horizon steps; its head starts at zero, so an
untrained model is the naive forecast. model.target=level: the model forecasts the scaled value itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from pandas.tseries.frequencies import to_offset
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection
from torchmetrics.wrappers import LambdaInputTransformer

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.recipe import Recipe
from recipes import _series as series_csv
from recipes import _tables as tables

Cell = Enum("Cell", "rnn lstm gru")
Target = Enum("Target", "change level")  # the forecast: the change from the window's last value, or the value
Duplicates = Enum("Duplicates", "refuse mean")  # what a timestamp given twice means
MissingSteps = Enum("MissingSteps", "interpolate skip")  # what a timestamp left out of the grid means
WINDOW = 24  # data.window's default where the eval part is long enough for it


@dataclass
class SeriesData(tables.CsvData):
    # Columns of a header row by name; empty: the first column is the timestamp, the second the value.
    time_column: str = ""
    value_column: str = ""
    freq: str = ""  # a pandas frequency (h, D, B, W-SUN, MS, ME, QS, YS); empty: inferred from the timestamps
    window: int | None = None  # steps the model sees; null: 24, or half the eval part where that is shorter
    horizon: int = 1  # the forecast is for the value this many steps after the window's last step
    duplicates: Duplicates = Duplicates.refuse  # mean: average the readings of a timestamp given twice
    missing_steps: MissingSteps = MissingSteps.interpolate  # skip: the series closes up over a missing timestamp


@dataclass
@dataclass
class ForecasterConfig(ModelConfig):
    cell: Cell = Cell.lstm
    hidden_size: int = 32
    num_layers: int = 2
    target: Target = Target.change


# ---------------------------------------------------------------- preparation


def time_split(rows: int, fraction: float) -> tuple[int, int]:
    """The train and eval lengths: the last `fraction` of the time is held out."""
    cut = int(rows * (1 - fraction))
    return cut, rows - cut


def check_sizes(cfg) -> None:
    for key in ("window", "horizon"):
        if cfg.data[key] is not None and cfg.data[key] < 1:
            raise ConfigError(f"data.{key}={cfg.data[key]}: it counts time steps, so it must be at least 1.")


def window_for(cfg, steps: int, stored: dict) -> int:
    """data.window, else the run's (data.statistics), else 24 steps or half the shorter part, which ever is less:
    a short series (100 years) still gets eval windows."""
    if cfg.data.window is not None:
        return cfg.data.window
    if "window" in stored:
        return stored["window"]
    part = min(time_split(steps, cfg.data.eval_fraction))
    window = max(1, min(WINDOW, (part - cfg.data.horizon + 1) // 2))
    print(
        f"data: window of {window} steps (data.window= sets it; by default {WINDOW}, or half the eval part where "
        f"that is shorter)"
    )
    return window


def prepare(cfg):
    check_sizes(cfg)
    path, horizon, fraction = series_csv.raw_files(cfg)[0], cfg.data.horizon, cfg.data.eval_fraction
    # Steps one training example covers at least: the window (1 step where it adapts to the data), the value forecast
    span = (cfg.data.window or 1) + horizon

    def enough(n):
        return min(time_split(n, fraction)) >= span

    what = (
        f"with data.eval_fraction={fraction}, each part at least data.window + data.horizon = {span} steps long "
        f"(or use a smaller data.window)"
    )
    table, report = series_csv.read_table(cfg, path, enough, what)
    series, grid = series_csv.on_grid(cfg, table, path)
    tables.require_rows(
        path, len(series), enough, f"(time steps, after merging duplicates) to split into train and eval {what}"
    )
    cut = time_split(len(series), fraction)[0]
    train, evaluation = series_csv.filled(series.iloc[:cut]), series_csv.filled(series.iloc[cut:])
    # Scaled by the train part alone: the future must not leak into the past through the scaler.
    stored = tables.stored_statistics(cfg, ("mean", "std"), ("change_std", "window")) or {}
    stats = {"mean": float(train.mean()), "std": float(train.std()), **stored}
    tables.require_spread(path, {series_csv.columns(cfg)[1].name: stats["std"]}, len(train))
    if "change_std" not in stats:  # the scale of the changes a change model forecasts; a straight line has none
        stats["change_std"] = float(np.std(train.to_numpy()[horizon:] - train.to_numpy()[:-horizon])) or stats["std"]
    stats.pop("window", None)
    features = datasets.Features({"value": datasets.Value("float32")})

    def split(part: pd.Series) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"value": series_csv.scale(part.to_numpy(), stats)}, features=features)

    meta = {
        **stats,
        "window": window_for(cfg, len(series), stored),
        "horizon": horizon,
        **grid,
        **report,
        "train_start": str(train.index[0]),
        "train_end": str(train.index[-1]),
        "eval_start": str(evaluation.index[0]),
        "eval_end": str(evaluation.index[-1]),
    }
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
    """An RNN over the window and a linear head. change: the forecast is the window's last value plus the head's
    output times `change_scale` (the train changes' std, in the scaled units), the window read relative to that
    last value in the same scale, and the head starts at zero, so the untrained model is the naive forecast."""

    def __init__(
        self,
        cell: str = "lstm",
        hidden_size: int = 32,
        num_layers: int = 2,
        target: str = "level",
        change_scale: float = 1.0,
    ):
        super().__init__()
        rnn = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(1, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)
        self.change_scale = change_scale if target == "change" else None
        if self.change_scale is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, window):
        if self.change_scale is None:
            out, _ = self.rnn(window)
            return self.head(out[:, -1]).squeeze(1)
        last = window[:, -1]
        out, _ = self.rnn((window - last[:, None]) / self.change_scale)
        return (last + self.head(out[:, -1]) * self.change_scale).squeeze(1)


def model(cfg, meta: dict) -> Forecaster:
    # What the dataset, read_inputs, predicted and metrics read from a run's meta.json; checked first, as evaluate
    # and predict build the model before anything else. A change model also needs the changes' scale.
    change = cfg.model.target.name == "change"
    tables.check_meta(
        meta,
        {
            "mean": tables.NUMBER,
            "std": tables.NUMBER,
            "window": int,
            **({"change_std": tables.NUMBER} if change else {}),
        },
        {"horizon": int, "step": str, "freq": str},
    )
    what = "the change from the window's last value" if change else "the value itself"
    PartialState().print(f"model: {cfg.model.cell.name} forecasts {what} (model.target={cfg.model.target.name})")
    return Forecaster(
        cfg.model.cell.name,
        cfg.model.hidden_size,
        cfg.model.num_layers,
        cfg.model.target.name,
        meta["change_std"] / meta["std"] if change else 1.0,
    )


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
        return LambdaInputTransformer(
            metric, transform_pred=lambda both: units(both[:, column]), transform_target=units
        )

    return {
        "": MetricCollection(
            {
                "mse": scored(MeanSquaredError(), 0),
                "mae": scored(MeanAbsoluteError(), 0),
                "naive_mse": scored(MeanSquaredError(), 1),
                "naive_mae": scored(MeanAbsoluteError(), 1),
            }
        )
    }


# ---------------------------------------------------------------- prediction


def read_inputs(cfg, meta: dict, path: Path) -> tuple[dict, dict]:
    """A series in the training CSV's format -> one forecast per window that ends in it: the last one forecasts
    past the file's end; the earlier ones can be checked against the values the file holds."""
    window, horizon = meta["window"], meta.get("horizon", 1)
    table, _ = series_csv.read_table(cfg, path, lambda n: n >= 1, "", source="input=")
    series_csv.require_window(path, len(table), window)
    # The run's frequency (a run prepared before it was kept in meta: its fixed step, or the input's own).
    freq = (
        to_offset(meta["freq"]) if "freq" in meta else to_offset(pd.Timedelta(meta["step"])) if "step" in meta else None
    )
    series, grid = series_csv.on_grid(cfg, table, path, freq)  # gaps filled and scaled as the run's own data was
    series_csv.require_window(path, len(series), window)  # duplicates merged
    values = series_csv.filled(series).to_numpy()
    scaled = np.lib.stride_tricks.sliding_window_view(series_csv.scale(values, meta), window)
    ends = series.index[window - 1 :]
    return {
        series_csv.columns(cfg)[0].name: [str(t) for t in ends + horizon * to_offset(grid["freq"])],
        "naive": values[window - 1 :],
    }, {"window": np.ascontiguousarray(scaled)}


def predicted(outputs, meta):
    """The model's forecast in the value's units (the naive one comes with the ids, from the input itself)."""
    return {"forecast": outputs.double().numpy() * meta["std"] + meta["mean"]}


recipe = Recipe(
    name="time_series",
    description="a CSV of timestamps and values, data.window steps -> the value data.horizon steps later (its change "
    "from the last value by default), RNN|LSTM|GRU, MSE, Adam 3e-3; naive last-value forecast alongside",
    prepare=prepare,
    raw_files=series_csv.raw_files,
    data_config=SeriesData,
    dataset=windows,
    model=model,
    model_config=ForecasterConfig,
    activation="tanh",
    inputs=("window",),
    targets=("target", "last"),
    transform=transform,
    loss=mse,
    predictions=predictions,
    metrics=metrics,
    read_inputs=read_inputs,
    predicted=predicted,
    # data.root ".": data.file is a path from the current folder (or absolute), as for recipe=tabular
    defaults={
        "data": {"root": ".", "eval_fraction": 0.2},
        "trainer": {"epochs": 30, "batch_size": 32, "eval_batch_size": 256, "log_every": 100},
        "optimizer": {"name": "adam", "lr": 3e-3},
    },
)

"""electricity_forecast: the next 15 minutes of consumption from the last day (96 steps), RNN/LSTM/GRU.

Raw file: <data.root>/electricity.csv: column 1 a timestamp (2016-01-01 00:15:00), column 2 the consumption.
python launch/train.py recipe=electricity_forecast data.root=data model.cell=gru
"""

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

from pipeline.config import ModelConfig
from pipeline.recipe import Recipe
from recipes._helpers import Column, CsvData, raw_file, read, require_spread

Cell = Enum("Cell", "rnn lstm gru")


@dataclass
class ElectricityData(CsvData):
    file: str = "electricity.csv"
    window: int = 96  # one day of 15-minute steps in, the next step out


@dataclass
class ForecasterConfig(ModelConfig):
    cell: Cell = Cell.lstm
    hidden_size: int = 32
    num_layers: int = 2


# Read by position; a missing reading (empty cell) is filled from its neighbours.
COLUMNS = [Column("timestamp", "time"), Column("consumption", empty_ok=True)]


def raw_files(cfg) -> list[Path]:
    return [raw_file(cfg, "a CSV whose first column is a timestamp (2016-01-01 00:15:00) and second column "
                          "the consumption, one row per 15 minutes (a header row is optional)")]


def time_split(rows: int, fraction: float) -> tuple[int, int]:
    """The train and eval lengths: the last `fraction` of the time is held out."""
    cut = int(rows * (1 - fraction))
    return cut, rows - cut


def read_series(cfg) -> tuple[pd.Series, dict]:
    window, fraction = cfg.data.window, cfg.data.eval_fraction
    table, report = read(cfg, raw_files(cfg)[0], COLUMNS, lambda n: min(time_split(n, fraction)) > window,
                         f"with data.eval_fraction={fraction}, each part longer than data.window={window} "
                         f"(or use a smaller data.window)", header=None)
    series = pd.Series(table["consumption"].to_numpy(), index=table["timestamp"].to_numpy()).sort_index()
    # A meter that skipped a reading: the straight line between its neighbours, not a drop to zero.
    return series.interpolate(limit_direction="both"), report


def prepare(cfg):
    series, report = read_series(cfg)
    cut = time_split(len(series), cfg.data.eval_fraction)[0]
    train, evaluation = series.iloc[:cut], series.iloc[cut:]
    # Scaled by the train split alone: the future must not leak into the past through the scaler.
    mean, std = float(train.mean()), float(train.std())
    require_spread(raw_files(cfg)[0], {"consumption": std}, len(train))
    features = datasets.Features({"value": datasets.Value("float32")})

    def split(part: pd.Series) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"value": ((part.to_numpy() - mean) / std).astype(np.float32)},
                                          features=features)

    meta = {"mean": mean, "std": std, "window": cfg.data.window, **report,
            "train_start": str(train.index[0]), "train_end": str(train.index[-1]),
            "eval_start": str(evaluation.index[0]), "eval_end": str(evaluation.index[-1])}
    return datasets.DatasetDict(train=split(train), eval=split(evaluation)), meta


class Windows(torch.utils.data.Dataset):
    """Every window of `window + 1` consecutive steps of one series, cut per batch: nothing is stored twice."""

    def __init__(self, series: torch.Tensor, window: int):
        self.series, self.window, self.device = series, window, series.device
        self.offsets = torch.arange(window + 1, device=series.device)

    def __len__(self):
        return len(self.series) - self.window

    def __getitems__(self, starts: list[int]) -> dict[str, torch.Tensor]:
        starts = torch.as_tensor(starts, device=self.series.device)
        return {"series": self.series[starts[:, None] + self.offsets]}

    __getitem__ = __getitems__

    def to(self, device) -> "Windows":
        return Windows(self.series.to(device), self.window)


def windows(columns, meta, split):
    return Windows(columns["value"], meta["window"])


def transform(batch, train, meta):
    series = batch["series"]
    return {"window": series[:, :-1, None], "target": series[:, -1], "last": series[:, -2]}


class Forecaster(nn.Module):
    def __init__(self, cell: str = "lstm", hidden_size: int = 32, num_layers: int = 2):
        super().__init__()
        rnn = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(1, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, window):
        out, _ = self.rnn(window)
        return self.head(out[:, -1]).squeeze(1)


def mse(outputs, batch):
    return nn.functional.mse_loss(outputs, batch["target"])


def predictions(outputs, batch):
    # Two forecasts side by side, the model's and the naive "same as the last step", scored alike.
    return {"": (torch.stack([outputs, batch["last"]], dim=1), batch["target"])}


def metrics(cfg, meta):
    mean, std = meta["mean"], meta["std"]

    def consumption(scaled):
        return scaled * std + mean

    def scored(metric, column):
        return LambdaInputTransformer(metric, transform_pred=lambda both: consumption(both[:, column]),
                                      transform_target=consumption)

    return {"": MetricCollection({"mse": scored(MeanSquaredError(), 0), "mae": scored(MeanAbsoluteError(), 0),
                                  "naive_mse": scored(MeanSquaredError(), 1),
                                  "naive_mae": scored(MeanAbsoluteError(), 1)})}


recipe = Recipe(
    name="electricity_forecast",
    description="electricity.csv 15-min consumption, 96-step window -> next step, RNN|LSTM|GRU, MSE, Adam 1e-4",
    prepare=prepare, raw_files=raw_files, data_config=ElectricityData, dataset=windows,
    model=lambda cfg, meta: Forecaster(cfg.model.cell.name, cfg.model.hidden_size, cfg.model.num_layers),
    model_config=ForecasterConfig, activation="tanh",
    inputs=("window",), targets=("target", "last"),
    transform=transform, loss=mse, predictions=predictions, metrics=metrics,
    defaults={"data": {"eval_fraction": 0.2},
              "trainer": {"epochs": 10, "batch_size": 32, "eval_batch_size": 256, "log_every": 100},
              "optimizer": {"name": "adam", "lr": 1e-4}},
)

"""house_prices_linear: the first regression tutorial, price = w * area + b, nn.Linear(1, 1), MSE, SGD.

Raw file: <data.root>/house_prices.csv with a header and columns area,price (one row per house).
python launch/train.py recipe=house_prices_linear data.root=data
python launch/train.py recipe=house_prices_linear data.root=data data.standardize=true optimizer.lr=0.05
"""

from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score
from torchmetrics.wrappers import LambdaInputTransformer

from pipeline.recipe import Recipe
from recipes._helpers import Column, CsvData, raw_file, read, require_spread, split_sizes, split_train_eval


@dataclass
class HousePricesData(CsvData):
    file: str = "house_prices.csv"
    x_column: str = "area"
    y_column: str = "price"
    # Raw units need the tutorial's tiny lr (x^2 ~ 10^4 sets the step size); standardized x and y
    # train with an ordinary one. Metrics are reported in the CSV's units either way.
    standardize: bool = False


def raw_files(cfg) -> list[Path]:
    return [raw_file(cfg, f"a CSV with a header row and numeric columns {cfg.data.x_column},{cfg.data.y_column} "
                          f"(one row per house)", "and data.x_column= data.y_column= for other column names")]


def read_csv(cfg) -> tuple[pd.DataFrame, dict]:
    path = raw_files(cfg)[0]
    # No empty cells: a house without a price teaches nothing, and rows are dropped only when asked.
    fraction = cfg.data.eval_fraction
    return read(cfg, path, [Column(cfg.data.x_column), Column(cfg.data.y_column)],
                lambda n: min(split_sizes(n, fraction)) >= 1, f"with data.eval_fraction={fraction}",
                rename="data.x_column= data.y_column=")


def prepare(cfg):
    table, report = read_csv(cfg)
    features = datasets.Features({"x": datasets.List(datasets.Value("float32"), length=1),
                                  "y": datasets.Value("float32")})
    full = datasets.Dataset.from_dict({"x": table.iloc[:, [0]].to_numpy(np.float32),
                                       "y": table.iloc[:, 1].to_numpy(np.float32)}, features=features)
    train, evaluation = split_train_eval(full, cfg.data.eval_fraction, cfg.data.split_seed, stratify=None)
    # Statistics of the train split only: the eval houses stay unseen, as they would be in use.
    rows = train.with_format("numpy")[:]
    x, y = rows["x"][:, 0], rows["y"]
    meta = {"x_column": cfg.data.x_column, "y_column": cfg.data.y_column, "standardize": cfg.data.standardize,
            "x_mean": float(x.mean()), "x_std": float(x.std()), "y_mean": float(y.mean()), "y_std": float(y.std()),
            **report}
    if cfg.data.standardize:
        require_spread(raw_files(cfg)[0], {cfg.data.x_column: meta["x_std"], cfg.data.y_column: meta["y_std"]},
                       len(train))
        train, evaluation = (split.with_format("numpy").map(standardize, batched=True, fn_kwargs={"meta": meta},
                                                            features=features)
                             for split in (train, evaluation))
    return datasets.DatasetDict(train=train, eval=evaluation), meta


def standardize(batch, meta):
    return {"x": (batch["x"] - meta["x_mean"]) / meta["x_std"], "y": (batch["y"] - meta["y_mean"]) / meta["y_std"]}


def mse(outputs, batch):
    return nn.functional.mse_loss(outputs.squeeze(1), batch["y"])


def predictions(outputs, batch):
    return {"": (outputs.squeeze(1), batch["y"])}


def metrics(cfg, meta):
    collection = MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError(), "r2": R2Score()})
    if not meta["standardize"]:
        return {"": collection}
    mean, std = meta["y_mean"], meta["y_std"]

    def to_price(y):
        return y * std + mean

    # predictions() sees no meta, so the metrics take the scaled values back to the CSV's units.
    return {"": LambdaInputTransformer(collection, transform_pred=to_price, transform_target=to_price)}


recipe = Recipe(
    name="house_prices_linear",
    description="house_prices.csv area -> price, nn.Linear(1, 1), MSELoss, SGD lr 4e-5",
    prepare=prepare, raw_files=raw_files, data_config=HousePricesData,
    model=lambda cfg, meta: nn.Linear(1, 1),
    inputs=("x",), targets=("y",),
    loss=mse, predictions=predictions, metrics=metrics,
    # The tutorial's per-sample SGD: batch 1, lr 4e-5 on raw square metres and prices.
    defaults={"data": {"eval_fraction": 0.2},
              "trainer": {"epochs": 30, "batch_size": 1, "eval_batch_size": 256, "log_every": 100},
              "optimizer": {"name": "sgd", "lr": 4e-5}},
)

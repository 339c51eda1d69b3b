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

from pipeline.config import DataConfig
from pipeline.data import DataError, split_train_eval
from pipeline.recipe import Recipe


@dataclass
class HousePricesData(DataConfig):
    file: str = "house_prices.csv"
    x_column: str = "area"
    y_column: str = "price"
    # Raw units need the tutorial's tiny lr (x^2 ~ 10^4 sets the step size); standardized x and y
    # train with an ordinary one. Metrics are reported in the CSV's units either way.
    standardize: bool = False


def raw_files(cfg) -> list[Path]:
    path = Path(cfg.data.root) / cfg.data.file
    if not path.is_file():
        raise DataError(
            f"{path.resolve()} not found: expected a CSV with a header row and numeric columns "
            f"{cfg.data.x_column},{cfg.data.y_column} (one row per house).\n"
            f"Fix: put {cfg.data.file} there or set data.root=<folder> data.file=<name.csv> "
            f"(and data.x_column= data.y_column= for other column names).")
    return [path]


def read_csv(cfg) -> pd.DataFrame:
    path = raw_files(cfg)[0]
    table = pd.read_csv(path)
    columns = [cfg.data.x_column, cfg.data.y_column]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{path} has no column {', '.join(missing)} (columns: {', '.join(table.columns)}); "
                        f"set data.x_column= and data.y_column=")
    return table[columns].apply(pd.to_numeric, errors="coerce").dropna()  # a house without a price teaches nothing


def prepare(cfg):
    table = read_csv(cfg)
    features = datasets.Features({"x": datasets.List(datasets.Value("float32"), length=1),
                                  "y": datasets.Value("float32")})
    full = datasets.Dataset.from_dict({"x": table.iloc[:, [0]].to_numpy(np.float32),
                                       "y": table.iloc[:, 1].to_numpy(np.float32)}, features=features)
    train, evaluation = split_train_eval(full, cfg.data.eval_fraction, cfg.data.split_seed, stratify=None)
    # Statistics of the train split only: the eval houses stay unseen, as they would be in use.
    rows = train.with_format("numpy")[:]
    x, y = rows["x"][:, 0], rows["y"]
    meta = {"x_column": cfg.data.x_column, "y_column": cfg.data.y_column, "standardize": cfg.data.standardize,
            "x_mean": float(x.mean()), "x_std": float(x.std()), "y_mean": float(y.mean()), "y_std": float(y.std())}
    if cfg.data.standardize:
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
    prepare=prepare,
    raw_files=raw_files,
    model=lambda cfg, meta: nn.Linear(1, 1),
    loss=mse,
    predictions=predictions,
    metrics=metrics,
    inputs=("x",),
    targets=("y",),
    data_config=HousePricesData,
    # The tutorial's per-sample SGD: batch 1, lr 4e-5 on raw square metres and prices.
    defaults={"data": {"eval_fraction": 0.2},
              "trainer": {"epochs": 30, "batch_size": 1, "eval_batch_size": 256, "log_every": 100},
              "optimizer": {"name": "sgd", "lr": 4e-5}},
)

"""water_potability: is this water safe to drink? 9 measurements -> MLP 9-16-8-1 (BatchNorm, ELU, He init).

Raw file: <data.root>/water_potability.csv, the Kaggle "Water Quality" CSV as published (3,276 rows).
python launch/train.py recipe=water_potability data.root=data
"""

from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from torch import nn

from pipeline.recipe import Recipe, binary_cross_entropy, binary_metrics, binary_predictions
from recipes._helpers import (
    Column,
    CsvData,
    raw_file,
    read,
    require_rows,
    require_spread,
    split_sizes,
    split_train_eval,
)

FEATURES = ["ph", "Hardness", "Solids", "Chloramines", "Sulfate", "Conductivity", "Organic_carbon",
            "Trihalomethanes", "Turbidity"]
LABEL = "Potability"
CLASSES = ["not potable", "potable"]


@dataclass
class WaterData(CsvData):
    file: str = "water_potability.csv"


COLUMNS = [*(Column(name, empty_ok=True) for name in FEATURES), Column(LABEL, "label", values=(0, 1))]


def raw_files(cfg) -> list[Path]:
    return [raw_file(cfg, f"the Kaggle 'Water Quality' CSV with a header row {','.join(FEATURES)},{LABEL} "
                          f"(numbers, empty cells for missing values; {LABEL} 0/1)",
                     "kaggle datasets download adityakadiwal/water-potability")]


def read_csv(cfg) -> tuple[datasets.Dataset, dict]:
    path = raw_files(cfg)[0]
    # Empty cells are allowed: missing measurements stay NaN here and are filled after the split,
    # from the train rows only. Text, inf and labels other than 0/1 are refused (or dropped when asked).
    fraction = cfg.data.eval_fraction
    table, report = read(cfg, path, COLUMNS, lambda n: min(split_sizes(n, fraction)) >= 2,
                         f"with data.eval_fraction={fraction} (stratified: each part needs a row of each class)")
    for value, count in ((v, int((table[LABEL] == v).sum())) for v in (0, 1)):
        require_rows(path, count, lambda n: n >= 2, f"with {LABEL}={value} (a stratified split needs 2 of each)")
    features = datasets.Features({"features": datasets.List(datasets.Value("float32"), length=len(FEATURES)),
                                  "label": datasets.ClassLabel(names=CLASSES)})
    full = datasets.Dataset.from_dict({"features": table[FEATURES].to_numpy(np.float32),
                                       "label": table[LABEL].to_numpy(np.int64)}, features=features)
    return full, report


def fit(train: datasets.Dataset) -> dict:
    """SimpleImputer(strategy="median") then StandardScaler, fitted on the train split alone."""
    x = train.with_format("numpy")[:]["features"].astype(np.float64)
    median = np.nanmedian(x, axis=0)
    x = np.where(np.isnan(x), median, x)
    return {"median": median.tolist(), "mean": x.mean(axis=0).tolist(), "std": x.std(axis=0).tolist()}


def preprocess(batch: dict, stats: dict) -> dict:
    """Missing values filled with the train medians, then scaled by the train means and stds: for the splits in
    prepare() and for new inputs in read_inputs(), always with the run's stored statistics."""
    x = batch["features"]
    x = np.where(np.isnan(x), np.asarray(stats["median"]), x)
    return {"features": ((x - np.asarray(stats["mean"])) / np.asarray(stats["std"])).astype(np.float32)}


def read_inputs(cfg, meta: dict, path: Path) -> tuple[dict, dict]:
    """New samples: a CSV with the nine measurement columns (a Potability column, if any, is ignored)."""
    table, _ = read(cfg, path, COLUMNS[:-1], lambda n: n >= 1, "")
    features = table[FEATURES].to_numpy(np.float32)  # float32 as in the shards, so the same numbers go in
    return {"line": table.attrs["lines"]}, preprocess({"features": features}, meta)


def prepare(cfg):
    full, report = read_csv(cfg)
    train, evaluation = split_train_eval(full, cfg.data.eval_fraction, cfg.data.split_seed, stratify="label")
    stats = fit(train)
    require_spread(raw_files(cfg)[0], dict(zip(FEATURES, stats["std"])), len(train))
    train, evaluation = (split.with_format("numpy").map(preprocess, batched=True, fn_kwargs={"stats": stats},
                                                        features=full.features)
                         for split in (train, evaluation))
    # Saved with the shards and the run: evaluation and inference fill and scale with these numbers.
    return datasets.DatasetDict(train=train, eval=evaluation), {"class_names": CLASSES,
                                                               "feature_names": FEATURES, **stats, **report}


class WaterNet(nn.Module):
    def __init__(self, inputs: int = len(FEATURES)):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(inputs, 16), nn.BatchNorm1d(16), nn.ELU(),
            nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ELU(),
            nn.Linear(8, 1),  # a logit: the sigmoid lives in the loss, where it cannot overflow
        )

    def forward(self, features):
        return self.net(features).squeeze(1)


recipe = Recipe(
    name="water_potability",
    description="water_potability.csv, MLP 9-16-8-1 BatchNorm+ELU, He init, BCEWithLogits, Adam lr 1e-3",
    prepare=prepare, raw_files=raw_files, read_inputs=read_inputs, data_config=WaterData,
    model=lambda cfg, meta: WaterNet(), activation="elu",
    inputs=("features",), targets=("label",),
    loss=binary_cross_entropy, predictions=binary_predictions, metrics=binary_metrics,
    defaults={"data": {"eval_fraction": 0.2},
              "model": {"init": "kaiming_normal"},
              "trainer": {"epochs": 30, "batch_size": 32, "clip_grad_norm": 1.0, "log_every": 100},
              "optimizer": {"name": "adam", "lr": 1e-3}},
)

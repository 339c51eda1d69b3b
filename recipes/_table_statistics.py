"""Statistics of a table's train rows (fill values, means and stds, one-hot categories), fitted on train alone and
applied alike to every split and to new inputs; kept in the run's meta.json."""

from __future__ import annotations

import numpy as np

from pipeline.data import DataError
from recipes._tables import stored_statistics

MAX_CATEGORIES = 256  # one-hot inputs a text column may add: more is an identifier or free text, not a category


def fit(numbers: np.ndarray, texts: dict[str, np.ndarray], cfg) -> dict:
    """Fill values, means and stds of the number columns and the categories of the text columns, from the train
    rows alone (SimpleImputer, StandardScaler and OneHotEncoder, fitted on train)."""
    fill = {"median": np.nanmedian, "mean": np.nanmean, "none": None}[cfg.data.impute.name]
    x = numbers.astype(np.float64)
    stats = {}
    if fill is not None and len(x.T):
        stats["median" if cfg.data.impute.name == "median" else "fill"] = fill(x, axis=0).tolist()
        x = np.where(np.isnan(x), np.asarray(_fill(stats)), x)
    standardize = cfg.data.standardize and len(x.T)
    stats["mean"] = x.mean(axis=0).tolist() if standardize else [0.0] * x.shape[1]
    stats["std"] = x.std(axis=0).tolist() if standardize else [1.0] * x.shape[1]
    stats["categories"] = {name: sorted({v for v in values if v != ""}) for name, values in texts.items()}
    many = {name: len(c) for name, c in stats["categories"].items() if len(c) > MAX_CATEGORIES}
    if many:
        name, count = next(iter(many.items()))
        raise DataError(f"column {name!r} has {count:,} different texts in the train rows: one-hot encoding would "
                        f"give it {count:,} inputs (at most {MAX_CATEGORIES} are taken). An identifier, a name or free "
                        f"text is no category.\nFix: leave it out, data.features=[...] naming the other columns; a "
                        f"column of numbers written with text is read as numbers once its cells are numbers")
    return stats


def _fill(stats: dict) -> list:
    return stats.get("median", stats.get("fill"))


def stored(cfg, meta: dict) -> dict | None:
    """The statistics of the run data.statistics names (evaluating that run on this data), checked to be about
    the same columns and task; None when it names none."""
    same = ("numbers", "categorical", "task")
    run = stored_statistics(cfg, (*same, "mean", "std", "categories"), optional=("median", "fill", "y_mean", "y_std"))
    if run is None:
        return None
    for key in same:
        if run[key] != meta[key]:
            raise DataError(f"data.statistics={cfg.data.statistics} is about other data: its {key} is {run[key]}, "
                            f"this table's is {meta[key]}.\nFix: give this table the run's columns, or leave "
                            f"data.statistics unset.")
    return {k: v for k, v in run.items() if k not in same}


def preprocess(batch: dict, stats: dict) -> dict:
    """Numbers filled and scaled with the stored statistics, then each text column one-hot over its stored
    categories (an unseen or empty category: all zeros); the splits in prepare() and new inputs in
    read_inputs() go through this same function."""
    x = batch["numbers"]
    if "median" in stats or "fill" in stats:
        x = np.where(np.isnan(x), np.asarray(_fill(stats)), x)
    parts = [(x - np.asarray(stats["mean"])) / np.asarray(stats["std"])]
    for name, categories in stats["categories"].items():
        parts.append(np.asarray(batch[name])[:, None] == np.asarray(categories, dtype=object)[None, :])
    return {"features": np.concatenate(parts, axis=1).astype(np.float32)}


def split_columns(table, numbers: list[str], texts: list[str]) -> dict:
    # float32 first, as the shards store numbers: statistics of exactly the values the model sees
    numbers = table[numbers].to_numpy(np.float32).astype(np.float64).reshape(len(table), len(numbers))
    return {"numbers": numbers,
            **{name: table[name].to_numpy() for name in texts}}

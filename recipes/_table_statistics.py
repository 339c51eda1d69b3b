"""Statistics of a table's train rows (fill values, means and stds, one-hot categories), fitted on train alone and
applied alike to every split and to new inputs; kept in the run's meta.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import DataError
from recipes._table_stream import RowsFile, batches, numbers_of
from recipes._tables import stored_statistics

MAX_CATEGORIES = 256  # one-hot inputs a text column may add: more is an identifier or free text, not a category


def merge(a: tuple, b: tuple) -> tuple:
    """Chan et al.'s parallel update: (count, mean, sum of squared deviations) of two parts -> of both."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = mb - ma
        mean = np.where(nb == 0, ma, np.where(na == 0, mb, ma + delta * nb / n))
        m2 = np.where(nb == 0, sa, np.where(na == 0, sb, sa + sb + delta**2 * na * nb / n))
    return n, mean, m2


def moments(x: np.ndarray) -> tuple:
    """(count, mean, sum of squared deviations) of each column's non-NaN values."""
    given = ~np.isnan(x)
    n = given.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(given, x, 0).sum(axis=0) / n
        m2 = np.where(given, (x - mean) ** 2, 0).sum(axis=0)
    return n, mean, m2


def median(arrow_file: Path, name: str, train: np.ndarray) -> float:
    """The exact median of a number column's non-empty train values (np.nanmedian), one column in memory."""
    with pa.memory_map(str(arrow_file)) as f:
        column = pa.ipc.open_file(f).read_all().column(name)
        parts, start = [], 0
        for chunk in column.chunks:
            values = chunk.to_numpy().astype(np.float32)[train[start : start + len(chunk)]]
            parts.append(values[~np.isnan(values)])
            start += len(chunk)
    values = np.concatenate(parts) if parts else np.empty(0, np.float32)
    if not len(values):
        return float("nan")
    half = len(values) // 2
    values.partition([half - 1, half] if len(values) % 2 == 0 else [half])
    return float(values[half]) if len(values) % 2 else (float(values[half - 1]) + float(values[half])) / 2


def fit(arrow_file: Path, numbers: list[str], texts: list[str], train: np.ndarray, cfg) -> dict:
    """Fill values, means and stds of the number columns and the categories of the text columns, from the train
    rows alone (`train`: a mask over the rows of the checked Arrow file), as SimpleImputer, StandardScaler and
    OneHotEncoder fit them, read a batch at a time: means and stds merge the batches' moments."""
    k, impute = len(numbers), cfg.data.impute.name
    given, empty = (np.zeros(k), np.zeros(k), np.zeros(k)), np.zeros(k)
    categories: dict[str, set] = {name: set() for name in texts}
    for start, batch in batches(arrow_file):
        mine = train[start : start + batch.num_rows]
        x = numbers_of(batch, numbers)[mine]
        given = merge(given, moments(x))
        empty += np.isnan(x).sum(axis=0)
        for name in texts:
            categories[name].update(pc.unique(batch.column(name).filter(pa.array(mine))).to_pylist())
    stats = {}
    if impute != "none" and k:
        fill = [median(arrow_file, n, train) for n in numbers] if impute == "median" else given[1].tolist()
        stats["median" if impute == "median" else "fill"] = fill
        given = merge(given, (empty, np.asarray(fill, dtype=np.float64), np.zeros(k)))
    n, mean, m2 = given
    standardize = cfg.data.standardize and k
    with np.errstate(invalid="ignore", divide="ignore"):
        stats["mean"] = mean.tolist() if standardize else [0.0] * k
        stats["std"] = np.sqrt(m2 / n).tolist() if standardize else [1.0] * k
    stats["categories"] = {name: sorted(values - {""}) for name, values in categories.items()}
    require_few_categories(stats["categories"])
    return stats


def require_few_categories(categories: dict[str, list]) -> None:
    many = {name: len(c) for name, c in categories.items() if len(c) > MAX_CATEGORIES}
    if many:
        name, count = next(iter(many.items()))
        raise DataError(
            f"column {name!r} has {count:,} different texts in the train rows: one-hot encoding would "
            f"give it {count:,} inputs (at most {MAX_CATEGORIES} are taken). An identifier, a name or free "
            f"text is no category.\nFix: leave it out, data.features=[...] naming the other columns; a "
            f"column of numbers written with text is read as numbers once its cells are numbers"
        )


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
            raise DataError(
                f"data.statistics={cfg.data.statistics} is about other data: its {key} is {run[key]}, "
                f"this table's is {meta[key]}.\nFix: give this table the run's columns, or leave "
                f"data.statistics unset."
            )
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
        # by Arrow's hash lookup, not a Python comparison per cell
        values = batch[name] if isinstance(batch[name], pa.Array) else pa.array(batch[name], pa.string())
        at = pc.index_in(values, value_set=pa.array(categories, pa.string()))
        parts.append(at.fill_null(-1).to_numpy()[:, None] == np.arange(len(categories))[None, :])
    return {"features": np.concatenate(parts, axis=1).astype(np.float32)}


def split_columns(table, numbers: list[str], texts: list[str]) -> dict:
    # float32 first, as the shards store numbers: statistics of exactly the values the model sees
    numbers = table[numbers].to_numpy(np.float32).astype(np.float64).reshape(len(table), len(numbers))
    return {"numbers": numbers, **{name: table[name].to_numpy() for name in texts}}


def features_file(checked: Path, columns: tuple[list[str], list[str]], stats: dict, out: Path) -> RowsFile:
    """Every row's features (`columns`: the number and text columns), preprocessed batch by batch into the float32
    file `out`."""
    numbers, texts = columns
    x = None
    for _, batch in batches(checked):
        part = preprocess(
            {"numbers": numbers_of(batch, numbers), **{name: batch.column(name) for name in texts}}, stats
        )["features"]
        if x is None:
            x = RowsFile(out, part.shape[1])
        x.append(part)
    return x

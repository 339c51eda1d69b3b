"""The target column of a table: its task (binary, multiclass, regression) inferred, its classes and each row's
class index, or its standardized value; with the checks that name a target a model cannot learn."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import ConfigError, DataError
from recipes import _table_stream as stream
from recipes._table_statistics import merge, moments
from recipes._tables import require_rows, require_spread

if TYPE_CHECKING:
    from recipes.tabular import Spec

MAX_CLASSES_INFERRED = 20  # a whole-number target with at most this many values is read as classes
# |target| a float32 squared error takes unscaled: a batch of 64 such squares stays below float32's 3.4e38.
UNSCALED_LIMIT = 1e18


def infer_task(cfg, values: np.ndarray, target: str, spec: Spec) -> str:
    """binary | multiclass | regression: data.task, or from the target's values (said in the log)."""
    distinct = np.unique(values)
    whole = values.dtype != object and np.all(np.mod(values, 1) == 0)
    if cfg.data.task.name != "auto":
        task = cfg.data.task.name
        if task == "regression" and values.dtype == object:
            raise DataError(
                f"data.task=regression, but the target column {target!r} holds text (e.g. "
                f"{distinct[0]!r}).\nFix: choose data.task=binary or multiclass, or another data.target"
            )
        if task == "binary" and len(distinct) != 2:
            raise DataError(
                f"data.task=binary, but the target column {target!r} has {len(distinct)} values "
                f"({_few(distinct)}).\nFix: data.task=multiclass, or a target with two values"
            )
        return task
    if spec.target_values:
        task = "binary" if len(spec.target_values) == 2 else "multiclass"
    elif values.dtype == object or (whole and len(distinct) <= MAX_CLASSES_INFERRED):
        task = "binary" if len(distinct) == 2 else "multiclass"
    else:
        task = "regression"
    print(
        f"data: task {task}, inferred from the target {target!r} ({len(distinct)} values: {_few(distinct)}); "
        f"set data.task=binary|multiclass|regression to choose"
    )
    return task


def require_classes(path: Path, target: str, distinct: np.ndarray, rows: int) -> None:
    """A classifier needs two classes to tell apart; with one its metrics are undefined."""
    if len(distinct) < 2:
        value = distinct[0]
        value = int(value) if isinstance(value, float) and value.is_integer() else value
        raise DataError(
            f"{path.resolve()}: the target column {target!r} has one value in all {rows} rows "
            f"({target}={value}), so there is nothing to classify.\nFix: use a file with rows of at "
            f"least two classes, or choose another data.target (data.task=regression for a number)"
        )


def require_squares_fit(path: Path, target: str, y: np.ndarray) -> None:
    """An unscaled target is learned by a float32 squared error: values beyond UNSCALED_LIMIT overflow it (inf loss)."""
    largest = float(np.abs(y).max())
    if largest > UNSCALED_LIMIT:
        raise DataError(
            f"{path.resolve()}: the target column {target!r} reaches {largest:.3g}, and with "
            f"data.standardize=false the training loss squares such values in float32, beyond its 3.4e38."
            f"\nFix: leave data.standardize=true (the default: the loss sees the standardized target, the "
            f"metrics and predictions stay in the target's units), or divide the column by a power of 10"
        )


def _few(values: np.ndarray) -> str:
    shown = ", ".join(str(v) for v in values[:5])
    return shown + (f", ... ({len(values)} in all)" if len(values) > 5 else "")


def class_list(values: np.ndarray, spec: Spec) -> list:
    """The classes in order: the preset's valid values, or the target's sorted values (numbers numerically)."""
    if spec.target_values:
        return [str(v) if values.dtype == object else v for v in spec.target_values]
    return sorted(set(values.tolist()))


def target_scale(cfg, path: Path, target: str, checked: Path, train: np.ndarray, stats: dict) -> np.ndarray:
    """A regression target's train mean and std (into `stats`, unless stored) and each row's standardized value."""
    seen, largest = (0, 0.0, 0.0), 0.0
    for start, batch in stream.batches(checked):
        y = batch.column(target).to_numpy().astype(np.float32)
        seen = merge(seen, moments(y[train[start : start + len(y)], None].astype(np.float64)))
        largest = max(largest, float(np.abs(y).max()))
    if "y_mean" not in stats:
        scale = cfg.data.standardize
        n, mean, m2 = seen
        stats.update(y_mean=float(mean[0]) if scale else 0.0, y_std=float(np.sqrt(m2[0] / n[0])) if scale else 1.0)
        if scale:
            require_spread(path, {target: stats["y_std"]}, int(n[0]))
        else:
            require_squares_fit(path, target, np.array([largest]))
    parts = [
        ((batch.column(target).to_numpy().astype(np.float32) - stats["y_mean"]) / stats["y_std"]).astype(np.float32)
        for _, batch in stream.batches(checked)
    ]
    return np.concatenate(parts)


def class_targets(cfg, path: Path, target: str, values: np.ndarray, spec: Spec, checked: Path):
    """Each row's class index (in the classes' sorted order) and the class names, data.class_names or the values
    themselves; a stratified split needs 2 rows of each class."""
    classes = class_list(values, spec)
    y = stream.codes(checked, target, classes)
    names = list(cfg.data.class_names) or [str(c) for c in classes]
    if len(names) != len(classes):
        raise ConfigError(
            f"data.class_names has {len(names)} names, but the target {target!r} has "
            f"{len(classes)} values ({_few(np.asarray(classes, dtype=object))}).\nFix: one name "
            f"per value, in their sorted order, or leave data.class_names empty"
        )
    counts = np.bincount(y, minlength=len(classes))
    for i in range(len(names)):
        require_rows(
            path, int(counts[i]), lambda n: n >= 2, f"with {target}={classes[i]} (a stratified split needs 2 of each)"
        )
    return y, names

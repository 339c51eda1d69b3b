"""tabular: any CSV or Parquet table of one's own -> an MLP (or a linear model) that predicts one column of it.

python launch/train.py recipe=tabular data.file=/data/cancer.csv data.target=diagnosis
python launch/train.py recipe=tabular data.file=houses.parquet data.target=price model.hidden=[]  # linear
The task (binary, multiclass, regression) is inferred from the target unless data.task says it; text columns
are categorical (one-hot, categories from the train rows); missing numbers are filled with train medians
(data.impute) and every number is standardized with train statistics (data.standardize), kept with the run so
that evaluate and predict use the same ones. water_potability and house_prices_linear are presets of this one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import PartialState
from datasets.fingerprint import get_temporary_cache_files_directory
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score
from torchmetrics.classification import (
    BinaryConfusionMatrix,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)
from torchmetrics.wrappers import LambdaInputTransformer

from pipeline.config import ModelConfig, choice
from pipeline.errors import ConfigError, DataError
from pipeline.files import scratch_folder
from pipeline.recipe import Recipe, binary_metrics, class_columns, cross_entropy
from recipes import _table_stream as stream
from recipes._splits import split_indices, split_sizes
from recipes._table_cells import Column, table_records
from recipes._table_statistics import features_file, fit, preprocess, split_columns, stored
from recipes._table_target import class_targets, infer_task, require_classes, target_scale
from recipes._tables import (
    NUMBER,
    CsvData,
    Reading,
    check_meta,
    raw_file,
    read,
    require_spread,
    with_statistics,
)

Task = choice("Task", ("auto", "binary", "multiclass", "regression"))
Impute = choice("Impute", ("median", "mean", "none"))
ACTIVATIONS = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
}
Activation = choice("Activation", ACTIVATIONS)


@dataclass
class TabularData(CsvData):
    target: str = ""  # the column to predict (required)
    features: list[str] = field(default_factory=list)  # the input columns; empty: every column but the target
    task: Task = Task.auto  # auto: text or few whole numbers -> classes (2: binary), other numbers -> regression
    categorical: list[str] = field(default_factory=list)  # number columns to one-hot too (text columns always are)
    impute: Impute = Impute.median  # fills an empty number cell, fitted on the train rows; none: refuse empty cells
    standardize: bool = True  # numbers (and a regression target) scaled by the train mean and std
    class_names: list[str] = field(default_factory=list)  # names for the target's values, in their sorted order
    eval_fraction: float = 0.2


@dataclass
class TabularModel(ModelConfig):
    # Hidden layer widths; [] is a linear model; null: by task (HIDDEN), said in the log.
    hidden: list[int] | None = None
    activation: Activation = Activation.relu
    batchnorm: bool = False
    dropout: float = 0.0


@dataclass(frozen=True)
class Spec:
    """How a preset reads its table: which columns, which target values are valid, what renames them."""

    columns: Callable = lambda cfg: (list(cfg.data.features), cfg.data.target)  # cfg -> (features or [], target)
    target_values: tuple = ()  # the valid values of a classification target (e.g. (0, 1)); () any
    rename: str = "data.target= data.features="  # the keys that choose other columns, for messages
    expected: str = "a CSV or Parquet table with a header row naming its columns"


# ---------------------------------------------------------------- raw table -> columns


def raw_files(cfg, spec: Spec = Spec()) -> list[Path]:
    path = raw_file(cfg, spec.expected)
    features, target = spec.columns(cfg)
    if not target:
        raise ConfigError(
            f"recipe=tabular needs the column to predict: data.target=<column name>; {path} has the "
            f"columns {', '.join(read_header(path)[0])}"
        )
    if target in features:
        raise ConfigError(
            f"data.target={target} is also among data.features={list(features)}: the model would be "
            f"given the answer as an input (a label leak).\nFix: remove {target} from data.features "
            f"(or leave data.features empty: every column but the target)"
        )
    return with_statistics(cfg, [path])


def sniff(cfg, path: Path, spec: Spec) -> tuple[list[str], str, list[str]]:
    """(features, target, categorical features): the named columns, or all but the target; a column is
    categorical when named in data.categorical or when most of its cells are not numbers."""
    features, target = spec.columns(cfg)
    header, *rows = read_header(path)
    features = features or [name for name in header if name != target]
    categorical = [
        name
        for name in features
        if name in cfg.data.categorical or (name in header and _mostly_text(rows, header.index(name)))
    ]
    return features, target, categorical


def read_header(path: Path) -> list[list[str]]:
    """The header and up to 1,000 rows as text (for `sniff`)."""
    return [row for _, row in table_records(path, limit=1001)]


def _mostly_text(rows: list[list[str]], column: int) -> bool:
    cells = [row[column].strip() for row in rows if column < len(row) and row[column].strip()]
    return sum(not _number(cell) for cell in cells) * 2 > len(cells)


def _number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def table_columns(cfg, spec: Spec, path: Path):
    """The table's feature and target columns to read and check, the features, categorical ones and target, and
    what the train/eval split needs: enough(rows) and how it splits, for the message."""
    features, target, categorical = sniff(cfg, path, spec)
    impute = cfg.data.impute.name != "none"
    columns = [
        Column(name, "category" if name in categorical else "number", empty_ok=impute or name in categorical)
        for name in features
    ]
    text_target = target in categorical or _target_is_text(path, target)
    values = tuple(str(v) for v in spec.target_values) if text_target else spec.target_values
    columns.append(Column(target, "category" if text_target else "number", values=values))
    classify = cfg.data.task.name in ("binary", "multiclass") or bool(spec.target_values)
    fraction, need = cfg.data.eval_fraction, 2 if classify else 1
    how = f"with data.eval_fraction={fraction}" + (
        " (stratified: each part needs a row of each class)" if classify else ""
    )
    return columns, (features, categorical, target), lambda n: min(split_sizes(n, fraction)) >= need, how


def _target_is_text(path: Path, target: str) -> bool:
    header, *rows = read_header(path)
    return target in header and _mostly_text(rows, header.index(target))


def prepare(cfg, spec: Spec = Spec()):
    """The table read and checked in record batches into a temporary Arrow file, its train statistics fitted and
    the splits written from there: memory holds a batch and a few numbers a row, not the table."""
    path = raw_files(cfg, spec)[0]
    columns, (features, categorical, target), enough, how = table_columns(cfg, spec, path)
    numbers = [name for name in features if name not in categorical]
    scratch = scratch_folder() or get_temporary_cache_files_directory()  # beside the shards, on the cache's disk
    with tempfile.TemporaryDirectory(prefix="tabular-", dir=scratch) as work:
        checked = Path(work) / "checked.arrow"
        rows, report = stream.check_into(cfg, path, columns, checked, (enough, how), spec.rename)
        values, _ = stream.distinct(checked, target)
        if values.dtype != object and np.all(np.mod(values, 1) == 0) and np.all(np.abs(values) <= 2**53):
            values = values.astype(np.int64)  # classes "0", "1" as written (in messages, meta), not 0.0 and 1.0
        task = infer_task(cfg, values, target, spec)
        meta = {"task": task, "target": target, "numbers": numbers, "categorical": categorical, **report}
        if task == "regression":
            y, target_feature = None, datasets.Value("float32")
        else:
            require_classes(path, target, values, rows)
            y, meta["class_names"] = class_targets(cfg, path, target, values, spec, checked)
            target_feature = datasets.ClassLabel(names=meta["class_names"])
        print(
            f"data: {len(numbers)} number column{'s' * (len(numbers) != 1)}"
            + (f", {len(categorical)} categorical (one-hot): {', '.join(categorical)}" if categorical else "")
            + f" -> {target!r} ({task})"
        )
        parts = dict(zip(("train", "eval"), split_indices(rows, cfg.data.eval_fraction, cfg.data.split_seed, y)))
        train = np.zeros(rows, dtype=bool)
        train[parts["train"]] = True
        stats = stored(cfg, meta) or fit(checked, numbers, categorical, train, cfg)
        if cfg.data.standardize:
            require_spread(path, dict(zip(numbers, stats["std"])), len(parts["train"]))
        if task == "regression":
            y = target_scale(cfg, path, target, checked, train, stats)
        meta.update(stats, feature_names=[*numbers, *(f"{n}={c}" for n in categorical for c in stats["categories"][n])])
        x = features_file(checked, (numbers, categorical), stats, Path(work) / "features.f32")
        kinds = datasets.Features(
            {"features": datasets.List(datasets.Value("float32"), length=x.width), "label": target_feature}
        )
        splits = {
            name: stream.write_split(x, y, at, kinds, (scratch, cfg.data.num_shards)) for name, at in parts.items()
        }
        del x
    return datasets.DatasetDict(splits), meta


def read_inputs(cfg, meta: dict, path: Path, spec: Spec = Spec()) -> tuple[dict, dict]:
    """New rows with the run's feature columns (the target column, if present, is ignored), preprocessed with
    the run's stored statistics."""
    try:
        check_meta(meta, META_INPUTS)
    except KeyError as e:
        raise DataError(
            f"the run's meta.json has no {e}: the train statistics that new rows are preprocessed with. "
            f"The file is damaged or from an older version of this recipe.\nFix: restore meta.json "
            f"from a copy of the run folder, or train the run again"
        ) from None
    impute = "median" in meta or "fill" in meta
    columns = [
        Column(
            name,
            "category" if name in meta["categorical"] else "number",
            empty_ok=impute or name in meta["categorical"],
        )
        for name in meta["numbers"] + meta["categorical"]
    ]
    table, _ = read(cfg, path, columns, lambda n: n >= 1, "", Reading(source="input="))
    batch = split_columns(table, meta["numbers"], meta["categorical"])
    return {"line": table.attrs["lines"]}, preprocess(batch, meta)


def predicted(outputs: torch.Tensor, meta: dict) -> dict:
    """Class names and probabilities, or the predicted value in the target's units."""
    if meta["task"] != "regression":
        return class_columns(outputs, meta)
    return {meta["target"]: (outputs.float() * meta["y_std"] + meta["y_mean"]).numpy()}


# ---------------------------------------------------------------- model, loss, metrics


class TabularNet(nn.Module):
    """Linear layers of the given widths, each followed by [BatchNorm] activation [Dropout]; the last gives one
    logit per class (one for binary: the sigmoid lives in the loss) or the predicted value."""

    def __init__(
        self,
        inputs: int,
        hidden: list[int],
        outputs: int,
        activation: str = "relu",
        batchnorm: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        layers, width = [], inputs
        for size in hidden:
            layers += [
                nn.Linear(width, size),
                *([nn.BatchNorm1d(size)] if batchnorm else []),
                ACTIVATIONS[activation](),
                *([nn.Dropout(dropout)] if dropout else []),
            ]
            width = size
        self.net = nn.Sequential(*layers, nn.Linear(width, outputs))

    def forward(self, features):
        out = self.net(features)
        return out.squeeze(1) if out.shape[1] == 1 else out


# The default widths by task: a number target (few rows, much noise, a mostly linear signal) overfits two layers
# within the default epochs; one layer of 32 keeps its final weights at a ridge regression's R^2 on the reference
# tables (docs/reference.md#tables), and classes keep the wider net that serves them better there.
HIDDEN = {"binary": [64, 32], "multiclass": [64, 32], "regression": [32]}


# What model() reads from a run's meta.json, and what read_inputs, predicted and metrics read.
META_MODEL = {"task": str, "feature_names": list}
META_INPUTS = {"target": str, "numbers": list, "categorical": list, "mean": list, "std": list, "categories": dict}
META_OPTIONAL = {"class_names": list, "y_mean": NUMBER, "y_std": NUMBER, "median": list, "fill": list}


def model(cfg, meta: dict) -> TabularNet:
    # Every fact typed here: evaluate and predict build the model first, and name the run's meta.json if one is off.
    check_meta(meta, META_MODEL, {**META_INPUTS, **META_OPTIONAL})
    outputs = len(meta["class_names"]) if meta["task"] == "multiclass" else 1
    m = cfg.model
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"bad value model.dropout={m.dropout}: a probability in [0, 1)")
    hidden = list(m.hidden) if m.hidden is not None else HIDDEN[meta["task"]]
    if m.hidden is None:
        PartialState().print(f"model: hidden layers {hidden} for {meta['task']} (model.hidden=null: by task)")
    return TabularNet(len(meta["feature_names"]), hidden, outputs, m.activation.name, m.batchnorm, m.dropout)


def loss(outputs: torch.Tensor, batch: dict) -> torch.Tensor:
    """MSE for a number target, binary cross-entropy on one logit, cross-entropy on class logits."""
    target = batch["label"]
    if target.is_floating_point():
        return nn.functional.mse_loss(outputs, target)
    if outputs.ndim == 1:
        return nn.functional.binary_cross_entropy_with_logits(outputs, target.float())
    return cross_entropy(outputs, batch)


def predictions(outputs: torch.Tensor, batch: dict) -> dict:
    target = batch["label"]
    if outputs.ndim == 1 and not target.is_floating_point():
        return {"": (outputs.sigmoid(), target)}
    return {"": (outputs, target)}


def metrics(cfg, meta: dict) -> dict:
    task = meta["task"]
    # Classifiers count their confusion matrix (summary, W&B chart and per-class table, confusion_matrix.png):
    # these predictions are this recipe's own, so the loop cannot add one for them.
    if task == "binary":
        head = binary_metrics(cfg, meta)[""]
        head.add_metrics({"confusion_matrix": BinaryConfusionMatrix()})
        return {"": head}
    if task == "multiclass":
        n = len(meta["class_names"])
        return {
            "": MetricCollection(
                {
                    "accuracy": MulticlassAccuracy(n, average="micro"),
                    "f1": MulticlassF1Score(n, average="macro"),
                    "auroc": MulticlassAUROC(n, average="macro"),
                    "confusion_matrix": MulticlassConfusionMatrix(n),
                }
            )
        }
    collection = MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError(), "r2": R2Score()})
    mean, std = meta["y_mean"], meta["y_std"]
    if (mean, std) == (0.0, 1.0):
        return {"": collection}

    def units(y):
        return y * std + mean

    # The loss is in standardized units; the metrics in the target's own ("label" holds the target, whatever the task).
    return {"": LambdaInputTransformer(collection, transform_pred=units, transform_target=units)}


def recipe_for(
    name: str,
    description: str,
    spec: Spec = Spec(),
    data_config: type = TabularData,
    defaults: dict | None = None,
    **fields,
) -> Recipe:
    """A tabular recipe: this module's, or a preset's with its own columns, config and defaults."""
    return Recipe(
        name=name,
        description=description,
        prepare=partial(prepare, spec=spec),
        raw_files=partial(raw_files, spec=spec),
        read_inputs=partial(read_inputs, spec=spec),
        predicted=predicted,
        data_config=data_config,
        model_config=TabularModel,
        model=model,
        activation=lambda cfg: cfg.model.activation.name,
        inputs=("features",),
        targets=("label",),
        loss=loss,
        predictions=predictions,
        metrics=metrics,
        defaults=defaults or {},
        **fields,
    )


recipe = recipe_for(
    "tabular",
    "a CSV/Parquet table of your own: data.file=... data.target=...; MLP 64-32 (32 for numbers), Adam 1e-3",
    # data.root ".": data.file is a path from the current folder (or absolute), as a user types it.
    # A small table still trains 16 steps an epoch, on every row: the batch halves to fit (trainer.min_steps_per_epoch).
    defaults={
        "data": {"root": "."},
        "trainer": {"epochs": 20, "batch_size": 64, "min_steps_per_epoch": 16, "last_batch": "complete"},
        "optimizer": {"name": "adam", "lr": 1e-3},
    },
)

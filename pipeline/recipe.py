"""What a recipe provides: the `Recipe` fields and their defaults, the binary-classification pieces, and splits built
from numpy arrays (the recipes by name and the contract's checks: `recipe_contract`).

A recipe holds only the task: raw data -> DatasetDict, the model, the loss, the metrics, its defaults.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.fingerprint import generate_random_fingerprint
from datasets.table import InMemoryTable
from omegaconf import OmegaConf
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryF1Score, BinaryPrecision, BinaryRecall

from pipeline.config import DataConfig, LossConfig, ModelConfig
from pipeline.errors import ConfigError


def cross_entropy(outputs: torch.Tensor, batch: dict) -> torch.Tensor:
    """The default loss: class logits [N, classes] against integer labels in `batch["label"]`."""
    if outputs.ndim < 2 or outputs.shape[1] == 1:  # one shape check a step; torch would fail or be silently wrong
        raise ConfigError(_one_output(outputs, batch))
    return nn.functional.cross_entropy(outputs, batch["label"])


def _one_output(outputs: torch.Tensor, batch: dict) -> str:
    shape = f"outputs of shape {list(outputs.shape)}"
    label = batch.get("label")
    if label is not None and not label.is_floating_point():
        return (
            f"the model returns one number per sample ({shape}) and the labels are integers, but the recipe "
            f"uses the default loss, cross_entropy, which needs one logit per class ([N, classes]).\nFix: for a "
            f"0/1 label use the binary pieces: `from pipeline.recipe import binary_cross_entropy, "
            f"binary_metrics, binary_predictions` and `Recipe(..., loss=binary_cross_entropy, "
            f"predictions=binary_predictions, metrics=binary_metrics)`; or let the model return [N, 2] logits."
        )
    return (
        f"the model returns one number per sample ({shape}), but the recipe uses the default loss, "
        f"cross_entropy, which needs class logits [N, classes] and integer labels in batch['label'].\nFix: "
        f"to predict a number give the Recipe a loss of its own, e.g. `loss=lambda outputs, batch: "
        f"torch.nn.functional.mse_loss(outputs, batch['y'])` with `targets=('y',)` and matching `predictions`."
    )


# Binary classification (a 0/1 label, one logit per sample): loss, predictions and metrics for a Recipe.
def _logit(outputs: torch.Tensor) -> torch.Tensor:
    if outputs.ndim == 2 and outputs.shape[1] == 1:
        return outputs.squeeze(1)
    if outputs.ndim != 1:
        raise ConfigError(
            f"the binary pieces take one logit per sample ([N] or [N, 1]); the model returns "
            f"{list(outputs.shape)}.\nFix: end the model with nn.Linear(..., 1), or for more than "
            f"two classes use the default loss, predictions and multiclass metrics."
        )
    return outputs


def binary_cross_entropy(outputs: torch.Tensor, batch: dict) -> torch.Tensor:
    """One logit per sample against 0/1 labels in `batch["label"]`; the sigmoid is inside, where it cannot overflow."""
    return nn.functional.binary_cross_entropy_with_logits(_logit(outputs), batch["label"].float())


def binary_predictions(outputs: torch.Tensor, batch: dict) -> dict:
    return {"": (_logit(outputs).sigmoid(), batch["label"])}


def binary_metrics(cfg, meta: dict) -> dict:
    """Accuracy, precision, recall and F1 at probability 0.5, and AUROC over all thresholds."""
    return {
        "": MetricCollection(
            {
                "accuracy": BinaryAccuracy(),
                "precision": BinaryPrecision(),
                "recall": BinaryRecall(),
                "f1": BinaryF1Score(),
                "auroc": BinaryAUROC(),
            }
        )
    }


def label_predictions(outputs: torch.Tensor, batch: dict) -> dict:
    return {"": (outputs, batch["label"])}


def no_transform(batch: dict, train: bool, meta: dict) -> dict:
    return batch


def class_columns(outputs: torch.Tensor, meta: dict) -> dict:
    """The default `predicted`: the class name and each class's probability, from class logits [N, classes]
    (softmax) or from one logit per sample [N] (sigmoid; class_names[1] above 0.5, as BinaryAccuracy counts)."""
    names = meta.get("class_names")
    if not names:
        raise ConfigError(
            "this run's meta.json has no class_names, so its outputs cannot be named as classes.\n"
            "Fix: give the recipe a `predicted=(outputs, meta) -> {column: values}` that says what "
            "its outputs mean (e.g. values in the target's units)"
        )
    if outputs.ndim == 1 or outputs.shape[1] == 1:
        p = _logit(outputs).float().sigmoid()
        return {"class": [names[int(positive)] for positive in p > 0.5], f"p({names[1]})": p.numpy()}
    p = outputs.float().softmax(1)
    return {
        "class": [names[i] for i in p.argmax(1).tolist()],
        **{f"p({n})": p[:, i].numpy() for i, n in enumerate(names)},
    }


@dataclass
class Recipe:
    """One task for the shared loop. Every field is described in docs/writing-a-recipe.md;
    `check` tests the fields when a recipe loads, `check_prepared` what `prepare` returns."""

    name: str
    description: str
    # cfg -> (DatasetDict with "train", "eval" and optionally "test"; meta: JSON-able facts such as
    # class names or train statistics, saved beside the shards and with the run)
    prepare: Callable
    # cfg -> the raw files prepare() reads; raises DataError naming what is missing and how to fix it
    raw_files: Callable
    # (cfg, meta) -> nn.Module
    model: Callable
    # (cfg, meta) -> {head: torchmetrics Metric or MetricCollection}; head "" for single-output tasks
    metrics: Callable
    # (outputs, batch, **settings) -> scalar mean loss over the batch. settings: the `loss.*` keys (the fields of
    # `loss_config`, none by default) as keyword arguments, e.g. omniglot_multi's `alphabet_weight`
    loss: Callable = cross_entropy
    # (outputs, batch) -> {head: (preds, target)} fed to that head's metrics
    predictions: Callable = label_predictions
    # (batch, train, meta) -> batch: normalization and augmentation of a whole batch on its device
    transform: Callable = no_transform
    # `data.` keys that only `transform` reads (e.g. augmentation), not prepare(): left out of the shards'
    # fingerprint, so changing one reuses the shards; `transform` finds each in meta, from the run's config
    transform_keys: tuple = ()
    activation: str | Callable = "relu"  # the model's nonlinearity for the gain of `model.init`; or cfg -> it
    # batch columns passed to the model, in order; or cfg -> such a tuple, where they depend on the config
    inputs: tuple | Callable = ("image",)
    targets: tuple = ("label",)  # batch columns the loss and metrics read
    defaults: dict = field(default_factory=dict)  # the tutorial's hyperparameters
    data_config: type = DataConfig  # subclass to add recipe keys under `data.`
    model_config: type = ModelConfig
    loss_config: type = LossConfig
    # In the shards' fingerprint beside the recipe's source (which already covers edits to prepare()):
    # bump it when the output changes for a reason the source does not show, e.g. a dependency's update.
    version: int = 1
    # (columns, meta, split) -> a batch-indexable dataset; default: the columns indexed by row
    dataset: Callable | None = None
    # Prediction on new inputs (launch/predict.py); None: the recipe does not predict.
    # (cfg, meta, path) -> (ids, columns): new inputs in the recipe's raw format, preprocessed with the run's stored
    # statistics (meta) by the same function prepare() applies; ids: {column: one value per row} naming each row
    # (a file, a CSV line), columns: {name: numpy array} as the shards hold them, before `transform`; or an
    # iterator of such pairs, a chunk at a time (inputs larger than memory: see recipes._images.image_inputs)
    read_inputs: Callable | None = None
    # (outputs, meta) -> {column: one value per row} for the predictions CSV: class names and probabilities by
    # default; a regression recipe gives values in the target's units
    predicted: Callable = class_columns


def loss_fn(recipe: Recipe, cfg, meta: dict | None = None) -> Callable:
    """The recipe's loss with its settings (the `loss.*` keys) bound; `meta` is not used."""
    settings = OmegaConf.to_container(cfg.loss)
    if not settings:
        return recipe.loss
    try:
        inspect.signature(recipe.loss).bind(None, None, **settings)
    except TypeError as e:
        raise ConfigError(
            f"recipe {recipe.name!r}: its loss {getattr(recipe.loss, '__name__', recipe.loss)} "
            f"cannot take the `loss.*` settings {', '.join(settings)} ({e}).\nFix: give the loss "
            f"(outputs, batch, ...) a keyword argument per field of its loss_config."
        ) from None
    return functools.partial(recipe.loss, **settings)


def activation(recipe: Recipe, cfg) -> str:
    """The model's nonlinearity under this config (for `model.init`)."""
    return recipe.activation(cfg) if callable(recipe.activation) else recipe.activation


def with_transform_keys(recipe: Recipe, cfg, meta: dict) -> dict:
    """meta with the recipe's `transform_keys` from this config (`data.augment` -> meta["augment"])."""
    return {**meta, **{key: OmegaConf.to_container(cfg.data, resolve=True)[key] for key in recipe.transform_keys}}


def model_inputs(recipe: Recipe, cfg) -> tuple:
    """The batch columns the model takes under this config, in order."""
    return tuple(recipe.inputs(cfg) if callable(recipe.inputs) else recipe.inputs)


def from_arrays(**columns: np.ndarray) -> datasets.Dataset:
    """A split from numpy arrays with one row per sample, each column stored with its fixed shape and dtype:
    [N] -> a number, [N, F] -> F numbers, [N, C, H, W] -> an image array."""
    features = {}
    for name, array in columns.items():
        array = np.asarray(array)
        dtype = str(array.dtype)
        if array.ndim == 1:
            features[name] = datasets.Value(dtype)
        elif array.ndim == 2:
            features[name] = datasets.List(datasets.Value(dtype), length=array.shape[1])
        elif array.ndim <= 6:
            features[name] = getattr(datasets, f"Array{array.ndim - 1}D")(shape=array.shape[1:], dtype=dtype)
        else:
            raise ConfigError(f"from_arrays: column {name!r} has {array.ndim} dimensions; at most 6 are stored.")
    return dataset(columns, datasets.Features(features))


def dataset(columns: dict[str, np.ndarray], features: datasets.Features) -> datasets.Dataset:
    """`Dataset.from_dict(columns, features=features)`; columns of numbers [N] and [N, F] are built as whole
    Arrow arrays in one call each (from_dict encodes them row by row, a Python object per cell)."""
    if any(np.ndim(array) > 2 for array in columns.values()):
        return datasets.Dataset.from_dict(columns, features=features)
    arrays = {}
    for name, array in columns.items():
        array = np.ascontiguousarray(array)
        arrays[name] = (
            pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])
            if array.ndim == 2
            else pa.array(array)
        )
    return datasets.Dataset(
        InMemoryTable(pa.table(arrays).cast(features.arrow_schema)),
        info=datasets.DatasetInfo(features=features),
        fingerprint=generate_random_fingerprint(),
    )

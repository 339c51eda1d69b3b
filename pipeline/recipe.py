"""What a recipe provides, and the recipes by name (every module in `recipes/` that defines `recipe`).

A recipe holds only the task: raw data -> DatasetDict, the model, the loss, the metrics, its defaults.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.config import ConfigError, DataConfig, LossConfig, ModelConfig


def cross_entropy(outputs: torch.Tensor, batch: dict) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, batch["label"])


def label_predictions(outputs: torch.Tensor, batch: dict) -> dict:
    return {"": (outputs, batch["label"])}


def no_transform(batch: dict, train: bool, meta: dict) -> dict:
    return batch


@dataclass
class Recipe:
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
    # (outputs, batch) -> scalar mean loss over the batch
    loss: Callable = cross_entropy
    # (cfg, meta) -> such a loss, for losses with settings of their own (`loss.*` keys); replaces `loss`
    make_loss: Callable | None = None
    # (outputs, batch) -> {head: (preds, target)} fed to that head's metrics
    predictions: Callable = label_predictions
    # (batch, train, meta) -> batch: normalization and augmentation of a whole batch on its device
    transform: Callable = no_transform
    activation: str = "relu"  # the model's nonlinearity, for the gain of `model.init`
    inputs: tuple = ("image",)  # batch columns passed to the model, in order
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


def loss_fn(recipe: Recipe, cfg, meta: dict) -> Callable:
    return recipe.make_loss(cfg, meta) if recipe.make_loss else recipe.loss


def names() -> list[str]:
    import recipes

    return sorted(m.name for m in pkgutil.iter_modules(recipes.__path__) if not m.name.startswith("_"))


def load(name: str) -> Recipe:
    available = names()
    if name not in available:
        raise ConfigError(f"unknown recipe {name!r}; available recipes: {', '.join(available)}")
    module = importlib.import_module(f"recipes.{name}")
    recipe = getattr(module, "recipe", None)
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"recipes/{name}.py defines no `recipe = Recipe(...)`")
    return recipe

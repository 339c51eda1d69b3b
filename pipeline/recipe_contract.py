"""The recipe contract enforced: recipes found by name (every module in `recipes/` that defines `recipe`, or any
importable module) and checked when they load, what their `prepare` returns, and the first batch."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import fields

import datasets
import numpy as np
import torch

from pipeline.decoded_shards import Undecoded, Written
from pipeline.errors import ConfigError
from pipeline.overrides import RECIPES as PACKAGE
from pipeline.overrides import recipe_names, unknown_recipe
from pipeline.recipe import Recipe, no_transform

# What prepare() may return for a split: its rows, or rows to decode while the shards are written.
SPLIT_TYPES = (datasets.Dataset, Undecoded, Written)

names = recipe_names  # the recipes in this repo's `recipes/`


def load_recipe(name: str) -> Recipe:
    """The `recipe` of `recipes/<name>.py`, or of any importable module given by its dotted path (`mypkg.my_recipe`),
    found on sys.path or, last, in the current folder: users keep their own recipes outside this repo."""
    path = name if "." in name else f"{PACKAGE}.{name}"
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # `python launch/train.py` puts launch/, not the current folder, on sys.path
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as e:
        if e.name is None or not (path == e.name or path.startswith(f"{e.name}.")):
            raise ConfigError(
                f"recipe {name!r}: importing {path} failed: {e}.\nFix: install that module "
                f"(pip install ...) or remove the import from the recipe."
            ) from None
        if "." not in name:
            raise ConfigError(unknown_recipe(name)) from None
        raise ConfigError(
            f"unknown recipe {name!r}: no module {e.name} (tried {path} from the current folder "
            f"{os.getcwd()}, PYTHONPATH and the installed packages).\nFix: run from the folder that "
            f"holds {path.split('.')[0]}/ or add it to PYTHONPATH; this repo's recipes: "
            f"{', '.join(names())}."
        ) from None
    recipe = getattr(module, "recipe", None)
    if not isinstance(recipe, Recipe):
        raise ConfigError(
            f"{module.__file__} defines no `recipe = Recipe(...)`.\nFix: end the module with "
            f"`recipe = Recipe(name=..., ...)` (pipeline.recipe.Recipe)."
        )
    return check_recipe(recipe)


def check_recipe(recipe: Recipe) -> Recipe:
    """The fields' types, when a recipe loads: a mistake is named with its fix before any data is read."""
    for f in fields(recipe):
        value, kind = getattr(recipe, f.name), str(f.type)
        if (
            kind == "Callable"
            and not callable(value)
            or kind == "Callable | None"
            and not (value is None or callable(value))
        ):
            _bad(
                recipe,
                f.name,
                "a function",
                f"pass the function itself, `{f.name}={f.name}` (no parentheses: the loop calls it)",
            )
        elif (
            kind.startswith("tuple")
            and not (kind.endswith("Callable") and callable(value))
            and (not isinstance(value, tuple) or not all(isinstance(v, str) for v in value))
        ):
            comma = " (a single name needs the trailing comma)" if isinstance(value, str) else ""
            what, example = (
                ("a tuple of `data.` keys", "augment")
                if f.name == "transform_keys"
                else ("a tuple of batch column names", "features")
            )
            _bad(recipe, f.name, what, f"`{f.name}=('{example}',)`{comma}; {FIELD_USE.get(f.name, '')}")
        elif kind == "str | Callable" and not (isinstance(value, str) or callable(value)):
            _bad(recipe, f.name, "a str or a function cfg -> str", FIELD_USE.get(f.name, ""))
        elif kind in ("dict", "str") and not isinstance(value, {"dict": dict, "str": str}[kind]):
            _bad(recipe, f.name, f"a {kind}", FIELD_USE.get(f.name, f"give `{f.name}` a {kind}"))
        elif kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            _bad(recipe, f.name, "an int", "e.g. `version=2`")
        elif kind == "type" and not isinstance(value, type):
            _bad(recipe, f.name, "a dataclass (the class itself)", f"`{f.name}=MyConfig`, a subclass of the default")
    if not recipe.inputs:
        _bad(recipe, "inputs", "at least one column name", FIELD_USE["inputs"])
    data_keys = {f.name for f in fields(recipe.data_config)}
    if unknown := [key for key in recipe.transform_keys if key not in data_keys]:
        raise ConfigError(
            f"{where(recipe)}: `transform_keys` names {', '.join(map(repr, unknown))}, not a key of its "
            f"data_config {recipe.data_config.__name__} ({', '.join(sorted(data_keys))}).\nFix: name "
            f"`data.` keys that only `transform` reads, or add the key to the data_config"
        )
    return recipe


FIELD_USE = {
    "inputs": "the columns the model's forward() takes, in its argument order",
    "targets": "the columns the loss and metrics read (default ('label',))",
    "defaults": "e.g. `defaults={'trainer': {'epochs': 10}, 'optimizer': {'lr': 1e-3}}`",
    "name": "the recipe's name, as given to `recipe=`",
    "description": "one line for `--help`",
    "activation": "the model's nonlinearity for `model.init`, e.g. 'relu'",
    "transform_keys": "the `data.` keys only `transform` reads, e.g. `transform_keys=('augment',)`",
}


def where(recipe: Recipe) -> str:
    """The recipe and the file that defines it, for messages."""
    prepare = getattr(recipe.prepare, "func", recipe.prepare)  # a functools.partial of a shared prepare()
    module = sys.modules.get(getattr(prepare, "__module__", ""))
    file = getattr(module, "__file__", None)
    return f"recipe {recipe.name!r}" + (f" ({file})" if file else "")


def _bad(recipe: Recipe, name: str, want: str, fix: str) -> None:
    value = getattr(recipe, name)
    raise ConfigError(
        f"{where(recipe)}: `{name}` must be {want}, but it is {type(value).__name__} {_short(value)}.\nFix: {fix}."
    )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_prepared(recipe: Recipe, result, cfg) -> tuple[datasets.DatasetDict, dict]:
    """What `prepare(cfg)` returned -> (DatasetDict, JSON-able meta), or a ConfigError naming the mistake."""
    expected = "`return datasets.DatasetDict(train=..., eval=...), meta` (meta: a dict of facts, {} if none)"
    if isinstance(result, dict) and all(isinstance(v, SPLIT_TYPES) for v in result.values()):
        raise ConfigError(
            f"{where(recipe)}: prepare(cfg) returned only the splits ({', '.join(result)}); it must "
            f"return two things, (DatasetDict, meta).\nFix: end prepare() with {expected}."
        )
    if not isinstance(result, tuple) or len(result) != 2:
        raise ConfigError(
            f"{where(recipe)}: prepare(cfg) returned {type(result).__name__} {_short(result)}; it "
            f"must return (DatasetDict, meta).\nFix: end prepare() with {expected}."
        )
    splits, meta = result
    if not isinstance(splits, dict) or not all(isinstance(v, SPLIT_TYPES) for v in splits.values()):
        raise ConfigError(
            f"{where(recipe)}: the first thing prepare(cfg) returns must be a datasets.DatasetDict, "
            f"but it is {type(splits).__name__} {_short(splits)}.\nFix: {expected}."
        )
    if not isinstance(meta, dict):
        raise ConfigError(
            f"{where(recipe)}: the second thing prepare(cfg) returns, meta, must be a dict, but it "
            f"is {type(meta).__name__} {_short(meta)}.\nFix: {expected}."
        )
    missing = [s for s in ("train", "eval") if s not in splits]
    if missing:
        raise ConfigError(
            f"{where(recipe)}: prepare(cfg) returned the splits {', '.join(splits) or '(none)'}; "
            f"{' and '.join(map(repr, missing))} missing. The loop trains on 'train', evaluates on "
            f"'eval' and, if present, 'test'.\nFix: {expected}."
        )
    # A split to decode while its shards are written (Undecoded), or written already (Written), is no Dataset.
    splits = datasets.DatasetDict(splits) if all(isinstance(v, datasets.Dataset) for v in splits.values()) else splits
    check_splits(recipe, splits, cfg)
    return splits, jsonable(meta)


def check_splits(recipe: Recipe, splits: dict, cfg) -> None:
    """Each split has rows, fixed-shape columns, and the columns `inputs` and `targets` name (unless a
    `transform` or `dataset` builds the batches: then `check_batch` looks at the first batch)."""
    for name, split in splits.items():
        if name == "train" and len(split) == 0:
            raise ConfigError(
                f"{where(recipe)}: prepare(cfg) returned an empty 'train' split.\nFix: check the "
                f"raw files and the split sizes prepare() uses."
            )
        for column, feature in split.features.items():
            if not _fixed(feature):
                raise ConfigError(
                    f"{where(recipe)}: column {column!r} of the prepared {name!r} split has no fixed shape "
                    f"({feature}); the loop stacks each column into one tensor.\nFix: build the split with "
                    f"`pipeline.recipe.from_arrays({column}=array, ...)` (numpy arrays, one row per sample), or "
                    f"give Dataset.from_dict the features, e.g. datasets.List(datasets.Value('float32'), length=8) "
                    f"or datasets.Array3D(shape=(1, 28, 28), dtype='uint8')."
                )
        if recipe.dataset is None and recipe.transform is no_transform:
            _require_columns(recipe, cfg, split.column_names, f"the prepared {name!r} split")


def check_batch(recipe: Recipe, cfg, batch: dict) -> None:
    """At the first training step, after `transform`: the batch holds the columns `inputs` and `targets` name."""
    _require_columns(recipe, cfg, list(batch), "the first training batch (after the recipe's dataset and transform)")


def _require_columns(recipe: Recipe, cfg, available: list[str], what: str) -> None:
    inputs = tuple(recipe.inputs(cfg) if callable(recipe.inputs) else recipe.inputs)
    for field_name, names in (("inputs", inputs), ("targets", recipe.targets)):
        missing = [c for c in names if c not in available]
        if not missing:
            continue
        others = [c for c in available if c not in (recipe.targets if field_name == "inputs" else inputs)]
        role = "the model's input" if field_name == "inputs" else "the target"
        raise ConfigError(
            f"{where(recipe)}: {role} column {missing[0]!r} (`{field_name}={names!r}`) is not in {what}; its "
            f"columns are: {', '.join(available) or '(none)'}.\nFix: name the right columns in the Recipe, "
            f"e.g. `{field_name}={tuple(others) or names!r}` ({FIELD_USE[field_name]})."
        )


def _fixed(feature) -> bool:
    """Whether `tensor_rows.columns` can make one tensor of the column: scalars, ArrayND, fixed-length lists of
    scalars."""
    if isinstance(feature, datasets.List):
        return (feature.length or -1) > 0 and isinstance(feature.feature, (datasets.Value, datasets.ClassLabel))
    return isinstance(
        feature,
        (datasets.Value, datasets.ClassLabel, datasets.Array2D, datasets.Array3D, datasets.Array4D, datasets.Array5D),
    )


def jsonable(value, key: str = "meta"):
    """`meta` with numpy and torch values as plain numbers and lists, as it will read back from meta.json."""
    if isinstance(value, dict):
        return {k: jsonable(v, f"{key}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (np.ndarray, np.generic, torch.Tensor)):
        return value.tolist()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ConfigError(
        f"{key} is {type(value).__name__} {_short(value)}, which meta.json cannot hold (meta is "
        f"saved beside the shards and with the run).\nFix: store plain numbers, strings, lists or "
        f"dicts, e.g. str(path) or float(x)."
    )

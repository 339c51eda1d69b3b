"""The command line and --config files read into overrides: `key=value` arguments, the preset file, the
recipe's name, and the checks that need no recipe (so a typo answers before torch is imported).

The schema they are checked against, and the merge with a recipe's defaults, live in pipeline/config.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pkgutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import Config, enum_keys, given, naming_the_file, normalize, parse
from pipeline.config_checks import check_values, describe_error
from pipeline.errors import ConfigError

RECIPES = "recipes"  # where a recipe name without a dot is found: recipes/<name>.py in this repo


def recipe_names() -> list[str]:
    """The recipes in this repo's `recipes/` (one kept elsewhere is named by its module path instead)."""
    package = importlib.import_module(RECIPES)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def unknown_recipe(name: str) -> str:
    return (
        f"unknown recipe {name!r} (no module {RECIPES}.{name}); available recipes: {', '.join(recipe_names())}."
        f"\nA recipe kept elsewhere is given by its module path: recipe=mypkg.my_recipe (mypkg's folder on "
        f"PYTHONPATH or the current folder)."
    )


def check_recipe_exists(dotlist: list[str], preset: Preset | None) -> None:
    """A recipe of this repo's that does not exist is named before any recipe module (and torch) is imported."""
    name = recipe_name(dotlist, preset)
    if "." in name:
        return  # a module path: only importing it tells
    try:
        found = importlib.util.find_spec(f"{RECIPES}.{name}") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        from_file = preset is not None and given(dotlist, "recipe") is None
        raise ConfigError((f"--config {preset.path}: " if from_file else "") + unknown_recipe(name))


def split_argv(argv: list[str]) -> list[str]:
    """Checks that every argument is `key=value`; returns them as an OmegaConf dotlist. `--key=value` is
    the form `wandb agent` passes, each value written by Python's str(): its `None` is YAML's null."""
    for arg in argv:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"argument {arg!r} is not key=value (e.g. trainer.epochs=3); see --help")
    return [
        (arg[2:] if not arg.endswith("=None") else arg[2:-4] + "null") if arg.startswith("--") else arg for arg in argv
    ]


def recipe_name(dotlist: list[str], preset: Preset | None = None) -> str:
    """The command line's `recipe=`, else the --config file's `recipe:`, else the default."""
    name = given(dotlist, "recipe")
    if name is None and preset is not None and preset.values.get("recipe") is not None:
        name = str(preset.values.recipe)
    return Config.recipe if name is None else name


@dataclass
class Preset:
    """A --config file: any keys of the config (and `recipe:`), between the recipe's defaults and the
    command line. `--print-config` writes one."""

    path: str
    values: DictConfig


PRESET_EXAMPLE = (
    "e.g. the output of `python launch/train.py recipe=NAME --print-config > my_task.yaml`, "
    "or just the keys that differ: `recipe: NAME` and `trainer: {epochs: 3}`"
)


def take_preset(argv: list[str]) -> tuple[list[str], str | None]:
    """Splits `--config FILE` (or `--config=FILE`) off the arguments: (the others, FILE or None)."""
    rest, path, items = [], None, iter(argv)
    for arg in items:
        if arg != "--config" and not arg.startswith("--config="):
            rest.append(arg)
            continue
        file = arg.partition("=")[2] if "=" in arg else next(items, "")
        if not file:
            raise ConfigError(f"--config needs a YAML file: --config my_task.yaml ({PRESET_EXAMPLE})")
        if path is not None:
            raise ConfigError(
                f"--config is given twice ({path} and {file}); give one file, and the keys that "
                f"differ from it as key=value arguments"
            )
        path = file
    return rest, path


def load_preset(path: str) -> Preset:
    """Reads a --config file; what is wrong with it (missing, not YAML, not a mapping) names the file."""
    file = Path(path)
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise ConfigError(f"--config {path}: {what}; give a YAML file of config keys, {PRESET_EXAMPLE}")
    try:
        values = OmegaConf.load(file)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(values, DictConfig):
        raise ConfigError(f"--config {path} holds a list, not keys: {PRESET_EXAMPLE}")
    return Preset(path, values)


RECIPE_SECTIONS = ("data", "model", "loss")  # a recipe may add keys under these (its data_config, ...)


def known_early(key: str, base: DictConfig) -> bool:
    """Whether a key can be checked without the recipe: outside the sections a recipe extends (data, model,
    loss), or one of the pipeline's own keys in them (a recipe's config subclasses the pipeline's, so those
    keep their types)."""
    parent, _, leaf = key.rpartition(".")
    if key.partition(".")[0] not in RECIPE_SECTIONS:
        return True
    node = OmegaConf.select(base, parent) if parent else None
    return isinstance(node, DictConfig) and leaf in node


def check_early(dotlist: list[str], preset: Preset | None = None) -> None:
    """Names an unknown key or a bad value before the recipe (and with it torch) is imported, as far as that is
    possible without the recipe's own keys (see `known_early`): a typo answers at once. `build` checks
    everything again."""
    base = OmegaConf.structured(Config)
    choices = enum_keys(base)
    if preset is not None:
        values = OmegaConf.masked_copy(preset.values, [k for k in preset.values if k not in RECIPE_SECTIONS])
        try:
            base = OmegaConf.merge(base, normalize(values, choices))
        except (OmegaConfBaseException, ConfigError) as e:
            why = str(e) if isinstance(e, ConfigError) else describe_error(e, base)
            raise ConfigError(f"--config {preset.path}: {why}") from None
    outside = [item for item in dotlist if known_early(item.partition("=")[0], base)]
    try:
        cfg = OmegaConf.merge(base, normalize(parse(outside), choices))
    except OmegaConfBaseException as e:
        raise ConfigError(describe_error(e, base)) from None
    try:  # every value here is a valid default or one given, so what fails here fails with the recipe's too
        check_values(cfg)
    except ConfigError as e:
        raise ConfigError(naming_the_file(str(e), preset, dotlist)) from None
    check_recipe_exists(dotlist, preset)
    check_recipe_keys([item.partition("=")[0] for item in dotlist if item not in outside], recipe_name(dotlist, preset))


# The keys each recipe of this repo has under data., model. and loss., so that a typo in one is named before the
# recipe (and torch) is imported. Written by tests/test_startup.py (UPDATE_RECIPE_KEYS=1), which checks it
# against the recipes.
RECIPE_KEYS = Path(__file__).resolve().parent.parent / RECIPES / "keys.json"


def check_recipe_keys(keys: list[str], name: str) -> None:
    """An unknown key under data./model./loss. of a recipe listed in RECIPE_KEYS, named as the full check names
    it (`config.build`); other recipes' keys are checked once the recipe is imported."""
    try:
        known = json.loads(RECIPE_KEYS.read_text()).get(name)
    except (OSError, ValueError):
        return
    for key in keys if known else ():
        if key not in known and not any(k.startswith(f"{key}.") for k in known):
            parent = key.rpartition(".")[0]
            valid = sorted({k[len(parent) + 1 :].partition(".")[0] for k in known if k.startswith(f"{parent}.")})
            if valid:  # else a key below one that is not a section: the full check words it
                raise ConfigError(f"unknown config key '{key}'; valid keys under '{parent}': {', '.join(valid)}")


def recipe_keys(cfg: DictConfig) -> list[str]:
    """A built config's keys under data., model. and loss. (what RECIPE_KEYS holds for its recipe)."""
    flat = []

    def walk(node, prefix):
        for key in node:
            value = node._get_node(key)
            if isinstance(value, DictConfig) and not value._is_none():
                walk(value, f"{prefix}{key}.")
            else:
                flat.append(f"{prefix}{key}")

    for section in RECIPE_SECTIONS:
        walk(cfg[section], f"{section}.")
    return sorted(flat)

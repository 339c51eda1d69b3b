"""The typed run configuration: pipeline defaults <- recipe defaults <- command line.

OmegaConf owns parsing and type checks; this module adds the choices and messages people need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A bad key or value; the message names it and the valid choices."""


@dataclass
class DataConfig:
    root: str = "data"  # directory with the raw files
    cache_dir: str = ".cache/shards"  # prepared Arrow shards: <cache_dir>/<recipe>/<fingerprint>/
    download: bool = False  # fetch the raw files where a network exists
    eval_fraction: float = 0.1  # held out from the training source for per-epoch evaluation
    split_seed: int = 0  # the held-out split is fixed by this, not by `seed`
    num_shards: int = 4  # Arrow files per split on disk
    num_proc: int = 1  # processes for `datasets.map` while preparing (changing it misses the cache)
    num_workers: int = 0  # DataLoader workers; only for data that is read from disk per batch
    on_device: str = "auto"  # auto | true | false: keep the prepared tensors on the GPU


@dataclass
class TrainerConfig:
    epochs: int = 5
    batch_size: int = 64  # GLOBAL samples per optimizer step, split across processes
    eval_batch_size: int = 512  # global samples per evaluation step
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    clip_grad_norm: float | None = None
    compile: str = "auto"  # auto | true | false (auto: on where CUDA is used)
    log_every: int = 50  # optimizer steps between train/loss log lines
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    sync_batchnorm: bool = False  # BatchNorm statistics over the global batch (several CUDA processes)


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | adamw | adagrad | rmsprop
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class SchedulerConfig:
    name: str = "none"  # none | step | cosine | onecycle
    warmup_steps: int = 0  # linear warmup before the schedule
    step_size: int = 1  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor


@dataclass
class ModelConfig:
    init: str = "default"  # default | xavier_uniform | xavier_normal | kaiming_uniform | kaiming_normal


@dataclass
class LossConfig:
    pass


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also save every N optimizer steps (0: only at the end of each epoch)
    keep: int = 1  # newest checkpoints kept in <run>/checkpoints/ (0: no checkpoints)
    resume: bool = True  # continue from the run directory's newest checkpoint (same run_name=)


@dataclass
class DebugConfig:
    hooks: bool = False  # log per-layer activation and gradient statistics
    hooks_every: int = 100  # optimizer steps between those logs


@dataclass
class Config:
    recipe: str = "digits"
    seed: int = 42
    output_dir: str = "runs"  # the run's directory is <output_dir>/<recipe>/<run_name>/
    run_name: str | None = None  # default: a timestamp; reuse one to keep a job's runs together
    tracking: str = "wandb"  # wandb | none
    project: str = "pipeline"  # W&B project
    data: Any = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    model: Any = field(default_factory=ModelConfig)
    loss: Any = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


CHOICES = {
    "tracking": ("wandb", "none"),
    "data.on_device": ("auto", "true", "false"),
    "trainer.compile": ("auto", "true", "false"),
    "optimizer.name": ("sgd", "adam", "adamw", "adagrad", "rmsprop"),
    "scheduler.name": ("none", "step", "cosine", "onecycle"),
    "model.init": ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"),
}
POSITIVE = ("trainer.epochs", "trainer.batch_size", "trainer.eval_batch_size", "trainer.grad_accum_steps",
            "trainer.log_every", "data.num_shards", "data.num_proc", "debug.hooks_every")


def split_argv(argv: list[str]) -> list[str]:
    """Checks that every argument is `key=value`; returns them as an OmegaConf dotlist."""
    for arg in argv:
        if "=" not in arg or arg.startswith("="):
            raise ConfigError(f"argument {arg!r} is not key=value (e.g. trainer.epochs=3); see --help")
    return [arg[2:] if arg.startswith("--") else arg for arg in argv]


def recipe_name(dotlist: list[str]) -> str:
    for item in dotlist:
        key, _, value = item.partition("=")
        if key == "recipe":
            return value
    return Config.recipe


def build(dotlist: list[str], recipe) -> DictConfig:
    """Merges the pipeline's defaults, the recipe's and the command line into one checked config."""
    schema = OmegaConf.structured(Config(recipe=recipe.name, data=recipe.data_config(),
                                         model=recipe.model_config(), loss=recipe.loss_config()))
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.create(recipe.defaults))
    except OmegaConfBaseException as e:  # a recipe's own mistake, not the user's
        raise ConfigError(f"recipe {recipe.name!r} has a bad default: {_describe(e, schema)}") from None
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e, schema)) from None
    _check_values(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _describe(e: OmegaConfBaseException, schema: DictConfig) -> str:
    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, ConfigKeyError) or "not in" in str(e):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(schema, parent) if parent else schema
        valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
        return f"unknown config key {key!r}; valid keys{' under ' + repr(parent) if parent else ''}: {', '.join(valid)}"
    if isinstance(e, ValidationError):
        msg = str(e).splitlines()[0]
        return f"bad value for {key!r}: {msg}"
    return f"{key}: {str(e).splitlines()[0]}"


def _check_values(cfg: DictConfig) -> None:
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and str(value).lower() not in choices:
            raise ConfigError(f"bad value {key}={value!r}; choose one of: {', '.join(choices)}")
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"bad value {key}={OmegaConf.select(cfg, key)}: must be >= 1")
    for key in ("checkpoint.every_steps", "checkpoint.keep"):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"bad value {key}={OmegaConf.select(cfg, key)}: must be >= 0")
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"bad value data.eval_fraction={cfg.data.eval_fraction}: must be between 0 and 1")
    if cfg.optimizer.lr <= 0:
        raise ConfigError(f"bad value optimizer.lr={cfg.optimizer.lr}: must be > 0")


def as_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def flag(value: str, cuda: bool) -> bool:
    """Resolves an auto | true | false choice: auto means on where CUDA is used."""
    value = str(value).lower()
    return cuda if value == "auto" else value == "true"

"""The typed run configuration: the schema, its defaults, the merge of pipeline defaults <- recipe defaults <-
--config file <- command line, and the checks with their messages (reading the command line: overrides.py).

OmegaConf owns parsing and type checks; this module adds the choices and messages people need.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError
from omegaconf.nodes import EnumNode

from pipeline.errors import ConfigError
from pipeline.optim import INITS, OPTIMIZERS, SCHEDULERS

if TYPE_CHECKING:
    from pipeline.overrides import Preset


def choice(name: str, names) -> type[Enum]:
    """An Enum whose member names are `names` (a registry's keys), so the config accepts exactly the
    names the code implements. OmegaConf checks values against it and writes members by name."""
    return Enum(name, {n: n for n in names}, module=__name__, qualname=name)


OptimizerName = choice("OptimizerName", OPTIMIZERS)
SchedulerName = choice("SchedulerName", SCHEDULERS)
InitName = choice("InitName", INITS)
Switch = choice("Switch", ("auto", "true", "false"))  # auto: decided by the device (see `flag`)
# Whether a larger or a smaller value of checkpoint.monitor is better (auto: by the metric's name, see best.py).
MonitorMode = choice("MonitorMode", ("auto", "max", "min"))
# The ragged end of a training epoch: dropped, or completed from the start of the epoch's own order
# (see batching.loader).
LastBatch = choice("LastBatch", ("drop", "complete"))
# The weights a finished run reports and evaluate/predict use by default: the best evaluation's, or the last step's.
Weights = choice("Weights", ("best", "final"))
# Every tracker Accelerate's `log_with` knows, by its own names, and `none` for the local record alone. Spelled
# out because accelerate.utils.LoggerType imports torch, and the config must check a command line without it;
# tests/test_startup.py holds this list to LoggerType's values. `all` is left out: it means whichever
# trackers happen to be installed.
TRACKERS = ("aim", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab")
Tracker = choice("Tracker", [*TRACKERS, "none"])


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
    # Each split as whole tensors in memory, or read a batch at a time from its memory-mapped shards (the
    # same batches either way). auto: in memory while the splits fit in in_memory_budget_gb.
    in_memory: Switch = Switch.auto
    in_memory_budget_gb: float | None = None  # per process; null: a quarter of available RAM / processes on a node
    on_device: Switch = Switch.auto  # keep the prepared tensors on the GPU (auto: if they fit)


@dataclass
class TrainerConfig:
    epochs: int = 5
    batch_size: int = 64  # GLOBAL samples per optimizer step, split across processes
    # Halve batch_size until the train split makes this many optimizer steps an epoch (0: never); said in the log.
    min_steps_per_epoch: int = 0
    last_batch: LastBatch = LastBatch.drop  # complete: every train row trains each epoch, some twice
    eval_batch_size: int = 512  # global samples per evaluation step
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    clip_grad_norm: float | None = None
    compile: Switch = Switch.auto  # torch.compile the model (auto: where CUDA is used)
    log_every: int = 50  # optimizer steps between train/loss log lines
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    sync_batchnorm: bool = False  # BatchNorm statistics over the global batch (several CUDA processes)
    tf32: bool = True  # fp32 matmuls/convolutions on TF32 tensor cores (Ampere+ GPUs); false: full fp32
    early_stopping_patience: int | None = None  # stop after N evaluations without a better checkpoint.monitor
    # Seconds a collective between processes (gradient all-reduce, broadcast) may wait before the run fails;
    # waiting for another process to prepare the data has no such limit (see shard_store.prepare).
    dist_timeout_s: int = 1800


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.sgd
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.none
    warmup_steps: int = 0  # linear warmup before the schedule
    step_size: int = 1  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor


@dataclass
class ModelConfig:
    init: InitName = InitName.default


@dataclass
class LossConfig:
    pass


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also save every N optimizer steps (0: only at the end of each epoch)
    keep: int = 1  # newest checkpoints kept in <run>/checkpoints/ (0: no checkpoints)
    resume: bool = True  # continue from the run directory's newest checkpoint (same run_name=)
    # Resume although the shards' fingerprint differs from the checkpoint's (the raw files or their
    # preprocessing changed): the model then trains on two data sets, which run.json records.
    allow_data_change: bool = False
    # The eval metric that picks <run>/best.safetensors and drives early stopping; null: eval/accuracy where
    # the recipe reports it, else eval/loss.
    monitor: str | None = None
    mode: MonitorMode = MonitorMode.auto  # auto: min for loss/mse/mae/rmse, max for the others
    # best: the summary, the test split, evaluate and predict use best.safetensors (the best checkpoint.monitor)
    weights: Weights = Weights.best


@dataclass
class TrackingConfig:
    # `tracking=none` on the command line (or in a YAML file) is short for tracking.name=none.
    name: Tracker = Tracker.wandb
    # W&B only. A WANDB_TAGS / WANDB_RUN_GROUP / WANDB_NOTES / WANDB_JOB_TYPE variable, where set, wins over
    # its key (a sweep or a cluster job sets them for every run it starts).
    tags: list[str] = field(default_factory=list)  # beside the recipe's name, which every run is tagged with
    group: str | None = None  # null: the recipe's name
    notes: str | None = None
    job_type: str = "train"
    log_model: bool = False  # model.safetensors and best.safetensors (with config.yaml, meta.json) as an artifact


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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    project: str = "pipeline"  # the tracker's project (W&B, MLflow experiment; TensorBoard: <run>/<project>/)
    data: Any = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    model: Any = field(default_factory=ModelConfig)
    loss: Any = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


POSITIVE = ("trainer.epochs", "trainer.batch_size", "trainer.eval_batch_size", "trainer.grad_accum_steps",
            "trainer.log_every", "trainer.dist_timeout_s", "scheduler.step_size", "data.num_shards", "data.num_proc",
            "debug.hooks_every")
NON_NEGATIVE = ("seed", "data.split_seed", "data.num_workers", "scheduler.warmup_steps", "checkpoint.every_steps",
                "checkpoint.keep", "optimizer.momentum", "optimizer.weight_decay",
                "trainer.min_steps_per_epoch")
NAME_EXAMPLE = "e.g. run_name=baseline-lr3e-4"


def _reads_as_text(raw: str) -> bool:
    """Whether OmegaConf reads a command-line value as text (not `true` -> bool, `1e3` -> float, ...)."""
    try:
        return isinstance(OmegaConf.from_dotlist([f"value={raw}"]).value, str)
    except OmegaConfBaseException:
        return True


def given(dotlist: list[str], key: str) -> str | None:
    """The raw text of the last `key=` item (the one OmegaConf keeps), or None."""
    values = [item.partition("=")[2] for item in dotlist if item.partition("=")[0] == key]
    return values[-1] if values else None


def schema(recipe) -> DictConfig:
    """The typed defaults of a run of `recipe`, before its own defaults and the command line."""
    return OmegaConf.structured(Config(recipe=recipe.name, data=recipe.data_config(),
                                       model=recipe.model_config(), loss=recipe.loss_config()))


def build(dotlist: list[str], recipe, preset: Preset | None = None) -> DictConfig:
    """Merges the pipeline's defaults, the recipe's, the --config file's and the command line into one
    checked config."""
    base = schema(recipe)
    choices = enum_keys(base)
    try:
        cfg = OmegaConf.merge(base, normalize(OmegaConf.create(recipe.defaults), choices))
    except (OmegaConfBaseException, ConfigError) as e:  # a recipe's own mistake, not the user's
        why = str(e) if isinstance(e, ConfigError) else _describe(e, base)
        raise ConfigError(f"recipe {recipe.name!r} has a bad default: {why}") from None
    if preset is not None:
        try:
            cfg = OmegaConf.merge(cfg, normalize(preset.values.copy(), choices))
        except (OmegaConfBaseException, ConfigError) as e:
            why = str(e) if isinstance(e, ConfigError) else _describe(e, base)
            raise ConfigError(f"--config {preset.path}: {why}") from None
    try:
        cfg = OmegaConf.merge(cfg, normalize(parse(dotlist), choices))
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e, base)) from None
    # `run_name=` parses as null (a timestamp); a script passing an empty variable meant a name.
    raw = given(dotlist, "run_name")
    check_run_name("" if raw == "" else cfg.run_name)
    if cfg.run_name is not None and raw and not _reads_as_text(raw):
        cfg.run_name = raw  # the folder is named as typed: OmegaConf reads `true` as a bool, `1e3` as 1000.0
    try:
        _check_values(cfg)
    except ConfigError as e:
        raise ConfigError(_naming_the_file(str(e), preset, dotlist)) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _naming_the_file(error: str, preset: Preset | None, dotlist: list[str]) -> str:
    """A `bad value KEY=...` that came from the --config file (set there, not on the command line) names it."""
    key = re.match(r"bad value ([\w.]+)=", error)
    if preset is None or key is None or given(dotlist, key[1]) is not None:
        return error
    try:
        in_file = OmegaConf.select(preset.values, key[1], throw_on_missing=False) is not None
    except OmegaConfBaseException:
        in_file = False
    return f"--config {preset.path}: {error}" if in_file else error


def restore(saved: DictConfig, recipe, dotlist: list[str], source: str) -> DictConfig:
    """A finished run's config (its config.yaml, `source`) read back through the typed schema, so choices
    are Enums again and a key or value the code no longer accepts is named; `dotlist` applies on top."""
    base = schema(recipe)
    choices = enum_keys(base)
    try:
        cfg = OmegaConf.merge(base, normalize(saved, choices))
        _check_values(cfg)
    except (OmegaConfBaseException, ConfigError) as e:
        why = str(e) if isinstance(e, ConfigError) else _describe(e, base)
        raise ConfigError(f"{source} no longer loads with recipe {recipe.name!r} as this code defines it: {why}.\n"
                          f"Fix: use the code the run was trained with (git checkout of that version), or "
                          f"retrain with this one") from None
    try:
        cfg = OmegaConf.merge(cfg, normalize(parse(dotlist), choices))
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e, base)) from None
    _check_values(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def parse(dotlist: list[str]) -> DictConfig:
    """The command line as a config; each value is YAML (OmegaConf's dotlist), read one item at a time
    so that an unreadable one is named."""
    overrides = OmegaConf.create()
    for item in dotlist:
        if item.partition("=")[0] == "tracking":
            item = "tracking.name=" + item.partition("=")[2]  # the tracker's name, its other keys kept
        try:
            overrides.merge_with_dotlist([item])
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot read {item!r}: {str(e).splitlines()[0]}; a value must be YAML, "
                              f"e.g. optimizer.betas=[0.9,0.999] or run_name=\"my run\"") from None
    return overrides


def enum_keys(cfg: DictConfig, prefix: str = "") -> dict[str, type[Enum]]:
    """Every choice in a typed config (the pipeline's and the recipe's own): dotted key -> its Enum."""
    found = {}
    for k in cfg:
        node = cfg._get_node(k)
        if isinstance(node, DictConfig):
            found.update(enum_keys(node, f"{prefix}{k}."))
        elif isinstance(node, EnumNode):
            found[f"{prefix}{k}"] = node.enum_type
    return found


def normalize(overrides: DictConfig, choices: dict[str, type[Enum]]) -> DictConfig:
    """Choices are matched case-insensitively (SGD, Xavier_Uniform), and `true`/`false`, which YAML
    reads as booleans, as the names they spell. Unknown names are refused with the valid ones."""
    tracker = overrides.get("tracking") if "tracking" in overrides else None
    if tracker is not None and not isinstance(tracker, DictConfig):
        overrides.tracking = {"name": tracker}  # `tracking: wandb` (a YAML file, a run's config.yaml from before)
    for k, enum in choices.items():
        parent, _, leaf = k.rpartition(".")
        node = OmegaConf.select(overrides, parent) if parent else overrides
        if not isinstance(node, DictConfig) or leaf not in node or OmegaConf.is_interpolation(node, leaf):
            continue
        value = node[leaf]
        if value is None or isinstance(value, Enum):
            continue  # OmegaConf decides: null is refused for a choice, a member is itself
        names = {name.lower(): name for name in enum.__members__}
        name = names.get(str(value).lower())
        if name is None:
            raise ConfigError(f"bad value {k}={value!r}; choose one of: {', '.join(enum.__members__)}")
        node[leaf] = name
    return overrides


def check_run_name(name: str | None) -> None:
    """A run's folder is <output_dir>/<recipe>/<run_name>: the name must stay one plain folder inside."""
    if name is None:
        return  # a timestamp is chosen
    if name in ("", ".", ".."):
        why = {"": "is empty", ".": "is '.', the recipe's folder itself", "..": "is '..', the folder above"}[name]
    elif "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        why = "contains a path separator; the run folder stays inside output_dir/<recipe>/ (output_dir= moves it)"
    elif "\0" in name:
        why = "contains a NUL character"
    elif len(name.encode()) > 255:
        why = f"is {len(name.encode())} bytes long; file systems allow 255"
    else:
        return
    raise ConfigError(f"bad value run_name={name!r}: it {why}. Give one plain folder name, {NAME_EXAMPLE}")


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
    _check_finite(cfg)  # first: `nan < 1` is False, so a NaN would pass every range check below
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"bad value {key}={OmegaConf.select(cfg, key)}: must be >= 1")
    for key in NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"bad value {key}={OmegaConf.select(cfg, key)}: must be >= 0")
    if cfg.trainer.max_steps is not None and cfg.trainer.max_steps < 1:
        raise ConfigError(f"bad value trainer.max_steps={cfg.trainer.max_steps}: must be >= 1, "
                          f"or null (the default) for no limit")
    patience = cfg.trainer.early_stopping_patience
    if patience is not None and patience < 1:
        raise ConfigError(f"bad value trainer.early_stopping_patience={patience}: must be >= 1 (evaluations "
                          f"without improvement), or null (the default) for no early stopping")
    monitor = cfg.checkpoint.monitor
    if monitor is not None and not monitor.startswith("eval/"):
        raise ConfigError(f"bad value checkpoint.monitor={monitor!r}: the best weights are chosen by the evaluation "
                          f"after each epoch, so name one of its metrics, e.g. checkpoint.monitor=eval/loss or "
                          f"checkpoint.monitor=eval/accuracy (null: eval/accuracy where reported, else eval/loss)")
    _check_settings(cfg)


def _check_settings(cfg: DictConfig) -> None:
    """The ranges of the trainer's, data's, optimizer's and scheduler's single settings."""
    if cfg.trainer.clip_grad_norm is not None and cfg.trainer.clip_grad_norm <= 0:
        raise ConfigError(f"bad value trainer.clip_grad_norm={cfg.trainer.clip_grad_norm}: must be > 0, "
                          f"or null (the default) for no clipping")
    budget = OmegaConf.select(cfg, "data.in_memory_budget_gb")
    if budget is not None and budget < 0:
        raise ConfigError(f"bad value data.in_memory_budget_gb={budget}: must be >= 0, or null (the default) for "
                          f"a quarter of the available memory divided by the processes on a node")
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"bad value data.eval_fraction={cfg.data.eval_fraction}: must be between 0 and 1")
    if cfg.optimizer.lr <= 0:
        raise ConfigError(f"bad value optimizer.lr={cfg.optimizer.lr}: must be > 0")
    if not all(0.0 <= b < 1.0 for b in cfg.optimizer.betas):
        raise ConfigError(f"bad value optimizer.betas={list(cfg.optimizer.betas)}: each must be in [0, 1)")
    if cfg.scheduler.gamma <= 0:
        raise ConfigError(f"bad value scheduler.gamma={cfg.scheduler.gamma}: must be > 0")
    if cfg.scheduler.name is SchedulerName.onecycle and cfg.scheduler.warmup_steps:
        raise ConfigError(f"scheduler.name=onecycle has its own warmup; leave scheduler.warmup_steps=0 "
                          f"(got {cfg.scheduler.warmup_steps})")


def _check_finite(node, prefix: str = "") -> None:
    """No key takes nan or inf (YAML reads `.nan`/`.inf`, OmegaConf's float parser `nan`/`inf`): every number
    here is a rate, a size or a count, and a non-finite one gives NaN weights or a loop that never ends."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=False, throw_on_missing=False)
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        key = f"{prefix}[{k}]" if isinstance(k, int) else f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, (dict, list)):
            _check_finite(v, key)
        elif isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"bad value {key}={v}: must be a finite number")


def as_dict(cfg: DictConfig) -> dict:
    """Plain values (choices by name), e.g. for a tracker's config."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def flag(value: Switch, cuda: bool) -> bool:
    """Resolves a Switch: auto means on where CUDA is used."""
    return cuda if value is Switch.auto else value is Switch.true

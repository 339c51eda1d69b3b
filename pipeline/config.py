"""The typed run configuration: the schema, its defaults, the merge of pipeline defaults <- recipe defaults <-
--config file <- command line (reading the command line: overrides.py; the values' checks: config_checks.py).

OmegaConf owns parsing and type checks; this module adds the choices and messages people need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import EnumNode

from pipeline.config_checks import check_run_name, check_values, describe_error
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
    num_proc: int = 1  # worker processes of each preparing process (decoders, `datasets.map`); not in the fingerprint
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
    return OmegaConf.structured(
        Config(recipe=recipe.name, data=recipe.data_config(), model=recipe.model_config(), loss=recipe.loss_config())
    )


def build(dotlist: list[str], recipe, preset: Preset | None = None) -> DictConfig:
    """Merges the pipeline's defaults, the recipe's, the --config file's and the command line into one
    checked config."""
    base = schema(recipe)
    choices = enum_keys(base)
    try:
        cfg = OmegaConf.merge(base, normalize(OmegaConf.create(recipe.defaults), choices))
    except (OmegaConfBaseException, ConfigError) as e:  # a recipe's own mistake, not the user's
        why = str(e) if isinstance(e, ConfigError) else describe_error(e, base)
        raise ConfigError(f"recipe {recipe.name!r} has a bad default: {why}") from None
    if preset is not None:
        try:
            cfg = OmegaConf.merge(cfg, normalize(preset.values.copy(), choices))
        except (OmegaConfBaseException, ConfigError) as e:
            why = str(e) if isinstance(e, ConfigError) else describe_error(e, base)
            raise ConfigError(f"--config {preset.path}: {why}") from None
    try:
        cfg = OmegaConf.merge(cfg, normalize(parse(dotlist), choices))
    except OmegaConfBaseException as e:
        raise ConfigError(describe_error(e, base)) from None
    # `run_name=` parses as null (a timestamp); a script passing an empty variable meant a name.
    raw = given(dotlist, "run_name")
    check_run_name("" if raw == "" else cfg.run_name)
    if cfg.run_name is not None and raw and not _reads_as_text(raw):
        cfg.run_name = raw  # the folder is named as typed: OmegaConf reads `true` as a bool, `1e3` as 1000.0
    try:
        check_values(cfg)
    except ConfigError as e:
        raise ConfigError(naming_the_file(str(e), preset, dotlist)) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def naming_the_file(error: str, preset: Preset | None, dotlist: list[str]) -> str:
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
        check_values(cfg)
    except (OmegaConfBaseException, ConfigError) as e:
        why = str(e) if isinstance(e, ConfigError) else describe_error(e, base)
        raise ConfigError(
            f"{source} no longer loads with recipe {recipe.name!r} as this code defines it: {why}.\n"
            f"Fix: use the code the run was trained with (git checkout of that version), or "
            f"retrain with this one"
        ) from None
    try:
        cfg = OmegaConf.merge(cfg, normalize(parse(dotlist), choices))
    except OmegaConfBaseException as e:
        raise ConfigError(describe_error(e, base)) from None
    check_values(cfg)
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
            raise ConfigError(
                f"cannot read {item!r}: {str(e).splitlines()[0]}; a value must be YAML, "
                f'e.g. optimizer.betas=[0.9,0.999] or run_name="my run"'
            ) from None
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


def as_dict(cfg: DictConfig) -> dict:
    """Plain values (choices by name), e.g. for a tracker's config."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def flag(value: Switch, cuda: bool) -> bool:
    """Resolves a Switch: auto means on where CUDA is used."""
    return cuda if value is Switch.auto else value is Switch.true

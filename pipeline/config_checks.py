"""The checks of a config's values, with their messages: ranges, finite numbers, the run's name, and OmegaConf's
errors in words (the schema and the merge: `config`)."""

from __future__ import annotations

import math
import os

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from pipeline.errors import ConfigError

POSITIVE = (
    "trainer.epochs",
    "trainer.batch_size",
    "trainer.eval_batch_size",
    "trainer.grad_accum_steps",
    "trainer.log_every",
    "trainer.dist_timeout_s",
    "scheduler.step_size",
    "data.num_shards",
    "data.num_proc",
    "debug.hooks_every",
)
NON_NEGATIVE = (
    "seed",
    "data.split_seed",
    "data.num_workers",
    "scheduler.warmup_steps",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "optimizer.momentum",
    "optimizer.weight_decay",
    "trainer.min_steps_per_epoch",
)
NAME_EXAMPLE = "e.g. run_name=baseline-lr3e-4"


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


def describe_error(e: OmegaConfBaseException, schema: DictConfig) -> str:
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


def check_values(cfg: DictConfig) -> None:
    _check_finite(cfg)  # first: `nan < 1` is False, so a NaN would pass every range check below
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"bad value {key}={OmegaConf.select(cfg, key)}: must be >= 1")
    for key in NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"bad value {key}={OmegaConf.select(cfg, key)}: must be >= 0")
    if cfg.trainer.max_steps is not None and cfg.trainer.max_steps < 1:
        raise ConfigError(
            f"bad value trainer.max_steps={cfg.trainer.max_steps}: must be >= 1, or null (the default) for no limit"
        )
    patience = cfg.trainer.early_stopping_patience
    if patience is not None and patience < 1:
        raise ConfigError(
            f"bad value trainer.early_stopping_patience={patience}: must be >= 1 (evaluations "
            f"without improvement), or null (the default) for no early stopping"
        )
    monitor = cfg.checkpoint.monitor
    if monitor is not None and not monitor.startswith("eval/"):
        raise ConfigError(
            f"bad value checkpoint.monitor={monitor!r}: the best weights are chosen by the evaluation "
            f"after each epoch, so name one of its metrics, e.g. checkpoint.monitor=eval/loss or "
            f"checkpoint.monitor=eval/accuracy (null: eval/accuracy where reported, else eval/loss)"
        )
    _check_settings(cfg)


def _check_settings(cfg: DictConfig) -> None:
    """The ranges of the trainer's, data's, optimizer's and scheduler's single settings."""
    if cfg.trainer.clip_grad_norm is not None and cfg.trainer.clip_grad_norm <= 0:
        raise ConfigError(
            f"bad value trainer.clip_grad_norm={cfg.trainer.clip_grad_norm}: must be > 0, "
            f"or null (the default) for no clipping"
        )
    budget = OmegaConf.select(cfg, "data.in_memory_budget_gb")
    if budget is not None and budget < 0:
        raise ConfigError(
            f"bad value data.in_memory_budget_gb={budget}: must be >= 0, or null (the default) for "
            f"a quarter of the available memory divided by the processes on a node"
        )
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"bad value data.eval_fraction={cfg.data.eval_fraction}: must be between 0 and 1")
    if cfg.optimizer.lr <= 0:
        raise ConfigError(f"bad value optimizer.lr={cfg.optimizer.lr}: must be > 0")
    if not all(0.0 <= b < 1.0 for b in cfg.optimizer.betas):
        raise ConfigError(f"bad value optimizer.betas={list(cfg.optimizer.betas)}: each must be in [0, 1)")
    if cfg.scheduler.gamma <= 0:
        raise ConfigError(f"bad value scheduler.gamma={cfg.scheduler.gamma}: must be > 0")
    if cfg.scheduler.name.name == "onecycle" and cfg.scheduler.warmup_steps:
        raise ConfigError(
            f"scheduler.name=onecycle has its own warmup; leave scheduler.warmup_steps=0 "
            f"(got {cfg.scheduler.warmup_steps})"
        )


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

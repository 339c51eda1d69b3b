"""The best evaluation so far by one monitored metric: it picks `<run>/best.safetensors` and stops a run early.

Its state travels in every checkpoint, so a resumed run keeps the best value and the patience count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from accelerate.utils import broadcast_object_list

from pipeline.config import MonitorMode

# Metrics where smaller is better; any other is taken as larger-is-better (accuracy, f1, auroc, r2, ...).
from pipeline.errors import ConfigError

SMALLER_IS_BETTER = ("loss", "mse", "mae", "rmse", "mape")
DEFAULT_MONITORS = ("eval/accuracy", "eval/loss")  # the first one the evaluation reports


@dataclass
class Best:
    monitor: str | None  # None until the first evaluation picks the default
    mode: str | None  # "max" | "min"; None: from the metric's name
    patience: int | None  # evaluations without improvement before stopping; None: never
    value: float | None = None
    step: int | None = None
    epoch: int | None = None
    stale: int = 0  # evaluations since the last improvement
    loss: float | None = None  # eval/loss of the best evaluation: it breaks a tie of the monitored metric
    stopped_early: str | None = None  # why the run stopped before its last epoch

    @classmethod
    def of(cls, cfg, saved: dict | None = None, say=print) -> Best:
        """From the config, continuing a checkpoint's `saved` state when it watched the same metric."""
        mode = None if cfg.checkpoint.mode is MonitorMode.auto else cfg.checkpoint.mode.name
        best = cls(cfg.checkpoint.monitor, mode, cfg.trainer.early_stopping_patience)
        if not saved:
            return best
        if best.monitor not in (None, saved["monitor"]) or best.mode not in (None, saved["mode"]):
            say(
                f"checkpoint.monitor/mode changed from {saved['monitor']} ({saved['mode']}) to "
                f"{best.monitor} ({best.mode or 'auto'}): the best weights are chosen afresh from the next evaluation"
            )
            return best
        return cls(
            saved["monitor"],
            saved["mode"],
            best.patience,
            saved["value"],
            saved["step"],
            saved["epoch"],
            saved["stale"],
            loss=saved.get("loss"),
        )

    def update(self, results: dict, step: int, epoch: int, accelerator) -> bool:
        """Takes one evaluation's results; True when it is the best so far. Every process gets process 0's
        value, so they all save, and stop, at the same epoch whatever the last bits of their own numbers."""
        self.monitor = self.monitor or next(k for k in DEFAULT_MONITORS if k in results)
        self.mode = self.mode or default_mode(self.monitor)
        value = results.get(self.monitor)
        if not is_metric(self.monitor, value):
            available = ", ".join(k for k, v in results.items() if is_metric(k, v))
            raise ConfigError(
                f"checkpoint.monitor={self.monitor} is not a metric this recipe's evaluation reports; "
                f"choose one of: {available}"
            )
        loss = results.get("eval/loss") if self.monitor != "eval/loss" else None
        if accelerator.num_processes > 1:
            value, loss = broadcast_object_list([value, loss])[:2]
        improved = math.isfinite(value) and (
            self.value is None
            or (value > self.value if self.mode == "max" else value < self.value)
            or self.lower_loss(value, loss)
        )
        if improved:
            self.value, self.step, self.epoch, self.stale, self.loss = value, step, epoch, 0, loss
        else:
            self.stale += 1
        if self.patience and self.stale >= self.patience:
            self.stopped_early = (
                f"{self.monitor} did not improve for {self.stale} evaluation"
                f"{'s' if self.stale > 1 else ''} (best {self.value:.6g} at epoch {self.epoch})"
            )
        return improved

    def lower_loss(self, value: float, loss: float | None) -> bool:
        """A tie of the monitored metric (accuracy on a small eval split moves in steps of 1/rows) goes to the
        evaluation with the lower eval/loss: the later, better-fitted model rather than the first to reach it."""
        return value == self.value and loss is not None and self.loss is not None and loss < self.loss

    def state(self) -> dict:
        """What a checkpoint keeps (the patience is the config's: it may change on resume)."""
        return {k: v for k, v in asdict(self).items() if k not in ("patience", "stopped_early")}

    def summary(self) -> dict:
        """summary.json's and the trackers' record of it."""
        if self.monitor is None:  # no evaluation happened (a resumed run that was already at its end)
            return {}
        return {
            f"best/{self.monitor}": self.value,
            "best/step": self.step,
            "best/epoch": self.epoch,
            "best/mode": self.mode,
            "stopped_early": self.stopped_early is not None,
            **({"stopped_early/reason": self.stopped_early} if self.stopped_early else {}),
        }


def is_metric(key: str, value) -> bool:
    """A score an evaluation reports (a number); its sample count is not one."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not key.endswith("/samples")


def default_mode(metric: str) -> str:
    return "min" if metric.rsplit("/", 1)[-1] in SMALLER_IS_BETTER else "max"

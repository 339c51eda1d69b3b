"""What a run reports: training speed, progress lines, the summary line, torchmetrics results as numbers.

Nothing here touches the model or the data; the loop calls it at steps, log lines and epoch ends.
"""

from __future__ import annotations

import functools
import time

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryConfusionMatrix, MulticlassConfusionMatrix

from pipeline import console
from pipeline.recipe import binary_predictions, label_predictions

# Steps before train/samples_per_s counts: the first carries compilation, the next ones the allocator's
# and autotuning's warm-up. launch/bench.py warms its other paths up for as many steps.
WARMUP_STEPS = 3


def flatten(values, prefix: str, class_names=None) -> dict:
    """torchmetrics results -> {name: float}; per-class vectors named by class; matrices kept as lists."""
    if not isinstance(values, dict):
        values = {"": values}
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}".rstrip("/")
        value = value.detach().cpu() if torch.is_tensor(value) else torch.as_tensor(value)
        if value.ndim == 0:
            out[name] = value.item()
        elif value.ndim == 1:
            labels = class_names if class_names and len(class_names) == len(value) else range(len(value))
            out.update({f"{name}/{label}": v.item() for label, v in zip(labels, value)})
        else:
            out[name] = value.tolist()
    return out


def reporting_dtype(device: torch.device) -> torch.dtype:
    """The dtype evaluation metrics count in: float64 where the device has it, so a target of 1e20 (squared: beyond
    float32's 3.4e38) still gives a finite mse. Only their floating states change (counts stay integers)."""
    return torch.float32 if device.type == "mps" else torch.float64


def wide(value):
    """A floating tensor in `reporting_dtype`, for the metrics' update; anything else as it is."""
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(reporting_dtype(value.device))
    return value


def scalar(value) -> bool:
    return isinstance(value, (int, float))


def with_confusion_matrix(metrics: dict, recipe, meta: dict) -> dict:
    """A classifier's metrics also count a confusion matrix (`<split>/confusion_matrix`, rows the true classes,
    columns the predicted ones), for the W&B plot, the per-class table and confusion_matrix.png.

    A classifier here: meta names its classes, it has one head, and its predictions are the pipeline's own
    classifier pieces, so their shape is known ([N, classes] logits from label_predictions, a probability
    from binary_predictions). A recipe that counts one itself keeps its own. The cost is one bincount per
    evaluation batch, on values the evaluation gathered anyway; training steps never see it.
    """
    names, head = meta.get("class_names"), metrics.get("")
    if not names or len(metrics) != 1 or not isinstance(head, MetricCollection):
        return metrics
    if any(isinstance(m, (BinaryConfusionMatrix, MulticlassConfusionMatrix)) for m in head.values()):
        return metrics
    if recipe.predictions is label_predictions:
        head.add_metrics({"confusion_matrix": MulticlassConfusionMatrix(len(names))})
    elif recipe.predictions is binary_predictions and len(names) == 2:
        head.add_metrics({"confusion_matrix": BinaryConfusionMatrix()})
    return metrics


def per_class(matrix: list, class_names: list) -> list[dict]:
    """Precision, recall, F1 and support of each class from a confusion matrix (0 where a class was never
    predicted or never present, as torchmetrics counts it)."""
    m = torch.tensor(matrix, dtype=torch.float64)
    hits, support, predicted = m.diag(), m.sum(1), m.sum(0)
    precision = torch.where(predicted > 0, hits / predicted, 0.0)
    recall = torch.where(support > 0, hits / support, 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    columns = zip(class_names, precision.tolist(), recall.tolist(), f1.tolist(), support.tolist())
    return [{"class": name, "precision": p, "recall": r, "f1": f, "support": int(n)} for name, p, r, f, n in columns]


class Speed:
    """Training samples/s over train steps only (not evaluation), after WARMUP_STEPS steps; the first
    step, which carries compilation, is reported on its own.

    Steps run without a sync; on CUDA the clock is read after one at the measured boundaries (the end of
    the warm-up, the start and end of each epoch's steps), so the kernels still queued there count.
    """

    def __init__(self, device: torch.device):
        self.sync = functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else (lambda: None)
        self.first, self.samples, self.elapsed, self.steps = None, 0, 0.0, 0
        self.last = time.perf_counter()

    def resume(self):
        """An epoch's steps begin (evaluation before them is not timed)."""
        self.sync()
        self.last = time.perf_counter()

    def step(self, batch: int):
        self.steps += 1
        if self.steps in (1, WARMUP_STEPS):
            self.sync()
        now = time.perf_counter()
        spent, self.last = now - self.last, now
        if self.steps == 1:
            self.first = spent
        elif self.steps > WARMUP_STEPS:
            self.samples += batch
            self.elapsed += spent

    def pause(self):
        """An epoch's steps end: the GPU work still queued belongs to them."""
        if self.steps > WARMUP_STEPS:
            self.sync()
            now = time.perf_counter()
            self.elapsed, self.last = self.elapsed + now - self.last, now

    def rate(self) -> float:
        return self.samples / self.elapsed if self.elapsed > 0 else 0.0


class Progress:
    """On a terminal, a bar per epoch (percentage, samples/s, time left) that gives way to the epoch's
    evaluation line; elsewhere (CI, SLURM logs) a plain line per log line. Main process only."""

    def __init__(self, enabled: bool, steps_per_epoch: int, epochs: int, batch_size: int):
        self.enabled, self.tty = enabled, enabled and console.terminal().isatty()
        self.steps_per_epoch, self.epochs, self.batch_size = steps_per_epoch, epochs, batch_size
        self.bar = None

    def step(self, step: int, epoch: int):
        """An optimizer step done (every step: the bar's rate and time left count them)."""
        if not self.tty:
            return
        if self.bar is None:
            from tqdm import tqdm

            done = step - 1 - (epoch - 1) * self.steps_per_epoch  # a run resumed mid-epoch starts there
            self.bar = tqdm(
                total=self.steps_per_epoch * self.batch_size,
                initial=done * self.batch_size,
                desc=f"epoch {epoch}/{self.epochs}",
                unit=" samples",
                leave=False,
                dynamic_ncols=True,
                file=console.terminal(),
            )
        self.bar.update(self.batch_size)
        if self.bar.n >= self.bar.total:
            self.bar.refresh()  # the full bar is drawn before the evaluation, whatever tqdm's redraw interval

    def update(self, step: int, epoch: int, loss: float, rate: float):
        """A log line: the mean loss since the last one; `rate` is 0 until the warm-up steps are over."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        else:
            speed = f" {rate:,.0f} samples/s" if rate else ""
            print(f"epoch {epoch} step {step} train/loss {loss:.4f}{speed}", flush=True)

    def epoch(self, epoch: int, epochs: int, results: dict):
        if not self.enabled:
            return
        self.close()
        shown = {
            k: v
            for k, v in results.items()
            if k.startswith("eval/") and scalar(v) and k.count("/") <= 2 and not k.endswith("/samples")
        }
        print(f"epoch {epoch}/{epochs} " + " ".join(f"{k} {v:.4f}" for k, v in list(shown.items())[:8]), flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


SHOWN_SCORES = 8  # numbers on the `done:` line; summary.json has them all


def summary_line(summary: dict) -> str:
    """`done:` with the weights the scores are of, then the test scores, the eval ones, the losses, and per-class
    numbers last (a classifier of many classes would fill the line with them)."""

    def rank(key: str) -> tuple:
        depth, name = key.count("/"), key.rsplit("/", 1)[-1]
        kind = 3 if depth > 1 else 2 if name.endswith("_micro") else 1 if name == "loss" else 0
        return kind, key.split("/")[0] != "test"

    keys = sorted(
        (
            k
            for k in summary
            if k.split("/")[0] in ("eval", "test") and scalar(summary[k]) and not k.endswith("/samples")
        ),
        key=rank,
    )[:SHOWN_SCORES]
    shown = " ".join(f"{k}={summary[k]:.4f}" for k in keys)
    return (
        f"done: {summary['recipe']} {count(summary['epochs'], 'epoch')} {count(summary['steps'], 'step')} "
        f"{summary['train/samples_per_s']:,.0f} samples/s {weights_text(summary)}{shown} -> {summary['run_dir']}"
    )


def weights_text(summary: dict) -> str:
    """`weights: best (epoch 9 of 11, eval/accuracy 0.97) ` or `weights: final `: which weights the scores are of."""
    if summary.get("weights") != "best":
        return "weights: final " if summary.get("weights") else ""
    monitor = next(k.removeprefix("best/") for k in summary if k.startswith("best/eval/"))
    return (
        f"weights: best (epoch {summary['best/epoch']} of {summary['epochs']}, {monitor} "
        f"{summary['best/' + monitor]:.4f}) "
    )


def count(n: int, noun: str) -> str:
    """`1 epoch`, `2,430 steps`."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"

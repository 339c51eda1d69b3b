"""Pictures of a finished run, drawn into its directory from its own records: `curves.png` (metrics.jsonl)
and, for classifiers, `confusion_matrix.png` (the final evaluation's confusion matrix, with class names).

matplotlib with the Agg backend: files only, no display (cluster nodes have none).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

MAX_METRICS = 8  # eval metrics drawn beside the losses; per-class values are left to the table and the matrix
SPLITS = ("eval", "test")


def write(run_dir: Path, summary: dict, class_names: list | None, say=print) -> list[Path]:
    """Both pictures, where there is something to draw. A picture that fails is one line through `say`: the
    weights and the summary are written by then, and a plot is never worth failing the run for."""
    run_dir = Path(run_dir)
    jobs = [("curves.png", lambda out: curves(read_lines(run_dir / "metrics.jsonl"), out, class_names))]
    matrices = {s: summary[f"{s}/confusion_matrix"] for s in SPLITS if f"{s}/confusion_matrix" in summary}
    if matrices and class_names:
        weights = which_weights(summary)
        jobs.append(("confusion_matrix.png", lambda out: confusion_matrix(matrices, class_names, out, weights)))
    written = []
    for name, draw in jobs:
        try:
            draw(run_dir / name)
            written.append(run_dir / name)
        except Exception as e:  # noqa: BLE001 -- any failure of a picture, by design (see above)
            say(f"plots: {name} was not written ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return written


def which_weights(summary: dict) -> str:
    """The weights the summary's scores are of: `best weights (epoch 3)` or `final weights`."""
    if summary.get("weights") == "best" and summary.get("best/epoch") is not None:
        return f"best weights (epoch {summary['best/epoch']})"
    return f"{summary.get('weights', 'final')} weights"


def read_lines(path: Path) -> list[dict]:
    lines = []
    for text in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill, before a resume
            lines.append(json.loads(text))
    return lines


def per_epoch(lines: list[dict], class_names: list | None) -> tuple[dict, dict]:
    """{epoch: mean train/loss of its log lines} and {metric: {epoch: value}} for the eval split's scalars
    (the last value an epoch logged), without sample counts and per-class values."""
    classes = set(class_names or ())
    train, evals = {}, {}
    for line in lines:
        epoch = line.get("epoch")
        if epoch is None:
            continue
        if "train/loss" in line:
            train.setdefault(epoch, []).append(line["train/loss"])
        for key, value in line.items():
            if (
                key.startswith("eval/")
                and isinstance(value, (int, float))
                and not key.endswith("/samples")
                and key.rsplit("/", 1)[-1] not in classes
            ):
                evals.setdefault(key, {})[epoch] = value
    return {e: sum(v) / len(v) for e, v in train.items()}, evals


def curves(lines: list[dict], out: Path, class_names: list | None = None) -> None:
    """Losses (train and eval) on the left, the other eval metrics on the right, against the epoch."""
    plt = pyplot()
    train, evals = per_epoch(lines, class_names)
    if not train and not evals:
        raise ValueError("metrics.jsonl has no line with an epoch")
    others = [k for k in evals if k != "eval/loss"][:MAX_METRICS]
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(11 if others else 6, 4.2), squeeze=False)
    loss = axes[0][0]
    if train:
        loss.plot(*zip(*sorted(train.items())), marker="o", label="train/loss (mean per epoch)")
    if "eval/loss" in evals:
        loss.plot(*zip(*sorted(evals["eval/loss"].items())), marker="o", label="eval/loss")
    loss.set(xlabel="epoch", ylabel="loss", title="loss")
    for key in others:
        axes[0][1].plot(*zip(*sorted(evals[key].items())), marker="o", label=key)
    if others:
        axes[0][1].set(xlabel="epoch", title="eval metrics")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def confusion_matrix(matrices: dict, class_names: list, out: Path, weights: str = "final weights") -> None:
    """One panel per split: counts, rows the true classes, columns the predicted ones."""
    plt = pyplot()
    n = len(class_names)
    side = min(max(4.0, 0.55 * n + 2), 14.0)
    fig, axes = plt.subplots(1, len(matrices), figsize=(side * len(matrices), side), squeeze=False)
    for ax, (split, matrix) in zip(axes[0], matrices.items()):
        if len(matrix) != n:
            raise ValueError(f"the {split} confusion matrix has {len(matrix)} rows for {n} class names")
        image = ax.imshow(matrix, cmap="Blues")
        total = sum(map(sum, matrix))
        ax.set(
            xticks=range(n),
            yticks=range(n),
            xlabel="predicted",
            ylabel="true",
            title=f"{split}: {total:,} samples, {weights}",
        )
        slanted = n > 4 and max(map(len, map(str, class_names))) > 2  # long names would overlap
        ax.set_xticklabels(class_names, rotation=45 if slanted else 0, ha="right" if slanted else "center")
        ax.set_yticklabels(class_names)
        if n <= 30:  # the counts stay legible up to about this many classes
            high = max(map(max, matrix)) / 2
            for i, row in enumerate(matrix):
                for j, count in enumerate(row):
                    ax.text(
                        j,
                        i,
                        f"{count:g}",
                        ha="center",
                        va="center",
                        fontsize="small",
                        color="white" if count > high else "black",
                    )
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

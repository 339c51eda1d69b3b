"""Several runs side by side from their local records (config.yaml, summary.json, metrics.jsonl).

One table (markdown or CSV) of the config keys that differ plus the results, and one metric's curves;
offline: nothing is asked of W&B.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline import files
from pipeline.errors import CompareError

# Keys that differ between any two runs because of where they ran, not what they trained.
LOCATION_KEYS = ("output_dir", "run_name", "data.cache_dir")
# With many eval/test metrics, the default columns keep the loss and these (by the name after the prefix).
PREFERRED = ("loss", "accuracy", "acc", "f1", "f1_macro", "rmse", "mae", "r2", "mape", "auroc")
MAX_DEFAULT_METRICS = 6
TIMING = ("samples/s", "duration_s")  # column names for summary.json's train/samples_per_s and time/total_s


@dataclass
class RunRecord:
    """One run folder's records: flat config, summary (empty when unfinished) and logged lines."""

    path: Path
    config: dict
    summary: dict
    lines: list = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return bool(self.summary)

    def results(self) -> dict:
        """The final values: summary.json, or for an unfinished run the last value of each logged key."""
        if self.finished:
            return self.summary
        last = {}
        for line in self.lines:
            last.update(line)
        return last


def expand(patterns: list[str]) -> list[Path]:
    """Run folders from paths and globs (quoted globs too, for shells that pass them on unexpanded)."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise CompareError(f"{pattern}: matches no folder; pass run folders such as runs/digits/*")
        paths += [Path(m) for m in matches]
    return paths


def read_run(path: Path, say=None) -> RunRecord:
    """A run folder's records. A damaged summary.json shows the run from its logged lines, and a line of
    metrics.jsonl that cannot be read (the last one of a run killed while writing it) is left out; `say`
    tells which (default: standard error, away from the table on standard output)."""
    say = say or (lambda message: print(message, file=sys.stderr))
    if not (path / "config.yaml").is_file():
        raise CompareError(
            f"{path}: not a run folder (no config.yaml); a run folder is "
            f"<output_dir>/<recipe>/<run name>/, e.g. runs/digits/20250101-120000"
        )
    try:
        config = files.flat(yaml.safe_load((path / "config.yaml").read_text()) or {})
    except (yaml.YAMLError, OSError, AttributeError) as e:
        raise CompareError(
            f"{path / 'config.yaml'} cannot be read ({str(e).splitlines()[0]}); leave {path} out "
            f"of the comparison, or restore the file"
        ) from None
    summary = {}
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
            if not isinstance(summary, dict):
                raise ValueError(f"a JSON {type(summary).__name__}, not an object")
        except (OSError, ValueError) as e:
            say(f"note: {path / 'summary.json'} cannot be read ({e}); the run is shown from its metrics.jsonl")
            summary = {}
    return RunRecord(path, config, summary, _lines(path / "metrics.jsonl", say))


def _lines(metrics: Path, say) -> list[dict]:
    if not metrics.is_file():
        return []
    lines, skipped = [], []
    for number, text in enumerate(metrics.read_text(errors="replace").splitlines(), 1):
        try:
            line = json.loads(text) if text.strip() else None
        except ValueError:
            line = False
        if isinstance(line, dict):
            lines.append(line)
        elif line is not None:
            skipped.append(number)
    if skipped:
        what = "line" if len(skipped) == 1 else "lines"
        say(
            f"note: {metrics} {what} {', '.join(map(str, skipped))} cannot be read (cut short by a kill while it "
            f"was written?); left out"
        )
    return lines


def differing_keys(runs: list[RunRecord]) -> list[str]:
    """Config keys whose values are not the same in every run (a key missing from one run differs)."""
    keys = sorted({k for r in runs for k in r.config})
    return [k for k in keys if k not in LOCATION_KEYS and len({repr(r.config.get(k, "")) for r in runs}) > 1]


def default_metrics(runs: list[RunRecord]) -> list[str]:
    """The final scalar eval/* and test/* metrics; when there are many, the loss and accuracy-like ones."""
    ordered = sorted(runs, key=lambda r: not r.finished)  # summary.json's order (loss first), then logged lines
    found = [
        k
        for r in ordered
        for k, v in r.results().items()
        if k.split("/")[0] in ("eval", "test") and _scalar(v) and not k.endswith("/samples")
    ]
    found = list(dict.fromkeys(found))
    if len(found) > MAX_DEFAULT_METRICS:
        found = [k for k in found if k.split("/", 1)[1] in PREFERRED] or found[:MAX_DEFAULT_METRICS]
    return found


def table(runs: list[RunRecord], metrics: list[str] | None = None) -> tuple[list[str], list[list]]:
    """Header and rows (raw values; None where a run lacks one): the run, its status, the config keys that
    differ, the final metrics, the best value and epoch where recorded, samples/s and duration."""
    keys = differing_keys(runs)
    metrics = metrics or default_metrics(runs)
    best = list(
        dict.fromkeys(
            k
            for r in runs
            for k in r.summary
            if k.startswith("best/") and k not in ("best/step", "best/epoch", "best/mode")
        )
    )
    extra = [k for k in ("best/epoch", "stopped_early") if any(k in r.summary for r in runs)]
    timing = ["train/samples_per_s", "time/total_s"]
    header = ["run", "status", *keys, *metrics, *best, *extra, *TIMING]
    names = _names(runs)
    rows = []
    for name, run in zip(names, runs):
        results = run.results()
        rows.append(
            [
                name,
                "done" if run.finished else "unfinished",
                *(run.config.get(k) for k in keys),
                *(results.get(k) for k in metrics + best + extra),
                *(run.summary.get(k) for k in timing),
            ]
        )
    return header, rows


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(h, v) for h, v in zip(header, row)) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """The same table with full-precision numbers (empty where the markdown shows a dash)."""
    with output_file(path, "--csv") as f:
        out = csv.writer(f)
        out.writerow(header)
        out.writerows([["" if v is None else v for v in row] for row in rows])


@contextmanager
def output_file(path: Path, option: str, mode: str = "w"):
    """A file to write an output into (its folder made if missing), renamed into place whole."""
    if path.is_dir():
        example = path / ("runs.csv" if option == "--csv" else "curves.png")
        raise CompareError(f"{option} {path} is a folder; name a file in it, e.g. {option} {example}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with files.replacing(path, mode, **({"newline": ""} if "b" not in mode else {})) as f:
            yield f
    except OSError as e:
        raise CompareError(f"{option} {path}: cannot write it ({e.strerror}); choose a writable place") from None


def cell(column: str, value) -> str:
    """A value for people: 4 significant digits, whole samples/s, seconds with one decimal."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if column == "samples/s":
        return f"{value:,.0f}"
    if column == "duration_s":
        return f"{value:,.1f}"
    return f"{value:.4g}"


def plot(runs: list[RunRecord], metric: str, out: Path) -> None:
    """`metric` against the step for every run that logged it, one line each, into a PNG."""
    try:
        import matplotlib
    except ImportError:
        raise CompareError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    curves = {name: curve(run, metric) for name, run in zip(_names(runs), runs)}
    if not any(curves.values()):
        logged = sorted({k for r in runs for line in r.lines for k in line if k != "step"})
        raise CompareError(f"--metric {metric}: no run logged it in metrics.jsonl; logged: {', '.join(logged)}")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    ax.set(xlabel="step", ylabel=metric, title=metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    try:
        with output_file(out, "--plot", "wb") as f:
            fig.savefig(f, dpi=120, format=out.suffix[1:].lower() or None)
    except ValueError as e:  # a suffix matplotlib cannot write
        raise CompareError(f"--plot {out}: {e}; name a .png (or .pdf, .svg) file") from None
    finally:
        plt.close(fig)


def curve(run: RunRecord, metric: str) -> list[tuple[int, float]]:
    """(step, value) pairs; a step logged twice (the final evaluation is) keeps its last value."""
    points = {line["step"]: line[metric] for line in run.lines if metric in line and "step" in line}
    return sorted(points.items())


def _scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _names(runs: list[RunRecord]) -> list[str]:
    """Each run's folder name, or its path where two folders share a name (same run name, two recipes)."""
    names = [r.path.name for r in runs]
    return [n if names.count(n) == 1 else str(r.path) for n, r in zip(names, runs)]

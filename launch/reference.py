"""The reference table: each generic recipe on public data sets, its defaults and one tuned setting, beside the
standard baselines fitted on the same split, read back from the run's own shards.

python launch/reference.py --only series --out series.md      # one family (or one data set, by name)
python launch/reference.py --quick                            # one small set per family (minutes)
python launch/reference.py --work /scratch/ref                # every family (hours on 2 CPU cores); keep runs, logs

The data sets are written to files first, as a user would write them (CSV tables, PNG folders, CSV series with
real dates), and trained with `launch/train.py` in a fresh process each, with `tracking=none`; the wall time of a
run is that process's, start-up and preparation included. Baselines (scikit-learn, statsmodels: `pip install -e
".[reference]"`) read the splits from the shards the default run trained on:
  tables  logistic (classes) or ridge (numbers) regression on standardized columns; gradient boosting
  images  logistic regression and histogram gradient boosting on the pixels (of the run whose shards hold the
          fewest), scored on a test folder written apart from the train folder (a fifth of each class)
  series  naive (the last value), seasonal naive (the value one season before), ARIMA(2,1,2) fitted on the train
          part, each forecasting the same eval steps as the model (one step ahead, from all values before it)
Images are scored on their test split, with the weights of the best evaluation (checkpoint.weights=best); tables
and series have no split apart from eval, so they are scored on it with their final weights: best weights would
be picked on the very rows that score them. Beside the tables' default, the score of its best epoch: what the
same run reports with the default checkpoint.weights=best.
Everything is written under --work (default: a temporary folder, removed at the end), never in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from launch.reference_data import ENTRIES, Entry  # noqa: E402
from pipeline.files import write_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("tables", "images", "series")


# The one tuned setting of each family, the same on every data set; and what every run of a family gets.
TUNED = {
    "tables": ("trainer.epochs=50",),
    "images": ("trainer.batch_size=64", "optimizer.lr=3e-3"),
    "series": ("model.cell=gru",),
}
RUN_ARGS = {
    "tables": ("checkpoint.weights=final",),
    "images": ("checkpoint.weights=best",),
    "series": ("checkpoint.weights=final",),
}


# ---------------------------------------------------------------- runs


def train(args: list[str], name: str, work: Path) -> dict:
    """One `launch/train.py` process; its wall time, summary and shards, or the error it ended with."""
    command = [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        *args,
        "tracking=none",
        f"run_name={name}",
        f"output_dir={work / 'runs'}",
        f"data.cache_dir={work / 'cache'}",
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - start
    (work / "logs").mkdir(exist_ok=True)
    (work / "logs" / f"{name}.log").write_text(" ".join(command) + "\n" + result.stdout + result.stderr)
    if result.returncode:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        said = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")] or lines[-1:]
        return {"wall_s": wall, "error": f"exit {result.returncode}: {said[-1] if said else 'no message'}"}
    run_dir = next((work / "runs").glob(f"*/{name}"))
    record = json.loads((run_dir / "run.json").read_text())
    return {
        "wall_s": wall,
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "shards": str(work / record["data"]["shards"]),
        "run_dir": str(run_dir),
    }


def splits(shards: str, scored: str = "eval") -> tuple[dict, dict, dict]:
    """The train and the `scored` split's columns of a run's shards, as numpy arrays, and the shards' meta."""
    import datasets

    data = datasets.load_from_disk(shards)
    train, evaluation = (data[s].with_format("numpy")[:] for s in ("train", scored))
    return train, evaluation, shards_meta(shards)


def shards_meta(shards: str) -> dict:
    return json.loads((Path(shards) / "meta.json").read_text())


def timed(fit: Callable) -> tuple[float, float]:
    start = time.perf_counter()
    value = float(fit())
    return value, time.perf_counter() - start


# ---------------------------------------------------------------- baselines on the run's own split


def table_baselines(shards: str) -> dict:
    from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, evaluation, meta = splits(shards)
    x, y, x_eval, y_eval = train["features"], train["label"], evaluation["features"], evaluation["label"]
    regression = meta["task"] == "regression"
    # score(): accuracy for classifiers, R^2 for regressors (the shards' standardized target: R^2 is unchanged).
    linear = (Ridge() if regression else LogisticRegression(max_iter=5000), "logistic / ridge")
    boosting = GradientBoostingRegressor(random_state=0) if regression else GradientBoostingClassifier(random_state=0)
    return {
        linear[1]: timed(lambda: make_pipeline(StandardScaler(), linear[0]).fit(x, y).score(x_eval, y_eval)),
        "gradient boosting": timed(lambda: boosting.fit(x, y).score(x_eval, y_eval)),
    }


def image_baselines(shards: str) -> dict:
    """Fitted on the train split's pixels, scored on the test split's, as the runs are."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    train, test, _ = splits(shards, "test")
    x, x_test = (split["image"].reshape(len(split["image"]), -1) / 255.0 for split in (train, test))
    logistic, boosting = LogisticRegression(max_iter=1000), HistGradientBoostingClassifier(random_state=0)
    return {
        "logistic": timed(lambda: logistic.fit(x, train["label"]).score(x_test, test["label"])),
        "gradient boosting": timed(lambda: boosting.fit(x, train["label"]).score(x_test, test["label"])),
    }


def series_baselines(shards: str, period: int) -> dict:
    """The eval steps the model forecasts (each after a whole window of eval steps), by naive, seasonal naive and
    ARIMA forecasts one step ahead, in the value's units."""
    import numpy as np
    from statsmodels.tsa.arima.model import ARIMA

    train, evaluation, meta = splits(shards)
    if meta.get("horizon", 1) != 1:
        raise ValueError("the series baselines forecast one step ahead: a run with data.horizon=1")
    train, evaluation = (split["value"].astype("float64") * meta["std"] + meta["mean"] for split in (train, evaluation))
    series = np.concatenate([train, evaluation])
    targets = np.arange(len(train) + meta["window"], len(series))

    def mse(forecast):
        return float(np.mean((forecast - series[targets]) ** 2))

    def arima():
        with warnings.catch_warnings():  # statsmodels' notes on its starting values and convergence
            warnings.simplefilter("ignore")
            fitted = ARIMA(train, order=(2, 1, 2)).fit()
        return mse(fitted.append(evaluation, refit=False).predict(start=targets[0], end=targets[-1]))

    found = {"naive": timed(lambda: mse(series[targets - 1]))}
    if period:
        found["seasonal naive"] = timed(lambda: mse(series[targets - period]))
    found["ARIMA(2,1,2)"] = timed(arima)
    return found


def baseline_shards(family: str, shards: list[str]) -> str | None:
    """The default run's shards (every setting splits the same rows); for images those with the fewest pixels,
    which the logistic regression fits in the least time."""
    if family != "images" or len(shards) < 2:
        return next(iter(shards), None)
    import datasets
    import numpy as np

    return min(shards, key=lambda s: np.prod(datasets.load_from_disk(s)["train"].features["image"].shape))


METRICS = {"tables": ("eval/accuracy", "eval/r2"), "images": ("test/accuracy",), "series": ("eval/mse",)}


def measure(entry: Entry, work: Path) -> dict:
    """An entry's data written, its default and tuned runs, and the baselines on the default run's shards."""
    folder = work / "data" / entry.name
    folder.mkdir(parents=True, exist_ok=True)
    print(f"reference: {entry.family}/{entry.name}: writing the data under {folder}", flush=True)
    args = entry.write(folder)
    row = {"family": entry.family, "name": entry.name, "runs": {}, "baselines": {}}
    for setting, overrides in (("default", ()), ("tuned", TUNED[entry.family])):
        run = train([*args, *RUN_ARGS[entry.family], *overrides], f"{entry.name}-{setting}", work)
        summary = run.pop("summary", {})
        key = next((k for k in METRICS[entry.family] if k in summary), None)
        row["metric"] = row.get("metric") or key
        sizes = summary.get("data", {})
        run.update(
            value=summary.get(key),
            best_epoch=best_epoch(run.get("run_dir"), summary, key),
            naive_mse=summary.get("eval/naive_mse"),
            rows=[sizes[split]["rows"] for split in ("train", "eval", "test") if split in sizes],
        )
        row["runs"][setting] = run
        print(f"reference: {entry.name} {setting}: {key or ''} {cell(run)}", flush=True)
    shards = baseline_shards(entry.family, [r["shards"] for r in row["runs"].values() if "shards" in r])
    if shards:
        meta = shards_meta(shards)  # a series' grid and window, said beside its name
        row["grid"] = f"{meta['freq']}, window {meta['window']}" if "freq" in meta else ""
        fit = {
            "tables": table_baselines,
            "images": image_baselines,
            "series": lambda s: series_baselines(s, entry.period),
        }[entry.family]
        row["baselines"] = {name: {"value": v, "wall_s": t} for name, (v, t) in fit(shards).items()}
        check_naive(row)
    return row


def best_epoch(run_dir: str | None, summary: dict, key: str | None) -> list | None:
    """[epoch, score] of the best evaluation: what the same run reports with checkpoint.weights=best (the
    default), its epoch picked on the very eval rows that score it."""
    epoch = summary.get("best/epoch")
    if not run_dir or epoch is None:
        return None
    records = (json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return next(([epoch, r[key]] for r in records if r.get("epoch") == epoch and key in r), None)


def check_naive(row: dict) -> None:
    """The naive baseline forecasts the steps the run scored exactly as the run's own naive forecast does: a
    difference means the baselines are not scored on the run's eval steps."""
    own = row["runs"]["default"].get("naive_mse")
    mine = row["baselines"].get("naive", {}).get("value")
    if own is not None and mine is not None and abs(own - mine) > 1e-3 * max(abs(own), 1e-9):
        print(
            f"reference: warning: {row['name']}: the naive baseline's MSE {mine:.6g} differs from the run's "
            f"own eval/naive_mse {own:.6g}: the baselines are not scored on the steps the run forecast",
            file=sys.stderr,
        )


# ---------------------------------------------------------------- the table


def cell(result: dict) -> str:
    if result.get("error"):
        shown = result["error"].replace("|", "/")
        return f"failed, {shown[:90]}{'...' * (len(shown) > 90)} ({result['wall_s']:.0f} s)"
    value = result["value"]
    if value is None:
        return f"no score ({result['wall_s']:.0f} s)"
    shown = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}" if abs(value) >= 10 else f"{value:.3f}"
    return f"{shown} ({result['wall_s']:.0f} s)" if result["wall_s"] >= 1 else f"{shown} (<1 s)"


def markdown(rows: list[dict], header: str) -> str:
    parts = [header]
    for family in FAMILIES:
        mine = [r for r in rows if r["family"] == family]
        if not mine:
            continue
        baselines = list(dict.fromkeys(name for r in mine for name in r["baselines"]))
        splits_named = "train/eval/test" if family == "images" else "train/eval"
        ratio = ["default / naive"] if family == "series" else []
        best = ["default's best epoch (picked on eval)"] if family == "tables" else []
        names = ["data set", splits_named, "metric", "default", *best, "tuned", *baselines, *ratio]
        parts += [
            "",
            f"### {family}",
            "",
            f"tuned: `{' '.join(TUNED[family])}`; every run: `{' '.join(RUN_ARGS[family])}`",
            "",
            "| " + " | ".join(names) + " |",
            "| --- " * len(names) + "|",
        ]
        for r in mine:
            parts.append("| " + " | ".join(table_row(r, baselines, ratio, best)) + " |")
    return "\n".join(parts) + "\n"


def table_row(r: dict, baselines: list[str], ratio: list[str], best: list[str]) -> list[str]:
    rows_seen = next((run["rows"] for run in r["runs"].values() if run.get("rows")), None)
    name = f"{r['name']} ({r['grid']})" if r.get("grid") else r["name"]
    found = [cell(r["baselines"][b]) if b in r["baselines"] else "-" for b in baselines]
    default, naive = r["runs"]["default"].get("value"), r["baselines"].get("naive", {}).get("value")
    shown = [f"{default / naive:.2f}" if default is not None and naive else "-" for _ in ratio]
    picked = r["runs"]["default"].get("best_epoch")
    best_cell = [f"{picked[1]:.3f} (epoch {picked[0]})" if picked else "-" for _ in best]
    return [
        name,
        "/".join(f"{n:,}" for n in rows_seen) if rows_seen else "-",
        (r.get("metric") or "-").split("/")[-1],
        cell(r["runs"]["default"]),
        *best_cell,
        cell(r["runs"]["tuned"]),
        *found,
        *shown,
    ]


def commit() -> str:
    """The checkout's commit as the run starts (and whether tracked files differ from it)."""

    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    changed = git("status", "--short", "--untracked-files=no")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + (" with local changes" if changed else "")


def header(sha: str, started: float, quick: bool, partial: bool = False) -> str:
    return (
        f"Measured at commit {sha}, {time.strftime('%Y-%m-%d', time.gmtime(started))}"
        f"{' (--quick)' if quick else ''}: {time.time() - started:.0f} s in all"
        f"{' so far (still running)' if partial else ''}, load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores when written. Each cell: the score (images: on the test split; tables, series: on "
        f"the eval split) and the wall time of the run or fit."
    )


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=[*FAMILIES, *(e.name for e in ENTRIES)], help="one family, or one data set")
    p.add_argument("--quick", action="store_true", help="one small data set per family")
    p.add_argument("--out", help="write the markdown table to this file too")
    p.add_argument("--work", help="folder for the data, runs, shards and logs (kept); default: a temporary one")
    return p.parse_args()


def work_folder(given: str | None) -> Path:
    if not given:
        return Path(tempfile.mkdtemp(prefix="reference-"))
    work = Path(given).resolve()
    if work == ROOT or ROOT in work.parents:
        print(
            f"error: --work {given} is inside the repository ({ROOT}); the runs, shards and data would be "
            f"written into it.\nFix: --work /tmp/reference (any folder outside the repository), or leave --work "
            f"out for a temporary folder",
            file=sys.stderr,
        )
        sys.exit(2)
    work.mkdir(parents=True, exist_ok=True)
    return work


def main() -> None:
    args = parse_args()
    work = work_folder(args.work)
    started, sha = time.time(), commit()
    entries = [e for e in ENTRIES if args.only in (None, e.family, e.name) and (e.quick or not args.quick)]
    try:
        rows = []
        for entry in entries:  # the table so far is written after each data set: a long run stopped keeps them
            rows.append(measure(entry, work))
            table = markdown(rows, header(sha, started, args.quick, len(rows) < len(entries)))
            write_text(work / "reference.json", json.dumps(rows, indent=1))
            if args.out:
                write_text(Path(args.out), table)
        print(table)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

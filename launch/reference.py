"""The reference table: each generic recipe on public data sets, its defaults and one tuned setting, beside the
standard baselines fitted on the same split, read back from the run's own shards.

python launch/reference.py --out reference.md                 # every family (tens of minutes on 2 CPU cores)
python launch/reference.py --quick                            # one small set per family (minutes)
python launch/reference.py --only series --work /scratch/ref  # one family (or data set); keep runs, logs, data

The data sets are written to files first, as a user would write them (CSV tables, PNG folders, CSV series), and
trained with `launch/train.py` in a fresh process each, with `tracking=none`; the wall time of a run is that
process's, start-up and preparation included. Baselines (scikit-learn, statsmodels: `pip install -e
".[reference]"`) read the train and eval splits from the shards the default run trained on:
  tables  logistic (classes) or ridge (numbers) regression on standardized columns; gradient boosting
  images  logistic regression on the pixels (of the run whose shards hold the fewest; every run splits alike)
  series  naive (the last value), seasonal naive (the value one season before), ARIMA(2,1,2) fitted on the train
          part, each forecasting the same eval steps as the model (one step ahead, from all values before it)
Everything is written under --work (default: a temporary folder, removed at the end), never in the repository.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from pipeline.files import write_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = ROOT / "tests" / "data"
FAMILIES = ("tables", "images", "series")


@dataclass(frozen=True)
class Entry:
    """One data set: how to write it as files (returns the recipe's arguments), its tuned setting."""

    family: str
    name: str
    write: Callable[[Path], list[str]]
    tuned: tuple[str, ...]
    quick: bool = False  # in the --quick table (one small set per family)
    period: int = 0  # series: steps in one season, for the seasonal naive forecast (0: none)


# ---------------------------------------------------------------- the data sets, written as files


def sklearn_table(loader: str, target: str, classes: bool):
    def write(folder: Path) -> list[str]:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, loader)(as_frame=True)
        frame = bunch.frame.rename(columns={"target": target})
        if classes:  # class names as text, as most tables hold them
            frame[target] = frame[target].map(dict(enumerate(bunch.target_names)))
        path = folder / f"{loader.removeprefix('load_')}.csv"
        frame.to_csv(path, index=False)
        return ["recipe=tabular", f"data.file={path}", f"data.target={target}"]

    return write


def save_pngs(images, labels, names: list[str], folder: Path) -> None:
    """uint8 grey images [N, H, W] as <folder>/<class name>/<index>.png."""
    from PIL import Image

    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image, mode="L").save(folder / names[label] / f"{i:05d}.png")


def digits_images(folder: Path) -> list[str]:
    """scikit-learn's 1,797 8x8 digits (values 0-16) as 8x8 grey PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype("uint8")
    save_pngs(images, digits.target, [str(d) for d in range(10)], folder / "digits")
    return ["recipe=image_folder", f"data.train_dir={folder / 'digits'}"]


def mnist_images(folder: Path) -> list[str]:
    """The MNIST test set (10,000 28x28 digits) from its IDX files, read by torchvision's readers, as PNGs."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = {}
    for source in (TEST_DATA / "mnist-test").glob("*.gz"):
        with gzip.open(source) as f:
            (folder / source.stem).write_bytes(f.read())
        raw[source.stem] = str(folder / source.stem)
    images, labels = read_image_file(raw["t10k-images-idx3-ubyte"]), read_label_file(raw["t10k-labels-idx1-ubyte"])
    save_pngs(images.numpy(), labels.numpy(), [str(d) for d in range(10)], folder / "mnist")
    return ["recipe=image_folder", f"data.train_dir={folder / 'mnist'}"]


def omniglot_images(folder: Path) -> list[str]:
    """Omniglot's 5-alphabet subset (2,720 105x105 PNGs in <alphabet>/<character>/): which alphabet."""
    with zipfile.ZipFile(TEST_DATA / "omniglot-small" / "images_background_small1.zip") as z:
        z.extractall(folder)
    return ["recipe=image_folder", f"data.train_dir={folder / 'images_background_small1'}"]


def statsmodels_series(name: str, column: str, dates: Callable):
    """A statsmodels series as `date,<column>` with real calendar dates (`dates(frame)`)."""

    def write(folder: Path) -> list[str]:
        import pandas as pd
        import statsmodels.api as sm

        frame = getattr(sm.datasets, name).load_pandas().data
        table = pd.DataFrame({"date": dates(frame), column: frame[column].to_numpy()})
        path = folder / f"{name}.csv"
        table.to_csv(path, index=False, date_format="%Y-%m-%d")
        return ["recipe=time_series", f"data.file={path}", "data.time_column=date", f"data.value_column={column}"]

    return write


def years(column: str) -> Callable:
    import pandas as pd

    return lambda frame: pd.to_datetime(frame[column].astype(int).astype(str) + "-01-01")


def quarters(frame):
    import pandas as pd

    return pd.PeriodIndex.from_fields(year=frame["year"].astype(int), quarter=frame["quarter"].astype(int),
                                      freq="Q").to_timestamp()


TABLES_TUNED = ("trainer.epochs=50",)
SERIES_TUNED = ("model.cell=gru", "trainer.epochs=30")
ENTRIES = [
    Entry("tables", "iris", sklearn_table("load_iris", "species", True), TABLES_TUNED, quick=True),
    Entry("tables", "wine", sklearn_table("load_wine", "cultivar", True), TABLES_TUNED),
    Entry("tables", "breast_cancer", sklearn_table("load_breast_cancer", "diagnosis", True), TABLES_TUNED),
    Entry("tables", "diabetes", sklearn_table("load_diabetes", "progression", False), TABLES_TUNED),
    Entry("images", "digits", digits_images, ("trainer.epochs=30",), quick=True),
    Entry("images", "mnist_test", mnist_images, ("trainer.batch_size=64", "optimizer.lr=3e-3")),
    Entry("images", "omniglot_alphabets", omniglot_images, ("data.channels=1", "data.image_size=32")),
    Entry("series", "sunspots", statsmodels_series("sunspots", "SUNACTIVITY", years("YEAR")), SERIES_TUNED,
          quick=True, period=11),
    Entry("series", "nile", statsmodels_series("nile", "volume", years("year")), SERIES_TUNED),
    Entry("series", "co2", statsmodels_series("co2", "co2", lambda frame: frame.index), SERIES_TUNED, period=52),
    Entry("series", "macrodata_unemp", statsmodels_series("macrodata", "unemp", quarters), SERIES_TUNED, period=4),
]


# ---------------------------------------------------------------- runs


def train(args: list[str], name: str, work: Path) -> dict:
    """One `launch/train.py` process; its wall time, summary and shards, or the error it ended with."""
    command = [sys.executable, str(ROOT / "launch" / "train.py"), *args, "tracking=none", f"run_name={name}",
               f"output_dir={work / 'runs'}", f"data.cache_dir={work / 'cache'}"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=work, capture_output=True, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - start
    (work / "logs").mkdir(exist_ok=True)
    (work / "logs" / f"{name}.log").write_text(" ".join(command) + "\n" + result.stdout + result.stderr)
    if result.returncode:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        said = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")] or lines[-1:]
        return {"wall_s": wall, "error": f"exit {result.returncode}: {said[-1] if said else 'no message'}"}
    run_dir = next((work / "runs").glob(f"*/{name}"))
    record = json.loads((run_dir / "run.json").read_text())
    return {"wall_s": wall, "summary": json.loads((run_dir / "summary.json").read_text()),
            "shards": str(work / record["data"]["shards"]), "run_dir": str(run_dir)}


def splits(shards: str) -> tuple[dict, dict, dict]:
    """The train and eval columns of a run's shards, as numpy arrays, and the shards' meta."""
    import datasets

    data = datasets.load_from_disk(shards)
    meta = json.loads((Path(shards) / "meta.json").read_text())
    train, evaluation = (data[s].with_format("numpy")[:] for s in ("train", "eval"))
    return train, evaluation, meta


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
    return {linear[1]: timed(lambda: make_pipeline(StandardScaler(), linear[0]).fit(x, y).score(x_eval, y_eval)),
            "gradient boosting": timed(lambda: boosting.fit(x, y).score(x_eval, y_eval))}


def image_baselines(shards: str) -> dict:
    from sklearn.linear_model import LogisticRegression

    train, evaluation, _ = splits(shards)

    def pixels(split):
        return split["image"].reshape(len(split["image"]), -1) / 255.0

    model = LogisticRegression(max_iter=1000)
    return {"logistic": timed(lambda: model.fit(pixels(train), train["label"]).score(pixels(evaluation),
                                                                                      evaluation["label"]))}


def series_baselines(shards: str, period: int) -> dict:
    """The eval steps the model forecasts (each after a whole window of eval steps), by naive, seasonal naive and
    ARIMA forecasts one step ahead, in the value's units."""
    import numpy as np
    from statsmodels.tsa.arima.model import ARIMA

    train, evaluation, meta = splits(shards)
    if meta.get("horizon", 1) != 1:
        raise ValueError("the series baselines forecast one step ahead: a run with data.horizon=1")
    train, evaluation = (split["value"] * meta["std"] + meta["mean"] for split in (train, evaluation))
    series = np.concatenate([train, evaluation])
    targets = np.arange(len(train) + meta["window"], len(series))

    def mse(forecast):
        return float(np.mean((forecast - series[targets]) ** 2))

    def arima():
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


METRICS = {"tables": ("eval/accuracy", "eval/r2"), "images": ("eval/accuracy",), "series": ("eval/mse",)}


def measure(entry: Entry, work: Path) -> dict:
    """An entry's data written, its default and tuned runs, and the baselines on the default run's shards."""
    folder = work / "data" / entry.name
    folder.mkdir(parents=True, exist_ok=True)
    print(f"reference: {entry.family}/{entry.name}: writing the data under {folder}", flush=True)
    args = entry.write(folder)
    row = {"family": entry.family, "name": entry.name, "tuned": " ".join(entry.tuned), "runs": {}, "baselines": {}}
    for setting, overrides in (("default", ()), ("tuned", entry.tuned)):
        run = train([*args, *overrides], f"{entry.name}-{setting}", work)
        summary = run.pop("summary", {})
        key = next((k for k in METRICS[entry.family] if k in summary), None)
        row["metric"] = row.get("metric") or key
        sizes = summary.get("data", {})
        run.update(value=summary.get(key), naive_mse=summary.get("eval/naive_mse"),
                   rows=[sizes.get(split, {}).get("rows") for split in ("train", "eval")])
        row["runs"][setting] = run
        print(f"reference: {entry.name} {setting}: {key or ''} {cell(run)}", flush=True)
    shards = baseline_shards(entry.family, [r["shards"] for r in row["runs"].values() if "shards" in r])
    if shards:
        fit = {"tables": table_baselines, "images": image_baselines,
               "series": lambda s: series_baselines(s, entry.period)}[entry.family]
        row["baselines"] = {name: {"value": v, "wall_s": t} for name, (v, t) in fit(shards).items()}
        check_naive(row)
    return row


def check_naive(row: dict) -> None:
    """The naive baseline forecasts the steps the run scored exactly as the run's own naive forecast does: a
    difference means the baselines are not scored on the run's eval steps."""
    own = row["runs"]["default"].get("naive_mse")
    mine = row["baselines"].get("naive", {}).get("value")
    if own is not None and mine is not None and abs(own - mine) > 1e-3 * max(abs(own), 1e-9):
        print(f"reference: warning: {row['name']}: the naive baseline's MSE {mine:.6g} differs from the run's "
              f"own eval/naive_mse {own:.6g}: the baselines are not scored on the steps the run forecast",
              file=sys.stderr)


# ---------------------------------------------------------------- the table


def cell(result: dict) -> str:
    if result.get("error"):
        shown = result["error"].replace("|", "/")
        return f"failed, {shown[:90]}{'...' * (len(shown) > 90)} ({result['wall_s']:.0f} s)"
    value = result["value"]
    shown = f"{value:.4g}" if abs(value) >= 10 else f"{value:.3f}"
    return f"{shown} ({result['wall_s']:.0f} s)" if result["wall_s"] >= 1 else f"{shown} (<1 s)"


def markdown(rows: list[dict], header: str) -> str:
    parts = [header]
    for family in FAMILIES:
        mine = [r for r in rows if r["family"] == family]
        if not mine:
            continue
        baselines = list(dict.fromkeys(name for r in mine for name in r["baselines"]))
        parts += ["", f"### {family}", "", "| " + " | ".join(["data set", "train/eval", "metric", "default",
                                                                  "tuned", *baselines, "tuned setting"]) + " |",
                  "| --- " * (6 + len(baselines)) + "|"]
        for r in mine:
            rows_seen = next((run["rows"] for run in r["runs"].values() if run.get("rows", [None])[0]), None)
            size = f"{rows_seen[0]:,}/{rows_seen[1]:,}" if rows_seen else "-"
            found = [cell(r["baselines"][b]) if b in r["baselines"] else "-" for b in baselines]
            metric = (r.get("metric") or "-").removeprefix("eval/")
            columns = [r["name"], size, metric, cell(r["runs"]["default"]), cell(r["runs"]["tuned"]), *found,
                       f"`{r['tuned']}`"]
            parts.append("| " + " | ".join(columns) + " |")
    return "\n".join(parts) + "\n"


def commit() -> str:
    """The checkout's commit as the run starts (and whether tracked files differ from it)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    changed = git("status", "--short", "--untracked-files=no")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + (" with local changes" if changed else "")


def header(sha: str, started: float, quick: bool, partial: bool = False) -> str:
    return (f"Measured at commit {sha}, {time.strftime('%Y-%m-%d', time.gmtime(started))}"
            f"{' (--quick)' if quick else ''}: {time.time() - started:.0f} s in all"
            f"{' so far (still running)' if partial else ''}, load average {os.getloadavg()[0]:.1f} on "
            f"{os.cpu_count()} cores when written. Each cell: the eval metric (wall time of the run or fit).")


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
        print(f"error: --work {given} is inside the repository ({ROOT}); the runs, shards and data would be "
              f"written into it.\nFix: --work /tmp/reference (any folder outside the repository), or leave --work "
              f"out for a temporary folder", file=sys.stderr)
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

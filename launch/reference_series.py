"""recipe=time_series on real public series, each trained with the recipe's defaults, against the naive and the
seasonal naive forecast on the same eval windows: the table "Forecasts on real series" in docs/benchmarks.md.

python launch/reference_series.py                       # all series, defaults (minutes on 2 CPU cores)
python launch/reference_series.py model.target=level    # any override goes to every run
python launch/reference_series.py --only co2,nile       # some of them

The series come with statsmodels (co2, sunspots, nile, elnino, macrodata) and are written as CSVs with their real
dates, as a user would have them; `electricity` is a daily pattern plus noise in electricity_forecast's layout,
trained with that preset's defaults. Runs and files go to a temporary folder (--keep FOLDER keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
# Steps in one season by the series' frequency, for the seasonal naive forecast (a year has no season).
SEASONS = {"W": 52, "MS": 12, "QS": 4, "15min": 96}


def statsmodels_series() -> dict[str, tuple[pd.DataFrame, str]]:
    """name -> (a table of date and value, what it is)."""
    import statsmodels.api as sm

    def years(values):
        return [f"{int(y)}-01-01" for y in values]

    co2 = sm.datasets.co2.load_pandas().data
    sun = sm.datasets.sunspots.load_pandas().data
    nile = sm.datasets.nile.load_pandas().data
    nino = sm.datasets.elnino.load_pandas().data.melt(id_vars="YEAR", var_name="month", value_name="temp")
    nino["date"] = pd.to_datetime(nino["YEAR"].astype(int).astype(str) + "-" + nino["month"] + "-01", format="%Y-%b-%d")
    macro = sm.datasets.macrodata.load_pandas().data
    quarters = pd.PeriodIndex.from_fields(year=macro["year"].astype(int), quarter=macro["quarter"].astype(int),
                                          freq="Q").start_time.strftime("%Y-%m-%d")
    return {
        "co2": (pd.DataFrame({"date": co2.index.strftime("%Y-%m-%d"), "co2": co2["co2"].to_numpy()}),
                "weekly CO2 at Mauna Loa: trend + yearly season, 59 empty weeks"),
        "sunspots": (pd.DataFrame({"date": years(sun["YEAR"]), "sunspots": sun["SUNACTIVITY"]}),
                     "yearly sunspot numbers: an ~11-year cycle"),
        "nile": (pd.DataFrame({"date": years(nile["year"]), "volume": nile["volume"]}),
                 "yearly Nile flow, 100 years: noise around a level that drops once"),
        "elnino": (nino.sort_values("date").assign(date=lambda t: t["date"].dt.strftime("%Y-%m-%d"))[["date", "temp"]],
                   "monthly Pacific sea surface temperature: yearly season + El Nino swings"),
        "realgdp": (pd.DataFrame({"date": quarters, "realgdp": macro["realgdp"]}), "quarterly US real GDP: a trend"),
        "unemp": (pd.DataFrame({"date": quarters, "unemp": macro["unemp"]}), "quarterly US unemployment rate"),
    }


def electricity(n: int = 2000) -> pd.DataFrame:
    """A daily pattern of 96 quarter hours plus noise, in electricity_forecast's layout."""
    rng = np.random.default_rng(0)
    t = np.arange(n)
    value = 100 + 30 * np.sin(2 * np.pi * t / 96) + 10 * np.sin(4 * np.pi * t / 96 + 1) + rng.normal(0, 6, n)
    time_ = pd.date_range("2016-01-01 00:15:00", periods=n, freq="15min").strftime("%Y-%m-%d %H:%M:%S")
    return pd.DataFrame({"timestamp": time_, "consumption": value.round(3)})


def train(work: Path, name: str, args: list[str], overrides: list[str]) -> tuple[Path, float]:
    # The final weights: the best evaluation's would be chosen on the eval split the table scores.
    run_args = [sys.executable, str(REPO / "launch" / "train.py"), *args, "tracking=none", f"run_name={name}",
                f"data.cache_dir={work / 'cache'}", "checkpoint.weights=final", *overrides]
    started = time.perf_counter()
    result = subprocess.run(run_args, cwd=work, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    (work / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"{name}: training failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    [run] = (work / "runs").glob(f"*/{name}")
    return run, time.perf_counter() - started


def seasonal_naive_mse(table: pd.DataFrame, meta: dict) -> float | None:
    """The MSE of "the same step one season earlier" on the run's eval windows, on the run's grid."""
    season = SEASONS.get(meta["freq"].split("-")[0])
    if season is None:
        return None
    values = pd.Series(table.iloc[:, 1].to_numpy(dtype=float), index=pd.to_datetime(table.iloc[:, 0]))
    values = values.reindex(pd.date_range(values.index[0], values.index[-1], freq=meta["freq"])).interpolate()
    first = values.index.get_loc(pd.Timestamp(meta["eval_start"])) + meta["window"] + meta["horizon"] - 1
    targets = np.arange(first, len(values))
    lag = season * -(-meta["horizon"] // season)  # the latest same-season step the forecast may see
    return float(np.mean((values.to_numpy()[targets] - values.to_numpy()[targets - lag]) ** 2))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated series names")
    parser.add_argument("--keep", default="", help="a folder to keep the CSVs and runs in")
    options, overrides = parser.parse_known_args(argv)
    work = Path(options.keep or tempfile.mkdtemp(prefix="reference_series-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    series = {**statsmodels_series(), "electricity": (electricity(), "15-minute load: a daily pattern + noise")}
    chosen = options.only.split(",") if options.only else list(series)
    print("| series | steps, frequency | model MSE | naive MSE | seasonal naive MSE | model / naive | train s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in chosen:
        table, what = series[name]
        if name == "electricity":
            (work / "data").mkdir(exist_ok=True)
            table.to_csv(work / "data" / "electricity.csv", index=False)
            args = ["recipe=electricity_forecast", f"data.root={work / 'data'}"]
        else:
            table.to_csv(work / f"{name}.csv", index=False, na_rep="")
            args = ["recipe=time_series", f"data.file={name}.csv", "data.time_column=date",
                    f"data.value_column={table.columns[1]}"]
        run, seconds = train(work, name, args, overrides)
        summary, meta = (json.loads((run / f).read_text()) for f in ("summary.json", "meta.json"))
        seasonal = seasonal_naive_mse(table, meta)
        print(f"| {name}: {what} | {len(table):,}, {meta['freq']}, window {meta['window']} | "
              f"{summary['eval/mse']:,.4g} | {summary['eval/naive_mse']:,.4g} | "
              f"{'n/a' if seasonal is None else f'{seasonal:,.4g}'} | "
              f"{summary['eval/mse'] / summary['eval/naive_mse']:.2f} | {seconds:.0f} |", flush=True)
    print(f"runs in {work}")


if __name__ == "__main__":
    main(sys.argv[1:])

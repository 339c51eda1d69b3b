"""Reading a series CSV for recipe=time_series and its presets: the timestamp and value columns, the series'
frequency (a fixed step or a calendar one), its grid with missing steps and empty values found and filled."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.tseries.frequencies import to_offset

from pipeline.errors import ConfigError, DataError
from recipes import _tables as tables
from recipes._table_cells import Column

# Calendar frequencies tried when the timestamps have gaps (pandas infers a frequency only from a gapless
# series), by the most common gap between timestamps in days; the fixed step of that gap is always tried too,
# after them (a week is both: its calendar name is the clearer one).
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
DAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")
CALENDAR = (
    (range(1, 4), ("B",)),
    (range(7, 8), tuple(f"W-{d}" for d in DAYS)),
    (range(28, 32), ("MS", "ME")),
    (range(89, 93), tuple(f"Q{e}-{m}" for e in "SE" for m in MONTHS[:3] + MONTHS[-3:])),
    (range(365, 367), tuple(f"Y{e}-{m}" for e in "SE" for m in MONTHS)),
)
NAMES = {
    "MS": "month start",
    "ME": "month end",
    "QS": "quarter start",
    "QE": "quarter end",
    "YS": "year start",
    "YE": "year end",
    "B": "business day",
    "W": "week",
}
FREQ_HELP = "a pandas frequency: h, 15min, D, B (business day), W-SUN, MS or ME (month start/end), QS, YS"


def columns(cfg) -> list[Column]:
    """The timestamp and value columns: named by the header, or the first two by position (names for messages)."""
    return [
        Column(cfg.data.time_column or "timestamp", "time"),
        Column(cfg.data.value_column or "value", empty_ok=True),
    ]


def by_name(cfg) -> bool:
    return bool(cfg.data.time_column or cfg.data.value_column)


def raw_files(cfg) -> list[Path]:
    time, value = (c.name for c in columns(cfg))
    if by_name(cfg):
        expected = f"a CSV with a header row naming the columns {time} (a timestamp) and {value} (a number)"
    else:
        expected = (
            "a CSV whose first column is a timestamp (2016-01-01 00:15:00) and second column the value, one "
            "row per time step (a header row is optional)"
        )
    fix = "or data.time_column= data.value_column= to pick columns of a header by name"
    return tables.with_statistics(cfg, [tables.raw_file(cfg, expected, fix)])


def read_table(cfg, path: Path, enough, what: str, source: str = "data.root / data.file") -> tuple[pd.DataFrame, dict]:
    """The CSV's timestamp and value columns, cell by cell checked (recipes/_tables.read); `source`: what names
    the file, for messages."""
    if by_name(cfg) and not (cfg.data.time_column and cfg.data.value_column):
        raise ConfigError(
            "give both data.time_column= and data.value_column= (columns of the header by name), or "
            "neither (the first column is the timestamp, the second the value)"
        )
    return tables.read(
        cfg,
        path,
        columns(cfg),
        enough,
        what,
        tables.Reading(
            header=True if by_name(cfg) else None, rename="data.time_column= data.value_column=", source=source
        ),
    )


# ---------------------------------------------------------------- the frequency


def given_freq(text: str):
    """data.freq= as a pandas offset; a ConfigError naming the valid forms."""
    try:
        return to_offset(text)
    except ValueError:
        raise ConfigError(
            f"data.freq={text}: not a frequency pandas knows. Use {FREQ_HELP}; or leave it out to "
            f"infer it from the timestamps."
        ) from None


def describe(freq) -> str:
    """A frequency in the user's words: a fixed step as a time span, a calendar one by name and pandas alias."""
    name = NAMES.get(freq.freqstr.split("-")[0])
    if name is not None:
        return f"{name} ({freq.freqstr})"
    try:
        return str(pd.Timedelta(freq))
    except (TypeError, ValueError):
        return freq.freqstr


def step_text(freq) -> str:
    """meta.json's `step`: a fixed step as a time span (what runs without `freq` kept), else the pandas alias."""
    try:
        return str(pd.Timedelta(freq))
    except (TypeError, ValueError):
        return freq.freqstr


def inferred_freq(index: pd.DatetimeIndex, path: Path):
    """The series' frequency: pandas' inference on a gapless series; with gaps, of the calendar frequencies near
    the most common gap and that gap as a fixed step, the one with the most timestamps on its grid, then the
    coarsest."""
    if len(index) < 2:
        raise DataError(f"{path}: a single timestamp; a series needs at least two to have a step.\nFix: add rows.")
    if len(index) >= 3:
        with warnings.catch_warnings():  # pandas 3 announces returning an offset; to_offset takes both
            warnings.simplefilter("ignore")
            found = pd.infer_freq(index)
        if found is not None:
            return to_offset(found)
    gaps, counts = np.unique(np.diff(index.to_numpy()), return_counts=True)
    common = pd.Timedelta(gaps[np.argmax(counts)])
    candidates = [
        to_offset(alias)
        for days, aliases in CALENDAR
        if common.days in days and common == pd.Timedelta(days=common.days)
        for alias in aliases
    ]
    candidates.append(to_offset(common))
    return min(candidates, key=lambda freq: (int(off_grid(index, freq).sum()), len(grid_of(index, freq))))


def grid_of(index: pd.DatetimeIndex, freq) -> pd.DatetimeIndex:
    return pd.date_range(index[0], index[-1], freq=freq)


def off_grid(index: pd.DatetimeIndex, freq) -> np.ndarray:
    return ~index.isin(grid_of(index, freq))


# ---------------------------------------------------------------- the grid


def on_grid(cfg, table: pd.DataFrame, path: Path, freq=None) -> tuple[pd.Series, dict]:
    """The values in time order on one regular grid of `freq` (default: data.freq, else inferred), with missing
    timestamps inserted (unless data.missing_steps=skip); empty values stay NaN here (see `filled`)."""
    time, value = (c.name for c in columns(cfg))
    lines = np.asarray(table.attrs["lines"])
    order = np.argsort(table[time].to_numpy(), kind="stable")  # rows of a file pasted together out of order
    times, values, lines = pd.DatetimeIndex(table[time].to_numpy()[order]), table[value].to_numpy()[order], lines[order]
    twice = times.duplicated(keep=False)
    if twice.any() and cfg.data.duplicates.name == "refuse":
        shown = "; ".join(
            f"{t} (lines {', '.join(map(str, lines[times == t]))})" for t in times[twice].unique()[: tables.SHOWN]
        )
        raise DataError(
            f"{path}: {plural(times[twice].nunique(), 'timestamp')} given more than once: {shown}."
            f"\nFix: keep one row per timestamp, or add data.duplicates=mean to average their values."
        )
    series = pd.Series(values, index=times).groupby(level=0).mean()  # one row per timestamp (a no-op if unique)
    if freq is None:
        freq = given_freq(cfg.data.freq) if cfg.data.freq else inferred_freq(series.index, path)
        how = "data.freq" if cfg.data.freq else "inferred from the timestamps; data.freq= sets it"
        print(f"data: {path}: one step every {describe(freq)} ({how})")
    check_on_grid(series.index, freq, path, lines, times)
    grid = grid_of(series.index, freq)
    facts = {
        "step": step_text(freq),
        "freq": freq.freqstr,
        "steps_missing": len(grid) - len(series),
        "values_filled": int(series.isna().sum()),
    }
    inserted, every = facts["steps_missing"], describe(freq)
    if facts["values_filled"]:
        print(
            f"data: {path}: {plural(facts['values_filled'], 'empty value')} filled by the straight line between "
            f"their neighbours"
        )
    if inserted and cfg.data.missing_steps.name == "skip":
        print(
            f"data: {path} skips {inserted} of {len(grid)} time steps (one every {every}); windows run across "
            f"them (data.missing_steps=skip)"
        )
        return series, facts
    if inserted > len(series):  # more invented than read: interpolating would make up most of the series
        raise DataError(
            f"{path}: its {len(series)} timestamps, one step every {every}, span {len(grid)} steps from "
            f"{grid[0]} to {grid[-1]}: {inserted} steps are missing, more than half of the series.\n"
            f"Fix: train on the part without the long gap (or on each part as its own series), or "
            f"resample the series to a coarser step."
        )
    if inserted:
        print(
            f"data: {path} skips {inserted} of {len(grid)} time steps (one every {every}); their values are "
            f"interpolated"
        )
    # A meter that skipped a reading: the straight line between its neighbours, not a drop to zero.
    return series.reindex(grid), facts


def check_on_grid(index: pd.DatetimeIndex, freq, path: Path, lines: np.ndarray, times: pd.DatetimeIndex) -> None:
    off = off_grid(index, freq)
    if off.any():
        shown = ", ".join(f"line {lines[times == t][0]} ({t})" for t in index[off][: tables.SHOWN])
        raise DataError(
            f"{path}: {plural(int(off.sum()), 'timestamp')} off the series' grid of one step every "
            f"{describe(freq)} from {index[0]}: {shown}.\nFix: resample the series to one step (e.g. "
            f"pandas DataFrame.resample), set its frequency with data.freq= ({FREQ_HELP}), or remove "
            f"those rows."
        )


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def filled(part: pd.Series) -> pd.Series:
    """Missing values interpolated within `part` alone, so no value from after it reaches into it."""
    return part.interpolate(limit_direction="both")


def scale(values: np.ndarray, stats: dict) -> np.ndarray:
    """Values as the model sees them, by the train part's mean and std: for the splits in prepare() and for new
    series in read_inputs(), always with the run's stored statistics."""
    return ((np.asarray(values, dtype=np.float64) - stats["mean"]) / stats["std"]).astype(np.float32)


def require_window(path: Path, steps: int, window: int) -> None:
    if steps < window:
        raise DataError(
            f"{path}: {plural(steps, 'time step')}, but the run's model reads windows of data.window="
            f"{window}: at least {window} are needed.\nFix: give at least the last {window} steps of the "
            f"series (more give one forecast per window that ends in the file)."
        )

"""Tables (CSV, Parquet) as recipes read them: the data config, checked columns, rows refused or dropped and counted,
and the statistics a run keeps in meta.json.

Nothing is dropped silently. Rows with bad cells stop the run, or are dropped with `data.drop_bad_rows=true`
and then counted on the console and in the prepared data's meta (kept with the run).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DataConfig
from pipeline.errors import DataError
from recipes._raw_files import readable_file
from recipes._table_cells import (
    Column,
    header_positions,
    is_header,
    parse,
    read_clean,
    require_unique_names,
    table_records,
)

SHOWN = 5  # bad cells named per problem; the count covers them all


KEPT_LINES = 100  # line numbers of dropped rows kept in meta (the count is always complete)


@dataclass
class CsvData(DataConfig):
    file: str = "data.csv"  # under data.root
    # Rows with a bad cell (text in a number column, inf, an empty cell the recipe cannot fill, a label
    # outside its values) stop the run unless this drops them; the count is printed and kept in meta.
    drop_bad_rows: bool = False
    # A run's meta.json whose train statistics (fill values, means, stds, categories) are applied to this data
    # instead of statistics fitted on its own train rows: how launch/evaluate.py scores a run on other data.
    statistics: str | None = None


def with_statistics(cfg, files: list[Path]) -> list[Path]:
    """A recipe's raw files and the meta.json data.statistics names: its size and time join the shards'
    fingerprint, so other statistics prepare the data again."""
    if not cfg.data.statistics:
        return files
    path = Path(cfg.data.statistics)
    readable_file(path, "the meta.json data.statistics names")
    return [*files, path]


def stored_statistics(cfg, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict | None:
    """The `keys` (and those of `optional` it has) of the meta.json that data.statistics names, or None when it
    names none."""
    if not cfg.data.statistics:
        return None
    path = Path(cfg.data.statistics)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(
            f"data.statistics={path}: cannot read it ({e}).\nFix: name a run's meta.json, or leave "
            f"data.statistics unset to fit the statistics on this data's train rows."
        ) from None
    missing = [k for k in keys if k not in meta]
    if missing:
        raise DataError(
            f"data.statistics={path} holds no {', '.join(missing)}: it is not the meta.json of a run of "
            f"this recipe as this code trains it (another recipe's, or a run from an older version)."
            f"\nFix: name the meta.json of such a run (retrain an old one), or leave data.statistics "
            f"unset."
        )
    return {k: meta[k] for k in (*keys, *optional) if k in meta}


NUMBER = (int, float)


def check_meta(meta: dict, kinds: dict, optional: dict | None = None) -> None:
    """The facts a recipe reads from a run's meta.json, each of the JSON type it is read as (`kinds`; `optional`
    where present): a KeyError names a missing one, a TypeError one of another type, so that the reader of the run
    folder (pipeline/runs.py) names the damaged file instead of the recipe failing deep inside."""
    for key, kind in {**kinds, **(optional or {})}.items():
        if key not in meta:
            if key in kinds:
                raise KeyError(key)
            continue
        value = meta[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            wanted = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise TypeError(f"its {key!r} is {json.dumps(value)[:60]}, where a JSON {wanted} belongs")


def raw_file(cfg, expected: str, fix: str = "") -> Path:
    """<data.root>/<data.file>, or a DataError saying what the file should hold and how to provide it."""
    path = Path(cfg.data.root) / cfg.data.file
    if not path.is_file():
        state = "is a directory, not a file" if path.is_dir() else "not found"
        raise DataError(
            f"{path.resolve()} {state}: expected {expected}.\nFix: put {cfg.data.file} there"
            f"{' (' + fix + ')' if fix else ''} or set data.root=<folder> data.file=<name.csv>."
        )
    return path


@dataclass(frozen=True)
class Reading:
    """How `read` takes a CSV: header=True: the first row names the columns; header=None: optional, columns taken
    by position. `rename`: the keys that choose other column names, if any. `source`: what names the file, for
    messages (`input=` when predicting)."""

    header: bool | None = True
    rename: str = ""
    source: str = "data.root / data.file"


def read(
    cfg, path: Path, columns: list[Column], enough: Callable[[int], bool], split: str, reading: Reading = Reading()
) -> tuple[pd.DataFrame, dict]:
    """The columns of a CSV, checked cell by cell: numbers as float64 (NaN where empty and `empty_ok`),
    labels as int64, times as datetime64. Also returns the facts to keep in meta (rows read, dropped);
    `table.attrs["lines"]` holds each kept row's line number in the file.

    enough(rows) says whether the recipe can split that many rows into train and eval; `split` says how
    it splits, for the message.
    """
    path = path.resolve()
    if reading.header is True:
        require_unique_names(path, columns, reading.source)
    # A clean file is read by Arrow in one pass, to the same table; any other is checked cell by cell.
    table = read_clean(path, columns) if reading.header is True else None
    if table is not None:
        report = {"rows_read": len(table), "rows_dropped": 0}
    else:
        table, report = _read_checked(cfg, path, columns, reading.header, reading.rename, reading.source)
    require_rows(path, len(table), enough, f"to split into train and eval {split}")
    _require_values(path, table, columns)
    return table, report


def _read_checked(
    cfg, path: Path, columns: list[Column], header: bool | None, rename: str, source: str
) -> tuple[pd.DataFrame, dict]:
    """`read`'s table, cell by cell: each bad cell found and named, or its row dropped (data.drop_bad_rows)."""
    records = table_records(path, source)
    positions, width = list(range(len(columns))), None  # by position, unless the header names them
    if header or (header is None and is_header(records[0][1], columns)):
        line, names = records.pop(0)
        if header:
            names = [n.strip() for n in names]
            positions, width = header_positions(path, line, names, columns, rename, source), len(names)
        if not records:
            raise DataError(
                f"{path} has a header (line {line}) but no data rows.\nFix: add the data rows, "
                f"or point {source} at the full CSV."
            )
    lines = np.array([line for line, _ in records])
    table, problems = parse(path, records, columns, positions, width)
    bad = np.zeros(len(records), dtype=bool)
    for cells in problems.values():
        bad[[i for i, _, _ in cells]] = True
    problems = {
        problem: (
            len(cells),
            sorted(((lines[i], c, text) for i, c, text in cells), key=lambda cell: (cell[0], cell[1] or 0))[:SHOWN],
        )
        for problem, cells in problems.items()
    }
    report = {"rows_read": len(records), "rows_dropped": int(bad.sum())}
    if bad.any():
        if not cfg.data.drop_bad_rows:
            raise DataError(bad_rows_message(path, problems, len(lines), int(bad.sum()), columns, positions))
        report["dropped_lines"] = lines[bad][:KEPT_LINES].tolist()
        print(
            f"data: dropped {bad.sum()} of {len(records)} rows of {path} (data.drop_bad_rows=true), "
            f"lines {_first(lines[bad].tolist())}"
        )
        table = table[~bad].reset_index(drop=True)
    # Each row's line in the file, to name it (predictions). An array: pandas deep-copies attrs into every
    # column it hands out, and a list would cost a Python object per row in each copy.
    table.attrs["lines"] = lines[~bad]
    return table, report


def require_rows(path: Path, rows: int, enough: Callable[[int], bool], what: str) -> None:
    """A DataError unless `rows` rows are enough for `what` (e.g. the train/eval split), saying how many are."""
    if enough(rows):
        return
    needed = next((n for n in range(rows + 1, 10_000_000) if enough(n)), None)
    need = f"at least {needed} are needed" if needed else "no number of rows is enough with these settings"
    raise DataError(
        f"{Path(path).resolve()}: {rows} usable data row{'s' * (rows != 1)} {what}: too few, {need}."
        f"\nFix: add rows to the file (or change the setting named above)."
    )


def require_spread(path: Path, spread: dict[str, float], rows: int) -> None:
    """Standardizing divides by each column's train std: a column with one value would become NaN."""
    flat = [name for name, std in spread.items() if not std > 0]
    if flat:
        raise DataError(
            f"{Path(path).resolve()}: column {', '.join(flat)} has the same value in all {rows} "
            f"train rows, so it cannot be standardized.\nFix: use data with varying values there."
        )


def _require_values(path: Path, table: pd.DataFrame, columns: list[Column]) -> None:
    empty = [c.name for c in columns if c.empty_ok and table[c.name].isna().all()]
    if empty:
        raise DataError(
            f"{path}: column {', '.join(empty)} has no values at all, only empty cells.\n"
            f"Fix: check that data.file is the right CSV and its values are in that column."
        )


def bad_rows_message(path, problems: dict[str, tuple[int, list]], rows: int, bad: int, columns, positions) -> str:
    """The refusal of a file with `bad` of its `rows` data rows bad; `problems`: per problem its count of bad cells
    (or rows) and the first SHOWN of them as (line, column index or None, what to show)."""
    out = [f"{path}: {bad} of {rows} data rows have bad cells:"]
    for problem, (count, cells) in problems.items():
        shown = []
        for line, c, text in cells[:SHOWN]:
            where = f"line {line}" + (f" column {positions[c] + 1} ({columns[c].name})" if c is not None else "")
            shown.append(f"{where} {text}".strip())
        more = f", and {count - SHOWN} more" if count > SHOWN else ""
        unit = "row" if cells[0][1] is None else "cell"
        out.append(f"  {problem}: {count} {unit}{'s' * (count != 1)}: {'; '.join(shown)}{more}")
    out.append(
        f"Fix: correct or delete those rows in the file, or add data.drop_bad_rows=true to train on "
        f"the other {rows - bad} rows (the dropped count is printed and kept in the run's meta.json)."
    )
    return "\n".join(out)


def _first(items: list) -> str:
    return ", ".join(map(str, items[:SHOWN])) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")

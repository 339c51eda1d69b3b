"""The CSV recipes' one reader: a raw CSV -> checked columns, or a DataError naming file, line, column and fix.

Nothing is dropped silently: rows with bad cells stop the run, or are dropped with `data.drop_bad_rows=true`
and then counted on the console and in the prepared data's meta (kept with the run).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from pipeline.config import DataConfig
from pipeline.data import DataError

SHOWN = 5  # bad cells named per problem; the count covers them all
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the shards store float32: 1e39 would become inf there
KEPT_LINES = 100  # line numbers of dropped rows kept in meta (the count is always complete)


@dataclass
class CsvData(DataConfig):
    file: str = "data.csv"  # under data.root
    # Rows with a bad cell (text in a number column, inf, an empty cell the recipe cannot fill, a label
    # outside its values) stop the run unless this drops them; the count is printed and kept in meta.
    drop_bad_rows: bool = False


class Column(NamedTuple):  # a NamedTuple: plain data, no generated methods for the code fingerprint to read
    name: str  # the header's name; in a file read by position, the name used in messages
    kind: str = "number"  # number | label | time
    empty_ok: bool = False  # an empty cell is a missing value the recipe fills itself
    values: tuple = ()  # the valid values of a label column


def raw_file(cfg, expected: str, fix: str = "") -> Path:
    """<data.root>/<data.file>, or a DataError saying what the file should hold and how to provide it."""
    path = Path(cfg.data.root) / cfg.data.file
    if not path.is_file():
        state = "is a directory, not a file" if path.is_dir() else "not found"
        raise DataError(f"{path.resolve()} {state}: expected {expected}.\nFix: put {cfg.data.file} there"
                        f"{' (' + fix + ')' if fix else ''} or set data.root=<folder> data.file=<name.csv>.")
    return path


def read(cfg, path: Path, columns: list[Column], enough: Callable[[int], bool], split: str,
         header: bool | None = True, rename: str = "") -> tuple[pd.DataFrame, dict]:
    """The columns of a CSV, checked cell by cell: numbers as float64 (NaN where empty and `empty_ok`),
    labels as int64, times as datetime64. Also returns the facts to keep in meta (rows read, dropped).

    enough(rows) says whether the recipe can split that many rows into train and eval; `split` says how
    it splits, for the message. header=True: the first row names the columns; header=None: optional,
    columns taken by position. `rename`: the keys that choose other column names, if any.
    """
    path = path.resolve()
    records = _records(path)
    positions, width = list(range(len(columns))), None  # by position, unless the header names them
    if header or (header is None and _is_header(records[0][1], columns)):
        line, names = records.pop(0)
        if header:
            positions, width = _positions(path, line, [n.strip() for n in names], columns, rename), len(names)
        if not records:
            raise DataError(f"{path} has a header (line {line}) but no data rows.\nFix: add the data rows, "
                            f"or point data.root / data.file at the full CSV.")
    lines = np.array([line for line, _ in records])
    table, problems = _parse(records, columns, positions, width)
    bad = np.zeros(len(records), dtype=bool)
    for cells in problems.values():
        bad[[i for i, _, _ in cells]] = True
    report = {"rows_read": len(records), "rows_dropped": int(bad.sum())}
    if bad.any():
        if not cfg.data.drop_bad_rows:
            raise DataError(_bad_rows_message(path, problems, lines, bad, columns, positions))
        report["dropped_lines"] = lines[bad][:KEPT_LINES].tolist()
        print(f"data: dropped {bad.sum()} of {len(records)} rows of {path} (data.drop_bad_rows=true), "
              f"lines {_first(lines[bad].tolist())}")
        table = table[~bad].reset_index(drop=True)
    require_rows(path, len(table), enough, f"to split into train and eval {split}")
    _require_values(path, table, columns)
    return table, report


def require_rows(path: Path, rows: int, enough: Callable[[int], bool], what: str) -> None:
    """A DataError unless `rows` rows are enough for `what` (e.g. the train/eval split), saying how many are."""
    if enough(rows):
        return
    needed = next((n for n in range(rows + 1, 10_000_000) if enough(n)), None)
    need = f"at least {needed} are needed" if needed else "no number of rows is enough with these settings"
    raise DataError(f"{Path(path).resolve()}: {rows} usable data row{'s' * (rows != 1)} {what}: too few, {need}."
                    f"\nFix: add rows to the file (or change the setting named above).")


def split_sizes(rows: int, fraction: float) -> tuple[int, int]:
    """The train and eval sizes `datasets.train_test_split` makes of `rows` with test_size `fraction`."""
    held = math.ceil(rows * fraction)
    return rows - held, held


def require_spread(path: Path, spread: dict[str, float], rows: int) -> None:
    """Standardizing divides by each column's train std: a column with one value would become NaN."""
    flat = [name for name, std in spread.items() if not std > 0]
    if flat:
        raise DataError(f"{Path(path).resolve()}: column {', '.join(flat)} has the same value in all {rows} "
                        f"train rows, so it cannot be standardized.\nFix: use data with varying values there.")


# ---------------------------------------------------------------- reading


def _records(path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank rows with the 1-based line number an editor shows (csv.reader counts quoted newlines)."""
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes).\nFix: copy the CSV again (an interrupted download or copy "
                        f"leaves an empty file), or point data.root / data.file at the full CSV.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
            reader = csv.reader(f)
            records = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}): is it a CSV?\nFix: save it as CSV, UTF-8, "
                        f"or point data.file at the CSV.") from None
    except OSError as e:  # e.g. no read permission
        raise DataError(f"{path} cannot be read ({e.strerror}).\nFix: make it readable (chmod +r) or copy it "
                        f"somewhere readable and point data.root there.") from None
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: not readable as CSV ({e}).\nFix: repair that line.") from None
    if not records:
        raise DataError(f"{path} has only blank lines.\nFix: copy the CSV again or point data.file at the full CSV.")
    return records


def _is_header(cells: list[str], columns: list[Column]) -> bool:
    """A first row none of whose cells reads as its column's kind names the columns."""
    cells = [*cells, *[""] * len(columns)][:len(columns)]
    return not any(cell.strip() and _parses(cell, column) for cell, column in zip(cells, columns))


def _parses(cell: str, column: Column) -> bool:
    if column.kind == "time":
        return not pd.isna(pd.to_datetime(cell.strip(), errors="coerce"))
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _positions(path: Path, line: int, names: list[str], columns: list[Column], rename: str) -> list[int]:
    missing = [c.name for c in columns if c.name not in names]
    if missing:
        other = f", or set {rename}" if rename else ""
        raise DataError(f"{path} has no column {', '.join(repr(m) for m in missing)} in its header (line {line} has "
                        f"{', '.join(repr(n) for n in names)}).\nFix: rename the header's columns{other}, or point "
                        f"data.root / data.file at a CSV with columns {', '.join(c.name for c in columns)}.")
    return [names.index(c.name) for c in columns]


def _parse(records, columns: list[Column], positions: list[int], width: int | None):
    """Typed columns, and per problem the bad cells as (row index, column index or None, what to show)."""
    problems: dict[str, list] = {}

    def flag(problem, row, col, text):
        problems.setdefault(problem, []).append((row, col, text))

    needed = max(positions) + 1
    for i, (_, row) in enumerate(records):
        if (width is not None and len(row) != width) or len(row) < needed:
            expected = f"a different number of cells than the header's {width}" if width else \
                f"fewer than {needed} cells"
            flag(f"a row with {expected} (a missing or extra comma?)", i, None, f"({len(row)} cells)")
    table = {}
    for c, (column, pos) in enumerate(zip(columns, positions)):
        cells = [row[pos].strip() if pos < len(row) else "" for _, row in records]
        empty = np.array([cell == "" for cell in cells])
        if not column.empty_ok:
            for i in np.flatnonzero(empty):
                flag("an empty cell, a missing value this recipe cannot fill", i, c, "")
        if column.kind == "time":
            values = pd.to_datetime(pd.Series(cells), errors="coerce")
            for i in np.flatnonzero(values.isna().to_numpy() & ~empty):
                flag("not a timestamp (expected e.g. 2016-01-01 00:15:00)", i, c, repr(cells[i]))
            table[column.name] = values
            continue
        values = np.full(len(cells), np.nan)
        for i, cell in enumerate(cells):
            if empty[i]:
                continue
            try:
                values[i] = float(cell)
            except ValueError:
                flag("text in a number column", i, c, repr(cell))
                continue
            if not abs(values[i]) <= FLOAT32_MAX:  # also false for nan
                flag("not a finite number (inf, nan or beyond float32's 3.4e38"
                     + ("; leave the cell empty for a missing value)" if column.empty_ok else ")"), i, c, repr(cell))
            elif column.values and values[i] not in column.values:
                flag(f"not one of {', '.join(map(str, column.values))}", i, c, repr(cell))
        table[column.name] = values
    table = pd.DataFrame(table)
    for column in columns:
        if column.kind == "label":  # bad label rows are refused or dropped before this cast is used
            table[column.name] = table[column.name].fillna(-1).astype(np.int64)
    return table, problems


def _require_values(path: Path, table: pd.DataFrame, columns: list[Column]) -> None:
    empty = [c.name for c in columns if c.empty_ok and table[c.name].isna().all()]
    if empty:
        raise DataError(f"{path}: column {', '.join(empty)} has no values at all, only empty cells.\n"
                        f"Fix: check that data.file is the right CSV and its values are in that column.")


def _bad_rows_message(path, problems, lines, bad, columns, positions) -> str:
    rows = len(lines)
    out = [f"{path}: {bad.sum()} of {rows} data rows have bad cells:"]
    for problem, cells in problems.items():
        shown = []
        for i, c, text in sorted(cells, key=lambda cell: (cell[0], cell[1] or 0))[:SHOWN]:
            where = f"line {lines[i]}" + (f" column {positions[c] + 1} ({columns[c].name})" if c is not None else "")
            shown.append(f"{where} {text}".strip())
        more = f", and {len(cells) - SHOWN} more" if len(cells) > SHOWN else ""
        unit = "row" if cells[0][1] is None else "cell"
        out.append(f"  {problem}: {len(cells)} {unit}{'s' * (len(cells) != 1)}: {'; '.join(shown)}{more}")
    out.append(f"Fix: correct or delete those rows in the file, or add data.drop_bad_rows=true to train on "
               f"the other {rows - bad.sum()} rows (the dropped count is printed and kept in the run's meta.json).")
    return "\n".join(out)


def _first(items: list) -> str:
    return ", ".join(map(str, items[:SHOWN])) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")

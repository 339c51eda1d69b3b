"""The cells of a CSV or Parquet table read and typed: the file as text records, Arrow's one-pass read of a clean file,
and the column by column checks that name every bad cell."""

from __future__ import annotations

import csv
import difflib
import functools
import itertools
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from pipeline.errors import DataError

FLOAT32_MAX = float(np.finfo(np.float32).max)  # the shards store float32: 1e39 would become inf there


class Column(NamedTuple):  # a NamedTuple: plain data, no generated methods for the code fingerprint to read
    name: str  # the header's name; in a file read by position, the name used in messages
    kind: str = "number"  # number | label | time | category (text kept as is, e.g. a color or a class name)
    empty_ok: bool = False  # an empty cell is a missing value the recipe fills itself
    values: tuple = ()  # the valid values of a label column


def read_clean(path: Path, columns: list[Column]) -> pd.DataFrame | None:
    """A CSV with a header read by pyarrow in one pass (in the memory of the values alone, where reading cell by
    cell holds a Python string per cell), when it needs none of the checks' verdicts: every cell of the
    columns reads as its kind, no cell is empty where a value is needed, no number is beyond float32, no text has
    surrounding spaces, and line i + 2 holds row i (no blank lines, no quoted newlines). Anything else, and
    every file the checks would refuse, returns None: `read` then checks cell by cell and names the problem."""
    import pyarrow as pa
    from pyarrow import csv as pa_csv

    if path.suffix.lower() in (".parquet", ".pq") or not path.is_file() or any(c.kind == "time" for c in columns):
        return None
    parse_options, convert_options = clean_options(columns)
    try:
        arrow = pa_csv.read_csv(path, parse_options=parse_options, convert_options=convert_options)
    except (pa.ArrowException, OSError, UnicodeError):
        return None
    if arrow.num_rows == 0 or line_count(path) != arrow.num_rows + 1:  # blank lines or quoted newlines
        return None
    checked = clean_columns(arrow, columns)
    if checked is None:
        return None
    table = pd.DataFrame({name: values.to_numpy(zero_copy_only=False) for name, values in checked.items()})
    table.attrs["lines"] = np.arange(2, len(table) + 2)
    return table


def clean_options(columns: list[Column]):
    """pyarrow's CSV parse and convert options of `read_clean` (each row one line; a cell not of its kind fails)."""
    import pyarrow as pa
    from pyarrow import csv as pa_csv

    kinds = {c.name: pa.string() if c.kind == "category" else pa.float64() for c in columns}
    return (
        pa_csv.ParseOptions(newlines_in_values=False),
        pa_csv.ConvertOptions(
            column_types=kinds,
            include_columns=list(kinds),
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        ),
    )


def clean_columns(arrow, columns: list[Column]) -> dict | None:
    """The columns of an Arrow table or record batch as the checks would type them (numbers float64 with NaN where
    empty, labels int64, texts with "" where empty), or None when any cell needs the checks' verdict."""
    import pyarrow as pa
    import pyarrow.compute as pc

    empty = {c.name: arrow.column(c.name).is_null().to_numpy(zero_copy_only=False) for c in columns}
    if np.logical_and.reduce(list(empty.values())).any():  # a row empty in every column read: maybe a blank one
        return None
    checked = {}
    for column in columns:
        values, given = arrow.column(column.name), ~empty[column.name]
        if not given.all() and (not column.empty_ok or column.kind == "label"):
            return None
        if column.kind == "category":
            if pc.any(pc.not_equal(values, pc.utf8_trim_whitespace(values))).as_py():
                return None
            if column.values and not pc.all(pc.is_in(values.drop_null(), pa.array(column.values))).as_py():
                return None
            checked[column.name] = values.fill_null("")
            continue
        numbers = values.to_numpy(zero_copy_only=False).astype(np.float64)  # NaN where empty
        if not (np.abs(numbers[given]) <= FLOAT32_MAX).all():  # a cell of inf, nan or beyond float32
            return None
        if column.values and not np.isin(numbers[given], column.values).all():
            return None
        checked[column.name] = pa.array(numbers.astype(np.int64) if column.kind == "label" else numbers)
    return checked


def require_unique_names(path: Path, columns: list[Column], source: str) -> None:
    """A column read by a name the header gives twice: both readers would take the first one and never read the
    other, so the model would be fed one column twice."""
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception:  # unreadable: table_records names the problem with its fix
            return
    else:
        names = [n.strip() for n in table_records(path, source, limit=1)[0][1]]
    wanted = {c.name for c in columns}
    twice = {name: [i + 1 for i, n in enumerate(names) if n == name] for name in dict.fromkeys(names) if name in wanted}
    twice = {name: at for name, at in twice.items() if len(at) > 1}
    if twice:
        shown = "; ".join(f"{name!r} at columns {', '.join(map(str, at))}" for name, at in twice.items())
        raise DataError(
            f"{path}: the header names {len(twice)} column{'s' * (len(twice) != 1)} more than once: "
            f"{shown}. Only the first of each would be read.\nFix: give every column its own name in "
            f"the header (rename or delete the copies), then run again."
        )


def line_count(path: Path) -> int:
    """The file's lines (a last line without a newline counts)."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            count, last = count + block.count(b"\n"), block[-1:]
    return count + (last != b"\n")


def table_records(
    path: Path, source: str = "data.root / data.file", limit: int | None = None
) -> list[tuple[int, list[str]]]:
    """Non-blank rows (the first `limit` of them) with the 1-based line number an editor shows (csv.reader counts
    quoted newlines). A Parquet file's rows come as text too, numbered as the same table written as CSV would be."""
    records = list(itertools.islice(rows_of(path, source), limit))
    if not records:
        raise DataError(f"{path} has only blank lines.\nFix: copy the CSV again or point {source} at the full CSV.")
    return records


def rows_of(path: Path, source: str = "data.root / data.file", batch_rows: int = 65536):
    """`table_records`' rows one at a time, read as they are needed (a Parquet file `batch_rows` rows at a time)."""
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a CSV or Parquet file.\nFix: point {source} at the file.")
    if path.suffix.lower() in (".parquet", ".pq"):
        yield from _parquet_records(path, source, batch_rows)
        return
    if path.stat().st_size == 0:
        raise DataError(
            f"{path} is empty (0 bytes).\nFix: copy the CSV again (an interrupted download or copy "
            f"leaves an empty file), or point {source} at the full CSV."
        )
    reader = None
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
            reader = csv.reader(f)
            yield from ((reader.line_num, row) for row in reader if "".join(row).strip())  # blank rows skipped
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte {e.start}): is it a CSV?\nFix: save it as CSV, UTF-8, "
            f"or point {source} at the CSV."
        ) from None
    except OSError as e:  # e.g. no read permission
        raise DataError(
            f"{path} cannot be read ({e.strerror}).\nFix: make it readable (chmod +r) or copy it "
            f"somewhere readable and point {source} there."
        ) from None
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: not readable as CSV ({e}).\nFix: repair that line.") from None


def _parquet_records(path: Path, source: str, batch_rows: int):
    """The header and rows of a Parquet file as text cells (repr of a float reads back exactly; null -> empty),
    so its cells are checked by the same rules as a CSV's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)  # read_table refuses a name given twice: `read` names it
        yield 1, file.schema_arrow.names
        line = 2
        for batch in file.iter_batches(batch_size=batch_rows):
            columns = [["" if v is None else str(v) for v in column.to_pylist()] for column in batch.columns]
            yield from ((line + i, list(row)) for i, row in enumerate(zip(*columns)))
            line += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise DataError(
            f"{path} is not a readable Parquet file ({str(e).splitlines()[0]}).\nFix: copy it again, "
            f"or point {source} at the CSV or Parquet file."
        ) from None


def is_header(cells: list[str], columns: list[Column]) -> bool:
    """A first row none of whose cells reads as its column's kind names the columns."""
    cells = [*cells, *[""] * len(columns)][: len(columns)]
    return not any(cell.strip() and _parses(cell, column) for cell, column in zip(cells, columns))


def _parses(cell: str, column: Column) -> bool:
    if column.kind == "time":
        return not pd.isna(pd.to_datetime(cell.strip(), errors="coerce"))
    try:
        float(cell)
    except ValueError:
        return False
    return True


def header_positions(
    path: Path, line: int, names: list[str], columns: list[Column], rename: str, source: str
) -> list[int]:
    missing = [c.name for c in columns if c.name not in names]
    if missing:
        other = f", or set {rename}" if rename else ""
        guesses = {m: _closest(m, names) for m in missing}
        meant = [f"{m!r} (did you mean {guess!r}?)" if guess else repr(m) for m, guess in guesses.items()]
        raise DataError(
            f"{path} has no column {', '.join(meant)} in its header (line {line} has "
            f"{', '.join(repr(n) for n in names)}).\nFix: rename the header's columns{other}, or point "
            f"{source} at a CSV with columns {', '.join(c.name for c in columns)}."
        )
    return [names.index(c.name) for c in columns]


def _closest(name: str, names: list[str]) -> str | None:
    """The header's name that `name` was likely meant to be: the same but for case, or a near spelling."""
    same = [n for n in names if n.casefold() == name.casefold()]
    return same[0] if same else next(iter(difflib.get_close_matches(name, names, n=1, cutoff=0.8)), None)


def parse(path: Path, records, columns: list[Column], positions: list[int], width: int | None):
    """Typed columns, and per problem the bad cells as (row index, column index or None, what to show)."""
    problems: dict[str, list] = {}

    def flag(problem, row, col, text):
        problems.setdefault(problem, []).append((row, col, text))

    _check_widths(records, positions, width, flag)
    table = {}
    for c, (column, pos) in enumerate(zip(columns, positions)):
        cells = [row[pos].strip() if pos < len(row) else "" for _, row in records]
        empty = np.array([cell == "" for cell in cells])
        if not column.empty_ok:
            for i in np.flatnonzero(empty):
                flag("an empty cell, a missing value this recipe cannot fill", i, c, "")
        flag_cell = functools.partial(_flag_cell, flag, c, cells)
        if column.kind == "category":
            table[column.name] = _categories(column, cells, empty, flag_cell)
        elif column.kind == "time":
            table[column.name] = _time_cells(path, column, cells, empty, [line for line, _ in records], flag_cell)
        else:
            table[column.name] = _number_cells(column, cells, empty, flag_cell)
    table = pd.DataFrame(table)
    for column in columns:
        if column.kind == "label":  # bad label rows are refused or dropped before this cast is used
            table[column.name] = table[column.name].fillna(-1).astype(np.int64)
    return table, problems


def _flag_cell(flag, c: int, cells: list[str], problem: str, i: int) -> None:
    flag(problem, i, c, repr(cells[i]))


def _check_widths(records, positions: list[int], width: int | None, flag) -> None:
    needed = max(positions) + 1
    for i, (_, row) in enumerate(records):
        if (width is not None and len(row) != width) or len(row) < needed:
            expected = (
                f"a different number of cells than the header's {width}" if width else f"fewer than {needed} cells"
            )
            flag(f"a row with {expected} (a missing or extra comma?)", i, None, f"({len(row)} cells)")


def _categories(column: Column, cells: list[str], empty: np.ndarray, flag_cell) -> np.ndarray:
    for i in np.flatnonzero(~np.isin(cells, column.values) & ~empty) if column.values else ():
        flag_cell(f"not one of {', '.join(map(str, column.values))}", i)
    return np.array(cells, dtype=object)


def _time_cells(path: Path, column: Column, cells: list[str], empty: np.ndarray, lines: list[int], flag_cell):
    values = _times(path, column.name, cells, lines)
    for i in np.flatnonzero(values.isna().to_numpy() & ~empty):
        flag_cell("not a timestamp (expected e.g. 2016-01-01 00:15:00)", i)
    return values


def _number_cells(column: Column, cells: list[str], empty: np.ndarray, flag_cell) -> np.ndarray:
    values, unreadable = _numbers(cells, empty)
    for i in unreadable:
        flag_cell("text in a number column", i)
    read = ~empty
    read[unreadable] = False
    for i in np.flatnonzero(read & ~(np.abs(values) <= FLOAT32_MAX)):  # also true for nan
        flag_cell(
            "not a finite number (inf, nan or beyond float32's 3.4e38"
            + ("; leave the cell empty for a missing value)" if column.empty_ok else ")"),
            i,
        )
    if column.values:
        for i in np.flatnonzero(read & (np.abs(values) <= FLOAT32_MAX) & ~np.isin(values, column.values)):
            flag_cell(f"not one of {', '.join(map(str, column.values))}", i)
    return values


def _times(path: Path, name: str, cells: list[str], lines: list[int]) -> pd.Series:
    """The cells as timestamps (NaT where unreadable). Timestamps with different UTC offsets (a summer and a winter
    time, or some with an offset and some without) are refused: they are no one series on one clock."""
    try:
        values = pd.to_datetime(pd.Series(cells), errors="coerce")
    except ValueError:  # pandas refuses mixed offsets outright, or reads the cells that differ as NaT
        values = None
    if values is None or values.isna().any():
        _require_one_offset(path, name, cells, lines)
    if values is None:
        raise DataError(
            f"{path}: column {name!r} holds timestamps pandas cannot read as one series.\nFix: write "
            f"them all in one format and one UTC offset (e.g. 2016-01-01 00:15:00+00:00)."
        )
    if values.dt.tz is not None:  # one offset throughout: its wall clock is as regular as UTC, and reads as written
        values = values.dt.tz_localize(None)
    return values


def _require_one_offset(path: Path, name: str, cells: list[str], lines: list[int]) -> None:
    if not pd.Series(cells).str.contains(r"(?:Z|UTC|[+-]\d\d:?\d\d)\s*$").any():
        return  # no cell names an offset: nothing can differ
    first = None
    for i, cell in enumerate(cells):
        try:
            time = pd.Timestamp(cell)
        except (ValueError, TypeError):
            continue  # not a timestamp: named with the other bad cells
        if time is pd.NaT:
            continue
        offset = time.utcoffset()
        if first is None:
            first = (i, offset)
        elif offset != first[1]:
            shown = [f"line {lines[j]} {cells[j]!r} ({_utc(o)})" for j, o in (first, (i, offset))]
            raise DataError(
                f"{path}: column {name!r} mixes UTC offsets: {shown[0]}, then {shown[1]}; one series "
                f"needs one clock.\nFix: convert the column to one offset, e.g. UTC (pandas: "
                f"pd.to_datetime(column, utc=True)), and write it back; then run again."
            )


def _utc(offset) -> str:
    if offset is None:
        return "no offset"
    minutes = round(offset.total_seconds() / 60)
    return f"UTC{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _numbers(cells: list[str], empty: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The cells as float64 (NaN where empty or unreadable) and the rows whose cell is not a number. All at
    once, by numpy's conversion (which reads as Python's float() does); cell by cell only where one fails."""
    text = np.array(cells, dtype=object)
    text[empty] = "nan"
    try:
        return text.astype(np.float64), []
    except ValueError:
        pass
    values, unreadable = np.full(len(cells), np.nan), []
    for i in np.flatnonzero(~empty):
        try:
            values[i] = float(cells[i])
        except ValueError:
            unreadable.append(i)
    return values, unreadable

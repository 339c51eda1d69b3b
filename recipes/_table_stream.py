"""Tables larger than memory: a CSV or Parquet file read in record batches and checked batch by batch (every
message names its exact line), kept in a temporary Arrow file, and its train statistics fitted pass by pass."""

from __future__ import annotations

import functools
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import DataError
from recipes._table_cells import (
    Column,
    clean_columns,
    clean_options,
    header_positions,
    line_count,
    parse,
    require_unique_names,
    rows_of,
)
from recipes._tables import KEPT_LINES, SHOWN, bad_rows_message, require_rows

# Bytes of CSV parsed at a time, one record batch of rows. pyarrow's streaming reader holds some 40 blocks read
# ahead, so the block size bounds that memory.
BLOCK_BYTES = 4 << 20
CHECKED_ROWS = 65536  # rows checked cell by cell at a time, where a file needs the checks' verdicts
# A split's rows are gathered from the preprocessed rows' file GATHER_BYTES at a time (in memory while they are
# written), reading that file READ_BYTES at a time: each gather reads the file once, so these bound both the
# memory and the number of reads of the file (its size / GATHER_BYTES).
GATHER_BYTES = 64 << 20
READ_BYTES = 16 << 20


class Unclean(Exception):
    """A batch needs the checks' verdicts: the file is read again, cell by cell."""


def check_into(cfg, path: Path, columns: list[Column], out: Path, split: tuple, rename: str = "") -> tuple[int, dict]:
    """The columns of the table at `path`, checked as `_tables.read` checks them, written to the Arrow IPC file
    `out` one record batch at a time (numbers float64 with NaN where empty, texts with "" where empty), enough
    rows for the train/eval split (`split`: enough(rows), and how it splits, for the message). Returns the rows
    written and the facts to keep in meta (rows read, dropped)."""
    path = path.resolve()
    require_unique_names(path, columns, "data.root / data.file")
    schema = pa.schema(
        [
            (c.name, pa.string() if c.kind == "category" else pa.int64() if c.kind == "label" else pa.float64())
            for c in columns
        ]
    )
    try:
        with pa.ipc.new_file(str(out), schema) as writer:
            rows, given = _write_clean(path, columns, writer)
        report = {"rows_read": rows, "rows_dropped": 0}
    except Unclean:
        with pa.ipc.new_file(str(out), schema) as writer:
            rows, report, given = _write_checked(cfg, path, columns, writer, rename)
    pa.default_memory_pool().release_unused()  # the reader's blocks, kept by the pool otherwise
    enough, how = split
    require_rows(path, rows, enough, f"to split into train and eval {how}")
    empty = [c.name for c in columns if c.empty_ok and not given[c.name]]
    if empty:
        raise DataError(
            f"{path}: column {', '.join(empty)} has no values at all, only empty cells.\n"
            f"Fix: check that data.file is the right CSV and its values are in that column."
        )
    return rows, report


def _write_clean(path: Path, columns: list[Column], writer) -> tuple[int, dict]:
    """Arrow's typed read of a file every cell of which reads as its kind, each row on its own line; Unclean at
    the first batch that needs a verdict (a bad or doubtful cell, a blank line, a quoted newline)."""
    rows, given = 0, {c.name: False for c in columns}
    for batch in _arrow_batches(path, columns):
        checked = clean_columns(batch, columns)
        if checked is None:
            raise Unclean
        writer.write_batch(pa.record_batch(list(checked.values()), names=list(checked)))
        rows += batch.num_rows
        for c in columns:
            given[c.name] = given[c.name] or _any_value(checked[c.name])
    if rows == 0 or (path.suffix.lower() not in (".parquet", ".pq") and line_count(path) != rows + 1):
        raise Unclean
    return rows, given


def _arrow_batches(path: Path, columns: list[Column]) -> Iterator[pa.RecordBatch]:
    """The columns' record batches, typed by Arrow; a Parquet file's only when its types are those the checks
    would give (numbers stored as numbers, texts as texts)."""
    import pyarrow.parquet as pq
    from pyarrow import csv as pa_csv

    if any(c.kind == "time" for c in columns):
        raise ValueError("time columns are read whole (recipes/_tables.read)")
    if path.suffix.lower() in (".parquet", ".pq"):
        file = pq.ParquetFile(path)
        kinds = {c.name: pa.string() if c.kind == "category" else pa.float64() for c in columns}
        stored = file.schema_arrow
        if any(
            stored.field(n).type != pa.string()
            if k == pa.string()
            else not (pa.types.is_floating(stored.field(n).type) or pa.types.is_integer(stored.field(n).type))
            for n, k in kinds.items()
        ):
            raise Unclean
        for batch in file.iter_batches(batch_size=max(1, BLOCK_BYTES // 64), columns=list(kinds)):
            try:
                yield pa.record_batch([batch.column(n).cast(k) for n, k in kinds.items()], names=list(kinds))
            except pa.ArrowInvalid:  # an integer beyond float64's exact range
                raise Unclean from None
        return
    parse_options, convert_options = clean_options(columns)
    try:
        reader = pa_csv.open_csv(
            path,
            read_options=pa_csv.ReadOptions(block_size=BLOCK_BYTES),
            parse_options=parse_options,
            convert_options=convert_options,
        )
        yield from reader
    except (pa.ArrowException, OSError, UnicodeError):
        raise Unclean from None


def _write_checked(cfg, path: Path, columns: list[Column], writer, rename: str) -> tuple[int, dict, dict]:
    """The rows checked cell by cell, CHECKED_ROWS at a time: each bad cell found and named by its line, or its
    row dropped (data.drop_bad_rows). Problems keep their count and their first SHOWN cells."""
    records = rows_of(path)
    line, names = next(records)
    names = [n.strip() for n in names]
    positions = header_positions(path, line, names, columns, rename, "data.root / data.file")
    problems: dict[str, tuple[int, list]] = {}
    read = bad = written = 0
    dropped, given = [], {c.name: False for c in columns}
    while chunk := list(itertools.islice(records, CHECKED_ROWS)):
        lines = np.array([n for n, _ in chunk])
        table, found = parse(path, chunk, columns, positions, len(names))
        wrong = np.zeros(len(chunk), dtype=bool)
        for problem, cells in found.items():
            wrong[[i for i, _, _ in cells]] = True
            count, shown = problems.get(problem, (0, []))
            shown = sorted([*shown, *((lines[i], c, text) for i, c, text in cells)], key=lambda s: (s[0], s[1] or 0))
            problems[problem] = (count + len(cells), shown[:SHOWN])
        read, bad = read + len(chunk), bad + int(wrong.sum())
        dropped += lines[wrong][: KEPT_LINES - len(dropped)].tolist()
        if bad and not cfg.data.drop_bad_rows:
            continue  # nothing is written: every bad cell is counted for the message
        keep = table[~wrong]
        writer.write_batch(
            pa.record_batch([_arrow(keep[c.name].to_numpy(), c) for c in columns], names=[c.name for c in columns])
        )
        written += len(keep)
        for c in columns:
            given[c.name] = given[c.name] or _any_value(_arrow(keep[c.name].to_numpy(), c))
    if not read:
        raise DataError(
            f"{path} has a header (line {line}) but no data rows.\nFix: add the data rows, "
            f"or point data.root / data.file at the full CSV."
        )
    report = {"rows_read": read, "rows_dropped": bad}
    if bad:
        if not cfg.data.drop_bad_rows:
            raise DataError(bad_rows_message(path, problems, read, bad, columns, positions))
        report["dropped_lines"] = dropped
        more = f" and {bad - SHOWN} more" if bad > SHOWN else ""
        print(
            f"data: dropped {bad} of {read} rows of {path} (data.drop_bad_rows=true), lines "
            f"{', '.join(map(str, dropped[:SHOWN]))}{more}"
        )
    return written, report, given


def _arrow(values: np.ndarray, column: Column) -> pa.Array:
    return pa.array(values, pa.string() if column.kind == "category" else None)


def _any_value(values: pa.Array) -> bool:
    if pa.types.is_string(values.type):
        return bool(pc.any(pc.not_equal(values, "")).as_py())
    return bool(pc.any(pc.invert(pc.is_nan(values))).as_py()) if pa.types.is_floating(values.type) else True


def batches(arrow_file: Path) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row, batch) of the checked rows, read into memory one batch at a time."""
    with pa.OSFile(str(arrow_file)) as f:
        reader, start = pa.ipc.open_file(f), 0
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            yield start, batch
            start += batch.num_rows


def numbers_of(batch: pa.RecordBatch, names: list[str]) -> np.ndarray:
    """float64 [rows, columns] of float32 values: the shards store float32, so the statistics are of exactly the
    values the model sees."""
    x = np.empty((batch.num_rows, len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        x[:, j] = batch.column(name).to_numpy().astype(np.float32)
    return x


def codes(arrow_file: Path, name: str, classes: list) -> np.ndarray:
    """Each row's class: the position of its value of column `name` among `classes` (-1: none of them)."""
    parts = []
    for _, batch in batches(arrow_file):
        column = batch.column(name)
        parts.append(pc.index_in(column, value_set=pa.array(classes).cast(column.type)).fill_null(-1).to_numpy())
    return np.concatenate(parts).astype(np.int32)  # few classes: 4 bytes a row


def distinct(arrow_file: Path, name: str) -> tuple[np.ndarray, int]:
    """The different values of column `name` (sorted; texts as an object array) and the number of rows."""
    parts, rows = [], 0
    for _, batch in batches(arrow_file):
        parts.append(pc.unique(batch.column(name)))
        rows += batch.num_rows
    values = (
        pa.chunked_array(parts, type=parts[0].type if parts else pa.float64()).unique().to_numpy(zero_copy_only=False)
    )
    return np.unique(values), rows


class RowsFile:
    """float32 rows [rows, width] in a file: appended in order, gathered in any order by plain reads of the file,
    READ_BYTES at a time. Never mapped: a mapped read of scattered rows maps whole (large) folios of the file,
    so a gather of a few thousand rows would count most of the file as this process's memory."""

    def __init__(self, path: Path, width: int):
        self._file = open(path, "w+b")  # noqa: SIM115 (open as long as the rows are needed)
        self.width, self.rows = width, 0
        self.row_bytes = max(1, 4 * width)

    def append(self, part: np.ndarray) -> None:
        np.ascontiguousarray(part, np.float32).tofile(self._file)
        self.rows += len(part)

    def gather(self, at: np.ndarray) -> np.ndarray:
        """The rows `at` (in that order): the file read in ranges of READ_BYTES from the first row wanted to the
        last, each range's rows copied out of it."""
        self._file.flush()
        out = np.empty((len(at), self.width), np.float32)
        order = np.argsort(at, kind="stable")
        wanted = at[order]
        step = max(1, READ_BYTES // self.row_bytes)
        block = np.empty((step, self.width), np.float32)
        start = 0
        while start < len(wanted):
            first = int(wanted[start])
            stop = int(np.searchsorted(wanted, first + step))
            rows = int(wanted[stop - 1]) - first + 1
            read = os.preadv(self._file.fileno(), [block[:rows]], first * 4 * self.width)
            if read != block[:rows].nbytes:
                raise OSError(f"{self._file.name}: read {read} of {block[:rows].nbytes} bytes at row {first}")
            out[order[start:stop]] = block[wanted[start:stop] - first]
            start = stop
        return out


def write_split(features: RowsFile, labels: np.ndarray, indices: np.ndarray, kinds, where: tuple[Path, int]):
    """The rows `indices` of `features` and `labels`, with the features `kinds`, written as a split's shard files
    (`where`: the folder to make theirs in, and data.num_shards) a writer batch of rows at a time, from gathers
    of GATHER_BYTES of rows: the build moves the files into place, never reading them back."""
    from pipeline.decoded_shards import write_rows

    chunk = max(1, GATHER_BYTES // features.row_bytes)

    @functools.lru_cache(maxsize=1)
    def gathered(k: int) -> np.ndarray:
        return features.gather(indices[k * chunk : (k + 1) * chunk])

    def take(start: int, stop: int) -> pa.Table:
        x = np.concatenate(
            [
                gathered(k)[max(start - k * chunk, 0) : stop - k * chunk]
                for k in range(start // chunk, (stop - 1) // chunk + 1)
            ]
        )
        column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        return pa.table({"features": column, "label": pa.array(labels[indices[start:stop]])})

    scratch, num_shards = where
    return write_rows(
        Path(tempfile.mkdtemp(prefix="tabular-split-", dir=scratch)), kinds, len(indices), num_shards, take
    )

"""Throughput of preparing a table: generates a CSV of a given size and prepares it with recipe=tabular in a
process of its own, then reports rows/s, MB/s and that process's peak memory (RSS).

python launch/bench_prepare.py --mb 1000 --folder /tmp/bench     # ~9M rows x 10 columns
python launch/bench_prepare.py --mb 100 --folder /tmp/bench data.impute=mean   # more keys go to the recipe
The CSV (8 numbers, one empty cell in 20 in x1, a category, a 3-class label) is made once per size and seed and
reused; the shards go to <folder>/cache and are rebuilt on every run.
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS_PER_CHUNK = 100_000


def generate(path: Path, mb: float, seed: int = 0) -> int:
    """Writes rows to `path` until it holds `mb` megabytes; returns the rows written."""
    import numpy as np
    import pyarrow as pa
    from pyarrow import csv as pa_csv

    rng, rows, tmp = np.random.default_rng(seed), 0, path.with_suffix(".tmp")
    colors = np.array(["red", "green", "blue", "amber", "violet"])
    with pa_csv.CSVWriter(tmp, pa.schema([*((f"x{i}", pa.float64()) for i in range(8)), ("color", pa.string()),
                                           ("label", pa.int64())])) as writer:
        while tmp.stat().st_size < mb * 1e6:
            x = (rng.normal(size=(ROWS_PER_CHUNK, 8)) * [1, 10, 100, 1, 1, 5, 50, 1000]).round(8)
            color = rng.integers(0, len(colors), ROWS_PER_CHUNK)
            label = ((x[:, 0] + x[:, 1] / 10 + (color == 2) > 0.5).astype(np.int64) + (x[:, 2] > 100))
            columns = {f"x{i}": pa.array(x[:, i]) for i in range(8)}
            columns["x1"] = pa.array(x[:, 1], mask=rng.random(ROWS_PER_CHUNK) < 0.05)  # empty: imputed
            writer.write_table(pa.table({**columns, "color": pa.array(colors[color]), "label": label}))
            rows += ROWS_PER_CHUNK
    tmp.rename(path)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="size of the CSV in megabytes")
    parser.add_argument("--folder", type=Path, default=Path("bench_prepare"), help="where the CSV and shards go")
    parser.add_argument("--seed", type=int, default=0)
    args, keys = parser.parse_known_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    path = args.folder / f"table-{args.mb:g}mb-seed{args.seed}.csv"
    if not path.exists():
        started = time.perf_counter()
        rows = generate(path, args.mb, args.seed)
        print(f"generated {path} ({rows:,} rows, {path.stat().st_size / 1e6:,.0f} MB) in "
              f"{time.perf_counter() - started:.0f} s")
    command = [sys.executable, str(ROOT / "launch" / "prepare.py"), "recipe=tabular", f"data.file={path}",
               "data.target=label", f"data.cache_dir={args.folder / 'cache'}", *keys, "--rebuild"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"prepare failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kilobytes on Linux
    # The preparation's own time, as launch/prepare.py prints it: the process's also holds Python's start.
    own = re.search(r"prepared ([\d,]+) rows in ([\d.]+) s", result.stdout)
    rows, prepare_s = int(own[1].replace(",", "")), float(own[2])
    size = path.stat().st_size
    print(f"prepared {rows:,} rows ({size / 1e6:,.0f} MB of CSV) in {prepare_s:.1f} s: {rows / prepare_s:,.0f} "
          f"rows/s, {size / 1e6 / prepare_s:,.1f} MB/s; the process took {seconds:.1f} s with its start, peak RSS "
          f"{peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()

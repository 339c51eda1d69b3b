"""Splits decoded while their shards are written: the rows a recipe lists cheaply (file paths and labels) are
decoded one shard at a time, by whichever process or worker writes that shard, straight into its file.

A split's shard files are cut at the same rows and written by the same function whatever process writes them,
so a build by N processes (each with `data.num_proc` workers) is byte for byte the build of one process.
Nothing passes through the main process's memory: a prepare's memory does not grow with the data.
A recipe that makes its rows batch by batch (a table larger than memory) writes them with `write_rows` into
the same layout, and the build moves the files into place (`Written`) instead of reading them back.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import numpy as np
from datasets.arrow_writer import ArrowWriter, get_writer_batch_size_from_data_size
from datasets.utils.py_utils import asdict  # datasets' own: the one save_to_disk writes dataset_info.json with

from pipeline import files

# Rows decoded and written at a time: small enough that a batch of photographs decoded at full size fits in
# memory, large enough that Arrow's per-batch cost does not show.
DECODE_BATCH = 64
# The most decoded bytes in one shard file of a split to decode: the unit of work processes share.
SHARD_BYTES = 128 * 2**20


@dataclass(frozen=True)
class Undecoded:
    """A split to decode while writing it: `rows` (a small dataset, e.g. file paths and labels),
    `decode(batch) -> columns` (batched, picklable: it runs in other processes) and the `features` it returns.

    A recipe's prepare() returns it in place of a datasets.Dataset for a split whose decoding is the work."""

    rows: datasets.Dataset
    decode: Callable[[dict], dict]
    features: datasets.Features

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def column_names(self) -> list[str]:
        return list(self.features)

    def decoded(self) -> datasets.Dataset:
        """The rows decoded now, in memory (a small split, e.g. to look at it)."""
        return self.rows.map(
            self.decode,
            batched=True,
            batch_size=DECODE_BATCH,
            features=self.features,
            remove_columns=[c for c in self.rows.column_names if c not in self.features],
        )

    def with_rows(self, rows: datasets.Dataset) -> Undecoded:
        """The same decoding of other rows (e.g. a train/eval split of these)."""
        return replace(self, rows=rows)


def shard_count(split, num_shards: int) -> int:
    """How many files a split gets: `data.num_shards`, at most one per row; a split to decode gets one per
    SHARD_BYTES of decoded rows at least, so that many processes can share a large build (a number that
    depends on the data alone, never on how many processes build it)."""
    if isinstance(split, Undecoded):
        num_shards = max(num_shards, math.ceil(len(split) * row_bytes(split.features) / SHARD_BYTES))
    return min(num_shards, max(1, len(split)))


def row_bytes(features: datasets.Features) -> int:
    """The bytes of one decoded row of fixed-shape columns (64 for a column of another kind)."""
    total = 0
    for feature in features.values():
        try:
            total += math.prod(getattr(feature, "shape", ())) * np.dtype(feature.dtype).itemsize
        except (AttributeError, TypeError):
            total += 64
    return total


def shard_name(index: int, count: int) -> str:
    return f"data-{index:05d}-of-{count:05d}.arrow"  # datasets' own layout, read back by load_from_disk


def jobs(splits: dict, num_shards: int) -> list[tuple[str, int, int]]:
    """(split, shard index, shard count) of every shard to decode, in one fixed order on every process."""
    return [
        (name, index, shard_count(split, num_shards))
        for name, split in splits.items()
        if isinstance(split, Undecoded)
        for index in range(shard_count(split, num_shards))
    ]


def mine(all_jobs: list, process: int, processes: int) -> list:
    """This process's share of the jobs: every `processes`-th, starting at its index."""
    return all_jobs[process::processes]


def write_shard(split: Undecoded, index: int, count: int, folder: Path) -> dict:
    """Decodes the `index`-th of `count` contiguous parts of `split` into `folder/<datasets' shard name>`;
    returns its {"<split>/<file>": {size, sha256}}: the writer hashes what it wrote while the bytes are in the
    page cache, so a build shared by many processes is not left hashing every file on one of them.
    Written under a temporary name and renamed: a killed writer leaves no shard file."""
    keep_freed_memory()
    part = split.rows.shard(num_shards=count, index=index, contiguous=True)
    target = folder / shard_name(index, count)
    partial = target.with_name(f".{target.name}.partial")
    writer = ArrowWriter(features=split.features, path=str(partial), writer_batch_size=DECODE_BATCH)
    try:
        for batch in part.iter(batch_size=DECODE_BATCH):
            writer.write_batch(split.decode(batch))
        writer.finalize()
    finally:
        writer.close()
    sums = {"size": partial.stat().st_size, "sha256": files.sha256(partial)}
    partial.rename(target)
    return {f"{folder.name}/{target.name}": sums}


# glibc's mallopt(3) parameters, and the values a decoding process sets: blocks under MAP_FROM come from the heap,
# and the heap gives freed memory back to the kernel once more than TRIM_AT is free at its top.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TRIM_AT, MAP_FROM = 64 * 2**20, 16 * 2**20


def keep_freed_memory() -> None:
    """Has glibc keep a decoded batch's freed arrays (MiBs each) for the next batch. By default it maps every
    block over 128 KiB afresh and unmaps it when freed, until the process happens to free a larger block: a process
    that had not, such as one handed its share of a build, faulted in new pages for every batch and decoded
    slower than the process that had. Not glibc (no mallopt): nothing to do."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return
    mallopt(M_TRIM_THRESHOLD, TRIM_AT)
    mallopt(M_MMAP_THRESHOLD, MAP_FROM)


def _write(args) -> dict:
    return write_shard(*args)


def write_shards(splits: dict, my_jobs: list, folder: Path, workers: int | None) -> dict:
    """Writes `my_jobs` of `splits` into `folder/<split>/`, in `workers` processes (data.num_proc) or here;
    returns the written files' sizes and sha256 as `write_shard` gives them."""
    tasks = [(splits[name], index, count, folder / name) for name, index, count in my_jobs]
    for name in {name for name, _, _ in my_jobs}:
        (folder / name).mkdir(parents=True, exist_ok=True)
    if workers and workers > 1 and len(tasks) > 1:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            written = pool.map(_write, tasks, chunksize=1)
    else:
        written = [_write(task) for task in tasks]
    return {name: sums for one in written for name, sums in one.items()}


@dataclass(frozen=True)
class Written:
    """A split whose shard files a recipe has written (`write_rows`): `rows` rows with `features` in `folder`,
    in save_to_disk's layout, and each file's {size, sha256}. The build moves the files into place as they are.

    A recipe's prepare() returns it in place of a datasets.Dataset that save_to_disk would read back: a
    memory-mapped read of every row, whose pages count in the process's memory until the split is gone."""

    folder: Path
    features: datasets.Features
    rows: int
    sums: dict

    def __len__(self) -> int:
        return self.rows

    @property
    def column_names(self) -> list[str]:
        return list(self.features)


def write_rows(folder: Path, features: datasets.Features, rows: int, num_shards: int, take: Callable) -> Written:
    """`rows` rows, `take(start, stop) -> pa.Table` of rows [start, stop), written into `folder` as
    `Dataset.save_to_disk(num_shards=...)` writes them (the same files, byte for byte): contiguous shards of
    the same lengths, each written by datasets' ArrowWriter in batches of the rows save_to_disk writes at a time."""
    count = min(num_shards, max(1, rows))
    row_nbytes = take(0, 1).nbytes if rows else 1
    step = min(datasets.config.DEFAULT_MAX_BATCH_SIZE, get_writer_batch_size_from_data_size(rows, rows * row_nbytes))
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for index in range(count):
        # Dataset.shard(num_shards=count, index=index, contiguous=True): the first rows % count shards one longer
        size, more = divmod(rows, count)
        start = size * index + min(index, more)
        stop = start + size + (index < more)
        path = folder / shard_name(index, count)
        with ArrowWriter(features=features, path=str(path), embed_local_files=True) as writer:
            for at in range(start, stop, step):
                writer.write_table(take(at, min(at + step, stop)))
            writer.finalize()
        sums[path.name] = {"size": path.stat().st_size, "sha256": files.sha256(path)}
    return Written(folder, features, rows, sums)


def finish_split(split: Undecoded | Written, name: str, num_shards: int, folder: Path, fingerprint: str) -> None:
    """The files datasets' load_from_disk reads beside the shards (state.json, dataset_info.json), as
    save_to_disk writes them, with a fingerprint of the build and split (the same whoever wrote the shards)."""
    count = shard_count(split, num_shards)
    missing = [shard_name(i, count) for i in range(count) if not (folder / name / shard_name(i, count)).exists()]
    if missing:
        raise RuntimeError(
            f"shards missing after every process wrote its own: {name}/{missing[0]} and {len(missing) - 1} more"
        )
    state = {
        "_data_files": [{"filename": shard_name(i, count)} for i in range(count)],
        "_fingerprint": hashlib.sha256(f"{fingerprint}/{name}".encode()).hexdigest()[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (folder / name / datasets.config.DATASET_STATE_JSON_FILENAME).write_text(
        json.dumps(state, indent=2, sort_keys=True)
    )
    info = asdict(datasets.DatasetInfo(features=split.features))
    (folder / name / datasets.config.DATASET_INFO_FILENAME).write_text(
        json.dumps({key: info[key] for key in sorted(info)}, indent=2)
    )

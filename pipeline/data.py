"""Data: a recipe's raw files -> Arrow shards on disk (once, keyed by a fingerprint) -> batches.

Prepared splits that fit in memory become one tensor per column (`Rows`); larger ones are read from their
memory-mapped shards a batch at a time (`Stream`). Both serve the same batches in the same order.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import inspect
import json
import math
import os
import pickle
import shutil
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from pipeline import decoded_shards, files, tracking
from pipeline import recipe as recipes
from pipeline.config import ConfigError

# Keys under `data.` that say where things are or how fast to work, not what the shards contain.
NOT_CONTENT = ("root", "cache_dir", "download", "num_proc", "num_workers", "in_memory", "in_memory_budget_gb",
               "on_device")
META_FILE = "meta.json"
# How the shard folder is laid out, in the fingerprint: a change rebuilds every cache. 2: one DatasetDict
# (dataset_dict.json + a folder per split) that `datasets.load_from_disk(<folder>)` reads; 1: loose splits.
LAYOUT = 2
CHECKSUM_FILE = "checksums.json"  # {file: {size, sha256}} of every shard file, written with the shards
# Shards up to this size are hashed in full each time they are reused (about 400 MiB/s measured on the
# MNIST shards on 2 busy cores, so at most ~0.3 s); larger ones get their sizes checked on every load,
# a full hash with `launch/prepare.py --verify`, and one whenever a file fails to load.
FULL_CHECK_BYTES = 128 * 2**20
# Waiting for another process's prepare: no practical limit (a process that dies closes its connections,
# which ends the wait with an error), and a line in the log every REPORT_EVERY_S.
WAIT_LIMIT = timedelta(days=7)
REPORT_EVERY_S = 60
PROJECT = ("pipeline", "recipes")  # packages whose code can change what prepare() makes (see _reached)


class DataError(RuntimeError):
    """Raw data missing or unreadable; the message names the files and the fix."""


# ---------------------------------------------------------------- preparation and cache


def fingerprint(recipe, cfg: DictConfig) -> str:
    """Hash of the recipe's code, every preprocessing parameter and the raw files (path, size, mtime)."""
    params = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
              if k not in NOT_CONTENT and k not in recipe.transform_keys}
    h = hashlib.sha256(json.dumps({"recipe": recipe.name, "version": recipe.version, "layout": LAYOUT, "data": params},
                                  sort_keys=True, default=str).encode())
    h.update(code_hash(recipe).encode())
    stats = raw_stats(recipe, cfg)
    for rel, size, mtime_ns in stats:
        h.update(f"{rel}\0{size}\0{mtime_ns}\n".encode())
    _FINGERPRINTED[_key(recipe, cfg)] = stats
    return h.hexdigest()[:16]


# The raw files' stats each fingerprint was computed from, so the run's data record (runinfo.data_identity)
# names the very files the shards were made from without walking a million of them a second time.
_FINGERPRINTED: dict[tuple, list] = {}


def _key(recipe, cfg: DictConfig) -> tuple:
    return recipe.name, json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True, default=str)


def fingerprinted_stats(recipe, cfg: DictConfig) -> list[tuple[str, int, int]]:
    """`raw_stats` as the last fingerprint of this recipe and data config saw them (walked now if none was)."""
    return _FINGERPRINTED.get(_key(recipe, cfg)) or raw_stats(recipe, cfg)


def raw_stats(recipe, cfg: DictConfig) -> list[tuple[str, int, int]]:
    """(path relative to data.root, size, mtime in ns) of each raw file the recipe reads, sorted by path."""
    root, stats = Path(cfg.data.root), []
    for path in sorted(Path(p) for p in recipe.raw_files(cfg)):
        stat = path.stat()
        rel = path.relative_to(root) if path.is_relative_to(root) else path
        stats.append((str(rel), stat.st_size, stat.st_mtime_ns))
    return stats


def code_hash(recipe) -> str:
    """Hash of the source that makes the shards: the whole module that defines prepare() (the recipe's, unless
    prepare() is a `functools.partial` of a shared helper), and every project function or class it reaches
    (e.g. the shared helpers in recipes/_*.py), so editing any of them rebuilds the shards.

    Source text, not behaviour: a comment or whitespace edit in those places rebuilds them too.
    """
    # A partial of a shared helper (functools' module is its getmodule): that helper and what it reaches only.
    module = None if isinstance(recipe.prepare, functools.partial) else inspect.getmodule(recipe.prepare)
    parts = [inspect.getsource(module)] if module else []
    parts += [f"{o.__qualname__}\n{inspect.getsource(o)}" for o in _reached(recipe.prepare)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _reached(start) -> list:
    """Project functions and classes that `start` calls, directly or through others, sorted by name.

    The project: this repo's packages and the one that holds `start` (a recipe kept outside this repo).
    """
    start = getattr(start, "func", start)
    project = {*PROJECT, (getattr(start, "__module__", None) or "pipeline").split(".")[0]}
    found, todo = {}, [start]
    while todo:
        obj = todo.pop()
        obj = getattr(obj, "func", obj)  # a functools.partial
        if id(obj) in found or (getattr(obj, "__module__", None) or "").split(".")[0] not in project:
            continue
        if inspect.isclass(obj):
            found[id(obj)] = obj
            # The methods written in the class's file (a dataclass's generated __init__ or __repr__ has no source).
            where = inspect.getsourcefile(obj)
            todo += [v for v in vars(obj).values() if inspect.isfunction(v) and v.__code__.co_filename == where]
        elif inspect.isfunction(obj):
            found[id(obj)] = obj
            names = _names(obj.__code__)
            for value in [obj.__globals__.get(n) for n in names] + [c.cell_contents for c in obj.__closure__ or ()]:
                if inspect.ismodule(value):  # `helpers.image_split`: the attribute names are in co_names too
                    todo += [getattr(value, n) for n in names if value.__name__.split(".")[0] in project
                             and hasattr(value, n)]
                elif value is not None:
                    todo.append(value)
    return sorted(found.values(), key=lambda o: (o.__module__, o.__qualname__))


def _names(code) -> set[str]:
    """Global and attribute names a code object uses, nested functions and lambdas included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= _names(const)
    return names


def shards_dir(recipe, cfg: DictConfig, fingerprinted: str | None = None) -> Path:
    """<data.cache_dir>/<recipe>/<fingerprint>; `fingerprinted`: the fingerprint, computed before."""
    return Path(cfg.data.cache_dir) / recipe.name / (fingerprinted or fingerprint(recipe, cfg))


def prepare(recipe, cfg: DictConfig, state=None, log=print, rebuild: bool = False) -> Path:
    """Builds the recipe's shards unless they exist (or `rebuild`); returns their directory.

    Reused shards are checked against the checksums written with them (see `check`), so a damaged
    cache stops here, before any run directory exists. Under several processes (`state`: an accelerate
    PartialState or Accelerator) see `_prepare_together`.
    """
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # per-shard bars are noise in a job's log
    if state is None or state.num_processes == 1:
        return _build(recipe, cfg, shards_dir(recipe, cfg), log, rebuild)
    return _prepare_together(recipe, cfg, state, log, rebuild)


def _build(recipe, cfg: DictConfig, out: Path, log, rebuild: bool = False, share=None) -> Path:
    """The shards in `out`: checked and reused if they exist, else prepared from the raw files and saved.
    `share(folder, splits, jobs)`: has the other processes write their part of the splits to decode."""
    if rebuild and out.exists():
        log(f"data: removing {out} to rebuild it")
        shutil.rmtree(out)
    if (out / META_FILE).exists():
        check(out, full=_size(out) <= FULL_CHECK_BYTES)
        log(f"data: reusing shards in {out}")
        return out
    log(f"data: preparing {recipe.name} from {cfg.data.root} -> {out}")
    with files.scratch(out):  # where the recipe's datasets.map writes what it decodes
        # The recipe's return value checked (and meta made JSON-able) before anything is written.
        splits, meta = recipes.check_prepared(recipe, recipe.prepare(cfg), cfg)
        _save(splits, meta, out, Saving(cfg.data.num_shards, cfg.data.num_proc, share), log)
    log(f"data: wrote {', '.join(f'{k} {len(v):,}' for k, v in splits.items())} rows to {out}")
    return out


def _prepare_together(recipe, cfg: DictConfig, state, log, rebuild: bool) -> Path:
    """The main process fingerprints the raw files and builds (or checks) the shards while the others wait;
    then the main process of every other node does the same in its own cache (which may be node-local),
    under the fingerprint the main process computed. The raw files are walked once, and read once per node at most.

    The waits are on a gloo group of their own with no practical time limit: a prepare may take longer than
    any collective timeout (trainer.dist_timeout_s). An error on any preparing process is raised on every
    process, so all of them stop with its message instead of waiting.
    """
    # torch.distributed directly: Accelerate's collectives run on the default group and inherit its timeout.
    group = dist.new_group(backend="gloo", timeout=WAIT_LIMIT)
    try:
        if state.is_main_process:
            share = functools.partial(_share, state=state, group=group, log=log, workers=cfg.data.num_proc)
            first = [_attempt(lambda: _build(recipe, cfg, shards_dir(recipe, cfg), log, rebuild, share))]
            dist.broadcast_object_list(first, src=0, group=group)
        else:  # a part of the shard files to write, if process 0 hands them out, then its outcome
            first = _take_part(state, group, cfg.data.num_proc)
        # The folder's name, not its path: a node-local cache_dir may be given differently on each node.
        out = shards_dir(recipe, cfg, _outcome(first[0], "process 0", own=state.is_main_process).name)
        node = (_attempt(lambda: _build(recipe, cfg, out, log))
                if state.is_local_main_process and not state.is_main_process else None)
        nodes = [None] * state.num_processes
        with _waiting("process 0 waiting for the other nodes' main processes to check or prepare their shards",
                      speak=state.is_main_process):
            dist.all_gather_object(nodes, node, group=group)
        for index, outcome in enumerate(nodes):
            if outcome is not None:
                _outcome(outcome, f"process {index}", own=index == state.process_index)
        return out
    finally:
        dist.destroy_process_group(group)


# The splits to decode, as process 0 hands them to the others (beside the shards they write).
PLAN_FILE = ".plan.pickle"


def _share(folder: Path, splits: dict, todo: list, state, group, log, workers) -> list:
    """Process 0's side of a shared build: the splits to decode go to every process (through `folder`, which
    they all see on a shared filesystem), each writes its share of the shard files, and process 0 is left
    the shares of processes that cannot see `folder` (another node's cache, where the cache is node-local)."""
    undecoded = {k: v for k, v in splits.items() if isinstance(v, decoded_shards.Undecoded)}
    (folder / PLAN_FILE).write_bytes(pickle.dumps((undecoded, todo)))
    dist.broadcast_object_list([("plan", str(folder))], src=0, group=group)
    log(f"data: {state.num_processes} processes decode {len(todo)} shard files")
    mine = decoded_shards.mine(todo, 0, state.num_processes)
    outcome = _attempt(lambda: decoded_shards.write_shards(splits, mine, folder, workers))
    outcomes = [None] * state.num_processes
    with _waiting("process 0 waiting for the other processes to write their shard files", speak=True):
        dist.all_gather_object(outcomes, outcome, group=group)
    (folder / PLAN_FILE).unlink()
    left = []
    for index, result in enumerate(outcomes):
        if result == ("unseen", None):
            left += decoded_shards.mine(todo, index, state.num_processes)
        else:
            _outcome(result, f"process {index}", own=index == 0)
    if left:
        log(f"data: {len(left)} shard files left by processes that cannot see {folder} (a node-local cache): "
            f"written here")
    return left


def _take_part(state, group, workers) -> list:
    """The other processes' side of a build: the shard files process 0 hands them, until it sends its outcome."""
    while True:
        message = [None]
        first_on_node = state.local_process_index == (1 if state.process_index == state.local_process_index else 0)
        with _waiting(f"process {state.process_index} waiting for process 0 to prepare the shards",
                      speak=first_on_node):
            dist.broadcast_object_list(message, src=0, group=group)
        if message[0][0] != "plan":
            return message
        folder = Path(message[0][1])
        outcome = ("unseen", None)
        if (folder / PLAN_FILE).exists():
            outcome = _attempt(functools.partial(_write_part, folder, state, workers))
        dist.all_gather_object([None] * state.num_processes, outcome, group=group)


def _write_part(folder: Path, state, workers) -> None:
    splits, todo = pickle.loads((folder / PLAN_FILE).read_bytes())
    decoded_shards.write_shards(splits, decoded_shards.mine(todo, state.process_index, state.num_processes),
                                folder, workers)


def _attempt(build) -> tuple[str, object]:
    """("ok", result) or ("error", the exception), to be sent to the other processes."""
    try:
        return "ok", build()
    except Exception as e:
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:  # an exception that does not survive pickling reaches the others as its text
            return "error", RuntimeError(f"{type(e).__name__}: {e}")
        return "error", e


def _outcome(outcome: tuple[str, object], who: str, own: bool):
    """The result a process sent, or its error raised here: this process's own as it is, ConfigError and
    DataError as they are (every process exits 2 with the message), anything else named as `who`'s failure."""
    kind, value = outcome
    if kind == "ok":
        return value
    if own or isinstance(value, (ConfigError, DataError)):
        raise value
    raise RuntimeError(f"{who} failed while preparing the shards ({type(value).__name__}: {value}); its "
                       f"output above has the traceback") from value


@contextmanager
def _waiting(what: str, speak: bool, every: float = REPORT_EVERY_S):
    """While the body blocks, prints `data: <what> (N min)` every `every` seconds (if `speak`), so a job's
    log says why it is quiet."""
    if not speak:
        yield
        return
    done, started = threading.Event(), time.monotonic()

    def report():
        while not done.wait(every):
            print(f"data: {what} ({(time.monotonic() - started) / 60:.0f} min)", flush=True)

    thread = threading.Thread(target=report, name="data-wait-report", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@dataclass(frozen=True)
class Saving:
    """How a build writes its shards: `num_shards` files per split at most, splits to decode written by
    `workers` processes (data.num_proc) and, with `share`, by every process of the job."""

    num_shards: int
    workers: int | None = None
    share: object = None  # share(folder, splits, jobs) -> the jobs left to this process


def _write_splits(splits: dict, folder: Path, saving: Saving, fingerprint: str) -> None:
    """DatasetDict.save_to_disk's layout: the rows a recipe made written by this process; the splits to
    decode shard by shard, by this process's workers or shared with the other processes."""
    for name, split in splits.items():
        if isinstance(split, datasets.Dataset):
            split.save_to_disk(str(folder / name), num_shards=decoded_shards.shard_count(split, saving.num_shards))
    todo = decoded_shards.jobs(splits, saving.num_shards)
    if todo and saving.share is not None:
        todo = saving.share(folder, splits, todo)
    decoded_shards.write_shards(splits, todo, folder, saving.workers)
    for name, split in splits.items():
        if isinstance(split, decoded_shards.Undecoded):
            decoded_shards.finish_split(split, name, saving.num_shards, folder, fingerprint)
    (folder / datasets.config.DATASETDICT_JSON_FILENAME).write_text(json.dumps({"splits": list(splits)}))


def _save(splits: dict, meta: dict, out: Path, saving: Saving, log=print) -> None:
    # Written beside the target and renamed into place, so a crash never leaves shards that look valid.
    out.parent.mkdir(parents=True, exist_ok=True)
    files.remove_dead_leftovers(out, log)  # a killed build's half-written folder (they can be large)
    tmp = files.temporary_folder(out)
    try:
        _write_splits(splits, tmp, saving, out.name)
        (tmp / META_FILE).write_text(tracking.dumps(meta, indent=2))  # null for a non-finite number, as every JSON
        (tmp / files.OWNER_FILE).unlink()
        sums = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(tmp)}
        (tmp / CHECKSUM_FILE).write_text(json.dumps(sums, indent=1))
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same shards first
            if not (out / META_FILE).exists():
                raise
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DataError(f"disk full while writing the shards to {out.parent} ({e.strerror}); the partial shards "
                        f"were removed.\nFix: free space there, or point data.cache_dir= at a larger disk") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _size(out: Path) -> int:
    return sum(p.stat().st_size for p in _files(out))


def check(out: Path, full: bool = False) -> int:
    """Compares the shard files with the sizes (and, if `full`, the sha256) recorded when they were
    written; raises a DataError naming the first bad file and the command that rebuilds them.
    Returns the bytes checked."""
    try:
        sums = json.loads((out / CHECKSUM_FILE).read_text())
    except (OSError, ValueError) as e:
        raise damaged(out, out / CHECKSUM_FILE, f"the list of checksums cannot be read ({e})") from None
    if not isinstance(sums, dict) or not all(isinstance(w, dict) and {"size", "sha256"} <= w.keys()
                                             for w in sums.values()):
        raise damaged(out, out / CHECKSUM_FILE, "the list of checksums parses, but not as the {file: {size, sha256}} "
                                                "that prepare writes")
    for name, want in sums.items():
        path = out / name
        if not path.is_file():
            raise damaged(out, path, "it is missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise damaged(out, path, f"{size:,} bytes, {want['size']:,} when written (truncated or overwritten)")
        if full and _sha256(path) != want["sha256"]:
            raise damaged(out, path, "its sha256 differs from the one recorded when it was written (changed bytes)")
    return sum(w["size"] for w in sums.values())


def damaged(out: Path, path: Path, why: str) -> DataError:
    # Shards are a cache of the raw files: deleting them loses nothing, and the next run rebuilds them.
    return DataError(
        f"damaged shard file {path}: {why}.\nThese shards were not used. They are a cache built from the raw "
        f"files, so nothing is lost by rebuilding them.\nFix: rm -r '{out}' and run the same command again "
        f"(or add --rebuild to the same `python launch/prepare.py ...` command).")


def load(out: Path) -> tuple[dict[str, datasets.Dataset], dict]:
    """The shards in `out`, memory-mapped. Their sizes are checked first; a file that fails to load
    is hashed in full, so corruption is named instead of surfacing as an Arrow error."""
    check(out)
    try:
        splits = dict(datasets.load_from_disk(str(out)))  # the DatasetDict that _save wrote
        meta = json.loads((out / META_FILE).read_text())
        if not isinstance(meta, dict):
            raise damaged(out, out / META_FILE, f"it holds a JSON {type(meta).__name__}, not the object of facts "
                                                f"(classes, statistics) that prepare writes")
        return splits, meta
    except Exception:
        check(out, full=True)  # raises a DataError if a file was damaged
        raise  # the files are as written: not corruption, a real error


# ---------------------------------------------------------------- batches


def columns(split: datasets.Dataset) -> dict[str, torch.Tensor]:
    """Every column of a prepared split as one tensor, read straight from Arrow (no per-row Python)."""
    try:
        table = split.with_format("arrow")[:]
    except (pa.ArrowException, OSError):
        for out in {Path(f["filename"]).parent.parent for f in split.cache_files}:
            check(out, full=True)  # names the damaged shard file, if that is the cause
        raise
    return {name: _tensor(table.column(name), len(split), feature) for name, feature in split.features.items()}


def _tensor(column: pa.ChunkedArray, rows: int, feature) -> torch.Tensor:
    # Chunk by chunk: Arrow's combine_chunks overflows the 32-bit list offsets of an image column past 2^31
    # values (2 GB of uint8), and one chunk stays a zero-copy view of the mapped file.
    parts = [_values(chunk).to_numpy(zero_copy_only=False) for chunk in column.chunks]
    values = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0)
    with warnings.catch_warnings():  # Arrow buffers are read-only; nothing here writes to them
        warnings.simplefilter("ignore", UserWarning)
        values = torch.from_numpy(values)
    return values.view(rows, *_shape(feature)) if rows else values


def _values(arr: pa.Array) -> pa.Array:
    """The flat values of a (nested) list or array column: one row's values after the other."""
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    while pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type):
        arr = arr.flatten()
    return arr


def _shape(feature) -> tuple:
    if hasattr(feature, "shape"):  # Array2D/3D/...
        return tuple(feature.shape)
    length = getattr(feature, "length", -1)  # fixed-length Sequence / List
    return (length,) if length and length > 0 else ()


class Rows(torch.utils.data.Dataset):
    """Tensors with one row per sample; `rows[indices]` returns a whole batch in one indexing op."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.length = len(next(iter(tensors.values())))
        self.device = next(iter(tensors.values())).device

    def __len__(self):
        return self.length

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        if idx.device != self.device:  # from pinned memory the copy does not wait for the GPU's queue
            idx = idx.pin_memory().to(self.device, non_blocking=True)
        # index_select, not v[idx]: advanced indexing is 2-4x slower for image rows on a CPU.
        return {k: v.index_select(0, idx) for k, v in self.tensors.items()}

    __getitem__ = __getitems__

    def to(self, device) -> Rows:
        return Rows({k: v.to(device) for k, v in self.tensors.items()})


class Stream(torch.utils.data.Dataset):
    """A prepared split read from its memory-mapped Arrow files: `stream[indices]` copies just those rows.

    No process holds the split: the files' pages live in the OS page cache, which the processes of a node
    share. Every prepared column is fixed-width (see `recipe.check_prepared`), so within a file a row's
    bytes sit at a fixed address: `starts[column][row]`. One `index_select` over a strided byte view of the
    mapped address range then copies a whole batch in one call. (pyarrow's `take` on a multi-chunk column
    concatenates the whole column first: 19 ms for 64 rows of 64x64x3 images, against 23 us this way.)
    A column that is not byte-addressable (booleans are bit-packed) or has nulls is read with `take`.
    """

    def __init__(self, files: list[str], features: datasets.Features):
        self.files, self.features = list(files), features
        self._open()

    def _open(self) -> None:
        # Zero-copy buffers over whole-file maps; kept here, so the addresses below stay mapped.
        self.maps = [pa.memory_map(f).read_buffer() for f in self.files]
        table = pa.concat_tables(pa.ipc.open_stream(pa.BufferReader(m)).read_all() for m in self.maps)
        self.length = len(table)
        base = min(m.address for m in self.maps)
        span = max(m.address + m.size for m in self.maps) - base
        # The address range from the first mapped file to the end of the last, as bytes; only the rows'
        # own bytes (inside the files) are ever read.
        whole = torch.from_numpy(np.ctypeslib.as_array(ctypes.cast(base, ctypes.POINTER(ctypes.c_uint8)),
                                                       shape=(span,)))
        self.fixed, self.other = {}, {}
        for name, feature in self.features.items():
            starts = _row_starts(table.column(name), math.prod(_shape(feature)), base)
            if starts is None:
                self.other[name] = (table.column(name), feature)
                continue
            dtype = _torch_dtype(_values(table.column(name).chunk(0)).type)
            width = math.prod(_shape(feature)) * dtype.itemsize
            # Row i of this view is the `width` bytes from address base + i: a batch is index_select(starts).
            window = torch.as_strided(whole, (span - width + 1, width), (1, 1))
            self.fixed[name] = (window, starts, dtype, _shape(feature))

    def __getstate__(self):  # DataLoader workers started by spawn map the files again
        return {"files": self.files, "features": self.features}

    def __setstate__(self, state):
        self.__init__(state["files"], state["features"])

    def __len__(self):
        return self.length

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        batch = {}
        for name in self.features:
            if name in self.fixed:
                window, starts, dtype, shape = self.fixed[name]
                batch[name] = window.index_select(0, starts.index_select(0, idx)).view(dtype).view(len(idx), *shape)
            else:
                column, feature = self.other[name]
                batch[name] = _tensor(column.take(pa.array(idx.numpy())), len(idx), feature)
        return batch

    __getitem__ = __getitems__


def _row_starts(column: pa.ChunkedArray, per_row: int, base: int) -> torch.Tensor | None:
    """Each row's first byte as an offset from `base`, or None where rows are not evenly laid out bytes."""
    starts = []
    for chunk in column.chunks:
        values = _values(chunk)
        width = values.type.bit_width if pa.types.is_primitive(values.type) else 0
        if width % 8 or width == 0 or chunk.null_count or values.null_count or len(values) != len(chunk) * per_row:
            return None
        size = width // 8
        first = values.buffers()[1].address + values.offset * size - base
        starts.append(first + np.arange(len(chunk), dtype=np.int64) * per_row * size)
    return torch.from_numpy(np.concatenate(starts)) if starts else None  # no rows: nothing to address


def _torch_dtype(arrow_type: pa.DataType) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=arrow_type.to_pandas_dtype())).dtype


def stream(split: datasets.Dataset) -> Stream:
    """A split's rows, read from its shard files batch by batch (see `Stream`)."""
    return Stream([f["filename"] for f in split.cache_files], split.features)


# ---------------------------------------------------------------- in memory or streamed


def tensor_bytes(split: datasets.Dataset) -> int:
    """What a split takes as whole tensors (`columns`), from its schema: nothing is read."""
    row = 0
    for name, feature in split.features.items():
        arrow_type = split.data.schema.field(name).type
        arrow_type = arrow_type.storage_type if isinstance(arrow_type, pa.ExtensionType) else arrow_type
        while pa.types.is_fixed_size_list(arrow_type) or pa.types.is_list(arrow_type):
            arrow_type = arrow_type.value_type
        width = arrow_type.bit_width if pa.types.is_primitive(arrow_type) else 64
        row += math.prod(_shape(feature)) * max(width // 8, 1)
    return row * len(split)


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def available_memory() -> int:
    """Bytes this process can still take: the kernel's MemAvailable, within its cgroup's memory limit (a
    container's, a SLURM job's) and those of the cgroups above it."""
    try:
        info = Path("/proc/meminfo").read_text()
        available = int(next(line.split()[1] for line in info.splitlines() if line.startswith("MemAvailable"))) * 1024
    except (OSError, StopIteration, ValueError):  # not Linux
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        groups = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return available
    for line in groups:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:  # cgroup v2
            folder, limit, usage = Path("/sys/fs/cgroup"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # cgroup v1
            folder, limit, usage = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        group = folder / path.lstrip("/")
        for level in [group, *group.parents]:  # a limit may sit on any cgroup above this one
            if not level.is_relative_to(folder):
                break
            try:
                cap, used = (level / limit).read_text().strip(), int((level / usage).read_text())
            except (OSError, ValueError):
                continue
            if cap.isdigit() and int(cap) < 2**60:
                available = min(available, max(int(cap) - used, 0))
    return available


def check_in_memory(cfg, own_dataset: bool) -> None:
    """A recipe's own dataset builds its rows (windows of a series, ...) from whole columns: never streamed."""
    if own_dataset and cfg.data.in_memory.name == "false":
        raise ConfigError(f"recipe {cfg.recipe!r} builds its own dataset from whole columns, which cannot be "
                          f"read a batch at a time; use data.in_memory=auto or true")


def choose_paths(cfg, splits: dict, processes_on_node: int, own_dataset: bool) -> dict[str, tuple[bool, str]]:
    """{split: (in memory?, why)}: `data.in_memory`, and for auto, whether the split's tensors fit in what is
    left of the budget (train first: it is read every step; eval and test once an epoch)."""
    wanted = cfg.data.in_memory.name
    check_in_memory(cfg, own_dataset)
    if own_dataset:
        return {name: (True, "the recipe's dataset needs whole columns") for name in splits}
    if wanted != "auto":
        return {name: (wanted == "true", f"data.in_memory={wanted}") for name in splits}
    if cfg.data.in_memory_budget_gb is not None:
        budget = int(cfg.data.in_memory_budget_gb * 2**30)
        rule = f"data.in_memory_budget_gb={cfg.data.in_memory_budget_gb:g}"
    else:
        available = available_memory()
        budget = available // 4 // processes_on_node
        rule = f"a quarter of {size_text(available)} available / {processes_on_node} process(es) on this node"
    paths = {}
    for name in sorted(splits, key=lambda n: n != "train"):
        size = tensor_bytes(splits[name])
        fits = size <= budget
        paths[name] = (fits, f"{size_text(size)} {'<=' if fits else '>'} budget {size_text(budget)}, {rule}")
        budget -= size if fits else 0
    return {name: paths[name] for name in splits}


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def loader(dataset, batch_size: int, train: bool, seed: int, num_workers: int = 0,
           step_batch: int | None = None, pin_memory: bool = False, complete: bool = False) -> DataLoader:
    """A DataLoader that fetches whole batches: the dataset's `__getitems__` slices all indices at once.

    Training serves whole optimizer steps only (`step_batch`, the global batch of an optimizer step, when
    micro-batches are accumulated): equal steps on every process, the same optimization with or without
    accumulation, no recompiles under torch.compile. The ragged last step's samples are dropped, or with
    `complete` (trainer.last_batch=complete) the step is filled up from the start of the epoch's own order, so
    every row trains each epoch. Evaluation keeps every sample.
    """
    if train:
        step_batch = step_batch or batch_size
        used = train_samples(len(dataset), step_batch, complete)
        # A generator of its own (ShuffledBatches draws the order; this one is never used): on more than one
        # process Accelerate seeds a sampler without one from the global stream, which then runs one draw
        # ahead of a single process's, and per-batch augmentation would differ between the two.
        generator = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(dataset, num_samples=used or len(dataset), generator=generator)
        batches = ShuffledBatches(sampler, batch_size, seed, device=getattr(dataset, "device", None))
    else:
        batches = BatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=False)
    # Each pass draws its workers' base seed from `generator`, by default torch's global stream: that is the
    # model's dropout stream, one per process (rng.seed_model), which the data side must not draw from.
    return DataLoader(dataset, batch_sampler=batches, collate_fn=_whole_batch, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed))


def train_samples(rows: int, step_batch: int, complete: bool) -> int:
    """Samples a training epoch serves: whole optimizer steps, the ragged last one dropped or completed (none when
    the batch is larger than the split)."""
    if complete and rows >= step_batch:
        return -(-rows // step_batch) * step_batch
    return rows - rows % step_batch


# DataLoader workers hand each batch over in shared memory (/dev/shm), `prefetch_factor` batches ahead each.
SHARED_MEMORY = Path("/dev/shm")
SHM_MARGIN = 2  # batches of one size in the estimate; the allocator and the pickled rest are not counted
SHM_FIXED = 2**16  # the workers' queues and semaphores, a page each


def check_shared_memory(loaders: list[DataLoader], shm: Path = SHARED_MEMORY) -> None:
    """Stops before any worker starts when /dev/shm cannot hold what the workers hand over: there they die
    with "unable to allocate shared memory" and the training waits for their batches forever. Docker gives a
    container 64 MB. The batches are global ones, so the need is the node's whatever the process count."""
    need = sum(shared_memory_need(loader) for loader in loaders)
    if not need or not shm.is_dir():
        return
    need += SHM_FIXED
    stats = os.statvfs(shm)
    free = stats.f_bavail * stats.f_frsize
    if need > free:
        workers = max(loader.num_workers for loader in loaders)
        raise ConfigError(
            f"{shm} has {free / 2**20:,.1f} MB free, but data.num_workers={workers} DataLoader workers need about "
            f"{need / 2**20:,.1f} MB there to hand their batches over (workers x prefetch x batch bytes, with a "
            f"margin); they would fail and the run would hang. Give the container more: `docker run "
            f"--shm-size=<size>` (podman the same; Kubernetes: an emptyDir with medium: Memory at {shm}), or "
            f"read the data in the training process: data.num_workers=0")


def shared_memory_need(loader: DataLoader) -> int:
    if loader.num_workers == 0:
        return 0
    rows = min(loader.batch_sampler.batch_size, len(loader.dataset))
    batch = loader.dataset.__getitems__(list(range(rows)))
    per_batch = sum(t.numel() * t.element_size() for t in batch.values() if isinstance(t, torch.Tensor))
    return SHM_MARGIN * loader.num_workers * (loader.prefetch_factor or 2) * per_batch


class ShuffledBatches(BatchSampler):
    """Epoch `e` is the permutation drawn from `seed + e`, served as index tensors.

    `BatchSampler(RandomSampler(...))` builds every batch in a Python loop over sample indices, a
    fifth of a small model's step; this draws the epoch in one call. The order depends on the seed
    and the epoch alone (the loop sets `epoch`), so every process draws the same batches and a
    resumed run continues the order it left. Full batches only: as many samples as the sampler's
    `num_samples`, the permutation's start served again where that is more than the rows.
    """

    def __init__(self, sampler: RandomSampler, batch_size: int, seed: int, device=None):
        super().__init__(sampler, batch_size, drop_last=True)  # the sampler gives Accelerate the sizes
        self.seed, self.epoch = seed, 0
        self.device = device  # rows kept on a GPU are indexed there: one index copy an epoch, not a step

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.sampler.data_source), generator=generator)
        if self.device is not None:
            order = order.to(self.device)
        usable = self.sampler.num_samples - self.sampler.num_samples % self.batch_size
        if usable > len(order):  # the ragged last step completed by the epoch's first rows
            order = torch.cat([order, order[:usable - len(order)]])
        yield from order[:usable].split(self.batch_size)
        self.epoch += 1  # the next pass is the next epoch, unless the loop says otherwise


def _whole_batch(batch: dict) -> dict:
    return batch  # __getitems__ already returns the batch as tensors

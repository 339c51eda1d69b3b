"""Shards: a recipe's raw files -> Arrow shards on disk (prepared once, under their fingerprint), checked
against the checksums written with them and opened memory-mapped.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import pickle
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import datasets
import pyarrow as pa
import torch.distributed as dist
from omegaconf import DictConfig

from pipeline import decoded_shards, files
from pipeline.errors import ConfigError, DataError, DiskFull
from pipeline.fingerprints import fingerprint, fingerprinted_stats
from pipeline.recipe_contract import check_prepared

META_FILE = "meta.json"
CHECKSUM_FILE = "checksums.json"  # {file: {size, sha256}} of every shard file, written with the shards
# Shards up to this size are hashed in full each time they are reused (a fraction of a run's start-up);
# larger ones get their sizes checked on every load, a full hash with `launch/prepare.py --verify`, and one
# whenever a file fails to load.
FULL_CHECK_BYTES = 128 * 2**20
NAMED_FILES = 3  # raw files a "preparing ... from" line names one by one; more are counted in their folder
# Waiting for another process's prepare: no practical limit (a process that dies closes its connections,
# which ends the wait with an error), and a line in the log every REPORT_EVERY_S.
WAIT_LIMIT = timedelta(days=7)
REPORT_EVERY_S = 60


def shards_dir(recipe, cfg: DictConfig, fingerprinted: str | None = None) -> Path:
    """<data.cache_dir>/<recipe>/<fingerprint>; `fingerprinted`: the fingerprint, computed before."""
    return Path(cfg.data.cache_dir) / recipe.name / (fingerprinted or fingerprint(recipe, cfg))


def prepare(recipe, cfg: DictConfig, state=None, log=print, rebuild: bool = False, fingerprinted=None) -> Path:
    """Builds the recipe's shards unless they exist (or `rebuild`); returns their directory. `fingerprinted`:
    the fingerprint, if the caller computed it (on the main process; the others never need it).

    Reused shards are checked against the checksums written with them (see `check_shards`), so a damaged
    cache stops here, before any run directory exists. Under several processes (`state`: an accelerate
    PartialState or Accelerator) see `_prepare_together`.
    """
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # per-shard bars are noise in a job's log
    if state is None or state.num_processes == 1:
        return _build(recipe, cfg, shards_dir(recipe, cfg, fingerprinted), log, rebuild)
    return _prepare_together(recipe, cfg, state, log, rebuild, fingerprinted)


def _build(recipe, cfg: DictConfig, out: Path, log, rebuild: bool = False, share=None) -> Path:
    """The shards in `out`: checked and reused if they exist, else prepared from the raw files and saved.
    `share(folder, splits, jobs)`: has the other processes write their part of the splits to decode."""
    if rebuild and out.exists():
        log(f"data: removing {out} to rebuild it")
        shutil.rmtree(out)
    if (out / META_FILE).exists():
        check_shards(out, full=_size(out) <= FULL_CHECK_BYTES)
        log(f"data: reusing shards in {out}")
        return out
    log(f"data: preparing {recipe.name} from {_source(recipe, cfg)} -> {out}")
    with files.scratch(out):  # where the recipe's datasets.map writes what it decodes
        # The recipe's return value checked (and meta made JSON-able) before anything is written.
        splits, meta = check_prepared(recipe, recipe.prepare(cfg), cfg)
        _save(splits, meta, out, Saving(cfg.data.num_shards, cfg.data.num_proc, share), log)
    log(f"data: wrote {', '.join(f'{k} {len(v):,}' for k, v in splits.items())} rows to {out}")
    return out


def _source(recipe, cfg: DictConfig) -> str:
    """The raw files a prepare reads, as a person recognizes them: the files by name where there are a few, or
    the folder holding them with their count and size (the stats the fingerprint was made from); data.root
    where this process was sent the fingerprint and never listed them."""
    stats, root = fingerprinted_stats(recipe, cfg, walk=False), str(cfg.data.root)
    if stats is None:
        return root
    if not stats:
        return "no files (the recipe generates its data)"
    if len(stats) <= NAMED_FILES:  # a table and the run's statistics file, each by name
        return ", ".join(str(Path(root, rel)) for rel, _, _ in stats)
    # The folders the files are in, a handful however many files: their common path is the files'.
    folders = [os.path.join(root, folder) for folder in {os.path.dirname(rel) for rel, _, _ in stats}]
    try:
        common = os.path.commonpath(folders)
    except ValueError:  # absolute and relative folders: named from /
        common = os.path.commonpath([os.path.abspath(folder) for folder in folders])
    return f"{common} ({len(stats):,} files, {files.size_text(sum(s for _, s, _ in stats))})"


def _prepare_together(recipe, cfg: DictConfig, state, log, rebuild: bool, fingerprinted: str | None) -> Path:
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
            share = Sharing(state, group, log, cfg.data.num_proc)
            first = [_attempt(lambda: _build(recipe, cfg, shards_dir(recipe, cfg, fingerprinted), log, rebuild, share))]
            dist.broadcast_object_list(first, src=0, group=group)
        else:  # a part of the shard files to write, if process 0 hands them out, then its outcome
            first = _take_part(state, group, cfg.data.num_proc)
        # The folder's name, not its path: a node-local cache_dir may be given differently on each node.
        out = shards_dir(recipe, cfg, _outcome(first[0], "process 0", own=state.is_main_process).name)
        node = (
            _attempt(lambda: _build(recipe, cfg, out, log))
            if state.is_local_main_process and not state.is_main_process
            else None
        )
        nodes = [None] * state.num_processes
        with _waiting(
            "process 0 waiting for the other nodes' main processes to check or prepare their shards",
            speak=state.is_main_process,
        ):
            dist.all_gather_object(nodes, node, group=group)
        for index, outcome in enumerate(nodes):
            if outcome is not None:
                _outcome(outcome, f"process {index}", own=index == state.process_index)
        return out
    finally:
        dist.destroy_process_group(group)


# The splits to decode, as process 0 hands them to the others (beside the shards they write).
PLAN_FILE = ".plan.pickle"


@dataclass(frozen=True)
class Sharing:
    """Process 0's side of a shared build (`Saving.share`), with the launch's processes (`state`), the gloo
    `group` they wait on, where it says what it does (`log`) and its own `workers` (data.num_proc)."""

    state: object
    group: object
    log: object
    workers: int | None

    def __call__(self, folder: Path, splits: dict, todo: list) -> tuple[list, dict]:
        return _share(self, folder, splits, todo)


def _share(how: Sharing, folder: Path, splits: dict, todo: list) -> tuple[list, dict]:
    """Process 0's side of a shared build: the splits to decode go to every process (through `folder`, which
    they all see on a shared filesystem), each writes and hashes its share of the shard files, and process 0
    is left the shares of processes that cannot see `folder` (another node's cache, where the cache is
    node-local). Returns those jobs, and the checksums of the files written."""
    state, group, log, workers = how.state, how.group, how.log, how.workers
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
    left, sums = [], {}
    for index, result in enumerate(outcomes):
        if result == ("unseen", None):
            left += decoded_shards.mine(todo, index, state.num_processes)
        else:
            sums |= _outcome(result, f"process {index}", own=index == 0)
    if left:
        log(
            f"data: {len(left)} shard files left by processes that cannot see {folder} (a node-local cache): "
            f"written here"
        )
    return left, sums


def _take_part(state, group, workers) -> list:
    """The other processes' side of a build: the shard files process 0 hands them, until it sends its outcome."""
    while True:
        message = [None]
        first_on_node = state.local_process_index == (1 if state.process_index == state.local_process_index else 0)
        with _waiting(
            f"process {state.process_index} waiting for process 0 to prepare the shards", speak=first_on_node
        ):
            dist.broadcast_object_list(message, src=0, group=group)
        if message[0][0] != "plan":
            return message
        folder = Path(message[0][1])
        outcome = ("unseen", None)
        if (folder / PLAN_FILE).exists():
            outcome = _attempt(functools.partial(_write_part, folder, state, workers))
        dist.all_gather_object([None] * state.num_processes, outcome, group=group)


def _write_part(folder: Path, state, workers) -> dict:
    splits, todo = pickle.loads((folder / PLAN_FILE).read_bytes())
    return decoded_shards.write_shards(
        splits, decoded_shards.mine(todo, state.process_index, state.num_processes), folder, workers
    )


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
    raise RuntimeError(
        f"{who} failed while preparing the shards ({type(value).__name__}: {value}); its output above has the traceback"
    ) from value


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
    share: object = None  # share(folder, splits, jobs) -> (the jobs left to this process, checksums written)


def _write_splits(splits: dict, folder: Path, saving: Saving, fingerprint: str) -> dict:
    """DatasetDict.save_to_disk's layout: the rows a recipe made written by this process, or moved into place
    as the recipe wrote them; the splits to decode shard by shard, by this process's workers or shared with the
    other processes. Returns the checksums of the files written by the recipe and the decoders (their writers
    hash them)."""
    sums = {}
    for name, split in splits.items():
        if isinstance(split, datasets.Dataset):
            split.save_to_disk(str(folder / name), num_shards=decoded_shards.shard_count(split, saving.num_shards))
        elif isinstance(split, decoded_shards.Written):
            shutil.move(split.folder, folder / name)  # a rename: the recipe's scratch folder lies beside the shards
            sums |= {f"{name}/{file}": sum_ for file, sum_ in split.sums.items()}
    todo = decoded_shards.jobs(splits, saving.num_shards)
    if todo and saving.share is not None:
        todo, shared = saving.share(folder, splits, todo)
        sums |= shared
    sums |= decoded_shards.write_shards(splits, todo, folder, saving.workers)
    for name, split in splits.items():
        if isinstance(split, (decoded_shards.Undecoded, decoded_shards.Written)):
            decoded_shards.finish_split(split, name, saving.num_shards, folder, fingerprint)
    (folder / datasets.config.DATASETDICT_JSON_FILENAME).write_text(json.dumps({"splits": list(splits)}))
    return sums


def _save(splits: dict, meta: dict, out: Path, saving: Saving, log=print) -> None:
    # Written beside the target and renamed into place, so a crash never leaves shards that look valid.
    out.parent.mkdir(parents=True, exist_ok=True)
    files.remove_dead_leftovers(out, log)  # a killed build's half-written folder (they can be large)
    tmp = files.temporary_folder(out)
    try:
        written = _write_splits(splits, tmp, saving, out.name)
        (tmp / META_FILE).write_text(files.dumps(meta, indent=2))  # null for a non-finite number, as every JSON
        (tmp / files.OWNER_FILE).unlink()
        sums = {
            name: written.get(name) or {"size": p.stat().st_size, "sha256": files.sha256(p)}
            for p in _files(tmp)
            for name in [str(p.relative_to(tmp))]
        }
        (tmp / CHECKSUM_FILE).write_text(json.dumps(sums, indent=1))
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same shards first
            if not (out / META_FILE).exists():
                raise
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFull(
            f"disk full while writing the shards to {out.parent} ({e.strerror}); the partial shards "
            f"were removed.\nFix: free space there, or point data.cache_dir= at a larger disk"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)


def _size(out: Path) -> int:
    return sum(p.stat().st_size for p in _files(out))


def check_shards(out: Path, full: bool = False) -> int:
    """Compares the shard files with the sizes (and, if `full`, the sha256) recorded when they were
    written; raises a DataError naming the first bad file and the command that rebuilds them.
    Returns the bytes checked."""
    try:
        sums = json.loads((out / CHECKSUM_FILE).read_text())
    except (OSError, ValueError) as e:
        raise damaged(out, out / CHECKSUM_FILE, f"the list of checksums cannot be read ({e})") from None
    if not isinstance(sums, dict) or not all(
        isinstance(w, dict) and {"size", "sha256"} <= w.keys() for w in sums.values()
    ):
        raise damaged(
            out,
            out / CHECKSUM_FILE,
            "the list of checksums parses, but not as the {file: {size, sha256}} that prepare writes",
        )
    for name, want in sums.items():
        path = out / name
        if not path.is_file():
            raise damaged(out, path, "it is missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise damaged(out, path, f"{size:,} bytes, {want['size']:,} when written (truncated or overwritten)")
        if full and files.sha256(path) != want["sha256"]:
            raise damaged(out, path, "its sha256 differs from the one recorded when it was written (changed bytes)")
    return sum(w["size"] for w in sums.values())


def damaged(out: Path, path: Path, why: str) -> DataError:
    # Shards are a cache of the raw files: deleting them loses nothing, and the next run rebuilds them.
    return DataError(
        f"damaged shard file {path}: {why}.\nThese shards were not used. They are a cache built from the raw "
        f"files, so nothing is lost by rebuilding them.\nFix: rm -r '{out}' and run the same command again "
        f"(or add --rebuild to the same `python launch/prepare.py ...` command)."
    )


def split_rows(out: Path) -> dict[str, int]:
    """Each split's rows in `out` (its sizes checked first), counted one shard file at a time: reading a file's
    record batches maps its pages into this process until it is closed, so opening every file at once (as
    `open_shards` does) would count the whole set as this process's memory."""
    check_shards(out)
    rows = {}
    for name in json.loads((out / datasets.config.DATASETDICT_JSON_FILENAME).read_text())["splits"]:
        state = json.loads((out / name / datasets.config.DATASET_STATE_JSON_FILENAME).read_text())
        rows[name] = 0
        for file in state["_data_files"]:
            with pa.memory_map(str(out / name / file["filename"])) as source:
                rows[name] += pa.ipc.open_stream(source).read_all().num_rows
    return rows


def open_shards(out: Path) -> tuple[dict[str, datasets.Dataset], dict]:
    """The shards in `out`, memory-mapped. Their sizes are checked first; a file that fails to load
    is hashed in full, so corruption is named instead of surfacing as an Arrow error."""
    check_shards(out)
    try:
        splits = dict(datasets.load_from_disk(str(out)))  # the DatasetDict that _save wrote
        meta = json.loads((out / META_FILE).read_text())
        if not isinstance(meta, dict):
            raise damaged(
                out,
                out / META_FILE,
                f"it holds a JSON {type(meta).__name__}, not the object of facts "
                f"(classes, statistics) that prepare writes",
            )
        return splits, meta
    except Exception:
        check_shards(out, full=True)  # raises a DataError if a file was damaged
        raise  # the files are as written: not corruption, a real error

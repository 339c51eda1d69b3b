"""Data: a recipe's raw files -> Arrow shards on disk (once, keyed by a fingerprint) -> batches.

Prepared splits that fit in memory become one tensor per column (`Rows`); larger ones are read from their
memory-mapped shards a batch at a time (`Stream`). Both serve the same batches in the same order.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

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
    root = Path(cfg.data.root)
    for path in sorted(Path(p) for p in recipe.raw_files(cfg)):
        stat = path.stat()
        rel = path.relative_to(root) if path.is_relative_to(root) else path
        h.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def code_hash(recipe) -> str:
    """Hash of the source that makes the shards: the whole module that defines prepare() (the recipe's, unless
    prepare() is a `functools.partial` of a shared helper), and every project function or class it reaches
    (e.g. those in recipes/_helpers.py), so editing any of them rebuilds the shards.

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
            todo += [v for v in vars(obj).values() if inspect.isfunction(v)]
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


def shards_dir(recipe, cfg: DictConfig) -> Path:
    return Path(cfg.data.cache_dir) / recipe.name / fingerprint(recipe, cfg)


def prepare(recipe, cfg: DictConfig, state=None, log=print, rebuild: bool = False) -> Path:
    """Builds the recipe's shards unless they exist (or `rebuild`); returns their directory.

    Reused shards are checked against the checksums written with them (see `check`), so a damaged
    cache stops here, before any run directory exists. Under several processes the main process of
    each node builds while the others wait (the cache may be node-local), so the raw data is read
    once per node at most.
    """
    wait = nullcontext()
    if state is not None and state.num_processes > 1:  # an accelerate PartialState or Accelerator
        wait = _main_first(state)
    error = None
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # per-shard bars are noise in a job's log
    with wait:
        # A failure must still leave the context normally: the other processes wait at its barrier.
        try:
            out = shards_dir(recipe, cfg)
            if rebuild and out.exists():
                log(f"data: removing {out} to rebuild it")
                shutil.rmtree(out)
            if (out / META_FILE).exists():
                check(out, full=_size(out) <= FULL_CHECK_BYTES)
                log(f"data: reusing shards in {out}")
            else:
                log(f"data: preparing {recipe.name} from {cfg.data.root} -> {out}")
                # The recipe's return value checked (and meta made JSON-able) before anything is written.
                splits, meta = recipes.check_prepared(recipe, recipe.prepare(cfg), cfg)
                _save(splits, meta, out, cfg.data.num_shards)
                log(f"data: wrote {', '.join(f'{k} {len(v):,}' for k, v in splits.items())} rows to {out}")
        except Exception as e:
            error = e
    if error is not None:
        raise error
    return out


class _main_first:
    """Global main process first, then each node's main, then the rest (all ranks see one barrier each)."""

    def __init__(self, state):
        self.contexts = [state.main_process_first(), state.local_main_process_first()]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)


def _save(splits: datasets.DatasetDict, meta: dict, out: Path, num_shards: int) -> None:
    # Written beside the target and renamed into place, so a crash never leaves shards that look valid.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        splits.save_to_disk(str(tmp), num_shards={k: min(num_shards, max(1, len(v))) for k, v in splits.items()})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        sums = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(tmp)}
        (tmp / CHECKSUM_FILE).write_text(json.dumps(sums, indent=1))
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same shards first
            if not (out / META_FILE).exists():
                raise
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
        return splits, json.loads((out / META_FILE).read_text())
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
           step_batch: int | None = None, pin_memory: bool = False) -> DataLoader:
    """A DataLoader that fetches whole batches: the dataset's `__getitems__` slices all indices at once.

    Training drops the ragged last optimizer step's samples (`step_batch`, the global batch of an
    optimizer step, when micro-batches are accumulated): equal steps on every process, the same
    optimization with or without accumulation, no recompiles under torch.compile. Evaluation keeps
    every sample.
    """
    if train:
        step_batch = step_batch or batch_size
        used = len(dataset) - len(dataset) % step_batch
        # A generator of its own (ShuffledBatches draws the order; this one is never used): on more than one
        # process Accelerate seeds a sampler without one from the global stream, which then runs one draw
        # ahead of a single process's, and per-batch augmentation would differ between the two.
        generator = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(dataset, num_samples=used or len(dataset), generator=generator)
        batches = ShuffledBatches(sampler, batch_size, seed, device=getattr(dataset, "device", None))
    else:
        batches = BatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=False)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=_whole_batch, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=pin_memory)


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
    resumed run continues the order it left. Full batches only.
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
        yield from order[:usable].split(self.batch_size)
        self.epoch += 1  # the next pass is the next epoch, unless the loop says otherwise


def _whole_batch(batch: dict) -> dict:
    return batch  # __getitems__ already returns the batch as tensors

"""Data: a recipe's raw files -> Arrow shards on disk (once, keyed by a fingerprint) -> batches.

Prepared splits that fit in memory become one tensor per column and are indexed a batch at a time.
"""

from __future__ import annotations

import hashlib
import json
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

# Keys under `data.` that say where things are or how fast to work, not what the shards contain.
NOT_CONTENT = ("root", "cache_dir", "download", "num_proc", "num_workers", "on_device")
META_FILE = "meta.json"


class DataError(RuntimeError):
    """Raw data missing or unreadable; the message names the files and the fix."""


# ---------------------------------------------------------------- preparation and cache


def fingerprint(recipe, cfg: DictConfig) -> str:
    """Hash of the recipe, every preprocessing parameter and the raw files (path, size, mtime)."""
    params = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in NOT_CONTENT}
    h = hashlib.sha256(json.dumps({"recipe": recipe.name, "version": recipe.version, "data": params},
                                  sort_keys=True, default=str).encode())
    root = Path(cfg.data.root)
    for path in sorted(Path(p) for p in recipe.raw_files(cfg)):
        stat = path.stat()
        rel = path.relative_to(root) if path.is_relative_to(root) else path
        h.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def shards_dir(recipe, cfg: DictConfig) -> Path:
    return Path(cfg.data.cache_dir) / recipe.name / fingerprint(recipe, cfg)


def prepare(recipe, cfg: DictConfig, state=None, log=print) -> Path:
    """Builds the recipe's shards unless they exist; returns their directory.

    Under several processes the main process of each node builds while the others wait (the cache may
    be node-local), so the raw data is read once per node at most.
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
            if (out / META_FILE).exists():
                log(f"data: reusing shards in {out}")
            else:
                log(f"data: preparing {recipe.name} from {cfg.data.root} -> {out}")
                splits, meta = recipe.prepare(cfg)
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
        for name, split in splits.items():
            split.save_to_disk(str(tmp / name), num_shards=min(num_shards, max(1, len(split))))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same shards first
            if not (out / META_FILE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(out: Path) -> tuple[dict[str, datasets.Dataset], dict]:
    splits = {p.name: datasets.load_from_disk(str(p)) for p in sorted(out.iterdir()) if p.is_dir()}
    return splits, json.loads((out / META_FILE).read_text())


# ---------------------------------------------------------------- batches


def columns(split: datasets.Dataset) -> dict[str, torch.Tensor]:
    """Every column of a prepared split as one tensor, read straight from Arrow (no per-row Python)."""
    table = split.with_format("arrow")[:]
    out = {}
    for name, feature in split.features.items():
        arr = table.column(name).combine_chunks()
        if isinstance(arr.type, pa.ExtensionType):
            arr = arr.storage
        while pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type):
            arr = arr.flatten()
        with warnings.catch_warnings():  # Arrow buffers are read-only; nothing here writes to them
            warnings.simplefilter("ignore", UserWarning)
            values = torch.from_numpy(arr.to_numpy(zero_copy_only=False))
        out[name] = values.view(len(split), *_shape(feature)) if len(split) else values
    return out


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
        sampler = RandomSampler(dataset, num_samples=used or len(dataset))
        batches = ShuffledBatches(sampler, batch_size, seed, device=getattr(dataset, "device", None))
    else:
        batches = BatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=False)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=_whole_batch, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=pin_memory)


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


# ---------------------------------------------------------------- helpers for recipes


def split_train_eval(ds: datasets.Dataset, fraction: float, seed: int, stratify: str | None = "label"):
    """Holds out `fraction` of `ds` for evaluation, stratified by a ClassLabel column when given."""
    parts = ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)
    return parts["train"].flatten_indices(), parts["test"].flatten_indices()


def image_split(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> datasets.Dataset:
    """uint8 images [N, C, H, W] and int labels as a compact Arrow dataset."""
    features = datasets.Features({
        "image": datasets.Array3D(shape=tuple(images.shape[1:]), dtype="uint8"),
        "label": datasets.ClassLabel(names=class_names),
    })
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def torchvision_raw(dataset_cls, cfg: DictConfig, files: dict[str, str]) -> list[Path]:
    """The raw files of a torchvision data set under `<data.root>/<Name>/raw/`, `.gz` or not.

    Missing files are downloaded with `data.download=true`, otherwise a DataError says where to put
    them. Only-gzipped files are unpacked beside themselves, as torchvision's own download does.
    """
    from torchvision.datasets.utils import extract_archive

    raw = Path(cfg.data.root) / dataset_cls.__name__ / "raw"
    missing = [f for f in files.values() if not (raw / f).exists() and not (raw / f"{f}.gz").exists()]
    if missing and cfg.data.download:
        dataset_cls(cfg.data.root, train=True, download=True)
        dataset_cls(cfg.data.root, train=False, download=True)
        missing = [f for f in files.values() if not (raw / f).exists()]
    if missing:
        raise DataError(
            f"{dataset_cls.__name__} raw files missing in {raw.resolve()}: {', '.join(missing)} "
            f"(plain or .gz).\nFix: put {', '.join(files.values())} (or their .gz) there and point "
            f"data.root at the folder that holds {dataset_cls.__name__}/, "
            f"or add data.download=true on a machine with a network.")
    for f in files.values():
        if not (raw / f).exists():
            try:
                extract_archive(str(raw / f"{f}.gz"), str(raw))
            except OSError as e:
                raise DataError(f"cannot unpack {raw / f}.gz next to itself ({e}); unpack it by hand "
                                f"(gunzip -k) or make {raw} writable") from None
    return [raw / f for f in files.values()]


def torchvision_arrays(dataset_cls, cfg: DictConfig, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Whole-split uint8 images [N, 1, H, W] and labels, read by torchvision from the raw files."""
    ds = dataset_cls(cfg.data.root, train=train, download=False)
    return ds.data.unsqueeze(1).numpy(), ds.targets.numpy()


IDX_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_raw_files(dataset_cls, cfg: DictConfig) -> list[Path]:
    """MNIST-format raw files (MNIST, FashionMNIST) under `<data.root>/<Name>/raw/`."""
    return torchvision_raw(dataset_cls, cfg, IDX_FILES)


def idx_splits(dataset_cls, cfg: DictConfig) -> tuple[datasets.DatasetDict, dict]:
    """train files -> train/eval (stratified, `data.eval_fraction` held out); t10k files -> test."""
    classes = list(dataset_cls.classes)
    full = image_split(*torchvision_arrays(dataset_cls, cfg, train=True), classes)
    train, evaluation = split_train_eval(full, cfg.data.eval_fraction, cfg.data.split_seed)
    test = image_split(*torchvision_arrays(dataset_cls, cfg, train=False), classes)
    return datasets.DatasetDict(train=train, eval=evaluation, test=test), {"class_names": classes}

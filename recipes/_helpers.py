"""What several recipes share: train/eval splits, readers of raw files (torchvision's MNIST-format data sets,
image files, CSVs), the `[0, 1]` image scaling, accuracy metrics. The library core (pipeline/) knows none of it.

CSVs: nothing is dropped silently. Rows with bad cells stop the run, or are dropped with `data.drop_bad_rows=true`
and then counted on the console and in the prepared data's meta (kept with the run).
"""

from __future__ import annotations

import csv
import difflib
import gzip
import itertools
import json
import math
import os
import shutil
import socket
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import pandas as pd
import torch
from datasets.fingerprint import generate_random_fingerprint
from datasets.table import InMemoryTable
from omegaconf import DictConfig
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from pipeline import files
from pipeline.config import DataConfig
from pipeline.data import DataError
from pipeline.recipe import Recipe

# ---------------------------------------------------------------- splits, torchvision's raw files

def split_train_eval(ds: datasets.Dataset, fraction: float, seed: int, stratify: str | None = "label"):
    """Holds out `fraction` of `ds` for evaluation, stratified by a ClassLabel column when given: the rows
    `Dataset.train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)` holds out, the same
    rows by the same functions and generator, but faster: datasets 5 reads the stratify labels through a Column
    one row at a time (150 us a row) and copies the parts out row by row (flatten_indices)."""
    from datasets.utils.stratify import stratified_shuffle_split_generate_indices

    held = math.ceil(fraction * len(ds))
    rng = np.random.default_rng(seed)
    if stratify is None:
        order = rng.permutation(len(ds))
        return _take(ds, order[held:]), _take(ds, order[:held])
    if not isinstance(ds.features[stratify], datasets.ClassLabel):
        raise ValueError(f"stratifying needs a ClassLabel column; {stratify} is {type(ds.features[stratify]).__name__}")
    labels = ds.with_format("numpy", columns=[stratify])[:][stratify]
    try:
        train, held_out = next(stratified_shuffle_split_generate_indices(labels, len(ds) - held, held, rng=rng))
    except ValueError as e:  # worded as datasets words it
        if str(e) == "Minimum class count error":
            raise ValueError(f"The least populated class in {stratify} column has only 1 member, which is too few. "
                             f"The minimum number of groups for any class cannot be less than 2.") from None
        raise
    return _take(ds, train), _take(ds, held_out)


def _take(ds: datasets.Dataset, indices: np.ndarray) -> datasets.Dataset:
    """The rows of `ds` at `indices`, stored in that order: one Arrow take for a dataset in memory (2 ms for
    160,000 rows, against 5.7 s for select + flatten_indices); flatten_indices, which writes to the cache
    rather than memory, for one on disk (decoded images) or one that is itself a selection."""
    if ds.cache_files or ds._indices is not None:
        return ds.select(indices).flatten_indices()
    # A fresh fingerprint: without one the constructor hashes the whole table (1 s for 160,000 rows).
    return datasets.Dataset(InMemoryTable(ds.data.table.take(indices)), info=ds.info.copy(),
                            fingerprint=generate_random_fingerprint())


def image_split(images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> datasets.Dataset:
    """uint8 images [N, C, H, W] and int labels as a compact Arrow dataset."""
    features = datasets.Features({
        "image": datasets.Array3D(shape=tuple(images.shape[1:]), dtype="uint8"),
        "label": datasets.ClassLabel(names=class_names),
    })
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def torchvision_raw(dataset_cls, cfg: DictConfig, files: dict[str, str]) -> list[Path]:
    """The raw files of a torchvision data set under `<data.root>/<Name>/raw/`, each plain or `.gz`.

    Missing files are downloaded with `data.download=true`; otherwise, or when the download fails, a
    DataError lists the files and where they go. Nothing here writes to the data folder except a
    download, and that only adds whole files (see `download`).
    """
    raw = Path(cfg.data.root) / dataset_cls.__name__ / "raw"
    missing = [f for f in files.values() if _raw_path(raw, f) is None]
    if missing and cfg.data.download:
        mirrors = getattr(dataset_cls, "mirrors", [])
        sources = dict(dataset_cls.resources)
        download([(f"{f}.gz", [m + f"{f}.gz" for m in mirrors], sources.get(f"{f}.gz")) for f in missing], raw,
                 f"{dataset_cls.__name__} raw files")
        missing = [f for f in files.values() if _raw_path(raw, f) is None]
    if missing:
        raise DataError(
            f"{dataset_cls.__name__} raw files missing in {raw.resolve()}: {', '.join(missing)} "
            f"(plain or .gz).\nFix: put {', '.join(files.values())} (or their .gz) there and point "
            f"data.root at the folder that holds {dataset_cls.__name__}/, "
            f"or add data.download=true on a machine with a network.")
    paths = [_raw_path(raw, f) for f in files.values()]
    for path in paths:
        readable_file(path, f"the {dataset_cls.__name__} raw file {path.name}")
    return paths


def _raw_path(raw: Path, name: str) -> Path | None:
    """The plain file if it exists (as torchvision reads it), else its .gz, else None."""
    for path in (raw / name, raw / f"{name}.gz"):
        if path.exists():
            return path
    return None


def readable_file(path: Path, what: str) -> None:
    """A DataError unless `path` is a file this process can open (a folder or unreadable file is named)."""
    if path.is_dir():
        raise DataError(f"{path} is a folder, but {what} belongs there.\nFix: move that folder away and put the "
                        f"file there.")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}).\nFix: make it readable (chmod a+r) or replace it "
                        f"with a good copy.") from None


def download(files: list[tuple[str, list[str], str | None]], folder: Path, what: str, timeout: float = 10) -> None:
    """Fetches each (name, urls, md5) into `folder` with torchvision's `download_url`, trying its URLs in order.

    Each file is downloaded into a temporary folder elsewhere, checked, then copied beside its target
    and renamed into place, so a failed or interrupted download leaves the data folder as it was. The
    first file that cannot be had from any URL stops with one message; `timeout` bounds each network
    wait, so without a network this fails in seconds.
    """
    from http.client import HTTPException
    from urllib.error import URLError

    from torchvision.datasets.utils import download_url

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # torchvision's urlopen calls take no timeout of their own
    try:
        for name, urls, md5 in files:
            errors = []
            with tempfile.TemporaryDirectory(prefix="download-") as tmp:
                for url in urls:
                    try:
                        download_url(url, tmp, filename=name, md5=md5)
                    except (URLError, HTTPException, OSError, RuntimeError) as e:  # RuntimeError: md5 mismatch
                        errors.append(f"{url}: {getattr(e, 'reason', e)}")
                        continue
                    _place(Path(tmp) / name, folder / name)
                    break
            if len(errors) == len(urls):
                sources = sorted({u[0].rsplit("/", 1)[0] + "/" for _, u, _ in files if u})
                raise DataError(
                    f"data.download is on, but {what} could not be downloaded ({'; '.join(errors) or 'no URL known'})."
                    f"\nFix: put {', '.join(n for n, _, _ in files)} in {folder.resolve()} (from a machine with "
                    f"a network, e.g. from {', '.join(sources)}), or check the network and proxy; "
                    f"data.download=false stops trying.")
    finally:
        socket.setdefaulttimeout(previous)


def _place(src: Path, target: Path) -> None:
    """Copies a finished download into the data folder under a temporary name of its own, then renames it into
    place: two machines downloading into one shared folder never mix their bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as source, files.replacing(target, "wb") as out:
        shutil.copyfileobj(source, out)


def read_idx(path: Path, reader) -> torch.Tensor:
    """An IDX file read by torchvision's `reader`; a `.gz` is unpacked to a temporary file, never beside itself."""
    if path.suffix != ".gz":
        try:
            return reader(str(path))
        except Exception as e:  # any parse failure of a user's file means the file is bad
            raise DataError(f"{path} is not a readable IDX file ({type(e).__name__}: {e}).\nFix: replace it with "
                            f"a good copy, or delete it if its .gz is beside it (the .gz is read then).") from None
    with tempfile.TemporaryDirectory(prefix="idx-") as tmp:
        plain = Path(tmp) / path.stem
        with unpacking(path, tmp), gzip.open(path) as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst, 2**20)
        return read_idx(plain, reader)


@contextmanager
def unpacking(archive: Path, folder: str, source: str = ""):
    """A failure to unpack `archive` (.gz or .zip) into the temporary `folder` as a DataError with the fix;
    `source`: where a good copy comes from, if worth naming."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zipfile.BadZipFile, zlib.error) as e:  # before OSError: BadGzipFile is one
        raise DataError(f"{archive} is damaged ({e}): a truncated or interrupted download?\nFix: replace it with a "
                        f"good copy{source}, or delete it and run again with data.download=true to fetch it anew. "
                        f"The data folder was not changed.") from None
    except OSError as e:
        raise DataError(f"cannot unpack {archive} into the temporary folder {folder} ({e}).\nFix: free space there "
                        f"or point TMPDIR at a folder with room.") from None


def torchvision_arrays(dataset_cls, cfg: DictConfig, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Whole-split uint8 images [N, 1, H, W] and labels, read by torchvision's IDX readers from the raw files."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    paths = dict(zip(IDX_FILES, torchvision_raw(dataset_cls, cfg, IDX_FILES), strict=True))
    split = "train" if train else "test"
    images_file, labels_file = paths[f"{split}_images"], paths[f"{split}_labels"]
    images, labels = read_idx(images_file, read_image_file), read_idx(labels_file, read_label_file)
    if len(images) != len(labels):
        raise DataError(f"{images_file} holds {len(images):,} images but {labels_file} {len(labels):,} labels."
                        f"\nFix: use the two files of one release (replace the one that does not belong).")
    return images.unsqueeze(1).numpy(), labels.numpy()


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



def idx_recipe(dataset_cls, **fields) -> Recipe:
    """A recipe over an MNIST-format torchvision data set (MNIST, FashionMNIST): the train files split into
    train/eval, the t10k files as test, pixels scaled to [0, 1], 10-class accuracy, and missing raw files
    downloaded as the tutorials' `download=True` does. `fields` are the other Recipe fields and may override these.
    """
    defaults = fields.pop("defaults", {})
    return Recipe(**{"prepare": partial(idx_splits, dataset_cls), "raw_files": partial(idx_raw_files, dataset_cls),
                     "metrics": class_accuracy, "transform": scale_images,
                     # new images as the IDX files hold them: grayscale 28x28, uint8
                     "read_inputs": partial(image_inputs, size=28, channels=1),
                     "defaults": {**defaults, "data": {"download": True, **defaults.get("data", {})}}, **fields})


# ---------------------------------------------------------------- image files -> uint8 rows


def image_rows(paths: list[str], labels: dict[str, tuple[list[int], list[str]]], read: Callable, channels: int,
               cfg) -> datasets.Dataset:
    """Image files -> a dataset of uint8 images [channels, data.image_size, data.image_size] beside their labels.

    labels: {column: (one class index per file, class names)}. read(path) -> a uint8 tensor [C, H, W], raising a
    DataError that names a file it cannot decode. Decoding runs once, here (in `data.num_proc` processes), never
    while training. Batches of 64 files: the photos are decoded at full size before they are resized.
    """
    size = cfg.data.image_size
    classes = {name: datasets.ClassLabel(names=names) for name, (_, names) in labels.items()}
    files = datasets.Dataset.from_dict({"path": paths, **{name: rows for name, (rows, _) in labels.items()}},
                                       features=datasets.Features({"path": datasets.Value("string"), **classes}))
    features = datasets.Features({**classes, "image": datasets.Array3D(shape=(channels, size, size), dtype="uint8")})
    return files.map(_load_batch, batched=True, batch_size=64, num_proc=cfg.data.num_proc,
                     fn_kwargs={"size": size, "read": read}, remove_columns=["path"], features=features)


def _load_batch(batch: dict, size: int, read: Callable) -> dict:
    return {"image": load_images(batch["path"], size, read)}


def load_images(paths: list[str], size: int, read: Callable) -> np.ndarray:
    """uint8 images [N, C, size, size]: what prepare() stores and prediction reads, by this one function.

    As the tutorials' Resize((size, size)): squashed, not cropped, so no part of the image is lost.
    """
    return np.stack([v2.functional.resize(read(path), [size, size], antialias=True).numpy() for path in paths])


# PIL refuses more pixels than this as a possible decompression bomb (and warns above half of it): the default
# of data.max_image_pixels, checked here instead, so that the message names the file and the setting.
PIL_MAX_PIXELS = 2 * 89_478_485


def read_image(path: str, channels: int = 3, max_pixels: int | None = None) -> torch.Tensor:
    """ImageFolder's reader (PIL, converted to RGB; to grayscale L for 1 channel) as a uint8 tensor [C, H, W];
    an image of more than `max_pixels` pixels (default PIL's limit) is a DataError naming data.max_image_pixels."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the size is checked below, against the run's own limit
    limit = max_pixels or PIL_MAX_PIXELS
    try:
        with open(path, "rb") as f:
            image = Image.open(f)  # reads the header only
            pixels = image.width * image.height
            if pixels <= limit:
                return v2.functional.pil_to_tensor(image.convert("L" if channels == 1 else "RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise DataError(f"not a readable image: {path} ({type(e).__name__}: {e}).\nFix: delete or replace "
                        f"that file (a folder of images must hold only images), then run again.") from None
    raise DataError(f"{path} is {image.width}x{image.height} = {pixels:,} pixels, more than the {limit:,} allowed "
                    f"(data.max_image_pixels; PIL's guard against decompression bombs).\nFix: if the image is "
                    f"yours, allow it: data.max_image_pixels={pixels}; or shrink or remove it.")


def image_tree(folder: str | Path, top: str | Path | None = None) -> list[tuple[str, str | None]]:
    """(path, real path) of every file with an image extension in `folder` and its subfolders, in ImageFolder's
    order; the real path only for a file reached through a symlink (any other is where its path says). A symlinked
    folder is followed unless it leads back into `top` (default `folder`) or above it, or up the folders walked
    to reach it: its files are listed already, or it is a loop that would list them again and again
    (`red/loop -> ..` labelled every image red, many times)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    top = os.path.realpath(top or folder)
    walked = []

    def walk(path: str, real: str, chain: tuple[str, ...], linked: bool) -> None:
        files = []
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if entry.is_dir() and not any(_within(target, d) or _within(d, target) for d in (top, *chain)):
                        walk(entry.path, target, (*chain, target), True)
                    elif not entry.is_dir() and entry.name.lower().endswith(IMG_EXTENSIONS):  # broken: named
                        files.append((entry.path, target))
                elif entry.is_dir():
                    walk(entry.path, os.path.join(real, entry.name), chain, linked)
                elif entry.name.lower().endswith(IMG_EXTENSIONS):
                    files.append((entry.path, os.path.join(real, entry.name) if linked else None))
        walked.append((path, sorted(files)))

    real = os.path.realpath(folder)
    walk(str(folder), real, (real,), real not in (top, os.path.join(top, os.path.basename(folder))))
    return [file for _, files in sorted(walked) for file in files]


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def image_files(path: Path) -> tuple[Path, list[Path]]:
    """(the folder ids are relative to, the image files): a file as given, or every file with an image extension
    (ImageFolder's list) in a folder and its subfolders, sorted; other files are skipped, as ImageFolder does."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if path.is_file():
        return path.parent, [path]
    files = sorted(Path(p) for p, _ in image_tree(path))
    if not files:
        raise DataError(f"{path} holds no image files ({', '.join(IMG_EXTENSIONS)}), in it or its subfolders.\n"
                        f"Fix: point input= at an image file or a folder of images.")
    return path, files


# Images decoded at a time when predicting: a folder of any size takes the memory of this many
# (1024 x 3 x 128 x 128 bytes: 48 MiB).
PREDICT_CHUNK = 1024


def image_inputs(cfg, meta: dict, path, size: int | None = None, channels: int | None = None,
                 levels: int = 255, chunk: int = PREDICT_CHUNK) -> Iterator[tuple[dict, dict]]:
    """A Recipe.read_inputs for image recipes: an image file, or a folder of them (searched recursively), read
    and resized by `load_images` as the shards hold them, `chunk` files at a time. size/channels: the shards'
    (default data.image_size, data.channels); levels: the shards' white (255, or e.g. 16 for scikit-learn's
    digits). The files are listed here (a missing or empty folder is named at once), read as the chunks are."""
    size, channels = size or cfg.data.image_size, channels or cfg.data.channels
    root, files = image_files(Path(path))
    read = partial(read_image, channels=channels, max_pixels=cfg.data.get("max_image_pixels"))
    return _image_chunks(root, files, size, read, levels, chunk)


def _image_chunks(root: Path, files: list[Path], size: int, read: Callable, levels: int, chunk: int):
    for start in range(0, len(files), chunk):
        part = files[start:start + chunk]
        images = load_images([str(f) for f in part], size, read)
        if levels != 255:
            images = np.rint(images * (levels / 255)).astype(np.uint8)
        yield {"file": [f.relative_to(root).as_posix() for f in part]}, {"image": images}


# ---------------------------------------------------------------- per batch, metrics


def unit_scale(image: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1], as ToTensor does, for a whole batch on its device."""
    return image.float().div_(255.0)


def scale_images(batch: dict, train: bool, meta: dict) -> dict:
    """A Recipe.transform: the batch's uint8 `image` column as float in [0, 1]."""
    return {**batch, "image": unit_scale(batch["image"])}


def accuracy(classes: int) -> MetricCollection:
    return MetricCollection({"accuracy": MulticlassAccuracy(classes, average="micro")})


def class_accuracy(cfg, meta: dict) -> dict:
    """A Recipe.metrics: the accuracy of the one head over meta["class_names"]."""
    return {"": accuracy(len(meta["class_names"]))}


# ---------------------------------------------------------------- CSV files


SHOWN = 5  # bad cells named per problem; the count covers them all
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the shards store float32: 1e39 would become inf there
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
        raise DataError(f"data.statistics={path}: cannot read it ({e}).\nFix: name a run's meta.json, or leave "
                        f"data.statistics unset to fit the statistics on this data's train rows.") from None
    missing = [k for k in keys if k not in meta]
    if missing:
        raise DataError(f"data.statistics={path} holds no {', '.join(missing)}: it is not the meta.json of a run of "
                        f"this recipe as this code trains it (another recipe's, or a run from an older version)."
                        f"\nFix: name the meta.json of such a run (retrain an old one), or leave data.statistics "
                        f"unset.")
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


class Column(NamedTuple):  # a NamedTuple: plain data, no generated methods for the code fingerprint to read
    name: str  # the header's name; in a file read by position, the name used in messages
    kind: str = "number"  # number | label | time | category (text kept as is, e.g. a color or a class name)
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


def read(cfg, path: Path, columns: list[Column], enough: Callable[[int], bool], split: str, header: bool | None = True,
         rename: str = "", source: str = "data.root / data.file") -> tuple[pd.DataFrame, dict]:
    """The columns of a CSV, checked cell by cell: numbers as float64 (NaN where empty and `empty_ok`),
    labels as int64, times as datetime64. Also returns the facts to keep in meta (rows read, dropped);
    `table.attrs["lines"]` holds each kept row's line number in the file.

    enough(rows) says whether the recipe can split that many rows into train and eval; `split` says how
    it splits, for the message. header=True: the first row names the columns; header=None: optional,
    columns taken by position. `rename`: the keys that choose other column names, if any. `source`: what names
    the file, for messages (`input=` when predicting).
    """
    path = path.resolve()
    if header is True:
        _require_unique_names(path, columns, source)
    # A clean file is read by Arrow in one pass, to the same table; any other is checked cell by cell.
    table = _read_clean(path, columns) if header is True else None
    if table is not None:
        report = {"rows_read": len(table), "rows_dropped": 0}
    else:
        table, report = _read_checked(cfg, path, columns, header, rename, source)
    require_rows(path, len(table), enough, f"to split into train and eval {split}")
    _require_values(path, table, columns)
    return table, report


def _read_checked(cfg, path: Path, columns: list[Column], header: bool | None, rename: str,
                  source: str) -> tuple[pd.DataFrame, dict]:
    """`read`'s table, cell by cell: each bad cell found and named, or its row dropped (data.drop_bad_rows)."""
    records = _records(path, source)
    positions, width = list(range(len(columns))), None  # by position, unless the header names them
    if header or (header is None and _is_header(records[0][1], columns)):
        line, names = records.pop(0)
        if header:
            positions, width = _positions(path, line, [n.strip() for n in names], columns, rename, source), len(names)
        if not records:
            raise DataError(f"{path} has a header (line {line}) but no data rows.\nFix: add the data rows, "
                            f"or point {source} at the full CSV.")
    lines = np.array([line for line, _ in records])
    table, problems = _parse(path, records, columns, positions, width)
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
    # Each row's line in the file, to name it (predictions). An array: pandas deep-copies attrs into every
    # column it hands out, and a list of a million ints took seconds a copy.
    table.attrs["lines"] = lines[~bad]
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


def _read_clean(path: Path, columns: list[Column]) -> pd.DataFrame | None:
    """A CSV with a header read by pyarrow in one pass (1,000,000 rows of 10 numbers: ~1 s and the memory of the
    values, against ~20 s and 2 GB cell by cell), when it needs none of the checks' verdicts: every cell of the
    columns reads as its kind, no cell is empty where a value is needed, no number is beyond float32, no text has
    surrounding spaces, and line i + 2 holds row i (no blank lines, no quoted newlines). Anything else, and
    every file the checks would refuse, returns None: `read` then checks cell by cell and names the problem."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyarrow import csv as pa_csv

    if path.suffix.lower() in (".parquet", ".pq") or not path.is_file() or any(c.kind == "time" for c in columns):
        return None
    kinds = {c.name: pa.string() if c.kind == "category" else pa.float64() for c in columns}
    try:
        arrow = pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(newlines_in_values=False),
                                convert_options=pa_csv.ConvertOptions(
                                    column_types=kinds, include_columns=list(kinds), null_values=[""],
                                    strings_can_be_null=True, quoted_strings_can_be_null=True))
    except (pa.ArrowException, OSError, UnicodeError):
        return None
    if arrow.num_rows == 0 or _newlines(path) != arrow.num_rows + 1:  # blank lines or quoted newlines
        return None
    empty = {c.name: arrow.column(c.name).is_null().to_numpy(zero_copy_only=False) for c in columns}
    if np.logical_and.reduce(list(empty.values())).any():  # a row empty in every column read: maybe a blank one
        return None
    table = {}
    for column in columns:
        values, given = arrow.column(column.name), ~empty[column.name]
        if not given.all() and (not column.empty_ok or column.kind == "label"):
            return None
        if column.kind == "category":
            if pc.any(pc.not_equal(values, pc.utf8_trim_whitespace(values))).as_py():
                return None
            text = values.to_numpy(zero_copy_only=False)
            if column.values and not np.isin(text[given], column.values).all():
                return None
            text[~given] = ""
            table[column.name] = text
            continue
        numbers = values.to_numpy(zero_copy_only=False).astype(np.float64)  # NaN where empty
        if not (np.abs(numbers[given]) <= FLOAT32_MAX).all():  # a cell of inf, nan or beyond float32
            return None
        if column.values and not np.isin(numbers[given], column.values).all():
            return None
        table[column.name] = numbers.astype(np.int64) if column.kind == "label" else numbers
    table = pd.DataFrame(table)
    table.attrs["lines"] = np.arange(2, len(table) + 2)
    return table


def _require_unique_names(path: Path, columns: list[Column], source: str) -> None:
    """A column read by a name the header gives twice: both readers would take the first one and never read the
    other, so the model would be fed one column twice."""
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception:  # unreadable: _records names the problem with its fix
            return
    else:
        names = [n.strip() for n in _records(path, source, limit=1)[0][1]]
    wanted = {c.name for c in columns}
    twice = {name: [i + 1 for i, n in enumerate(names) if n == name] for name in dict.fromkeys(names) if name in wanted}
    twice = {name: at for name, at in twice.items() if len(at) > 1}
    if twice:
        shown = "; ".join(f"{name!r} at columns {', '.join(map(str, at))}" for name, at in twice.items())
        raise DataError(f"{path}: the header names {len(twice)} column{'s' * (len(twice) != 1)} more than once: "
                        f"{shown}. Only the first of each would be read.\nFix: give every column its own name in "
                        f"the header (rename or delete the copies), then run again.")


def _newlines(path: Path) -> int:
    """The file's lines (a last line without a newline counts)."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            count, last = count + block.count(b"\n"), block[-1:]
    return count + (last != b"\n")


def _records(path: Path, source: str = "data.root / data.file",
             limit: int | None = None) -> list[tuple[int, list[str]]]:
    """Non-blank rows (the first `limit` of them) with the 1-based line number an editor shows (csv.reader counts
    quoted newlines). A Parquet file's rows come as text too, numbered as the same table written as CSV would be."""
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a CSV or Parquet file.\nFix: point {source} at the file.")
    if path.suffix.lower() in (".parquet", ".pq"):
        return _parquet_records(path, source)[:limit]
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes).\nFix: copy the CSV again (an interrupted download or copy "
                        f"leaves an empty file), or point {source} at the full CSV.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
            reader = csv.reader(f)
            rows = ((reader.line_num, row) for row in reader if "".join(row).strip())  # blank rows skipped
            records = list(itertools.islice(rows, limit))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}): is it a CSV?\nFix: save it as CSV, UTF-8, "
                        f"or point {source} at the CSV.") from None
    except OSError as e:  # e.g. no read permission
        raise DataError(f"{path} cannot be read ({e.strerror}).\nFix: make it readable (chmod +r) or copy it "
                        f"somewhere readable and point {source} there.") from None
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: not readable as CSV ({e}).\nFix: repair that line.") from None
    if not records:
        raise DataError(f"{path} has only blank lines.\nFix: copy the CSV again or point {source} at the full CSV.")
    return records


def _parquet_records(path: Path, source: str) -> list[tuple[int, list[str]]]:
    """The header and rows of a Parquet file as text cells (repr of a float reads back exactly; null -> empty),
    so its cells are checked by the same rules as a CSV's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path).read()  # read_table refuses a name given twice: `read` names it
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0]}).\nFix: copy it again, "
                        f"or point {source} at the CSV or Parquet file.") from None
    columns = [["" if v is None else str(v) for v in column.to_pylist()] for column in table.columns]
    return [(1, table.column_names), *((i + 2, list(row)) for i, row in enumerate(zip(*columns)))]


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


def _positions(path: Path, line: int, names: list[str], columns: list[Column], rename: str, source: str) -> list[int]:
    missing = [c.name for c in columns if c.name not in names]
    if missing:
        other = f", or set {rename}" if rename else ""
        guesses = {m: _closest(m, names) for m in missing}
        meant = [f"{m!r} (did you mean {guess!r}?)" if guess else repr(m) for m, guess in guesses.items()]
        raise DataError(f"{path} has no column {', '.join(meant)} in its header (line {line} has "
                        f"{', '.join(repr(n) for n in names)}).\nFix: rename the header's columns{other}, or point "
                        f"{source} at a CSV with columns {', '.join(c.name for c in columns)}.")
    return [names.index(c.name) for c in columns]


def _closest(name: str, names: list[str]) -> str | None:
    """The header's name that `name` was likely meant to be: the same but for case, or a near spelling."""
    same = [n for n in names if n.casefold() == name.casefold()]
    return same[0] if same else next(iter(difflib.get_close_matches(name, names, n=1, cutoff=0.8)), None)


def _parse(path: Path, records, columns: list[Column], positions: list[int], width: int | None):
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
        if column.kind == "category":
            for i in np.flatnonzero(~np.isin(cells, column.values) & ~empty) if column.values else ():
                flag(f"not one of {', '.join(map(str, column.values))}", i, c, repr(cells[i]))
            table[column.name] = np.array(cells, dtype=object)
            continue
        if column.kind == "time":
            values = _times(path, column.name, cells, [line for line, _ in records])
            for i in np.flatnonzero(values.isna().to_numpy() & ~empty):
                flag("not a timestamp (expected e.g. 2016-01-01 00:15:00)", i, c, repr(cells[i]))
            table[column.name] = values
            continue
        values, unreadable = _numbers(cells, empty)
        for i in unreadable:
            flag("text in a number column", i, c, repr(cells[i]))
        read = ~empty
        read[unreadable] = False
        for i in np.flatnonzero(read & ~(np.abs(values) <= FLOAT32_MAX)):  # also true for nan
            flag("not a finite number (inf, nan or beyond float32's 3.4e38"
                 + ("; leave the cell empty for a missing value)" if column.empty_ok else ")"), i, c, repr(cells[i]))
        if column.values:
            for i in np.flatnonzero(read & (np.abs(values) <= FLOAT32_MAX) & ~np.isin(values, column.values)):
                flag(f"not one of {', '.join(map(str, column.values))}", i, c, repr(cells[i]))
        table[column.name] = values
    table = pd.DataFrame(table)
    for column in columns:
        if column.kind == "label":  # bad label rows are refused or dropped before this cast is used
            table[column.name] = table[column.name].fillna(-1).astype(np.int64)
    return table, problems


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
        raise DataError(f"{path}: column {name!r} holds timestamps pandas cannot read as one series.\nFix: write "
                        f"them all in one format and one UTC offset (e.g. 2016-01-01 00:15:00+00:00).")
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
            raise DataError(f"{path}: column {name!r} mixes UTC offsets: {shown[0]}, then {shown[1]}; one series "
                            f"needs one clock.\nFix: convert the column to one offset, e.g. UTC (pandas: "
                            f"pd.to_datetime(column, utc=True)), and write it back; then run again.")


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

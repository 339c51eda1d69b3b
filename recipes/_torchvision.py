"""torchvision's MNIST-format data sets (MNIST, FashionMNIST): their raw IDX files, read by torchvision's readers,
split into train/eval/test, and the recipe that trains on them."""

from __future__ import annotations

import gzip
import shutil
import tempfile
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import torch
from omegaconf import DictConfig

from pipeline.errors import DataError
from pipeline.recipe import Recipe
from recipes._images import StoredImages, class_accuracy, image_inputs, scale_images
from recipes._raw_files import download, readable_file, unpacking
from recipes._splits import image_split, split_train_eval


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
        download(
            [(f"{f}.gz", [m + f"{f}.gz" for m in mirrors], sources.get(f"{f}.gz")) for f in missing],
            raw,
            f"{dataset_cls.__name__} raw files",
        )
        missing = [f for f in files.values() if _raw_path(raw, f) is None]
    if missing:
        raise DataError(
            f"{dataset_cls.__name__} raw files missing in {raw.resolve()}: {', '.join(missing)} "
            f"(plain or .gz).\nFix: put {', '.join(files.values())} (or their .gz) there and point "
            f"data.root at the folder that holds {dataset_cls.__name__}/, "
            f"or add data.download=true on a machine with a network."
        )
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


def read_idx(path: Path, reader) -> torch.Tensor:
    """An IDX file read by torchvision's `reader`; a `.gz` is unpacked to a temporary file, never beside itself."""
    if path.suffix != ".gz":
        try:
            return reader(str(path))
        except Exception as e:  # any parse failure of a user's file means the file is bad
            raise DataError(
                f"{path} is not a readable IDX file ({type(e).__name__}: {e}).\nFix: replace it with "
                f"a good copy, or delete it if its .gz is beside it (the .gz is read then)."
            ) from None
    with tempfile.TemporaryDirectory(prefix="idx-") as tmp:
        plain = Path(tmp) / path.stem
        with unpacking(path, tmp), gzip.open(path) as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst, 2**20)
        return read_idx(plain, reader)


def torchvision_arrays(dataset_cls, cfg: DictConfig, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Whole-split uint8 images [N, 1, H, W] and labels, read by torchvision's IDX readers from the raw files."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    paths = dict(zip(IDX_FILES, torchvision_raw(dataset_cls, cfg, IDX_FILES), strict=True))
    split = "train" if train else "test"
    images_file, labels_file = paths[f"{split}_images"], paths[f"{split}_labels"]
    images, labels = read_idx(images_file, read_image_file), read_idx(labels_file, read_label_file)
    if len(images) != len(labels):
        raise DataError(
            f"{images_file} holds {len(images):,} images but {labels_file} {len(labels):,} labels."
            f"\nFix: use the two files of one release (replace the one that does not belong)."
        )
    return images.unsqueeze(1).numpy(), labels.numpy()


IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
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
    return Recipe(
        **{
            "prepare": partial(idx_splits, dataset_cls),
            "raw_files": partial(idx_raw_files, dataset_cls),
            "metrics": class_accuracy,
            "transform": scale_images,
            # new images as the IDX files hold them: grayscale 28x28, uint8
            "read_inputs": partial(image_inputs, stored=StoredImages(size=28, channels=1)),
            "defaults": {**defaults, "data": {"download": True, **defaults.get("data", {})}},
            **fields,
        }
    )

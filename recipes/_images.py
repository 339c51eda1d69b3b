"""Image files -> uint8 rows (prepare) and chunks (predict) by one reader; the [0, 1] scaling of a batch and the
accuracy metrics of image classifiers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import datasets
import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from pipeline.decoded_shards import Undecoded
from pipeline.errors import DataError
from pipeline.files import scratch_folder
from pipeline.recipe import dataset


def undecoded_images(
    paths: list[str], labels: dict[str, tuple[list[int], list[str]]], read: Callable, channels: int, cfg
) -> Undecoded:
    """Image files -> a split of uint8 images [channels, data.image_size, data.image_size] beside their labels,
    decoded while its shards are written (each shard by the process or worker that writes it), never while
    training.

    labels: {column: (one class index per file, class names)}. read(path) -> a uint8 tensor [C, H, W], raising a
    DataError that names a file it cannot decode. Batches of 64 files: the photos are decoded at full size
    before they are resized. Each image is fitted to the square by data.resize where the recipe has it (see
    `fit`), else stretched.
    """
    size, resize = cfg.data.image_size, resize_mode(cfg)
    classes = {name: datasets.ClassLabel(names=names) for name, (_, names) in labels.items()}
    files = dataset(
        {
            "path": np.asarray(paths, dtype=str),
            **{name: np.asarray(rows, dtype=np.int64) for name, (rows, _) in labels.items()},
        },
        datasets.Features({"path": datasets.Value("string"), **classes}),
    )
    features = datasets.Features({**classes, "image": datasets.Array3D(shape=(channels, size, size), dtype="uint8")})
    return Undecoded(files, partial(_decoded, size=size, read=read, resize=resize), features)


def image_rows(
    paths: list[str], labels: dict[str, tuple[list[int], list[str]]], read: Callable, channels: int, cfg
) -> datasets.Dataset:
    """`undecoded_images` decoded now, in `data.num_proc` processes, for a recipe that needs the decoded rows
    before it returns them (e.g. its raw files live in a temporary folder)."""
    split = undecoded_images(paths, labels, read, channels, cfg)
    return split.rows.map(
        split.decode,
        batched=True,
        batch_size=64,
        num_proc=cfg.data.num_proc,
        remove_columns=["path"],
        features=split.features,
        **on_disk(),
    )


def _decoded(batch: dict, size: int, read: Callable, resize: str) -> dict:
    return {**{k: v for k, v in batch.items() if k != "path"}, "image": load_images(batch["path"], size, read, resize)}


def on_disk() -> dict:
    """`datasets.map`'s arguments that make its workers write the decoded rows to the build's scratch folder
    (memory-mapped afterwards), so a prepare's memory does not grow with the number of images: without a
    file, map keeps an in-memory dataset's results in memory."""
    folder = scratch_folder()
    return {} if folder is None else {"cache_file_name": str(folder / f"{uuid.uuid4().hex}.arrow")}


def load_images(paths: list[str], size: int, read: Callable, resize: str = "stretch") -> np.ndarray:
    """uint8 images [N, C, size, size]: what prepare() stores and prediction reads, by this one function."""
    return np.stack([fit(read(path), size, resize).numpy() for path in paths])


def resize_mode(cfg) -> str:
    """data.resize by name; `stretch` for recipes without the key (their images are square already)."""
    mode = cfg.data.get("resize") or "stretch"
    return getattr(mode, "name", mode)


def fit(image: torch.Tensor, size: int, resize: str) -> torch.Tensor:
    """A uint8 image [C, H, W] made size x size, antialiased: `crop` scales its shorter side to `size` and cuts
    the middle square (torchvision's Resize(size) + CenterCrop: nothing is distorted, the edges of the longer side
    are lost); `pad` scales its longer side to `size` and centres it on black (nothing is lost or distorted);
    `stretch` squashes it to the square (the tutorials' Resize((size, size)): nothing is lost, shapes distort)."""
    functional = v2.functional
    if resize == "stretch":
        return functional.resize(image, [size, size], antialias=True)
    if resize == "crop":
        image = functional.resize(image, size, antialias=True)
    elif resize == "pad":
        image = functional.resize(image, None, max_size=size, antialias=True)
    else:
        raise ValueError(f"unknown resize mode {resize!r}: crop, pad or stretch")
    return functional.center_crop(image, [size, size])  # pads with zeros where the image is smaller


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
                mode = "L" if channels == 1 else "RGB"
                # convert() to the mode an image has already decodes and then copies it
                return v2.functional.pil_to_tensor(image if image.mode == mode else image.convert(mode))
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise unreadable(path, e) from None
    raise DataError(
        f"{path} is {image.width}x{image.height} = {pixels:,} pixels, more than the {limit:,} allowed "
        f"(data.max_image_pixels; PIL's guard against decompression bombs).\nFix: if the image is "
        f"yours, allow it: data.max_image_pixels={pixels}; or shrink or remove it."
    )


def unreadable(path: str, e: Exception) -> DataError:
    return DataError(
        f"not a readable image: {path} ({type(e).__name__}: {e}).\nFix: delete or replace that file "
        f"(a folder of images must hold only images), then run again."
    )


# PIL modes without colour: one grey (or black/white) channel, with or without alpha.
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# At most this many headers are read, evenly spread over the files (and so over the class folders): the median
# of a thousand images is the set's, and no process can start decoding until they are read.
HEADERS_READ = 1_000


def image_headers(paths: list[str]) -> dict:
    """What the images' headers say (PIL reads no pixels for it): the files' count, the median, smallest and
    largest width x height, the median shorter side and whether every image is grayscale. Of more than
    HEADERS_READ files, an even sample is read (`headers_read` says how many)."""
    from PIL import Image

    sample = paths[:: max(1, -(-len(paths) // HEADERS_READ))]
    sizes, grey = np.zeros((len(sample), 2), dtype=np.int64), True
    for i, path in enumerate(sample):
        try:
            with Image.open(path) as image:
                sizes[i], grey = image.size, grey and image.mode in GREY_MODES
        except (OSError, SyntaxError, ValueError) as e:
            raise unreadable(path, e) from None
    areas = sizes.prod(1)
    return {
        "files": len(paths),
        "headers_read": len(sample),
        "median_size": np.median(sizes, 0).astype(int).tolist(),
        "smallest": sizes[areas.argmin()].tolist(),
        "largest": sizes[areas.argmax()].tolist(),
        "median_shorter_side": int(np.median(sizes.min(1))),
        "grayscale": grey,
    }


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
        raise DataError(
            f"{path} holds no image files ({', '.join(IMG_EXTENSIONS)}), in it or its subfolders.\n"
            f"Fix: point input= at an image file or a folder of images."
        )
    return path, files


# Images decoded at a time when predicting: a folder of any size takes the memory of this many
# (1024 x 3 x 128 x 128 bytes: 48 MiB).
PREDICT_CHUNK = 1024


@dataclass(frozen=True)
class StoredImages:
    """How a recipe's shards hold images, for reading new ones alike: size/channels (default the run's meta, where
    prepare() recorded them, else data.image_size, data.channels); levels: the shards' white (255, or e.g. 16 for
    scikit-learn's digits)."""

    size: int | None = None
    channels: int | None = None
    levels: int = 255


def image_inputs(
    cfg, meta: dict, path, stored: StoredImages = StoredImages(), chunk: int = PREDICT_CHUNK
) -> Iterator[tuple[dict, dict]]:
    """A Recipe.read_inputs for image recipes: an image file, or a folder of them (searched recursively), read
    and resized by `load_images` as the shards hold them (`stored`), `chunk` files at a time. The files are
    listed here (a missing or empty folder is named at once), read as the chunks are."""
    size = stored.size or meta.get("image_size") or cfg.data.image_size
    channels = stored.channels or meta.get("channels") or cfg.data.channels
    root, files = image_files(Path(path))
    read = partial(read_image, channels=channels, max_pixels=cfg.data.get("max_image_pixels"))
    return _image_chunks(
        root, files, partial(load_images, size=size, read=read, resize=resize_mode(cfg)), stored.levels, chunk
    )


def _image_chunks(root: Path, files: list[Path], load: Callable, levels: int, chunk: int):
    for start in range(0, len(files), chunk):
        part = files[start : start + chunk]
        images = load([str(f) for f in part])
        if levels != 255:
            images = np.rint(images * (levels / 255)).astype(np.uint8)
        yield {"file": [f.relative_to(root).as_posix() for f in part]}, {"image": images}


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

"""synthetic: generated images whose class is learnable, in any number and size, for scale tests and benchmarks.

Each class has a template, a coarse grid of random colour blocks; each image is its class's template plus
pixel noise, drawn from (data.seed, row index) alone, so the set is the same whichever data.num_proc builds it.
Rows are generated in data.num_proc processes a batch at a time and written to Arrow as they are made, so a
set of many GB is never held in memory. No raw files: data.root is not read.
python launch/train.py recipe=synthetic                                    # 20,000 RGB 32x32 images, 10 classes
python launch/prepare.py recipe=synthetic data.rows=250000 data.image_size=64 data.channels=3 data.num_proc=2
python launch/train.py recipe=synthetic data.rows=250000 data.image_size=64 data.channels=3   # 3.27 GB of shards
"""

import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from datasets.fingerprint import get_temporary_cache_files_directory
from torch import nn

from pipeline.config import DataConfig
from pipeline.errors import ConfigError
from pipeline.recipe import Recipe
from recipes._images import class_accuracy, scale_images
from recipes._splits import split_sizes

GRID = 4  # a template is GRID x GRID blocks of colour: the class shows at any image_size and survives pooling
BATCH_BYTES = 2**24  # image bytes generated per map batch (a batch is built in memory, then written to Arrow)


@dataclass
class SyntheticData(DataConfig):
    rows: int = 20_000  # train + eval; data.eval_fraction of them are held out for eval
    image_size: int = 32  # images are uint8 [channels, image_size, image_size]
    channels: int = 3
    num_classes: int = 10
    noise: int = 96  # each pixel is its template's level plus a uniform integer in [-noise, noise], clipped to 0-255
    seed: int = 0  # draws the templates and every row's noise


def raw_files(cfg) -> list[Path]:
    return []  # everything is generated from the config


def prepare(cfg):
    """Rows [0, train) are the train split, the rest eval: every row is an independent draw, so a cut by
    index is a random split (data.split_seed has nothing to choose)."""
    check_data_keys(cfg)
    train_rows, eval_rows = split_sizes(cfg.data.rows, cfg.data.eval_fraction)
    splits = {"train": generate(cfg, 0, train_rows), "eval": generate(cfg, train_rows, cfg.data.rows)}
    return datasets.DatasetDict(splits), {"class_names": class_names(cfg)}


def check_data_keys(cfg) -> None:
    d = cfg.data
    train_rows, eval_rows = split_sizes(d.rows, d.eval_fraction)
    problems = [
        f"data.{key}={value} (at least {least})"
        for key, value, least in (
            ("image_size", d.image_size, GRID),
            ("channels", d.channels, 1),
            ("num_classes", d.num_classes, 2),
        )
        if value < least
    ]
    if min(train_rows, eval_rows) < 1:
        problems.append(
            f"data.rows={d.rows} with data.eval_fraction={d.eval_fraction} leaves {train_rows} train "
            f"and {eval_rows} eval rows (at least 1 each)"
        )
    if not 0 <= d.noise <= 255:
        problems.append(f"data.noise={d.noise} (0 to 255)")
    if problems:
        raise ConfigError(f"recipe synthetic: {'; '.join(problems)}.\nFix: set them within those bounds.")


def class_names(cfg) -> list[str]:
    return [str(c) for c in range(cfg.data.num_classes)]


def generate(cfg, start: int, stop: int) -> datasets.Dataset:
    """Rows start..stop-1, made by `datasets.map` in data.num_proc processes.

    map keeps the output of an in-memory dataset in memory; given a file it writes each batch there
    instead. The file lies in a folder of datasets' temporary directory that is removed once the
    returned split is no longer used (after the pipeline has saved the shards) or at exit.
    """
    d = cfg.data
    shape = (d.channels, d.image_size, d.image_size)
    features = datasets.Features(
        {"image": datasets.Array3D(shape=shape, dtype="uint8"), "label": datasets.ClassLabel(names=class_names(cfg))}
    )
    folder = tempfile.mkdtemp(prefix="synthetic-", dir=get_temporary_cache_files_directory())
    batch = max(1, min(1000, BATCH_BYTES // int(np.prod(shape))))
    rows = datasets.Dataset.from_dict({"row": np.arange(start, stop, dtype=np.int64)})
    split = rows.map(
        draw,
        batched=True,
        batch_size=batch,
        writer_batch_size=batch,
        num_proc=d.num_proc,
        fn_kwargs={"templates": templates(cfg), "noise": d.noise, "seed": d.seed},
        remove_columns=["row"],
        features=features,
        cache_file_name=f"{folder}/rows.arrow",
    )
    weakref.finalize(split, shutil.rmtree, folder, ignore_errors=True)
    return split


def templates(cfg) -> np.ndarray:
    """int16 [num_classes, channels, size, size]: per class a GRID x GRID grid of random levels in each
    channel, scaled up to the image size (block edges fall where `size` allows: any size >= GRID works)."""
    d = cfg.data
    grid = np.random.default_rng(d.seed).integers(48, 208, (d.num_classes, d.channels, GRID, GRID), dtype=np.int16)
    cells = np.arange(d.image_size) * GRID // d.image_size
    return grid[:, :, cells][:, :, :, cells]


def draw(batch: dict, templates: np.ndarray, noise: int, seed: int) -> dict:
    """The rows of one map batch. Row r is class r % num_classes (balanced classes) and its noise comes
    from a generator seeded with (seed, r): the same pixels whichever process or batch makes the row.
    Uniform integer noise: cheaper to draw than Gaussian, so writing Arrow, not drawing, sets the pace."""
    rows = np.asarray(batch["row"])
    labels = rows % len(templates)
    pixels = np.empty((len(rows), *templates.shape[1:]), dtype=np.int16)
    for i, row in enumerate(rows):
        pixels[i] = np.random.default_rng([seed, int(row)]).integers(
            -noise, noise + 1, pixels.shape[1:], dtype=np.int16
        )
    pixels += templates[labels]
    return {"image": np.clip(pixels, 0, 255, out=pixels).astype(np.uint8), "label": labels}


class SyntheticNet(nn.Module):
    """Two 3x3 convolutions with pooling, then one linear layer; the adaptive pooling fits any image size."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(GRID),
            nn.Flatten(),
            nn.Linear(64 * GRID * GRID, num_classes),
        )

    def forward(self, image):
        return self.net(image)


recipe = Recipe(
    name="synthetic",
    description="generated class-template images of any count and size (data.rows, data.image_size), "
    "CNN conv32-pool-conv64-adaptive pool-linear, Adam lr 1e-3, batch 128",
    prepare=prepare,
    raw_files=raw_files,
    data_config=SyntheticData,
    model=lambda cfg, meta: SyntheticNet(cfg.data.channels, len(meta["class_names"])),
    transform=scale_images,
    metrics=class_accuracy,  # uint8 -> [0, 1] per batch; 10-class accuracy
    defaults={"trainer": {"epochs": 2, "batch_size": 128}, "optimizer": {"name": "adam", "lr": 1e-3}},
)

"""digits: scikit-learn's bundled 8x8 handwritten digits (1,797 real images) with a small CNN.

The embedded default: no download, trains to >= 0.95 eval accuracy in seconds on a CPU.
python launch/train.py recipe=digits
Predicts on image files (a light digit on a dark background, as the data set's), shrunk to 8x8 grayscale:
python launch/predict.py run=runs/digits/<run> input=<image or folder>
"""

from functools import partial
from importlib import resources
from pathlib import Path

import datasets
import numpy as np
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from pipeline.recipe import Recipe
from recipes._images import StoredImages, image_inputs
from recipes._splits import image_split, split_train_eval

CLASSES = [str(d) for d in range(10)]


def raw_files(cfg) -> list[Path]:
    return [Path(str(resources.files("sklearn.datasets.data") / "digits.csv.gz"))]


def prepare(cfg):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, None]  # pixel values 0..16
    full = image_split(images, digits.target, CLASSES)
    train, evaluation = split_train_eval(full, cfg.data.eval_fraction, cfg.data.split_seed)
    return datasets.DatasetDict(train=train, eval=evaluation), {"class_names": CLASSES}


def transform(batch, train, meta):
    return {**batch, "image": batch["image"].float() / 16.0}


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, image):
        return self.net(image)


def metrics(cfg, meta):
    return {
        "": MetricCollection(
            {"accuracy": MulticlassAccuracy(10, average="micro"), "f1_macro": MulticlassF1Score(10, average="macro")}
        )
    }


recipe = Recipe(
    name="digits",
    description="scikit-learn's bundled 8x8 digits, small CNN (embedded default, no download)",
    prepare=prepare,
    raw_files=raw_files,
    model=lambda cfg, meta: DigitsCNN(),
    transform=transform,
    metrics=metrics,
    # new images as the data set holds them: 8x8 grayscale in 17 levels, 0 (background) to 16
    read_inputs=partial(image_inputs, stored=StoredImages(size=8, channels=1, levels=16)),
    defaults={
        "data": {"eval_fraction": 0.2},
        "trainer": {"epochs": 10, "batch_size": 32},
        "optimizer": {"name": "adam", "lr": 1e-3},
    },
)

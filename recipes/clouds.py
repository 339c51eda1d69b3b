"""clouds: ground-level cloud photos in 7 classes from two image folders, a two-block ELU CNN, Adam lr 1e-3.

Raw files: <data.root>/clouds_train/<class name>/*.jpg and <data.root>/clouds_test/<class name>/*.jpg. Files
without an image extension are skipped (ImageFolder's rule); an image file that does not decode stops prepare
with its path, so no class silently loses samples.
python launch/train.py recipe=clouds data.root=data
"""

from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader
from torchvision.transforms import v2

from pipeline.config import DataConfig
from pipeline.data import DataError
from pipeline.recipe import Recipe
from recipes._helpers import image_rows, split_train_eval, unit_scale

FOLDERS = {"train": "clouds_train", "test": "clouds_test"}
LAYOUT = ("<data.root>/clouds_train/<class name>/*.jpg and <data.root>/clouds_test/<class name>/*.jpg, "
          "one folder per class (e.g. 'cumulus clouds', 'clear sky')")
GET_DATA = ("get the clouds image folders of DataCamp's 'Intermediate Deep Learning with PyTorch' (7 classes; "
            "no download here), unpack them so that clouds_train/ and clouds_test/ sit side by side, and pass "
            "data.root=<the folder that holds them>")


@dataclass
class CloudsData(DataConfig):
    image_size: int = 64  # every photo is squashed to image_size x image_size RGB once, in prepare


# ---------------------------------------------------------------- raw files -> uint8 shards


def read_folder(cfg, split: str) -> ImageFolder:
    """torchvision's ImageFolder lists the files and names the classes (sorted folder names)."""
    path = Path(cfg.data.root) / FOLDERS[split]
    if not path.is_dir():
        raise DataError(f"clouds data not found: {path.resolve()} is missing.\nExpected layout: {LAYOUT}.\n"
                        f"Fix: {GET_DATA}.")
    try:
        return ImageFolder(str(path))
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise DataError(f"clouds data in {path.resolve()} is incomplete: {e}\nExpected layout: {LAYOUT}.\n"
                        f"Fix: {GET_DATA}.") from None


def raw_files(cfg) -> list[Path]:
    return [Path(p) for split in FOLDERS for p, _ in read_folder(cfg, split).samples]


def read_rgb(path: str) -> torch.Tensor:
    """ImageFolder's reader (PIL, converted to RGB) as a uint8 tensor [3, H, W]."""
    try:
        return v2.functional.pil_to_tensor(default_loader(path))
    except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise DataError(f"not a readable image: {path} ({type(e).__name__}: {e}).\nFix: delete or replace "
                        f"that file (the class folders must hold only images), then run again.") from None


def decode(folder: ImageFolder, cfg) -> datasets.Dataset:
    return image_rows([p for p, _ in folder.samples], {"label": (folder.targets, folder.classes)}, read_rgb, 3, cfg)


def prepare(cfg):
    """clouds_train -> train/eval (stratified, `data.eval_fraction` held out); clouds_test -> test."""
    train_folder, test_folder = read_folder(cfg, "train"), read_folder(cfg, "test")
    if train_folder.classes != test_folder.classes:
        raise DataError(f"the class folders differ: {FOLDERS['train']} has {train_folder.classes}, "
                        f"{FOLDERS['test']} has {test_folder.classes}.\nFix: give both the same class folders.")
    full = decode(train_folder, cfg)
    train, evaluation = split_train_eval(full, cfg.data.eval_fraction, cfg.data.split_seed)
    test = decode(test_folder, cfg)
    return datasets.DatasetDict(train=train, eval=evaluation, test=test), {"class_names": train_folder.classes}


# ---------------------------------------------------------------- per batch: augmentation and scaling

def augment(image: torch.Tensor) -> torch.Tensor:
    """The tutorial's RandomHorizontalFlip, RandomRotation(45), RandomAutocontrast, drawn per image.

    A whole float batch [N, C, H, W] in [0, 1] at once on its device: v2's transforms draw one set of
    parameters per call (one flip and one angle for the whole batch), so the per-image draws are done
    here with masks and one affine grid, without a Python loop over images.
    """
    flip, turn, contrast = draws(3, len(image), image.device)
    image = torch.where(flip[:, None, None, None] < 0.5, image.flip(-1), image)
    image = rotate(image, turn * 90.0 - 45.0)
    return torch.where(contrast[:, None, None, None] < 0.5, v2.functional.autocontrast(image), image)


def draws(rows: int, n: int, device) -> torch.Tensor:
    """[rows, n] uniform [0, 1) numbers for this process's n images: the draws for the whole global batch,
    made alike on every process (set_seed gives them one generator state), sliced at this process's part.

    Each process trains on its slice of the global batch (split_batches), so image i of the global batch
    gets the same draws on 1 or N processes and the generators stay in step; drawing only n numbers would
    give every process's slice the same flips and angles.
    """
    state = PartialState()  # Accelerate's process group (a singleton); one process outside a launch
    numbers = torch.rand(rows, n * state.num_processes, device=device)
    return numbers[:, state.process_index * n:(state.process_index + 1) * n]


def rotate(image: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Each square image turned counter-clockwise about its centre by its own angle, as v2.functional.rotate
    does (nearest pixel, black corners)."""
    angle = torch.deg2rad(degrees)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    # affine_grid maps output to input positions (x right, y down): the inverse of the image's turn.
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(image.shape), align_corners=False)
    return nn.functional.grid_sample(image, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def transform(batch, train, meta):
    image = unit_scale(batch["image"])  # ToTensor: [0, 1]
    return {**batch, "image": augment(image) if train else image}


# ---------------------------------------------------------------- model, metrics


class CloudsNet(nn.Module):
    def __init__(self, num_classes: int, image_size: int = 64):
        super().__init__()
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=3, padding=1), nn.ELU(), nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.ELU(), nn.MaxPool2d(kernel_size=2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64 * (image_size // 4) ** 2, num_classes)

    def forward(self, image):
        return self.classifier(self.feature_extractor(image))


def metrics(cfg, meta):
    n = len(meta["class_names"])
    # average=None gives one value per class, logged as eval/<metric>/<class name>.
    per_average = {f"{name}{suffix}": cls(n, average=average)
                   for name, cls in (("precision", MulticlassPrecision), ("recall", MulticlassRecall),
                                     ("f1", MulticlassF1Score))
                   for suffix, average in (("", None), ("_micro", "micro"), ("_macro", "macro"))}
    return {"": MetricCollection({"accuracy": MulticlassAccuracy(n, average="micro"), **per_average,
                                  "confusion_matrix": MulticlassConfusionMatrix(n)})}


recipe = Recipe(
    name="clouds",
    description="clouds image folders (7 classes), CNN conv32-conv64-linear with ELU, Adam lr 1e-3, batch 16",
    prepare=prepare, raw_files=raw_files, data_config=CloudsData,
    model=lambda cfg, meta: CloudsNet(len(meta["class_names"]), cfg.data.image_size), activation="elu",
    transform=transform, metrics=metrics,
    defaults={"trainer": {"epochs": 10, "batch_size": 16},
              "optimizer": {"name": "adam", "lr": 1e-3}},
)

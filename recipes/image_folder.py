"""image_folder: your own images, one folder per class -> a classifier (the tutorial CNN or a torchvision model).

Raw files: <data.train_dir>/<class name>/*.jpg (or .png, ...: ImageFolder's extensions; other files are skipped),
optional data.eval_dir and data.test_dir with the same class folders. Relative folders are under data.root (here
the current folder). Without data.eval_dir, data.eval_fraction of train_dir is held out, stratified by class;
without data.test_dir there is no test split. Every image is fitted to data.image_size x data.image_size (center crop,
pad or stretch: data.resize), RGB (data.channels=3) or grayscale (1), once, in prepare; size and channels unset are
taken from the train images' headers (their median shorter side, at most 64 px; grayscale if every image is).
python launch/train.py recipe=image_folder data.train_dir=photos/train data.test_dir=photos/test
python launch/train.py recipe=image_folder data.train_dir=photos data.augment=[hflip,rotate:10] model.arch=resnet18
Presets over this recipe: clouds.
"""

import copy
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torchvision
from omegaconf import OmegaConf
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
from torchvision.datasets.folder import IMG_EXTENSIONS

from pipeline.config import DataConfig, ModelConfig, choice
from pipeline.decoded_shards import Undecoded
from pipeline.errors import ConfigError, DataError
from pipeline.recipe import Recipe
from recipes._augment import augment, augmentations
from recipes._images import (
    image_headers,
    image_inputs,
    image_tree,
    read_image,
    resize_mode,
    undecoded_images,
    unit_scale,
)
from recipes._splits import split_train_eval
from recipes._tables import stored_statistics, with_statistics

# `cnn`: the tutorial's two-block ELU CNN (below); the others: torchvision's classification models, by name.
Arch = choice("Arch", ["cnn", *torchvision.models.list_models(module=torchvision.models)])
Resize = choice("Resize", ["crop", "pad", "stretch"])  # the modes of recipes._images.fit
MAX_INFERRED_SIZE = 64  # images larger than this are shrunk to it unless data.image_size says otherwise
ENLARGED = 4  # a data.image_size this many times the images' median side is warned about
FOLDERS = {"train": "train_dir", "eval": "eval_dir", "test": "test_dir"}  # split -> the data key naming its folder


@dataclass
class ImageFolderData(DataConfig):
    train_dir: str = ""  # one subfolder per class; absolute, or under data.root
    eval_dir: str | None = None  # null: data.eval_fraction of train_dir, stratified by class
    test_dir: str | None = None  # null: no test split
    # Every image is fitted to image_size x image_size once, in prepare. null: the train images' median shorter
    # side, at most MAX_INFERRED_SIZE (said in the log and kept in meta.json)
    image_size: int | None = None
    channels: int | None = None  # 3: RGB, 1: grayscale; null: 1 if every train image is grayscale, else 3
    # crop: shorter side to image_size, the middle kept; pad: longer side to image_size, black borders; stretch:
    # squashed to the square (see recipes._images.fit)
    resize: Resize = Resize.crop
    # Random changes to each training image, drawn per image (see AUGMENTATIONS), e.g. [hflip,rotate:15]
    augment: list[str] = field(default_factory=list)
    # Images with more pixels are refused (PIL's decompression-bomb guard); null: PIL's limit, 178,956,970
    max_image_pixels: int | None = None
    # A run's meta.json whose image_size and channels this data takes where they are unset: how launch/evaluate.py
    # prepares other data for a run (set by it)
    statistics: str | None = None


@dataclass
class ImageFolderModel(ModelConfig):
    arch: Arch = Arch.cnn  # cnn, or a torchvision model trained from scratch (no weights downloaded): resnet18, ...


# ---------------------------------------------------------------- raw files -> uint8 shards


def folder_path(cfg, split: str) -> Path | None:
    name = cfg.data[FOLDERS[split]]
    return Path(cfg.data.root).expanduser() / Path(name).expanduser() if name else None


class ImageTree(ImageFolder):
    """ImageFolder, its class folders listed by `image_tree`: no symlinked folder that leads back into the tree is
    followed, and one file under two classes (the same real path) is refused, naming both."""

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples, linked, top = [], {}, os.path.realpath(directory)
        for name, index in sorted(class_to_idx.items()):
            for path, real in image_tree(os.path.join(directory, name), top=directory):
                # A file reached through a link; any other is only where its path says.
                first, owner = listed_first(real, path, name, top, class_to_idx, linked) if real else (path, name)
                if owner != name:
                    raise DataError(
                        f"{first} (class {owner}) and {path} (class {name}) are one file, {real}: an "
                        f"image cannot belong to two classes.\nFix: keep it in one class folder "
                        f"(remove the other link or copy)."
                    )
                samples.append((path, index))
        found = {index for _, index in samples}
        empty = sorted(name for name, index in class_to_idx.items() if index not in found)
        if empty and not allow_empty:  # worded as ImageFolder words it
            raise FileNotFoundError(
                f"Found no valid file for the classes {', '.join(empty)}. Supported extensions "
                f"are: {', '.join(extensions or IMG_EXTENSIONS)}"
            )
        return samples


def listed_first(real: str, path: str, name: str, top: str, classes: dict, linked: dict) -> tuple[str, str]:
    """(path, class) where the file at `real`, linked from `path` in class `name`, is listed first: the class
    folder it is in, inside the tree; else the first class that links it (`linked` remembers)."""
    inside = os.path.relpath(real, top).split(os.sep)[0]
    if real.startswith(top + os.sep) and inside in classes:
        return real, inside
    return linked.setdefault(real, (path, name))


def read_folder(cfg, split: str, hint: str = "") -> ImageFolder:
    """ImageFolder (as ImageTree) lists the files and names the classes (sorted folder names)."""
    path = folder_path(cfg, split)
    key = f"data.{FOLDERS[split]}"
    layout = f"{path}/<class name>/*.jpg (or .png, ...), one folder per class"
    fix = hint or f"point {key} at a folder with one subfolder of images per class"
    if not path.is_dir():
        raise DataError(f"{key}: {path.resolve()} is missing.\nExpected layout: {layout}.\nFix: {fix}.")
    try:
        folder = ImageTree(str(path))
    except FileNotFoundError as e:  # no class folders, or a class folder without images
        raise DataError(
            f"{key}: the images in {path.resolve()} are incomplete: {e}\nExpected layout: {layout}.\nFix: {fix}."
        ) from None
    if split == "train" and len(folder.classes) < 2:  # the other splits must have the train classes
        raise DataError(
            f"{key}: {path.resolve()} has one class folder, {folder.classes[0]!r}: a classifier needs "
            f"two classes or more.\nExpected layout: {layout}.\nFix: add a folder of images for each "
            f"other class, or point {key} at the folder whose subfolders are the classes."
        )
    return folder


def raw_files(cfg, hint: str = "") -> list[str]:
    check_data_keys(cfg)  # the fingerprint asks for the raw files before anything else runs: a typo stops here, at once
    files = [p for split in FOLDERS if folder_path(cfg, split) for p, _ in read_folder(cfg, split, hint).samples]
    return with_statistics(cfg, files)


def check_data_keys(cfg) -> None:
    """The data keys no type check covers: a mistake stops the run before any image is read."""
    if not cfg.data.train_dir:
        raise ConfigError(
            "no images given: data.train_dir is empty.\nFix: data.train_dir=<folder with one subfolder "
            "of images per class>, e.g. python launch/train.py recipe=image_folder data.train_dir=photos"
        )
    if cfg.data.channels not in (None, 1, 3):
        raise ConfigError(
            f"data.channels={cfg.data.channels}: images are read as RGB or grayscale.\nFix: "
            f"data.channels=3 (RGB) or data.channels=1 (grayscale)"
        )
    if cfg.data.image_size is not None and cfg.data.image_size < 4:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is too small for two 2x2 poolings.\nFix: "
            f"data.image_size=64 (or any size >= 4), or leave it unset to take it from the images"
        )
    if cfg.data.max_image_pixels is not None and cfg.data.max_image_pixels < 1:
        raise ConfigError(
            f"data.max_image_pixels={cfg.data.max_image_pixels}: a number of pixels must be >= 1.\n"
            f"Fix: e.g. data.max_image_pixels=400000000, or null for PIL's limit"
        )
    augmentations(tuple(cfg.data.augment))


def same_classes(folders: dict[str, ImageFolder]) -> list[str]:
    """The class names, which every split's folder must share: a class missing from one would shift the labels."""
    train = folders["train"]
    for folder in folders.values():
        if folder.classes != train.classes:
            missing = sorted(set(train.classes) - set(folder.classes))
            extra = sorted(set(folder.classes) - set(train.classes))
            raise DataError(
                f"the class folders differ: {folder.root} lacks {missing} and has {extra}, compared "
                f"with {train.root} (classes {train.classes}).\nFix: give every folder the same class "
                f"folders, each with at least one image."
            )
    return train.classes


def decode(folder: ImageFolder, cfg) -> Undecoded:
    read = partial(read_image, channels=cfg.data.channels, max_pixels=cfg.data.max_image_pixels)
    return undecoded_images(
        [p for p, _ in folder.samples], {"label": (folder.targets, folder.classes)}, read, cfg.data.channels, cfg
    )


def hold_out(full: Undecoded, cfg, folder: ImageFolder) -> tuple[Undecoded, Undecoded]:
    """The held-out rows chosen by their labels alone, before any image is decoded."""
    try:
        return tuple(
            full.with_rows(rows) for rows in split_train_eval(full.rows, cfg.data.eval_fraction, cfg.data.split_seed)
        )
    except ValueError as e:  # scikit-learn's stratified split: too few images in a class
        raise DataError(
            f"cannot hold out data.eval_fraction={cfg.data.eval_fraction} of {folder.root} for "
            f"evaluation, stratified by class: {e}\nFix: put more images in each class folder, raise "
            f"data.eval_fraction, or give data.eval_dir=<a folder with the same class folders>."
        ) from None


def prepare(cfg, hint: str = ""):
    """train_dir -> train (and eval, `data.eval_fraction` held out stratified, unless eval_dir); test_dir -> test."""
    folders = {split: read_folder(cfg, split, hint) for split in FOLDERS if folder_path(cfg, split)}
    classes = same_classes(folders)
    cfg, shape = image_shape(cfg, folders["train"])
    splits = {split: decode(folder, cfg) for split, folder in folders.items()}
    if "eval" not in splits:
        splits["train"], splits["eval"] = hold_out(splits["train"], cfg, folders["train"])
    return splits, {"class_names": classes, **shape}


def image_shape(cfg, train: ImageFolder) -> tuple[object, dict]:
    """`cfg` with data.image_size and data.channels set (unset ones from the train images' headers, or from the
    run's meta.json that data.statistics names), and the facts for meta.json; the choice is said in the log, with
    a warning where a given size enlarges the images many times."""
    source = image_headers([path for path, _ in train.samples])
    run = stored_statistics(cfg, (), optional=("image_size", "channels")) or {}
    found = {
        "image_size": min(source["median_shorter_side"], MAX_INFERRED_SIZE),
        "channels": 1 if source["grayscale"] else 3,
    }
    chosen = {key: cfg.data[key] or run.get(key) or found[key] for key in found}
    said = ", ".join(
        f"data.{key}={value} ({'given' if cfg.data[key] else 'the run' if key in run else 'the images'})"
        for key, value in chosen.items()
    )
    width, height = source["median_size"]
    print(
        f"data: train images {width}x{height} px (median; {_side(source['smallest'])} to "
        f"{_side(source['largest'])}), {'grayscale' if source['grayscale'] else 'colour'} (headers of "
        f"{source['headers_read']:,} of {source['files']:,} files) -> {said}, data.resize={resize_mode(cfg)}"
    )
    size, shorter = chosen["image_size"], max(source["median_shorter_side"], 1)
    if cfg.data.image_size and size >= ENLARGED * shorter:
        print(
            f"WARNING: data.image_size={size} enlarges the images (median shorter side {shorter} px) "
            f"{size / shorter:.0f}x: no detail is gained and each step costs {(size / shorter) ** 2:.0f}x the "
            f"pixels.\nFix: leave data.image_size unset to take {found['image_size']} from the images"
        )
    resolved = copy.deepcopy(cfg)
    OmegaConf.set_readonly(resolved, False)
    resolved.data.image_size, resolved.data.channels = size, chosen["channels"]
    OmegaConf.set_readonly(resolved, True)
    return resolved, {**chosen, "source_images": source}


def _side(size: list[int]) -> str:
    return f"{size[0]}x{size[1]}"


# ---------------------------------------------------------------- per batch: augmentation and scaling


def transform(batch, train, meta, default=()):
    """[0, 1] scaling (ToTensor) and, for training batches, meta["augment"] (`data.augment`, a transform key: the
    shards do not depend on it; the preset's `default` where the meta has none)."""
    image = unit_scale(batch["image"])
    return {**batch, "image": augment(image, meta.get("augment", default)) if train else image}


# ---------------------------------------------------------------- model, metrics


class CNN(nn.Module):
    """The clouds tutorial's network: two conv-ELU-maxpool blocks and one linear layer, for any channel count."""

    def __init__(self, num_classes: int, image_size: int = 64, channels: int = 3):
        super().__init__()
        self.feature_extractor = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=3, padding=1),
            nn.ELU(),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ELU(),
            nn.MaxPool2d(kernel_size=2),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64 * (image_size // 4) ** 2, num_classes)

    def forward(self, image):
        return self.classifier(self.feature_extractor(image))


class Torchvision(nn.Module):
    """A torchvision classifier; grayscale images are repeated to the 3 channels it takes."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image):
        return self.net(image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image)


# Builder options by arch. googlenet's and inception_v3's auxiliary heads would run while training without a loss,
# so they would get no gradient (DDP stops at the second step) and inception_v3's fails below ~300 px; their
# init_weights=True is torchvision's own initialisation, said explicitly (left unset, it warns).
BUILD_OPTIONS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def build(arch: str, num_classes: int) -> Torchvision:
    """torchvision's `arch` from scratch (weights=None: nothing is downloaded), one output per class."""
    return Torchvision(
        torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **BUILD_OPTIONS.get(arch, {}))
    )


def torchvision_model(arch: str, num_classes: int, image_size: int) -> nn.Module:
    """`build(arch)` tried once on a blank image, so that a size it cannot take stops here, named, not at the
    first step."""
    model = build(arch, num_classes)
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError) as e:
        raise ConfigError(
            f"model.arch={arch} cannot take {image_size}x{image_size} images ({e}).\nFix: a "
            f"larger data.image_size (e.g. 224), or model.arch=cnn or resnet18, which take small "
            f"images"
        ) from None
    return model.train()


def model(cfg, meta):
    check_data_keys(cfg)
    classes, arch = len(meta["class_names"]), cfg.model.arch.name
    # The shards' size and channels (prepare() chose them where the config leaves them unset)
    size, channels = meta.get("image_size") or cfg.data.image_size, meta.get("channels") or cfg.data.channels
    if arch == "cnn":
        return CNN(classes, size, channels)
    return torchvision_model(arch, classes, size)


def metrics(cfg, meta):
    n = len(meta["class_names"])
    # average=None gives one value per class, logged as eval/<metric>/<class name>.
    per_average = {
        f"{name}{suffix}": cls(n, average=average)
        for name, cls in (("precision", MulticlassPrecision), ("recall", MulticlassRecall), ("f1", MulticlassF1Score))
        for suffix, average in (("", None), ("_micro", "micro"), ("_macro", "macro"))
    }
    return {
        "": MetricCollection(
            {
                "accuracy": MulticlassAccuracy(n, average="micro"),
                **per_average,
                "confusion_matrix": MulticlassConfusionMatrix(n),
            }
        )
    }


DEFAULTS = {
    "data": {"root": "."},  # relative folders are where the command runs
    "trainer": {"epochs": 10, "batch_size": 16},
    "optimizer": {"name": "adam", "lr": 1e-3},
}


def recipe_for(name: str, description: str, defaults: dict, hint: str = "") -> Recipe:
    """This recipe under another name with its own defaults (over DEFAULTS): a preset such as clouds. `hint`: how
    to get the preset's data, said when its folders are missing."""
    defaults = OmegaConf.to_container(OmegaConf.merge(DEFAULTS, defaults))
    return Recipe(
        name=name,
        description=description,
        prepare=partial(prepare, hint=hint),
        raw_files=partial(raw_files, hint=hint),
        data_config=ImageFolderData,
        model_config=ImageFolderModel,
        model=model,
        activation="elu",
        transform=partial(transform, default=tuple(defaults["data"].get("augment", ()))),
        transform_keys=("augment",),
        metrics=metrics,
        read_inputs=image_inputs,
        defaults=defaults,
    )


recipe = recipe_for(
    "image_folder", "your image folders (one per class), the tutorial CNN or a torchvision model, Adam lr 1e-3", {}
)

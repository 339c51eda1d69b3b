"""omniglot_multi: Omniglot characters with two heads (alphabet, character) or two inputs (image, alphabet).

Raw files: <data.root>/images_background/<Alphabet>/characterNN/<id>_<drawer>.png, or images_background.zip
(either also under <data.root>/omniglot-py/); downloaded there when missing unless data.download=false.
python launch/train.py recipe=omniglot_multi data.root=data                          # image -> alphabet, character
python launch/train.py recipe=omniglot_multi data.root=data model.mode=multi_input   # image, alphabet -> character
"""

import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import datasets
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.datasets import Omniglot
from torchvision.datasets.utils import list_dir, list_files
from torchvision.io import ImageReadMode, decode_image

from pipeline.config import DataConfig, LossConfig, ModelConfig
from pipeline.errors import ConfigError, DataError
from pipeline.recipe import Recipe
from recipes._images import accuracy, image_rows, unit_scale
from recipes._raw_files import download, readable_file, unpacking

LAYOUT = (
    "<data.root>/images_background/<Alphabet>/characterNN/<id>_<drawer>.png, or the zip images_background.zip "
    "holding that folder, in <data.root>/ or in <data.root>/omniglot-py/ (where torchvision downloads it)"
)
ZIP_URL = f"{Omniglot.download_url_prefix}/images_background.zip"
GET_DATA = (
    f"put images_background.zip from {ZIP_URL} (or its unpacked folder) in data.root, "
    "or add data.download=true on a machine with a network"
)
# A real subset kept in this repository, for a first run without a network.
OFFLINE = (
    "To try it offline with the real subset kept in this repository: mkdir -p data && cp "
    "tests/data/omniglot-small/images_background_small1.zip data/images_background.zip, then data.root=data"
)


class Mode(Enum):
    multi_output = "multi_output"  # image -> alphabet and character
    multi_input = "multi_input"  # image and the alphabet (one-hot) -> character


@dataclass
class OmniglotData(DataConfig):
    image_size: int = 64  # 105x105 strokes are resized once, in prepare, to image_size x image_size grey
    eval_drawers: int = 4  # of each character's 20 drawers, the held-out ones (the same drawers for all)


@dataclass
class OmniglotModel(ModelConfig):
    mode: Mode = Mode.multi_output  # OmegaConf checks the value against the Enum's names


@dataclass
class OmniglotLoss(LossConfig):
    alphabet_weight: float = 1.0  # multi_output only
    character_weight: float = 1.0


# ---------------------------------------------------------------- raw files -> uint8 shards


def raw_source(cfg) -> Path:
    """The unpacked images_background folder, else its zip; the zip is downloaded if neither exists."""
    root = Path(cfg.data.root)
    places = (root, root / Omniglot.folder)
    for folder in (p / "images_background" for p in places):
        if folder.is_dir():
            return folder
    for archive in (p / "images_background.zip" for p in places):
        if archive.exists():
            readable_file(archive, "Omniglot's images_background.zip")
            return archive
    if cfg.data.download:
        # Into omniglot-py/, as torchvision's Omniglot(download=True) puts it; the zip stays a zip (see unpacked).
        try:
            download(
                [("images_background.zip", [ZIP_URL], Omniglot.zips_md5["images_background"])],
                root / Omniglot.folder,
                "Omniglot's images_background.zip",
            )
        except DataError as e:
            raise DataError(f"{e}\nExpected layout: {LAYOUT}.\n{OFFLINE}.") from None
        return root / Omniglot.folder / "images_background.zip"
    raise DataError(
        f"Omniglot not found under {root.resolve()}.\nExpected layout: {LAYOUT}.\nFix: {GET_DATA}.\n{OFFLINE}."
    )


@contextmanager
def unpacked(cfg):
    """The folder of alphabets: the unpacked one, or the zip unpacked into a temporary folder for as long as
    prepare() needs it (the data folder is never written to)."""
    source = raw_source(cfg)
    if source.suffix != ".zip":
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="omniglot-") as tmp:
        with unpacking(source, tmp, f" from {ZIP_URL}"), zipfile.ZipFile(source) as archive:
            archive.extractall(tmp)
        top = list_dir(tmp)
        # The zip holds one folder (images_background/, or images_background_small1/ for the subsets).
        yield Path(tmp) / top[0] if len(top) == 1 and top[0].startswith("images_") else Path(tmp)


def list_images(folder: Path) -> tuple[list[str], list[str], list[tuple[str, int, int]]]:
    """Alphabets, characters ("Alphabet/characterNN") and (file, alphabet, character) rows.

    torchvision's Omniglot insists on its downloaded zip being present, so it cannot read an unpacked copy;
    this is its listing, sorted, because os.listdir's order (and so every label) would vary by file system.
    """
    alphabets = sorted(list_dir(str(folder)))
    characters = [f"{a}/{c}" for a in alphabets for c in sorted(list_dir(str(folder / a)))]
    rows = [
        (str(folder / character / name), alphabets.index(character.split("/")[0]), index)
        for index, character in enumerate(characters)
        for name in sorted(list_files(str(folder / character), ".png"))
    ]
    if not rows:
        raise DataError(f"no character images in {folder.resolve()}.\nExpected layout: {LAYOUT}.\nFix: {GET_DATA}.")
    return alphabets, characters, rows


def raw_files(cfg) -> list[Path]:
    source = raw_source(cfg)
    return [source] if source.suffix == ".zip" else [Path(path) for path, _, _ in list_images(source)[2]]


def drawer(path: str) -> int:
    """Omniglot names a file <image id>_<drawer>.png; drawers are numbered 01..20 for every character."""
    try:
        return int(Path(path).stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise DataError(f"{path}: not an Omniglot file name (<id>_<drawer>.png).\nExpected layout: {LAYOUT}.") from None


def read_gray(path: str) -> torch.Tensor:
    try:
        return decode_image(path, mode=ImageReadMode.GRAY)
    except RuntimeError as e:
        raise DataError(f"not a readable image: {path} ({e}).\nFix: delete or replace that file.") from None


def decode(rows: list, alphabets: list[str], characters: list[str], cfg) -> datasets.Dataset:
    paths, alphabet, character = zip(*rows)
    labels = {"alphabet": (list(alphabet), alphabets), "character": (list(character), characters)}
    return image_rows(list(paths), labels, read_gray, 1, cfg)


def prepare(cfg):
    """Each character's drawings by `data.eval_drawers` drawers (picked by `data.split_seed`) -> eval."""
    with unpacked(cfg) as folder:
        alphabets, characters, rows = list_images(folder)
        drawers = sorted({drawer(path) for path, _, _ in rows})
        if not 0 < cfg.data.eval_drawers < len(drawers):
            raise ConfigError(
                f"bad value data.eval_drawers={cfg.data.eval_drawers}: the data has {len(drawers)} "
                f"drawers per character; choose 1..{len(drawers) - 1}"
            )
        # Whole drawers, not random images, are held out: eval measures new handwriting of known characters.
        rng = np.random.default_rng(cfg.data.split_seed)
        held_out = {int(d) for d in rng.choice(drawers, cfg.data.eval_drawers, replace=False)}
        train = [row for row in rows if drawer(row[0]) not in held_out]
        evaluation = [row for row in rows if drawer(row[0]) in held_out]
        splits = datasets.DatasetDict(
            train=decode(train, alphabets, characters, cfg), eval=decode(evaluation, alphabets, characters, cfg)
        )
    return splits, {"alphabet_names": alphabets, "character_names": characters, "eval_drawers": sorted(held_out)}


# ---------------------------------------------------------------- per batch


def transform(batch, train, meta):
    # The one-hot alphabet is built here, per batch, from the stored label: one integer per row on disk, not
    # a vector as wide as the alphabet count.
    alphabet = F.one_hot(batch["alphabet"], len(meta["alphabet_names"])).float()
    return {**batch, "image": unit_scale(batch["image"]), "alphabet_onehot": alphabet}  # ToTensor: [0, 1]


# ---------------------------------------------------------------- the tutorial's networks


def image_layer(image_size: int) -> nn.Sequential:
    """One conv block and a linear layer: the image's 128 features, shared by every head."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.MaxPool2d(kernel_size=2),
        nn.ELU(),
        nn.Flatten(),
        nn.Linear(16 * (image_size // 2) ** 2, 128),
    )


class TwoOutputNet(nn.Module):
    """image -> {alphabet, character} logits."""

    def __init__(self, num_alphabets: int, num_characters: int, image_size: int = 64):
        super().__init__()
        self.image_layer = image_layer(image_size)
        self.classifier_alpha = nn.Linear(128, num_alphabets)
        self.classifier_char = nn.Linear(128, num_characters)

    def forward(self, image):
        x = self.image_layer(image)
        return {"alphabet": self.classifier_alpha(x), "character": self.classifier_char(x)}


class TwoInputNet(nn.Module):
    """image and one-hot alphabet -> {character} logits."""

    def __init__(self, num_alphabets: int, num_characters: int, image_size: int = 64):
        super().__init__()
        self.image_layer = image_layer(image_size)
        self.alphabet_layer = nn.Sequential(nn.Linear(num_alphabets, 8), nn.ELU())
        self.classifier = nn.Linear(128 + 8, num_characters)

    def forward(self, image, alphabet_onehot):
        x = torch.cat((self.image_layer(image), self.alphabet_layer(alphabet_onehot)), dim=1)
        return {"character": self.classifier(x)}


def model(cfg, meta):
    net = TwoOutputNet if cfg.model.mode == Mode.multi_output else TwoInputNet
    return net(len(meta["alphabet_names"]), len(meta["character_names"]), cfg.data.image_size)


def loss(outputs, batch, alphabet_weight: float, character_weight: float):
    """Weighted sum of one cross-entropy per head the model has; the weights are the `loss.*` keys."""
    weights = {"alphabet": alphabet_weight, "character": character_weight}
    return sum(weights[head] * F.cross_entropy(logits, batch[head]) for head, logits in outputs.items())


def predictions(outputs, batch):
    return {head: (logits, batch[head]) for head, logits in outputs.items()}


def metrics(cfg, meta):
    sizes = {"alphabet": len(meta["alphabet_names"]), "character": len(meta["character_names"])}
    heads = ("alphabet", "character") if cfg.model.mode == Mode.multi_output else ("character",)
    return {head: accuracy(sizes[head]) for head in heads}


recipe = Recipe(
    name="omniglot_multi",
    description="Omniglot, multi_output (image -> alphabet, character) or multi_input (image, alphabet -> "
    "character); conv16-pool-128 ELU",
    prepare=prepare,
    raw_files=raw_files,
    data_config=OmniglotData,
    model=model,
    model_config=OmniglotModel,
    activation="elu",
    # multi_output predicts the alphabet, so it is not given it.
    inputs=lambda cfg: ("image",) if cfg.model.mode == Mode.multi_output else ("image", "alphabet_onehot"),
    targets=("alphabet", "character"),
    transform=transform,
    loss=loss,
    loss_config=OmniglotLoss,
    predictions=predictions,
    metrics=metrics,
    defaults={
        "data": {"download": True},  # as the tutorial's Omniglot(download=True)
        "trainer": {"epochs": 10, "batch_size": 32},
        "optimizer": {"name": "adam", "lr": 1e-3},
    },
)

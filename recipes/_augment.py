"""Batch augmentations of image recipes (`data.augment`): random changes drawn per image for the whole global batch,
alike on every process, and applied to a float batch on its device without a Python loop over images."""

import math
from functools import cache

import torch
from accelerate import PartialState
from torch import nn
from torchvision.transforms import v2

from pipeline import rng
from pipeline.errors import ConfigError


def flip(dim: int):
    def apply(image: torch.Tensor, u: torch.Tensor, _) -> torch.Tensor:
        return torch.where(u[:, None, None, None] < 0.5, image.flip(dim), image)

    return apply


def turn(image: torch.Tensor, u: torch.Tensor, degrees: float) -> torch.Tensor:
    return rotate(image, u * (2 * degrees) - degrees)


def autocontrast(image: torch.Tensor, u: torch.Tensor, _) -> torch.Tensor:
    return torch.where(u[:, None, None, None] < 0.5, v2.functional.autocontrast(image), image)


def brighten(image: torch.Tensor, u: torch.Tensor, fraction: float) -> torch.Tensor:
    return (image * (1 + (2 * u[:, None, None, None] - 1) * fraction)).clamp_(0, 1)


def resized_crop(image: torch.Tensor, u: torch.Tensor, min_scale: float) -> torch.Tensor:
    """RandomResizedCrop(size, scale=(min_scale, 1), ratio=(3/4, 4/3)) of each image by its own four draws: a part
    of scale x its area and of that aspect ratio, anywhere inside the image, scaled back to the full size
    (bilinear). A side longer than the image's is cut to it where torchvision would draw again."""
    area = min_scale + (1 - min_scale) * u[0]
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u[1])
    width, height = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # of the image's sides
    # affine_grid's coordinates run from -1 to 1 across the image: a centre within 1 - side keeps the part inside.
    x, y, zero = (1 - width) * (2 * u[2] - 1), (1 - height) * (2 * u[3] - 1), torch.zeros_like(area)
    theta = torch.stack([torch.stack([width, zero, x], 1), torch.stack([zero, height, y], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(image.shape), align_corners=False)
    return nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


# The one registry of `data.augment` names: name -> (function(images, uniform draws, value), what the value is).
# Each takes a float batch [N, C, H, W] in [0, 1] and one uniform number per image ([DRAWN, N] where it draws more),
# as torchvision's Random* transforms with p=0.5 or a uniform range would draw them for each image on its own.
AUGMENTATIONS = {
    "hflip": (flip(-1), None),  # mirrored left-right, half the images (RandomHorizontalFlip)
    "vflip": (flip(-2), None),  # upside down, half the images (RandomVerticalFlip)
    "rotate": (turn, "degrees"),  # turned by an angle in [-degrees, degrees], black corners (RandomRotation)
    "autocontrast": (autocontrast, None),  # contrast stretched, half the images (RandomAutocontrast)
    "brightness": (brighten, "fraction"),  # scaled by a factor in [1 - fraction, 1 + fraction] (ColorJitter)
    # a random part of at least `min scale` of the area, of aspect ratio 3/4 to 4/3, scaled up (RandomResizedCrop)
    "random_resized_crop": (resized_crop, "min scale"),
}
# Uniform numbers an augmentation draws per image, where more than one (area, aspect ratio, x, y).
DRAWN = {"random_resized_crop": 4}
VALID = ", ".join(f"{name}:<{value}>" if value else name for name, (_, value) in AUGMENTATIONS.items())


@cache
def augmentations(names: tuple[str, ...]) -> list[tuple]:
    """`data.augment` -> [(function, value, draws per image)], or a ConfigError naming the bad item and the valid
    ones."""
    found = []
    for item in names:
        name, _, text = str(item).partition(":")
        if name not in AUGMENTATIONS:
            raise ConfigError(
                f"data.augment: unknown augmentation {item!r}; valid: {VALID}.\nFix: e.g. "
                f"data.augment=[hflip,rotate:15], or data.augment=[] for none"
            )
        apply, unit = AUGMENTATIONS[name]
        if bool(unit) != bool(text):
            want = f"a value, {name}:<{unit}>" if unit else f"no value: {name}"
            raise ConfigError(f"data.augment: {item!r} needs {want}.\nFix: e.g. data.augment=[hflip,rotate:15]")
        value = None
        if unit:
            try:
                value = float(text)
            except ValueError:
                value = -1.0
            limit = 180.0 if unit == "degrees" else 1.0
            if not 0 < value <= limit:
                raise ConfigError(
                    f"data.augment: {item!r}: the {unit} must be a number in (0, {limit:g}].\nFix: "
                    f"e.g. {name}:{15 if unit == 'degrees' else 0.2}"
                )
        found.append((apply, value, DRAWN.get(name, 1)))
    return found


def augment(image: torch.Tensor, names) -> torch.Tensor:
    """The named augmentations in order, each with its own draw per image: a whole batch on its device at once
    (v2's transforms draw one set of parameters per call, one flip and one angle for the whole batch), so the
    per-image draws are done here with masks and one affine grid, without a Python loop over images."""
    steps = augmentations(tuple(names))
    if not steps:
        return image
    numbers = draws(sum(rows for _, _, rows in steps), len(image), image.device)
    for apply, value, rows in steps:
        u, numbers = numbers[:rows], numbers[rows:]
        image = apply(image, u[0] if rows == 1 else u, value)
    return image


def draws(rows: int, n: int, device) -> torch.Tensor:
    """[rows, n] uniform [0, 1) numbers for this process's n images: the draws for the whole global batch,
    made alike on every process (from the data's generator, rng.DRAWS, not the model's per-process stream),
    sliced at this process's part.

    Each process trains on its slice of the global batch (split_batches), so image i of the global batch
    gets the same draws on 1 or N processes and the generators stay in step; drawing only n numbers would
    give every process's slice the same flips and angles.
    """
    state = PartialState()  # Accelerate's process group (a singleton); one process outside a launch
    numbers = torch.rand(rows, n * state.num_processes, device=device, generator=rng.DRAWS.generator(device))
    return numbers[:, state.process_index * n : (state.process_index + 1) * n]


def rotate(image: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Each square image turned counter-clockwise about its centre by its own angle, as v2.functional.rotate
    does (nearest pixel, black corners)."""
    angle = torch.deg2rad(degrees)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    # affine_grid maps output to input positions (x right, y down): the inverse of the image's turn.
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(image.shape), align_corners=False)
    return nn.functional.grid_sample(image, grid, mode="nearest", padding_mode="zeros", align_corners=False)

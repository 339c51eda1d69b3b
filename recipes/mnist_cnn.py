"""mnist_cnn: two 3x3 convolutions, max-pool, two linear layers; Adam lr 1e-3, batch 64.

Raw files: <data.root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
(downloaded there when missing, unless data.download=false)
python launch/train.py recipe=mnist_cnn data.root=data
"""

from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchvision.datasets import MNIST

from pipeline.data import idx_raw_files, idx_splits
from pipeline.recipe import Recipe


def transform(batch, train, meta):
    return {**batch, "image": batch["image"].float().div_(255.0)}  # ToTensor: [0, 255] -> [0, 1]


def model(cfg, meta):
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(14 * 14 * 32, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )


recipe = Recipe(
    name="mnist_cnn",
    description="MNIST, CNN conv32-conv32-pool-128-10, CrossEntropyLoss, Adam lr 1e-3",
    prepare=lambda cfg: idx_splits(MNIST, cfg),
    raw_files=lambda cfg: idx_raw_files(MNIST, cfg),
    model=model,
    metrics=lambda cfg, meta: {"": MetricCollection({"accuracy": MulticlassAccuracy(10, average="micro")})},
    transform=transform,
    defaults={"data": {"download": True},  # as the tutorial's MNIST(download=True)
              "trainer": {"epochs": 5, "batch_size": 64},
              "optimizer": {"name": "adam", "lr": 1e-3}},
)

"""fashion_mnist_mlp: the PyTorch quickstart network on FashionMNIST, 784-512-512-10, SGD lr 1e-3.

Raw files: <data.root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
(downloaded there when missing, unless data.download=false)
python launch/train.py recipe=fashion_mnist_mlp data.root=data
"""

from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchvision.datasets import FashionMNIST

from pipeline.data import idx_raw_files, idx_splits
from pipeline.recipe import Recipe


def transform(batch, train, meta):
    return {**batch, "image": batch["image"].float().div_(255.0)}  # ToTensor: [0, 255] -> [0, 1]


def model(cfg, meta):
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 10),
    )


recipe = Recipe(
    name="fashion_mnist_mlp",
    description="FashionMNIST, MLP 784-512-512-10, CrossEntropyLoss, SGD lr 1e-3",
    prepare=lambda cfg: idx_splits(FashionMNIST, cfg),
    raw_files=lambda cfg: idx_raw_files(FashionMNIST, cfg),
    model=model,
    metrics=lambda cfg, meta: {"": MetricCollection({"accuracy": MulticlassAccuracy(10, average="micro")})},
    transform=transform,
    defaults={"data": {"download": True},  # as the tutorial's FashionMNIST(download=True)
              "trainer": {"epochs": 10, "batch_size": 64},
              "optimizer": {"name": "sgd", "lr": 1e-3}},
)

"""mnist_mlp: the classic MNIST MLP, 784-128-64-10 with LogSoftmax and NLLLoss, plain SGD.

Raw files: <data.root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
(downloaded there when missing, unless data.download=false)
python launch/train.py recipe=mnist_mlp data.root=data
"""

import torch
from torch import nn
from torchvision.datasets import MNIST

from recipes._torchvision import idx_recipe

MINUS_ONE = torch.tensor(-1.0)


def transform(batch, train, meta):
    # ToTensor + Normalize((0.5,), (0.5,)) on the whole batch: [0, 255] -> [-1, 1] as -1 + x * 2/255,
    # one kernel that reads uint8 and writes float (half the time of convert, divide, subtract)
    return {**batch, "image": torch.add(MINUS_ONE, batch["image"], alpha=2 / 255)}


def model(cfg, meta):
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
        nn.LogSoftmax(dim=1),
    )


def nll(outputs, batch):
    return nn.functional.nll_loss(outputs, batch["label"])


# The data and accuracy: recipes/_torchvision.py's idx_recipe.
recipe = idx_recipe(
    MNIST,
    name="mnist_mlp",
    model=model,
    description="MNIST, MLP 784-128-64-10, LogSoftmax + NLLLoss, SGD lr 0.003",
    loss=nll,
    transform=transform,
    defaults={"trainer": {"epochs": 5, "batch_size": 64}, "optimizer": {"name": "sgd", "lr": 0.003}},
)

"""fashion_mnist_mlp: the PyTorch quickstart network on FashionMNIST, 784-512-512-10, SGD lr 1e-3.

Raw files: <data.root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
(downloaded there when missing, unless data.download=false)
python launch/train.py recipe=fashion_mnist_mlp data.root=data
"""

from torch import nn
from torchvision.datasets import FashionMNIST

from recipes._torchvision import idx_recipe


def model(cfg, meta):
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


# The data, ToTensor's [0, 1] scaling and accuracy: recipes/_torchvision.py's idx_recipe.
recipe = idx_recipe(
    FashionMNIST,
    name="fashion_mnist_mlp",
    model=model,
    description="FashionMNIST, MLP 784-512-512-10, CrossEntropyLoss, SGD lr 1e-3",
    defaults={"trainer": {"epochs": 10, "batch_size": 64}, "optimizer": {"name": "sgd", "lr": 1e-3}},
)

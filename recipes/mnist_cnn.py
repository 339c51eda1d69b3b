"""mnist_cnn: two 3x3 convolutions, max-pool, two linear layers; Adam lr 1e-3, batch 64.

Raw files: <data.root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
(downloaded there when missing, unless data.download=false)
python launch/train.py recipe=mnist_cnn data.root=data
"""

from torch import nn
from torchvision.datasets import MNIST

from recipes._torchvision import idx_recipe


def model(cfg, meta):
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(14 * 14 * 32, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


# The data, ToTensor's [0, 1] scaling and accuracy: recipes/_torchvision.py's idx_recipe.
recipe = idx_recipe(
    MNIST,
    name="mnist_cnn",
    model=model,
    description="MNIST, CNN conv32-conv32-pool-128-10, CrossEntropyLoss, Adam lr 1e-3",
    defaults={"trainer": {"epochs": 5, "batch_size": 64}, "optimizer": {"name": "adam", "lr": 1e-3}},
)

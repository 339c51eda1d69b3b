"""house_prices_linear: the first regression tutorial, price = w * area + b, one linear layer, MSE, SGD.

A preset of `tabular` (model.hidden=[]): <data.root>/house_prices.csv with a header and columns area,price.
python launch/train.py recipe=house_prices_linear data.root=data
python launch/train.py recipe=house_prices_linear data.root=data data.standardize=true optimizer.lr=0.05
"""

from dataclasses import dataclass

from recipes.tabular import Spec, TabularData, recipe_for


@dataclass
class HousePricesData(TabularData):
    file: str = "house_prices.csv"
    x_column: str = "area"
    y_column: str = "price"
    # Raw units need the tutorial's tiny lr (x^2 ~ 10^4 sets the step size); standardized x and y
    # train with an ordinary one. Metrics are reported in the CSV's units either way.
    standardize: bool = False


recipe = recipe_for(
    "house_prices_linear",
    "house_prices.csv area -> price, nn.Linear(1, 1), MSELoss, SGD lr 4e-5",
    Spec(
        columns=lambda cfg: ([cfg.data.x_column], cfg.data.y_column),
        rename="data.x_column= data.y_column=",
        expected="a CSV with a header row and numeric columns area,price (one row per house)",
    ),
    data_config=HousePricesData,
    # The tutorial's per-sample SGD: batch 1, lr 4e-5 on raw square metres and prices. No house without an
    # area or a price is filled in: such rows are refused (or dropped with data.drop_bad_rows=true).
    defaults={
        "data": {"eval_fraction": 0.2, "task": "regression", "impute": "none"},
        "model": {"hidden": []},
        "trainer": {"epochs": 30, "batch_size": 1, "eval_batch_size": 256, "log_every": 100},
        "optimizer": {"name": "sgd", "lr": 4e-5},
    },
)

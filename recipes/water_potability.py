"""water_potability: is this water safe to drink? 9 measurements -> MLP 9-16-8-1 (BatchNorm, ELU, He init).

A preset of `tabular`: the Kaggle "Water Quality" CSV as published (3,275 rows), <data.root>/water_potability.csv.
Empty cells are filled with the train medians, then every column is standardized (train statistics).
python launch/train.py recipe=water_potability data.root=data
"""

from dataclasses import dataclass, field

from recipes.tabular import Spec, TabularData, recipe_for

FEATURES = [
    "ph",
    "Hardness",
    "Solids",
    "Chloramines",
    "Sulfate",
    "Conductivity",
    "Organic_carbon",
    "Trihalomethanes",
    "Turbidity",
]
LABEL = "Potability"


@dataclass
class WaterData(TabularData):
    file: str = "water_potability.csv"
    target: str = LABEL
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    class_names: list[str] = field(default_factory=lambda: ["not potable", "potable"])


recipe = recipe_for(
    "water_potability",
    "water_potability.csv, MLP 9-16-8-1 BatchNorm+ELU, He init, BCEWithLogits, Adam lr 1e-3",
    Spec(
        target_values=(0, 1),
        expected=f"the Kaggle 'Water Quality' CSV with a header row {','.join(FEATURES)},"
        f"{LABEL} (numbers, empty cells for missing values; {LABEL} 0/1)",
    ),
    data_config=WaterData,
    defaults={
        "data": {"eval_fraction": 0.2, "task": "binary"},
        "model": {"init": "kaiming_normal", "hidden": [16, 8], "batchnorm": True, "activation": "elu"},
        "trainer": {"epochs": 30, "batch_size": 32, "clip_grad_norm": 1.0, "log_every": 100},
        "optimizer": {"name": "adam", "lr": 1e-3},
    },
)

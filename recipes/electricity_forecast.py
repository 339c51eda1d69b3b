"""electricity_forecast: the next 15 minutes of consumption from the last day (96 steps), RNN/LSTM/GRU.

A preset of recipes/time_series.py. Raw file: <data.root>/electricity.csv, column 1 a timestamp
(2016-01-01 00:15:00), column 2 the consumption, one row per 15 minutes (a header row is optional).
python launch/train.py recipe=electricity_forecast data.root=data model.cell=gru
"""

from dataclasses import replace

from recipes import time_series
from recipes.time_series import Windows, transform

__all__ = ["recipe", "Windows", "transform"]  # the series' windows and batches, as this preset cuts them

recipe = replace(
    time_series.recipe,
    name="electricity_forecast",
    description="electricity.csv 15-min consumption, 96-step window -> next step, RNN|LSTM|GRU, MSE, Adam 1e-4",
    # missing_steps=skip: a row left out (or dropped by data.drop_bad_rows) closes up the series, as the
    # tutorial's windows over consecutive rows do; an empty reading is interpolated.
    defaults={
        "data": {
            "root": "data",
            "file": "electricity.csv",
            "window": 96,
            "horizon": 1,
            "eval_fraction": 0.2,
            "missing_steps": "skip",
        },
        "trainer": {"epochs": 10, "batch_size": 32, "eval_batch_size": 256, "log_every": 100},
        "optimizer": {"name": "adam", "lr": 1e-4},
    },
)

"""Predict with a finished run's model on new inputs in the recipe's raw format; the result is a CSV.

A CSV of measurements:   python launch/predict.py run=runs/water_potability/baseline input=new_samples.csv
A folder of images:      python launch/predict.py run=runs/clouds/baseline input=photos/ output=clouds.csv
The best weights:        python launch/predict.py run=runs/mnist_cnn/baseline input=digit.png weights=best
Without output= the CSV goes to <run>/predictions/<input name>.csv. Inputs are preprocessed with the statistics
stored with the run (train medians, means, stds), never with statistics of the new data.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from pipeline.cli import main  # noqa: E402


def parse_argv(argv: list[str]):
    from pipeline import predict  # imported once --help is ruled out: it needs no torch

    return predict.parse_argv(argv)


def run(*args) -> None:
    from pipeline import predict

    predict.predict(*args)


if __name__ == "__main__":
    main(
        "predict",
        "Predicts with a finished run.",
        run,
        parse_argv=parse_argv,
        help_text=__doc__.strip() + "\n\nKeys: run=DIR and input=PATH (required), output=FILE.csv, "
        "weights=final|best|FILE (default: the weights the run reports),\n      data.KEY=VALUE (e.g. "
        "data.drop_bad_rows=true) and "
        "trainer.eval_batch_size=N on top of the run's config.yaml.",
    )

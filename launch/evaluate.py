"""Evaluate a finished run's weights on its held-out data, or on other data prepared the same way.

One process:            python launch/evaluate.py run=runs/digits/20250101-120000
The test split, best:   python launch/evaluate.py run=runs/mnist_cnn/baseline split=test weights=best
Other data:             python launch/evaluate.py run=runs/water_potability/baseline data.file=new_samples.csv
Several processes:      accelerate launch --multi_gpu --num_processes 2 launch/evaluate.py run=runs/digits/...
The metrics go to <run>/evaluations/<split>[-best].json on the run's own data (its fingerprint), else
<split>[-best]-<data fingerprint>.json.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from pipeline.cli import main  # noqa: E402


def parse_argv(argv: list[str]):
    from pipeline import runs  # imported once --help is ruled out: it needs no torch

    return runs.parse_argv(argv)


def run(*args) -> None:
    from pipeline import runs

    runs.evaluate(*args)


if __name__ == "__main__":
    main(
        "evaluate",
        "Evaluates a finished run.",
        run,
        parse_argv=parse_argv,
        help_text=__doc__.strip() + "\n\nKeys: run=DIR (required), split=eval|test (default eval), weights=final|best"
        "|FILE (default: the weights the run reports),\n      data.KEY=VALUE and "
        "trainer.eval_batch_size=N on top of the run's config.yaml.\nShow the config it evaluates with: "
        "add --print-config",
    )

"""Train one recipe with the shared loop.

One process (CPU or one GPU):   python launch/train.py recipe=mnist_cnn trainer.epochs=3
Several GPUs on one machine:    accelerate launch --multi_gpu --num_processes 8 launch/train.py recipe=mnist_cnn
Two machines (run on each):     accelerate launch --num_machines 2 --machine_rank R --main_process_ip HOST \\
                                  --main_process_port 29500 --num_processes 16 launch/train.py recipe=mnist_cnn
Mixed precision / compile:      accelerate launch --mixed_precision bf16 launch/train.py trainer.compile=true
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from pipeline import console  # noqa: E402
from pipeline.cli import main  # noqa: E402


def train(recipe, cfg) -> None:
    from pipeline.loop import train  # imported once the command line is checked: --help needs no torch

    with console.quiet():  # other tools' output to <run>/console.log (--verbose: to the terminal too)
        train(cfg, recipe)


if __name__ == "__main__":
    main("train", "Trains and evaluates a recipe; the run goes to <output_dir>/<recipe>/<run_name>/.", train)

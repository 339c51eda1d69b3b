"""Build a recipe's Arrow shards without training (a cluster job's first step, on one process).

python launch/prepare.py recipe=mnist_cnn data.root=/data data.cache_dir=/cache
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from pipeline import data  # noqa: E402
from pipeline.cli import main  # noqa: E402


def prepare(recipe, cfg):
    out = data.prepare(recipe, cfg)
    splits, _ = data.load(out)
    print(f"shards ready: {out} ({', '.join(f'{k} {len(v):,}' for k, v in splits.items())})")


if __name__ == "__main__":
    main("prepare", "Builds the recipe's shards under <data.cache_dir>/<recipe>/<fingerprint>/ and exits.", prepare)

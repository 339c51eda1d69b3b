"""Build a recipe's Arrow shards without training (a cluster job's first step, on one process).

python launch/prepare.py recipe=mnist_cnn data.root=/data data.cache_dir=/cache
python launch/prepare.py recipe=mnist_cnn data.root=/data data.cache_dir=/cache --verify    # hash every shard file
python launch/prepare.py recipe=mnist_cnn data.root=/data data.cache_dir=/cache --rebuild   # remove and rebuild
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from pipeline import data  # noqa: E402
from pipeline.cli import main  # noqa: E402

FLAGS = ("--verify", "--rebuild")


def prepare(recipe, cfg, verify: bool = False, rebuild: bool = False):
    out = data.prepare(recipe, cfg, rebuild=rebuild)
    if verify:
        started = time.perf_counter()
        size = data.check(out, full=True)
        seconds = time.perf_counter() - started
        print(f"verified: every shard file matches its recorded sha256 ({size / 2**20:,.1f} MiB in {seconds:.2f} s, "
              f"{size / 2**20 / max(seconds, 1e-9):,.0f} MiB/s)")
    splits, _ = data.load(out)
    print(f"shards ready: {out} ({', '.join(f'{k} {len(v):,}' for k, v in splits.items())})")


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a in FLAGS]
    sys.argv = [a for a in sys.argv if a not in FLAGS]  # the rest are config overrides
    main("prepare", "Builds the recipe's shards under <data.cache_dir>/<recipe>/<fingerprint>/ and exits.\n"
         "--verify checks every shard file against the sha256 recorded when it was written; "
         "--rebuild removes the shards and builds them again.",
         lambda recipe, cfg: prepare(recipe, cfg, verify="--verify" in flags, rebuild="--rebuild" in flags))

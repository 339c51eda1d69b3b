"""Build a recipe's Arrow shards without training (a cluster job's first step); several processes share it.

python launch/prepare.py recipe=mnist_cnn data.root=/data data.cache_dir=/cache
python launch/prepare.py recipe=mnist_cnn data.root=/data data.cache_dir=/cache --verify    # hash every shard file
python launch/prepare.py recipe=mnist_cnn data.root=/data data.cache_dir=/cache --rebuild   # remove and rebuild
accelerate launch --multi_gpu --num_processes 8 launch/prepare.py recipe=image_folder data.train_dir=/data/photos
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from pipeline.cli import main  # noqa: E402

FLAGS = ("--verify", "--rebuild")


def prepare(recipe, cfg, verify: bool = False, rebuild: bool = False):
    from pipeline import shard_store  # imported once the command line is checked: --help needs no torch

    # Started by `accelerate launch` or torchrun with several processes: they share the build (see docs/data.md).
    state = together() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if state is not None and not state.is_main_process:
        shard_store.prepare(recipe, cfg, state, log=lambda *_: None, rebuild=rebuild)
        return
    started = time.perf_counter()
    out = shard_store.shards_dir(recipe, cfg)  # the fingerprint, once: it walks and stats every raw file
    reused = not rebuild and (out / shard_store.META_FILE).exists()
    out = shard_store.prepare(recipe, cfg, state, rebuild=rebuild, fingerprinted=out.name)
    seconds = time.perf_counter() - started
    if verify:
        started = time.perf_counter()
        size = shard_store.check_shards(out, full=True)
        hashing = time.perf_counter() - started
        print(
            f"verified: every shard file matches its recorded sha256 ({size / 2**20:,.1f} MiB in {hashing:.2f} s, "
            f"{size / 2**20 / max(hashing, 1e-9):,.0f} MiB/s)"
        )
    rows = shard_store.split_rows(out)
    print(f"shards ready: {out} ({', '.join(f'{k} {n:,}' for k, n in rows.items())})")
    print(rate(sum(rows.values()), shard_store.check_shards(out), None if reused else seconds))


def together():
    """The processes of the launch, on the CPU's gloo backend: a prepare needs no accelerator."""
    from accelerate import PartialState

    return PartialState(cpu=True)


def rate(rows: int, size: int, seconds: float | None) -> str:
    """The preparation's speed, the figure to watch on a large set; `seconds` None: the shards were reused."""
    if seconds is None:
        return f"reused the shards of {rows:,} rows ({_bytes(size)}), prepared earlier: nothing was built"
    return (
        f"prepared {rows:,} rows in {seconds:,.1f} s ({rows / seconds:,.0f} rows/s, {_bytes(size)} of shards, "
        f"{size / 1e6 / seconds:,.1f} MB/s)"
    )


def _bytes(size: int) -> str:
    return f"{size / 1e9:,.2f} GB" if size >= 1e9 else f"{size / 1e6:,.1f} MB"


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a in FLAGS]
    sys.argv = [a for a in sys.argv if a not in FLAGS]  # the rest are config overrides
    main(
        "prepare",
        "Builds the recipe's shards under <data.cache_dir>/<recipe>/<fingerprint>/ and exits.\n"
        "--verify checks every shard file against the sha256 recorded when it was written; "
        "--rebuild removes the shards and builds them again.",
        lambda recipe, cfg: prepare(recipe, cfg, verify="--verify" in flags, rebuild="--rebuild" in flags),
    )

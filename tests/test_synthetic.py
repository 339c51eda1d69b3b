"""The synthetic recipe through the real CLI: launch/prepare.py builds the set (and reports its rate), the
same rows come out of one or two processes, and training learns the classes.

.venv/bin/pytest tests/test_synthetic.py            # about 30 s on 2 cores
"""

import re
from pathlib import Path

import pytest
import torch
from conftest import cli, common, ok, summary

from pipeline import cli as pipeline_cli
from pipeline import shard_store, tensor_rows
from pipeline.errors import ConfigError

SMALL = ["recipe=synthetic", "data.rows=2000", "data.image_size=16"]


def columns(cache: Path, *args: str) -> dict:
    recipe, cfg = pipeline_cli.parse([*SMALL, f"data.cache_dir={cache}", *args])
    splits, meta = shard_store.open_shards(shard_store.shards_dir(recipe, cfg))
    return {name: tensor_rows.columns(split) for name, split in splits.items()} | {"meta": meta}


def prepare(workdir: Path, cache: Path, *args: str) -> str:
    return ok(cli([*SMALL, f"data.cache_dir={cache}", *args], cwd=workdir, script="prepare")).stdout


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The small set built by two processes; the cache folder that holds it."""
    workdir = tmp_path_factory.mktemp("synthetic")
    out = prepare(workdir, workdir / "cache", "data.num_proc=2")
    assert re.search(r"prepared 2,000 rows in [\d.]+ s \([\d,]+ rows/s, [\d.]+ MB of shards, [\d.]+ MB/s\)", out), out
    assert "data: preparing synthetic from no files (the recipe generates its data) -> " in out, out
    return workdir / "cache"


@pytest.mark.slow
def test_synthetic_learns_and_one_process_makes_the_same_rows_as_two(prepared, workdir):
    # Built again here by one process (launch/train.py prepares what is missing), then trained on.
    ok(cli(common(workdir, *SMALL, "data.num_proc=1", "trainer.epochs=1"), cwd=workdir))
    s = summary(workdir / "runs", "synthetic")
    assert s["eval/samples"] == 200 and s["eval/accuracy"] >= 0.9, s  # chance: 0.1

    one, two = columns(workdir / "cache"), columns(prepared)
    assert one["meta"] == two["meta"] == {"class_names": [str(c) for c in range(10)]}
    for split, rows in (("train", 1800), ("eval", 200)):
        image, label = one[split]["image"], one[split]["label"]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (rows, 3, 16, 16)
        assert torch.equal(image, two[split]["image"]) and torch.equal(label, two[split]["label"])
        assert torch.bincount(label).tolist() == [rows // 10] * 10  # balanced classes


@pytest.mark.slow
def test_prepare_says_when_it_reused_the_shards(prepared, workdir):
    # num_proc says how fast, not what: the set built by two processes is found again with one.
    out = prepare(workdir, prepared, "data.num_proc=1")
    assert re.search(r"reused the shards of 2,000 rows \([\d.]+ MB\), prepared earlier: nothing was built", out), out


def test_synthetic_bad_sizes_are_named():
    recipe, cfg = pipeline_cli.parse([*SMALL, "data.image_size=2", "data.num_classes=1", "data.rows=1"])
    with pytest.raises(ConfigError) as e:
        recipe.prepare(cfg)
    assert "data.image_size=2 (at least 4)" in str(e.value) and "data.num_classes=1 (at least 2)" in str(e.value)
    assert "data.rows=1 with data.eval_fraction=0.1 leaves 0 train and 1 eval rows" in str(e.value)

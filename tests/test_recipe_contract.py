"""The recipe contract: a new user's CSV recipe, kept outside this repo, with each usual mistake named and fixed.

Each recipe is a real module in a temporary folder (`mine/points.py`), run through the real CLI as
`recipe=mine.points` from that folder; each mistake exits 2 with the fix and no traceback.
"""

import json

import datasets
import numpy as np
import pytest
import torch
from conftest import cli, common, ok

from pipeline import shard_store
from pipeline.errors import ConfigError
from pipeline.recipe import Recipe, dataset, from_arrays
from pipeline.recipe_contract import check_batch

RECIPE = """
from pathlib import Path

import datasets
import numpy as np
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from pipeline.recipe import Recipe, from_arrays


def raw_files(cfg):
    return [Path(cfg.data.root) / "points.csv"]


def prepare(cfg):
    table = np.loadtxt(raw_files(cfg)[0], delimiter=",", skiprows=1)
    x, y = table[:, :2].astype(np.float32), table[:, 2].astype(np.int64)
    splits = datasets.DatasetDict(train=from_arrays(features=x[:80], label=y[:80]),
                                  eval=from_arrays(features=x[80:], label=y[80:]))
    meta = {"mean": x.mean(0).tolist()}
    return splits, meta


def metrics(cfg, meta):
    return {"": MetricCollection({"accuracy": MulticlassAccuracy(2, average="micro")})}


recipe = Recipe(name="points", description="two features, a 0/1 label", prepare=prepare, raw_files=raw_files,
                model=lambda cfg, meta: nn.Linear(2, 2), metrics=metrics,
                inputs=("features",))
"""


def write(folder, *changes: tuple[str, str]):
    """`folder/mine/points.py` (RECIPE with each (old, new) replaced) and `folder/points.csv`; returns the CLI args."""
    source = RECIPE
    for old, new in changes:
        assert old in source, old
        source = source.replace(old, new)
    (folder / "mine").mkdir(parents=True)
    (folder / "mine" / "points.py").write_text(source)
    x = np.random.default_rng(0).normal(size=(100, 2))
    rows = "".join(f"{a},{b},{int(a + b > 0)}\n" for a, b in x)
    (folder / "points.csv").write_text("a,b,label\n" + rows)
    return common(folder, "recipe=mine.points", f"data.root={folder}", "trainer.epochs=1", "trainer.batch_size=16")


def refused(result, *words: str) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for word in words:
        assert word in result.stderr, (word, result.stderr)
    return result.stderr


def test_the_good_recipe_trains_and_its_shards_are_one_datasetdict(workdir):
    out = ok(cli(write(workdir), cwd=workdir))
    assert "eval/accuracy" in out.stdout
    [shards] = (workdir / "cache" / "points").iterdir()
    # As the README says: one DatasetDict, readable by `datasets` itself; the pipeline's own files beside it.
    whole = datasets.load_from_disk(str(shards))
    assert isinstance(whole, datasets.DatasetDict)
    assert {k: len(v) for k, v in whole.items()} == {"train": 80, "eval": 20}
    assert whole["train"].features["features"] == datasets.List(datasets.Value("float32"), length=2)
    splits, meta = shard_store.open_shards(shards)
    assert list(splits) == ["train", "eval"] and len(splits["eval"]) == 20 and len(meta["mean"]) == 2
    assert "dataset_dict.json" in json.loads((shards / shard_store.CHECKSUM_FILE).read_text())


@pytest.mark.slow
def test_missing_inputs_names_the_column_the_columns_and_the_fix(workdir):
    args = write(workdir, ('\n                inputs=("features",))', ")"))
    refused(
        cli(args, cwd=workdir),
        "recipe 'points'",
        "mine/points.py",
        "input column 'image'",
        "its columns are: features, label",
        "inputs=('features',)",
    )
    assert not (workdir / "runs").exists() and not list((workdir / "cache").rglob("meta.json"))


def test_prepare_returning_only_the_splits_says_what_to_return(workdir):
    args = write(workdir, ("    return splits, meta", "    return splits"))
    refused(
        cli(args, cwd=workdir, script="prepare"),
        "recipe 'points'",
        "returned only the splits (train, eval)",
        "(DatasetDict, meta)",
        "return datasets.DatasetDict(train=..., eval=...), meta",
    )


def test_a_missing_eval_split_is_named(workdir):
    args = write(workdir, ("eval=from_arrays", "valid=from_arrays"))
    refused(cli(args, cwd=workdir, script="prepare"), "the splits train, valid", "'eval' missing")


def test_numpy_values_in_meta_are_saved_as_numbers_and_lists(workdir):
    args = write(
        workdir,
        (
            'meta = {"mean": x.mean(0).tolist()}',
            'meta = {"mean": x.mean(0), "rows": np.int64(len(x)), "std": {"a": x[:, 0].std()}}',
        ),
    )
    ok(cli(args, cwd=workdir, script="prepare"))
    [meta_file] = (workdir / "cache" / "points").rglob(shard_store.META_FILE)
    meta = json.loads(meta_file.read_text())
    assert len(meta["mean"]) == 2 and meta["rows"] == 100 and isinstance(meta["std"]["a"], float)


def test_meta_that_json_cannot_hold_is_named_by_its_key(workdir):
    args = write(workdir, ('meta = {"mean": x.mean(0).tolist()}', 'meta = {"files": {"csv": raw_files(cfg)[0]}}'))
    refused(cli(args, cwd=workdir, script="prepare"), "meta['files']['csv'] is PosixPath", "str(path)")


def test_single_logit_with_the_default_loss_points_to_the_binary_pieces(workdir):
    args = write(workdir, ("nn.Linear(2, 2)", "nn.Sequential(nn.Linear(2, 1), nn.Flatten(0))"))
    refused(
        cli(args, cwd=workdir),
        "outputs of shape [16]",
        "labels are integers",
        "loss=binary_cross_entropy",
        "predictions=binary_predictions",
        "metrics=binary_metrics",
    )


def test_the_binary_pieces_train_a_single_logit_model(workdir):
    args = write(
        workdir,
        ("nn.Linear(2, 2)", "nn.Linear(2, 1)"),  # [N, 1] outputs are taken as [N]
        ("metrics=metrics,", "metrics=binary_metrics, loss=binary_cross_entropy, predictions=binary_predictions,"),
        ("import Recipe,", "import Recipe, binary_cross_entropy, binary_metrics, binary_predictions,"),
    )
    out = ok(cli(args + ["trainer.epochs=20", "optimizer.lr=0.1"], cwd=workdir))
    for name in ("eval/accuracy", "eval/auroc", "eval/f1"):
        assert name in out.stdout
    summary = json.loads(next((workdir / "runs" / "points").rglob("summary.json")).read_text())
    assert summary["eval/accuracy"] > 0.9  # a linearly separable label


def test_a_split_column_without_a_fixed_shape_is_refused(workdir):
    # Dataset.from_dict stores a 2-D array as variable-length lists, which cannot become one tensor.
    args = write(
        workdir,
        (
            "train=from_arrays(features=x[:80], label=y[:80])",
            'train=datasets.Dataset.from_dict({"features": x[:80], "label": y[:80]})',
        ),
    )
    refused(
        cli(args, cwd=workdir, script="prepare"),
        "column 'features' of the prepared 'train' split has no fixed shape",
        "from_arrays(features=array",
        "length=",
    )


@pytest.mark.parametrize(
    "change, words",
    [
        (('inputs=("features",)', 'inputs=("features")'), ["`inputs` must be a tuple", "trailing comma"]),
        (("prepare=prepare,", "prepare='prepare',"), ["`prepare` must be a function", "`prepare=prepare`"]),
        (
            ("metrics=metrics,", "metrics=metrics, defaults=[('trainer', 1)],"),
            ["`defaults` must be a dict", "defaults={'trainer'"],
        ),
    ],
)
def test_wrong_field_types_are_named_when_the_recipe_loads(workdir, change, words):
    refused(cli(write(workdir, change), cwd=workdir, script="prepare"), "recipe 'points'", *words)
    assert not (workdir / "cache").exists()  # stopped before any data was read


def test_first_batch_check_names_columns_a_transform_left_out():
    # With a transform the split's columns may not be the batch's; the loop checks its first batch.
    recipe = Recipe(
        name="t",
        description="",
        prepare=print,
        raw_files=print,
        model=print,
        metrics=print,
        transform=lambda batch, train, meta: {"x": batch["features"]},
        inputs=("x",),
    )
    cfg = None  # a tuple `inputs` needs no config
    check_batch(recipe, cfg, {"x": torch.zeros(2, 3), "label": torch.zeros(2)})
    with pytest.raises(ConfigError, match=r"target column 'label' .* first training batch .* columns are: x"):
        check_batch(recipe, cfg, {"x": torch.zeros(2, 3)})


# ---- the helpers a recipe builds its splits with: the same datasets as the library's own functions, faster


def same_rows(ours: datasets.Dataset, theirs: datasets.Dataset) -> bool:
    return ours.features == theirs.features and ours.data.table.equals(theirs.flatten_indices().data.table)


def test_dataset_builds_what_from_dict_builds():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 6)), rng.integers(0, 3, 50)
    features = datasets.Features(
        {
            "features": datasets.List(datasets.Value("float32"), length=3),
            "label": datasets.ClassLabel(names=["a", "b", "c"]),
            "w": datasets.Value("float32"),
        }
    )
    columns = {"features": x[:, ::2], "label": y, "w": x[:, 0]}  # a strided view, float64 into float32
    assert same_rows(dataset(columns, features), datasets.Dataset.from_dict(columns, features=features))
    images = rng.integers(0, 255, (4, 1, 3, 3)).astype(np.uint8)  # more dimensions: from_dict itself
    assert np.array_equal(from_arrays(image=images).with_format("numpy")[:]["image"], images)


@pytest.mark.parametrize("stratify", ["label", None])
def test_split_train_eval_holds_out_what_train_test_split_holds_out(tmp_path, stratify):
    from recipes._splits import split_train_eval

    rng = np.random.default_rng(1)
    for rows, classes, fraction, seed in [(50, 2, 0.2, 42), (1797, 10, 0.2, 7), (3276, 2, 0.25, 0), (200, 7, 0.3, 5)]:
        features = datasets.Features(
            {"x": datasets.Value("float64"), "label": datasets.ClassLabel(num_classes=classes)}
        )
        full = datasets.Dataset.from_dict(
            {"x": rng.normal(size=rows), "label": rng.integers(0, classes, rows)}, features=features
        )
        on_disk = tmp_path / f"{rows}-{stratify}"
        full.save_to_disk(on_disk)
        # In memory, as a selection of another dataset, and memory-mapped from disk (as decoded images are).
        for ds in (full, full.select(rng.permutation(rows)), datasets.load_from_disk(on_disk)):
            theirs = ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)
            train, held_out = split_train_eval(ds, fraction, seed, stratify)
            assert same_rows(train, theirs["train"]) and same_rows(held_out, theirs["test"]), (rows, classes)
    one_of_a_class = datasets.Dataset.from_dict(
        {"label": [0, 0, 0, 1]}, features=datasets.Features({"label": datasets.ClassLabel(num_classes=2)})
    )
    with pytest.raises(ValueError, match="The least populated class in label column has only 1 member"):
        split_train_eval(one_of_a_class, 0.5, 0, "label")

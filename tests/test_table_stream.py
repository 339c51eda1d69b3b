"""Tables prepared in record batches (recipes/_table_stream.py): tiny blocks force many batches, and the shards,
statistics and messages equal those of the whole table read at once (recipes/_tables.read) with numpy's statistics."""

from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from test_tabular import cancer_csv, houses

from pipeline import cli as pipeline_cli
from pipeline import shard_store, tensor_rows
from pipeline.errors import DataError
from recipes import _table_stream, _tables
from recipes._splits import split_indices
from recipes._table_statistics import preprocess, split_columns
from recipes.tabular import Spec, table_columns

WATER = Path(__file__).parent / "data" / "water-potability"


@pytest.fixture
def tiny_batches(monkeypatch):
    """Batches of a few hundred bytes (a dozen rows) read by Arrow, 50 rows at a time checked cell by cell, and
    splits gathered a few dozen rows at a time from reads of a few rows."""
    monkeypatch.setattr(_table_stream, "BLOCK_BYTES", 700)
    monkeypatch.setattr(_table_stream, "CHECKED_ROWS", 50)
    monkeypatch.setattr(_table_stream, "GATHER_BYTES", 1500)
    monkeypatch.setattr(_table_stream, "READ_BYTES", 300)


def tables(folder: Path) -> dict:
    """Every tabular test file, as (recipe arguments): numbers, texts, empty cells, Parquet, bad rows dropped."""
    house = houses(folder)
    pd.read_csv(house).to_parquet(folder / "houses.parquet")
    bad = house.read_text().splitlines(keepends=True)
    bad[5] = "abc" + bad[5][bad[5].index(",") :]  # text in a number column
    bad[9] = "\n"  # a blank line
    bad[20] = bad[20].rstrip() + ",7\n"  # a cell too many
    (folder / "bad.csv").write_text("".join(bad))
    return {
        "houses": ["recipe=tabular", f"data.file={house}", "data.target=price"],
        "parquet": ["recipe=tabular", f"data.file={folder / 'houses.parquet'}", "data.target=price"],
        "unscaled": ["recipe=tabular", f"data.file={house}", "data.target=price", "data.standardize=false"],
        "cancer": ["recipe=tabular", f"data.file={cancer_csv(folder)}", "data.target=diagnosis"],
        "water": ["recipe=water_potability", f"data.root={WATER}"],
        "water_mean": ["recipe=water_potability", f"data.root={WATER}", "data.impute=mean"],
        "dropped": [
            "recipe=tabular",
            f"data.file={folder / 'bad.csv'}",
            "data.target=price",
            "data.drop_bad_rows=true",
        ],
    }


def whole_table(recipe, cfg, meta: dict) -> tuple[dict, dict]:
    """The splits and statistics of the table read whole, split by datasets' rules and fitted by numpy."""
    spec = recipe.prepare.keywords["spec"] if hasattr(recipe.prepare, "keywords") else Spec()
    path = Path(cfg.data.root) / cfg.data.file
    columns, (_, categorical, target), enough, how = table_columns(cfg, spec, path)
    table, _ = _tables.read(cfg, path, columns, enough, how, _tables.Reading(rename=spec.rename))
    values = table[target].to_numpy()
    # classes in their sorted order
    y = values.astype(np.float32) if meta["task"] == "regression" else np.searchsorted(np.unique(values), values)
    parts = split_indices(
        len(table), cfg.data.eval_fraction, cfg.data.split_seed, None if meta["task"] == "regression" else y
    )
    columns = split_columns(table, meta["numbers"], categorical)
    x = columns["numbers"][parts[0]]
    stats = {}
    if cfg.data.impute.name != "none":
        stats[cfg.data.impute.name if cfg.data.impute.name == "median" else "fill"] = fill = (
            np.nanmedian(x, axis=0) if cfg.data.impute.name == "median" else np.nanmean(x, axis=0)
        )
        x = np.where(np.isnan(x), fill, x)
    scale = cfg.data.standardize
    stats.update(
        mean=x.mean(axis=0) if scale else np.zeros(x.shape[1]),
        std=x.std(axis=0) if scale else np.ones(x.shape[1]),
        categories={n: sorted(set(columns[n][parts[0]]) - {""}) for n in categorical},
    )
    splits = {}
    for name, rows in zip(("train", "eval"), parts):
        label = y[rows]
        if meta["task"] == "regression":
            label = ((label - meta["y_mean"]) / meta["y_std"]).astype(np.float32)
        splits[name] = {
            "features": preprocess({k: v[rows] for k, v in columns.items()}, meta)["features"],
            "label": label,
        }
    return splits, stats


@pytest.mark.parametrize("case", ["houses", "parquet", "unscaled", "cancer", "water", "water_mean", "dropped"])
def test_batches_give_the_shards_and_statistics_of_the_whole_table(workdir, tiny_batches, case):
    args = tables(workdir / "data")[case]
    recipe, cfg = pipeline_cli.parse([*args, f"data.cache_dir={workdir / 'cache'}"])
    splits, meta = shard_store.open_shards(shard_store.prepare(recipe, cfg, log=lambda *a: None))
    expected, stats = whole_table(recipe, cfg, meta)
    for key, value in stats.items():  # merged moments: the same statistics to the last bits of a float64
        assert meta[key] == value if key == "categories" else np.allclose(meta[key], value, rtol=1e-12, atol=0), key
    for name, split in splits.items():
        columns = tensor_rows.columns(split)
        assert columns["label"].numpy().tolist() == expected[name]["label"].tolist()
        assert np.allclose(columns["features"].numpy(), expected[name]["features"], rtol=0, atol=1e-6)
    if case == "dropped":
        assert (meta["rows_read"], meta["rows_dropped"], meta["dropped_lines"]) == (599, 2, [6, 21])


def test_bad_cells_are_named_by_their_lines_across_batches(workdir, tiny_batches):
    """Bad cells in different batches, after a blank line and a quoted newline: one message, the whole table's."""
    path = houses(workdir / "data")
    lines = path.read_text().splitlines(keepends=True)
    for at in (7, 130, 131, 400):
        lines[at] = "inf" + lines[at][lines[at].index(",") :]
    lines[300] = lines[300].replace("north", '"no\nrth"').replace("south", '"so\nuth"').replace("east", '"ea\nst"')
    lines[50] = "\n"
    path.write_text("".join(lines))
    recipe, cfg = pipeline_cli.parse(
        ["recipe=tabular", f"data.file={path}", "data.target=price", f"data.cache_dir={workdir / 'cache'}"]
    )
    with pytest.raises(DataError) as streamed:
        shard_store.prepare(recipe, cfg, log=lambda *a: None)
    columns, _, enough, how = table_columns(cfg, Spec(), path)
    with pytest.raises(DataError) as whole:
        _tables.read(cfg, path, columns, enough, how)
    assert str(streamed.value) == str(whole.value)
    assert (
        "not a finite number" in str(whole.value)
        and "4 cells: line 8 column 1 (area) 'inf'; line 131" in str(whole.value)
        and "line 402 column 1 (area) 'inf'" in str(whole.value)
    )


def test_shards_written_batch_by_batch_are_the_bytes_save_to_disk_writes(workdir, monkeypatch):
    """The recipe writes its splits' shard files itself (decoded_shards.write_rows), several writer batches and
    uneven shards each, from gathers of 777 rows (5 features) across the writer batches: byte for byte the files
    datasets' save_to_disk writes of the same rows."""
    monkeypatch.setattr(_table_stream, "GATHER_BYTES", 777 * 5 * 4)
    monkeypatch.setattr(_table_stream, "READ_BYTES", 5000 * 5 * 4)
    rng = np.random.default_rng(0)
    rows = 30_001
    table = pd.DataFrame(
        {
            "a": rng.normal(size=rows),
            "b": rng.normal(size=rows) * 100,
            "color": rng.choice(["red", "green", "blue"], rows),
            "label": rng.integers(0, 3, rows),
        }
    )
    table.loc[::17, "b"] = np.nan  # empty cells, filled with the train median
    path = workdir / "table.csv"
    table.to_csv(path, index=False)
    recipe, cfg = pipeline_cli.parse(
        [
            "recipe=tabular",
            f"data.file={path}",
            "data.target=label",
            "data.num_shards=3",
            f"data.cache_dir={workdir / 'cache'}",
        ]
    )
    out = shard_store.prepare(recipe, cfg, log=lambda *a: None)
    for name, split in datasets.load_from_disk(str(out)).items():
        split.save_to_disk(str(workdir / "saved" / name), num_shards=3)
        written = sorted(p.name for p in (out / name).iterdir())
        assert written == sorted(p.name for p in (workdir / "saved" / name).iterdir())
        assert len([n for n in written if n.startswith("data-")]) == 3
        for file in written:
            if file != "state.json":  # its fingerprint: of the build here, random in save_to_disk
                assert (out / name / file).read_bytes() == (workdir / "saved" / name / file).read_bytes(), file

"""Data preparation: Arrow shards keyed by a fingerprint, reused, rebuilt on change, clear errors."""

import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from conftest import cli, common, ok, write_mnist_raw
from omegaconf import OmegaConf
from torchvision.datasets import MNIST

from pipeline import batching, errors, files, fingerprints, shard_store, tensor_rows
from pipeline.recipe import Recipe
from pipeline.recipe_contract import load_recipe


def shard_dirs(workdir, recipe):
    base = workdir / "cache" / recipe
    return sorted(p for p in base.iterdir()) if base.exists() else []


@pytest.mark.slow
def test_prepare_once_reuse_and_invalidate(workdir):
    root = write_mnist_raw(workdir / "data")
    args = common(workdir, "recipe=mnist_mlp", f"data.root={root}")
    first = ok(cli(args, cwd=workdir, script="prepare"))
    assert "data: preparing mnist_mlp" in first.stdout and "train 9,000, eval 1,000, test 10,000" in first.stdout
    # The log names what is read: the raw files' folder, how many and how large.
    assert f"from {root / 'MNIST' / 'raw'} (4 files, " in first.stdout
    [shards] = shard_dirs(workdir, "mnist_mlp")
    assert {p.name for p in shards.iterdir()} == {
        "train",
        "eval",
        "test",
        "dataset_dict.json",
        "meta.json",
        "checksums.json",
    }  # one DatasetDict and the pipeline's files
    assert len(list((shards / "train").glob("*.arrow"))) == 4  # data.num_shards

    # Reused: same directory, untouched files, no preparation.
    stamp = (shards / "train" / "state.json").stat().st_mtime_ns
    again = ok(cli(args, cwd=workdir, script="prepare"))
    assert "reusing shards" in again.stdout and "preparing" not in again.stdout
    assert shard_dirs(workdir, "mnist_mlp") == [shards]
    assert (shards / "train" / "state.json").stat().st_mtime_ns == stamp

    # A changed preprocessing parameter makes new shards ...
    ok(cli(args + ["data.eval_fraction=0.2"], cwd=workdir, script="prepare"))
    assert len(shard_dirs(workdir, "mnist_mlp")) == 2
    # ... and so does a changed raw file; a speed-only key does not.
    raw = root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10**9))
    ok(cli(args, cwd=workdir, script="prepare"))
    assert len(shard_dirs(workdir, "mnist_mlp")) == 3
    ok(cli(args + ["data.num_workers=2"], cwd=workdir, script="prepare"))
    assert len(shard_dirs(workdir, "mnist_mlp")) == 3


def test_split_is_stratified_and_disjoint(workdir):
    root = write_mnist_raw(workdir / "data")
    recipe, cfg = recipes_parse(["recipe=mnist_mlp", f"data.root={root}", f"data.cache_dir={workdir / 'cache'}"])
    splits, meta = shard_store.open_shards(shard_store.prepare(recipe, cfg))
    train, evaluation = tensor_rows.columns(splits["train"]), tensor_rows.columns(splits["eval"])
    assert train["image"].dtype == torch.uint8 and train["image"].shape == (9000, 1, 28, 28)
    assert train["label"].dtype == torch.int64
    # Every class keeps its share in the held-out split (label counts 980/1135/... over 10,000).
    counts = torch.bincount(evaluation["label"], minlength=10)
    full = torch.tensor([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    assert (counts - full * 0.1).abs().max() <= 1 and counts.sum() == 1000
    # No image is in both splits.
    flat_train = {bytes(x) for x in train["image"].flatten(1).numpy()}
    assert not any(bytes(x) in flat_train for x in evaluation["image"].flatten(1).numpy()[:200])
    assert meta["class_names"][0].startswith("0")


@pytest.mark.slow
def test_missing_raw_files_name_the_directory_files_and_fixes(workdir):
    result = cli(
        common(workdir, "recipe=mnist_cnn", f"data.root={workdir / 'nothing'}", "data.download=false"), cwd=workdir
    )
    assert result.returncode == 2
    for word in [
        str(workdir / "nothing" / "MNIST" / "raw"),
        "train-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        ".gz",
        "data.root",
        "data.download=true",
    ]:
        assert word in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "runs").exists()  # nothing left behind that looks like a run
    assert shard_dirs(workdir, "mnist_cnn") == []


@pytest.mark.slow
def test_fashion_mnist_reads_its_own_folder(workdir):
    root = write_mnist_raw(workdir / "data", name="FashionMNIST")
    result = ok(cli(common(workdir, "recipe=fashion_mnist_mlp", f"data.root={root}"), cwd=workdir, script="prepare"))
    assert "FashionMNIST" not in result.stderr
    [shards] = shard_dirs(workdir, "fashion_mnist_mlp")
    meta = shard_store.open_shards(shards)[1]
    assert meta["class_names"][0] == "T-shirt/top"


def test_interrupted_build_leaves_no_valid_looking_shards(workdir, monkeypatch):
    recipe, cfg = recipes_parse(["recipe=digits", f"data.cache_dir={workdir / 'cache'}"])

    def broken_save(self, path, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", broken_save)
    try:
        shard_store.prepare(recipe, cfg)
    except OSError:
        pass
    else:
        raise AssertionError("the failed save should propagate")
    leftovers = [p for p in (workdir / "cache").rglob("*")] if (workdir / "cache").exists() else []
    assert not [p for p in leftovers if p.name == "meta.json"]
    assert not [p for p in leftovers if ".tmp-" in p.name]


def test_the_ragged_last_step_is_completed_from_the_epochs_own_order():
    rows = tensor_rows.Rows({"y": torch.arange(10)})
    batches = [b["y"] for b in batching.loader(rows, batch_size=4, train=True, seed=0, complete=True)]
    order = torch.cat(batches).tolist()
    assert [len(b) for b in batches] == [4, 4, 4] and sorted(set(order)) == list(range(10))
    assert order[10:] == order[:2]  # every row once, then the epoch's first two again
    assert order[:8] == torch.cat([b["y"] for b in batching.loader(rows, 4, train=True, seed=0)]).tolist()
    # Accumulation: micro-batches of 3 for optimizer steps of 6 -> two whole steps, 12 samples, every row.
    micro = [b["y"] for b in batching.loader(rows, batch_size=3, train=True, seed=0, step_batch=6, complete=True)]
    assert [len(b) for b in micro] == [3, 3, 3, 3] and set(torch.cat(micro).tolist()) == set(range(10))
    assert len(batching.loader(rows, batch_size=16, train=True, seed=0, complete=True)) == 0  # more than the rows


def test_rows_serve_whole_batches():
    rows = tensor_rows.Rows({"x": torch.arange(10).view(10, 1), "y": torch.arange(10)})
    batch = rows.__getitems__([3, 1, 4])
    assert batch["y"].tolist() == [3, 1, 4] and batch["x"].shape == (3, 1)
    loader = batching.loader(rows, batch_size=4, train=True, seed=0)
    batches = list(loader)
    assert len(batches) == 2 and all(len(b["y"]) == 4 for b in batches)  # ragged last batch dropped
    order = torch.cat([b["y"] for b in batches]).tolist()
    assert len(set(order)) == 8 and order != sorted(order)  # shuffled, no repeats
    assert order == torch.cat([b["y"] for b in batching.loader(rows, 4, train=True, seed=0)]).tolist()  # seeded
    assert torch.cat([b["y"] for b in loader]).tolist() != order  # a new permutation every epoch
    # Accumulation: micro-batches of 3 for optimizer steps of 6 -> only whole steps (6 of 10 rows).
    micro = list(batching.loader(rows, batch_size=3, train=True, seed=0, step_batch=6))
    assert [len(b["y"]) for b in micro] == [3, 3]
    evaluation = list(batching.loader(rows, batch_size=4, train=False, seed=0))
    assert torch.cat([b["y"] for b in evaluation]).tolist() == list(range(10))


def recipes_parse(argv):
    from pipeline import cli as pipeline_cli

    recipe, cfg = pipeline_cli.parse(argv)
    assert isinstance(recipe, Recipe)
    return recipe, cfg


def test_moved_cache_is_reused_not_rebuilt(workdir):
    # Shards are found by content (<cache>/<recipe>/<fingerprint>), with no absolute path kept in them:
    # a cache moved to another disk or mounted elsewhere serves the same rows without preparing again.
    recipe, cfg = recipes_parse(["recipe=digits", f"data.cache_dir={workdir / 'cache'}"])
    out = shard_store.prepare(recipe, cfg, log=lambda line: None)
    rows = tensor_rows.columns(shard_store.open_shards(out)[0]["train"])
    shutil.move(workdir / "cache", workdir / "moved")
    recipe, moved = recipes_parse(["recipe=digits", f"data.cache_dir={workdir / 'moved'}"])
    said = []
    again = shard_store.prepare(recipe, moved, log=said.append)
    assert again == workdir / "moved" / "digits" / out.name and not (workdir / "cache").exists()
    assert [line for line in said if "data:" in line] == [f"data: reusing shards in {again}"]
    moved_rows = tensor_rows.columns(shard_store.open_shards(again)[0]["train"])
    assert moved_rows.keys() == rows.keys() and all(torch.equal(moved_rows[k], rows[k]) for k in rows)


@pytest.mark.slow
def test_loader_workers_serve_the_same_batches(workdir):
    args = ["trainer.epochs=1", "trainer.max_steps=15"]
    ok(cli(common(workdir / "w0", *args), cwd=workdir))
    ok(cli(common(workdir / "w2", *args, "data.num_workers=2"), cwd=workdir))
    from conftest import summary

    assert summary(workdir / "w2" / "runs", "digits")["eval/loss"] == pytest.approx(
        summary(workdir / "w0" / "runs", "digits")["eval/loss"], rel=1e-6
    )


# ---------------------------------------------------------------- shard integrity (checksums written with them)


def flip(path, start: int, count: int) -> None:
    """Changes `count` bytes of a file in place, keeping its size (bit rot, a bad copy)."""
    with open(path, "r+b") as f:
        f.seek(start)
        old = f.read(count)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in old))


@pytest.mark.slow
def test_damaged_shards_are_named_never_trained_on_and_rebuilt(workdir, mnist_root):
    args = common(workdir, "recipe=mnist_mlp", f"data.root={mnist_root}")
    ok(cli(args, cwd=workdir, script="prepare"))
    [shards] = shard_dirs(workdir, "mnist_mlp")
    sums = json.loads((shards / "checksums.json").read_text())
    assert set(sums) == {str(p.relative_to(shards)) for p in shards.rglob("*") if p.is_file()} - {"checksums.json"}

    # 2,000 changed bytes inside a shard: same size, caught by the hash before any training.
    bad = shards / "train" / "data-00001-of-00004.arrow"
    flip(bad, bad.stat().st_size // 2, 2000)
    result = cli(args, cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"damaged shard file {bad}" in result.stderr and "sha256" in result.stderr
    assert f"rm -r '{shards}'" in result.stderr and "--rebuild" in result.stderr
    assert not (workdir / "runs").exists()
    verify = cli(args + ["--verify"], cwd=workdir, script="prepare")
    assert verify.returncode == 2 and f"damaged shard file {bad}" in verify.stderr

    # --rebuild: the same folder, built again, verified.
    rebuilt = ok(cli(args + ["--rebuild", "--verify"], cwd=workdir, script="prepare"))
    assert "preparing mnist_mlp" in rebuilt.stdout and "verified: every shard file matches" in rebuilt.stdout
    assert shard_dirs(workdir, "mnist_mlp") == [shards]

    # A truncated shard: its size says so, on every load.
    bad = shards / "test" / "data-00000-of-00004.arrow"
    bad.write_bytes(bad.read_bytes()[:1000])
    result = cli(args, cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"damaged shard file {bad}: 1,000 bytes" in result.stderr and "truncated" in result.stderr
    assert not (workdir / "runs").exists()
    # The streaming path (batches read from these files) checks them the same way before any step.
    bad.unlink()
    result = cli(args + ["data.in_memory=false"], cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"damaged shard file {bad}: it is missing" in result.stderr and "--rebuild" in result.stderr
    assert not (workdir / "runs").exists()


def test_shard_that_fails_to_load_is_hashed_and_named(workdir, mnist_root):
    # Above the size for a full hash on reuse only the sizes are checked; a file Arrow cannot read is
    # then hashed, so the error names it instead of an ArrowInvalid traceback.
    recipe, cfg = recipes_parse(["recipe=mnist_mlp", f"data.root={mnist_root}", f"data.cache_dir={workdir / 'cache'}"])
    out = shard_store.prepare(recipe, cfg)
    bad = out / "eval" / "data-00002-of-00004.arrow"
    flip(bad, 0, 64)  # the Arrow stream's header
    with pytest.raises(errors.DataError, match=f"damaged shard file {bad}: its sha256 differs"):
        shard_store.open_shards(out)
    assert shard_store.check_shards(out) > 0  # sizes alone pass: the hash found it


def test_shard_checks_cost(workdir, mnist_root):
    """Sizes on every load: well under a millisecond a file; the full hash: hundreds of MB/s."""
    recipe, cfg = recipes_parse(["recipe=mnist_mlp", f"data.root={mnist_root}", f"data.cache_dir={workdir / 'cache'}"])
    out = shard_store.prepare(recipe, cfg)
    started = time.perf_counter()
    size = shard_store.check_shards(out)
    sizes = time.perf_counter() - started
    started = time.perf_counter()
    shard_store.check_shards(out, full=True)
    full = time.perf_counter() - started
    print(
        f"size check {sizes * 1e3:.2f} ms; full hash {size / 2**20:.1f} MiB in {full * 1e3:.0f} ms "
        f"({size / 2**20 / full:.0f} MiB/s)"
    )
    assert sizes < 0.05 and size / 2**20 / full > 50


# ---------------------------------------------------------------- the fingerprint covers the code that made the shards


RECIPES = Path(shard_store.__file__).parent.parent / "recipes"


def module_copy(tmp_path, name: str, source: str):
    """`source` (a recipe's or the helpers' text, maybe edited) loaded as another module, `recipes.<name>`."""
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"recipes.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_raw_stats_name_and_order_the_files_as_paths_do(tmp_path, monkeypatch):
    # Text in Path's normal form is taken as it is, anything else through Path: the same names, order and stats.
    for name in ("data/a.jpg", "data/sub/b.jpg", "data2/c.jpg", "data-x.jpg", ".hidden/d.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * len(name))
    monkeypatch.chdir(tmp_path)
    listed = ["data//sub/b.jpg", "./data2/c.jpg", "data-x.jpg", str(tmp_path / "data/a.jpg"), Path("data/a.jpg")]
    listed += ["data/sub/../a.jpg", ".hidden/d.jpg", "data/sub/b.jpg/"]
    recipe = SimpleNamespace(raw_files=lambda cfg: listed)
    for root in (".", "data", "data/", str(tmp_path), str(tmp_path / "data"), "/"):
        by_path = []
        for path in sorted(Path(p) for p in listed):
            rel = path.relative_to(Path(root)) if path.is_relative_to(Path(root)) else path
            by_path.append((str(rel), path.stat().st_size, path.stat().st_mtime_ns))
        assert fingerprints.raw_stats(recipe, OmegaConf.create({"data": {"root": root}})) == by_path, root


def test_editing_prepare_or_its_helpers_changes_the_fingerprint(tmp_path):
    def recipe_hash(name, source):
        return fingerprints.code_hash(dataclasses.replace(module_copy(tmp_path, name, source).recipe, name=name))

    source = (RECIPES / "digits.py").read_text()
    same = recipe_hash("copy_a", source)
    assert recipe_hash("copy_b", source) == same  # the text, not the module name
    edited = source.replace("cfg.data.split_seed)", "cfg.data.split_seed, stratify=None)")
    assert edited != source and recipe_hash("copy_c", edited) != same
    # Honest limit: the hash is of source text, so a whitespace or comment edit rebuilds the shards too.
    assert recipe_hash("copy_d", source + "\n") != same

    # A shared helper that prepare() reaches (mnist_mlp's is a partial of recipes/_torchvision.py's idx_splits):
    # editing it rebuilds; editing one it does not reach (idx_recipe, which builds the Recipe) does not.
    mnist = load_recipe("mnist_mlp")

    def helpers_hash(name, source):
        return fingerprints.code_hash(
            dataclasses.replace(mnist, prepare=functools.partial(module_copy(tmp_path, name, source).idx_splits, MNIST))
        )

    helpers = (RECIPES / "_torchvision.py").read_text()
    same = helpers_hash("helpers_a", helpers)
    assert helpers_hash("helpers_b", helpers) == same
    reached_edit = helpers.replace("shutil.copyfileobj(src, dst, 2**20)", "shutil.copyfileobj(src, dst, 2**21)")
    unreached_edit = helpers.replace("StoredImages(size=28, channels=1)", "StoredImages(size=29, channels=1)")
    assert reached_edit != helpers and helpers_hash("helpers_c", reached_edit) != same
    assert unreached_edit != helpers and helpers_hash("helpers_d", unreached_edit) == same

    # A module-level constant a reached helper reads (torchvision_arrays reads IDX_FILES) is part of the code too;
    # one nothing reached reads is not.
    constant_edit = helpers.replace('"test_images": "t10k-images-idx3-ubyte"', '"test_images": "t10k-images.idx3"')
    unread_edit = helpers + "\nNOT_READ_BY_PREPARE = 1\n"
    assert constant_edit != helpers and helpers_hash("helpers_e", constant_edit) != same
    assert helpers_hash("helpers_f", unread_edit) == same

    reached = {f.__qualname__ for f in fingerprints._reached(mnist.prepare)}
    assert {"idx_splits", "torchvision_arrays", "image_split", "split_train_eval", "read_idx"} <= reached
    assert not {"loader", "columns", "Rows", "prepare", "check", "read"} & reached


def test_a_killed_builds_leftover_is_removed_a_live_ones_kept(workdir):
    recipe, cfg = recipes_parse(["recipe=digits", f"data.cache_dir={workdir / 'cache'}"])
    out = shard_store.shards_dir(recipe, cfg)
    out.parent.mkdir(parents=True)
    # A SIGKILLed build: a real process that is gone now, and a folder named as builds before owners were recorded.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = files.temporary_folder(out)
    (killed / files.OWNER_FILE).write_text(json.dumps({**files.owner(), "pid": dead.pid}))
    (killed / "data-00000-of-00001.arrow").write_bytes(b"x" * 4096)
    old_style = out.with_name(f"{out.name}.tmp-{dead.pid}")
    old_style.mkdir()
    live = files.temporary_folder(out)  # this process: alive, so a build still writing
    said = []
    shard_store.prepare(recipe, cfg, log=said.append)
    assert not killed.exists() and not old_style.exists() and live.exists()
    assert any(f"removing {killed}" in line and "killed" in line for line in said), said
    assert (out / "meta.json").exists()


@pytest.mark.slow
def test_full_disk_while_preparing_is_one_message_and_leaves_nothing(workdir):
    from test_faults import tmpfs

    with tmpfs(workdir / "small", "64k") as small:
        result = cli(common(workdir, f"data.cache_dir={small}"), cwd=workdir, script="prepare")
        left = [p.name for p in small.rglob("*")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"disk full while writing the shards to {small / 'digits'}" in result.stderr
    assert "data.cache_dir=" in result.stderr and "Traceback" not in result.stderr
    assert left == ["digits"], left  # no half-written shards, no temporary folder

"""image_folder and image prediction: the real CLI on folders of real PNG/JPEG files written here, and
launch/predict.py on image files giving back the run's eval accuracy (image_folder, digits, mnist_mlp).

.venv/bin/pytest tests/test_image_folder.py                  # all, about 1.5 minutes on 2 busy cores
.venv/bin/pytest tests/test_image_folder.py -m "not slow"
"""

import csv
import dataclasses
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, common, launch_flags, ok, run_dirs, summary
from PIL import Image, ImageDraw

from pipeline import cli as pipeline_cli
from pipeline import fingerprints, rng, shard_store, tensor_rows
from pipeline import predict as predict_module
from pipeline.errors import ConfigError, DataError
from pipeline.recipe import with_transform_keys
from pipeline.recipe_contract import check_recipe, load_recipe
from recipes._images import read_image as _read
from recipes.image_folder import Arch

SHAPES = ["circle", "square", "triangle"]


def write_shapes(folder: Path, per_class: int, seed: int, suffix: str = ".png") -> Path:
    """<folder>/<shape>/*.png: one light shape on a dark noisy background, sizes and places varied."""
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        (folder / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(40, 61, 2))
            image = Image.fromarray(rng.integers(0, 50, (h, w, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(image)
            r = int(rng.integers(min(w, h) // 5, min(w, h) // 3))
            cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
            colour = tuple(int(c) for c in rng.integers(150, 256, 3))
            if shape == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            elif shape == "square":
                draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            image.save(folder / shape / f"{i:03d}{suffix}")
    return folder


def predictions(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def accuracy_of(rows: list[dict], truth) -> float:
    return sum(row["class"] == truth(row["file"]) for row in rows) / len(rows)


def parse(*args: str):
    return pipeline_cli.parse(["recipe=image_folder", *args])


# ---------------------------------------------------------------- end to end: train, then predict


@pytest.mark.slow
def test_image_folder_trains_and_predicts_its_eval_accuracy(workdir):
    """PNG train folder, JPEG eval and test folders; predicting on the eval folder's files gives eval/accuracy."""
    photos = workdir / "photos"
    write_shapes(photos / "train", 24, seed=0)
    write_shapes(photos / "eval", 8, seed=1, suffix=".jpg")
    write_shapes(photos / "test", 6, seed=2, suffix=".jpg")
    ok(
        cli(
            common(
                workdir,
                "recipe=image_folder",
                "data.train_dir=photos/train",
                "data.eval_dir=photos/eval",
                "data.test_dir=photos/test",
                "data.image_size=32",
                "data.augment=[hflip,vflip]",
                "trainer.epochs=6",
            ),
            cwd=workdir,
        )
    )
    s = summary(workdir / "runs", "image_folder")
    assert s["eval/samples"] == 24 and s["test/samples"] == 18
    assert s["eval/accuracy"] >= 0.4, s  # chance 1/3; 0.5 measured
    assert np.array(s["eval/confusion_matrix"]).shape == (3, 3)
    assert all(f"eval/recall/{shape}" in s for shape in SHAPES)

    run = run_dirs(workdir / "runs", "image_folder")[0]
    assert json.loads((run / "meta.json").read_text())["augment"] == ["hflip", "vflip"]  # from the run's config
    evaluated = ok(cli([f"run={run}"], cwd=workdir, script="evaluate"))  # on the same shards, quietly
    assert "differ from the run's meta.json" not in evaluated.stdout + evaluated.stderr
    assert json.loads((run / "evaluations" / "eval.json").read_text())["eval/accuracy"] == s["eval/accuracy"]
    result = ok(cli([f"run={run}", "input=photos/eval", "output=eval.csv"], cwd=workdir, script="predict"))
    rows = predictions(workdir / "eval.csv")
    assert list(rows[0]) == ["file", "class", *(f"p({shape})" for shape in SHAPES)]
    assert rows[0]["file"] == "circle/000.jpg" and len(rows) == 24  # relative paths, subfolders searched
    from_folder = accuracy_of(rows, lambda file: file.split("/")[0])
    assert from_folder == pytest.approx(s["eval/accuracy"], abs=1e-6)  # the metric is float32
    assert "predicted: 24 inputs" in result.stdout


@pytest.mark.slow
def test_digits_predicts_its_eval_accuracy_from_png_files(digits_run, tmp_path, capsys):
    """The eval split's 8x8 images (0..16) written as 8-bit PNGs read back to the same pixels."""
    run, s, workdir = digits_run  # a real two-epoch digits run (conftest's, shared)
    truth = write_eval_split(workdir, "digits", tmp_path / "eval", 255 / 16)
    ok(
        cli(
            [f"run={run}", f"input={tmp_path / 'eval'}", f"output={tmp_path / 'eval.csv'}"],
            cwd=tmp_path,
            script="predict",
        )
    )
    rows = predictions(tmp_path / "eval.csv")
    assert len(rows) == s["eval/samples"]
    assert accuracy_of(rows, truth.get) == pytest.approx(s["eval/accuracy"], abs=1e-6)  # float32 metric

    # A chunk of 64 images at a time (a folder larger than memory): the same predictions and console preview.
    recipe, cfg, request = predict_module.parse_argv(
        [f"run={run}", f"input={tmp_path / 'eval'}", f"output={tmp_path / 'chunked.csv'}"]
    )
    chunked = dataclasses.replace(recipe, read_inputs=partial(recipe.read_inputs, chunk=64))
    predict_module.predict(chunked, cfg, request)
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith(f"predicted: 360 inputs of {tmp_path / 'eval'} with digits")
    assert [line.split()[0] for line in shown[3:]] == [
        "0000.png",
        "0001.png",
        "0002.png",
        "0003.png",
        "...",
        "0359.png",
    ]
    again = predictions(tmp_path / "chunked.csv")
    assert [r["file"] for r in again] == [r["file"] for r in rows] and [r["class"] for r in again] == [
        r["class"] for r in rows
    ]
    assert [float(r["p(0)"]) for r in again] == pytest.approx([float(r["p(0)"]) for r in rows], rel=1e-5)
    # A broken image in the last chunk, after five were written: no CSV under the name, no temporary file.
    (tmp_path / "eval" / "9999.png").write_bytes(b"no PNG here")
    request.output = tmp_path / "broken.csv"
    with pytest.raises(DataError, match="not a readable image: .*9999.png"):
        predict_module.predict(chunked, cfg, request)
    assert sorted(p.name for p in tmp_path.glob("*.csv*")) == ["chunked.csv", "eval.csv"]


@pytest.mark.slow
def test_mnist_predicts_its_eval_accuracy_from_png_files(workdir, mnist_root):
    ok(cli(common(workdir, "recipe=mnist_mlp", f"data.root={mnist_root}", "trainer.max_steps=5"), cwd=workdir))
    s = summary(workdir / "runs", "mnist_mlp")
    truth = write_eval_split(workdir, "mnist_mlp", workdir / "eval", 1, f"data.root={mnist_root}")
    run = run_dirs(workdir / "runs", "mnist_mlp")[0]
    ok(cli([f"run={run}", "input=eval", "output=eval.csv"], cwd=workdir, script="predict"))
    rows = predictions(workdir / "eval.csv")
    assert len(rows) == s["eval/samples"] == 1000
    assert accuracy_of(rows, truth.get) == pytest.approx(s["eval/accuracy"], abs=1e-6)  # float32 metric


def write_eval_split(workdir: Path, recipe: str, folder: Path, scale: float, *args: str) -> dict:
    """A run's eval split as grayscale PNG files, pixel * scale; returns {relative file: class name}."""
    recipe, cfg = pipeline_cli.parse([f"recipe={recipe}", f"data.cache_dir={workdir / 'cache'}", *args])
    splits, meta = shard_store.open_shards(shard_store.shards_dir(recipe, cfg))
    columns = tensor_rows.columns(splits["eval"])
    folder.mkdir()
    truth = {}
    for i, (image, label) in enumerate(zip(columns["image"].numpy(), columns["label"].tolist())):
        name = f"{i:04d}.png"
        Image.fromarray(np.rint(image[0] * scale).astype(np.uint8), mode="L").save(folder / name)
        truth[name] = meta["class_names"][label]
    return truth


# ---------------------------------------------------------------- mistakes, named before any work


def test_image_folder_mistakes_are_named(tmp_path):
    write_shapes(tmp_path / "train", 2, seed=0)
    write_shapes(tmp_path / "test", 1, seed=1)
    (tmp_path / "test" / "circle").rename(tmp_path / "test" / "oval")
    root = f"data.root={tmp_path}"

    recipe, cfg = parse(root, "data.train_dir=train", "data.test_dir=test")
    with pytest.raises(DataError, match=r"lacks \['circle'\] and has \['oval'\]"):
        recipe.prepare(cfg)
    recipe, cfg = parse(root, "data.train_dir=nowhere")
    with pytest.raises(DataError, match=r"(?s)data.train_dir: .*nowhere is missing.*nowhere/<class name>/\*.jpg"):
        recipe.raw_files(cfg)
    recipe, cfg = parse(root)
    with pytest.raises(ConfigError, match="data.train_dir is empty"):
        recipe.raw_files(cfg)
    recipe, cfg = parse(root, "data.train_dir=train", "data.eval_fraction=0.2")  # 6 images, 3 classes
    with pytest.raises(DataError, match="(?s)stratified by class.*data.eval_dir"):
        recipe.prepare(cfg)
    recipe, cfg = parse(root, "data.train_dir=train", "data.channels=2")
    with pytest.raises(ConfigError, match="data.channels=1"):
        recipe.raw_files(cfg)
    with pytest.raises(ConfigError, match="model.arch='resnet_18'; choose one of: cnn, alexnet,.* resnet18"):
        parse(root, "model.arch=resnet_18")


@pytest.mark.parametrize(
    "items, message",
    [
        (
            ["flip"],
            "unknown augmentation 'flip'; valid: hflip, vflip, rotate:<degrees>, autocontrast, brightness:<fraction>",
        ),
        (["rotate"], r"needs a value, rotate:<degrees>"),
        (["hflip:1"], "needs no value"),
        (["rotate:ninety"], r"number in \(0, 180\]"),
        (["brightness:2"], r"number in \(0, 1\]"),
    ],
)
def test_unknown_or_malformed_augmentations_list_the_valid_ones(tmp_path, items, message):
    recipe, cfg = parse(f"data.train_dir={tmp_path}", f"data.augment=[{','.join(items)}]")
    with pytest.raises(ConfigError, match=message):
        recipe.raw_files(cfg)  # the first thing a run asks of the recipe: before any image is read


# ---------------------------------------------------------------- augmentations, models, fingerprint


def test_augmentations_each_act_per_image():
    from recipes._augment import AUGMENTATIONS
    from recipes.image_folder import transform

    # Values in [50, 200): autocontrast changes every image (one spanning 0..255 in each channel, as a
    # random image often does, it leaves alone: the test failed now and then).
    image = torch.randint(50, 200, (1, 3, 16, 16), dtype=torch.uint8).repeat(32, 1, 1, 1)
    plain = image.float() / 255
    for name, (_, unit) in AUGMENTATIONS.items():
        item = f"{name}:{30 if unit == 'degrees' else 0.5}" if unit else name
        out = transform({"image": image}, True, {"augment": [item]})["image"]
        assert out.shape == plain.shape and out.min() >= 0 and out.max() <= 1
        changed = [not torch.equal(x, plain[0]) for x in out]
        assert any(changed) and (name in ("rotate", "brightness", "random_resized_crop") or not all(changed)), name
        assert torch.equal(transform({"image": image}, False, {"augment": [item]})["image"], plain)  # eval: none
    flipped = transform({"image": image}, True, {"augment": ["hflip"]})["image"]
    assert all(torch.equal(x, plain[0]) or torch.equal(x, plain[0].flip(-1)) for x in flipped)
    # image_folder's default: no augmentation at all.
    assert torch.equal(transform({"image": image}, True, {"augment": []})["image"], plain)


def test_torchvision_models_by_name_for_grayscale_and_too_small_images(tmp_path):
    from recipes import image_folder

    meta = {"class_names": SHAPES}
    recipe, cfg = parse(f"data.train_dir={tmp_path}", "model.arch=resnet18", "data.channels=1", "data.image_size=32")
    model = recipe.model(cfg, meta)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 3)
    recipe, cfg = parse(f"data.train_dir={tmp_path}", "data.channels=1", "data.image_size=20")
    assert isinstance(recipe.model(cfg, meta), image_folder.CNN) and recipe.model(cfg, meta)(
        torch.rand(2, 1, 20, 20)
    ).shape == (2, 3)
    recipe, cfg = parse(f"data.train_dir={tmp_path}", "model.arch=squeezenet1_1", "data.image_size=16")
    with pytest.raises(ConfigError, match="model.arch=squeezenet1_1 cannot take 16x16 images"):
        recipe.model(cfg, meta)


def empty_model(arch: str) -> torch.nn.Module:
    """image_folder's model for `arch` with 3 classes, its parameters made without torchvision's initialisation
    (accelerate's init_empty_weights: the largest have 600M parameters, and which parameters a backward pass
    reaches does not depend on their values)."""
    from accelerate import init_empty_weights

    from recipes import image_folder

    with init_empty_weights():
        return image_folder.CNN(3, 32) if arch == "cnn" else image_folder.build(arch, 3)


def backward_once(model: torch.nn.Module) -> torch.nn.Module:
    """One training-mode forward and backward pass: on the CPU with zeros at 32 px where the model is small enough
    and takes that size, else on the meta device (shapes only) at 224 px. Zeros: no denormal numbers to slow it."""
    model.train()
    if sum(p.numel() for p in model.parameters()) < 100_000_000:
        model.to_empty(device="cpu")
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.zero_()
        try:
            model(torch.zeros(2, 3, 32, 32)).sum().backward()
            return model
        except (RuntimeError, AssertionError):  # too small for it (inception_v3, alexnet, vit_*, ...)
            model.zero_grad(set_to_none=True)
    model.to_empty(device="meta")
    model(torch.zeros(2, 3, 224, 224, device="meta")).sum().backward()
    return model


@pytest.fixture
def one_thread():
    """Tiny passes on shared cores: a second thread only spins waiting for the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", [arch.name for arch in Arch])
def test_every_arch_trains_every_parameter(arch, one_thread):
    """DDP stops at the second step when a parameter gets no gradient (googlenet's and inception_v3's auxiliary
    heads did): every name model.arch accepts, one backward pass, every parameter reached."""
    model = backward_once(empty_model(arch))
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.slow
def test_googlenet_trains_under_ddp(workdir):
    """Its auxiliary heads got no gradient: DDP stopped at the second step ("Expected to have finished
    reduction in the prior iteration")."""
    write_shapes(workdir / "photos", 8, seed=0)
    ok(
        cli(
            common(
                workdir,
                "recipe=image_folder",
                "data.train_dir=photos",
                "data.eval_fraction=0.25",
                "data.image_size=32",
                "model.arch=googlenet",
                "trainer.epochs=1",
                "trainer.batch_size=4",
            ),
            cwd=workdir,
            processes=2,
        )
    )
    s = summary(workdir / "runs", "image_folder")
    assert s["num_processes"] == 2 and s["steps"] == 18 // 4 and s["eval/samples"] == 6


def test_clouds_shards_fingerprint_covers_the_image_folder_code_it_runs():
    """clouds is a preset: its prepare() is image_folder's, so the code that makes its shards lives there."""
    from recipes import _images, _splits, image_folder

    recipe, cfg = pipeline_cli.parse(["recipe=clouds"])
    reached = fingerprints._reached(recipe.prepare)
    for function in (
        image_folder.prepare,
        image_folder.read_folder,
        image_folder.decode,
        image_folder.hold_out,
        image_folder.ImageTree.make_dataset,
        _images.image_tree,
        _images.undecoded_images,
        _images._decoded,
        _images.load_images,
        _images.read_image,
        _splits.split_train_eval,
    ):
        assert function in reached, function.__qualname__
    # The preset's choices reach the fingerprint through the config: its folders and augmentation.
    assert list(cfg.data.augment) == ["hflip", "rotate:45", "autocontrast"] and cfg.data.test_dir == "clouds_test"
    assert fingerprints.code_hash(recipe) == fingerprints.code_hash(pipeline_cli.parse(["recipe=image_folder"])[0])


def test_changing_the_augmentation_reuses_the_shards(tmp_path):
    # data.augment is a transform key: transform reads it per batch, the decoded images do not depend on it.
    write_shapes(tmp_path / "train", 2, seed=0)
    recipe, plain = parse(f"data.train_dir={tmp_path / 'train'}", "data.augment=[]")
    _, flipped = parse(f"data.train_dir={tmp_path / 'train'}", "data.augment=[hflip,rotate:10]")
    _, smaller = parse(f"data.train_dir={tmp_path / 'train'}", "data.augment=[]", "data.image_size=16")
    assert (
        fingerprints.fingerprint(recipe, plain)
        == fingerprints.fingerprint(recipe, flipped)
        != fingerprints.fingerprint(recipe, smaller)
    )
    assert with_transform_keys(recipe, flipped, {"class_names": ["a"]}) == {
        "class_names": ["a"],
        "augment": ["hflip", "rotate:10"],
    }


def test_transform_keys_must_be_data_keys():
    recipe = dataclasses.replace(load_recipe("image_folder"), transform_keys=("augmnt",))
    with pytest.raises(
        ConfigError,
        match=r"`transform_keys` names 'augmnt', not a key of its data_config "
        r"ImageFolderData \(augment, ",
    ):
        check_recipe(recipe)


def read_inputs(recipe, cfg, path: Path, **settings) -> tuple[dict, dict]:
    """All of an image recipe's inputs (which it yields a chunk at a time), joined."""
    parts = list(predict_module.chunks(recipe.read_inputs(cfg, {}, path, **settings)))
    return (
        {"file": [f for ids, _ in parts for f in ids["file"]]},
        {"image": np.concatenate([columns["image"] for _, columns in parts])},
    )


def test_prediction_reads_a_file_or_a_folder_and_names_a_broken_image(tmp_path):
    write_shapes(tmp_path / "new", 2, seed=3)
    recipe, cfg = parse(f"data.train_dir={tmp_path}", "data.image_size=24", "data.channels=1")
    ids, columns = read_inputs(recipe, cfg, tmp_path / "new")  # subfolders searched, paths relative to the input
    assert ids["file"] == [f"{shape}/{i:03d}.png" for shape in SHAPES for i in range(2)]
    assert columns["image"].dtype == np.uint8 and columns["image"].shape == (6, 1, 24, 24)
    ids, one = read_inputs(recipe, cfg, tmp_path / "new" / "square" / "001.png")
    assert ids["file"] == ["001.png"] and np.array_equal(one["image"][0], columns["image"][3])
    # A chunk at a time (a folder larger than memory): the same inputs, in the same order.
    chunked = list(recipe.read_inputs(cfg, {}, tmp_path / "new", chunk=4))
    assert [len(ids["file"]) for ids, _ in chunked] == [4, 2]
    assert read_inputs(recipe, cfg, tmp_path / "new", chunk=4)[0] == read_inputs(recipe, cfg, tmp_path / "new")[0]
    assert np.array_equal(read_inputs(recipe, cfg, tmp_path / "new", chunk=4)[1]["image"], columns["image"])
    (tmp_path / "new" / "square" / "notes.txt").write_text("skipped: no image extension, as ImageFolder skips it")
    (tmp_path / "new" / "square" / "broken.png").write_bytes(b"no PNG here")
    with pytest.raises(DataError, match=f"not a readable image: {tmp_path / 'new' / 'square' / 'broken.png'}"):
        read_inputs(recipe, cfg, tmp_path / "new")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        recipe.read_inputs(cfg, {}, tmp_path / "empty")  # named at once, before any chunk is read


def test_image_recipes_predict():
    from pipeline.recipe_contract import load_recipe

    for name in ("image_folder", "clouds", "mnist_mlp", "mnist_cnn", "fashion_mnist_mlp", "digits"):
        assert load_recipe(name).read_inputs is not None, name


# ---------------------------------------------------------------- folders that are not trees, oversized images


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header claims width x height: PIL reads the size from the header, before any pixel."""
    import struct
    import zlib

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # b"IHDR" + width, height, depth, colour, compression, filter, interlace
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29], data[29:33] = ihdr, struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def test_symlinked_folders_back_into_the_tree_are_not_followed(tmp_path):
    """`circle/loop -> ..` turned 6 images into thousands of rows, square and triangle images labelled circle."""
    write_shapes(tmp_path / "train", 2, seed=0)
    write_shapes(tmp_path / "elsewhere", 2, seed=1)
    (tmp_path / "train" / "circle" / "loop").symlink_to("..")
    (tmp_path / "train" / "square" / "again").symlink_to("../square")
    (tmp_path / "train" / "triangle" / "more").symlink_to(tmp_path / "elsewhere" / "triangle")  # outside: followed
    (tmp_path / "elsewhere" / "triangle" / "up").symlink_to("..")  # a loop outside the tree
    recipe, cfg = parse(f"data.train_dir={tmp_path / 'train'}", "data.eval_fraction=0.5", "data.image_size=8")
    assert len(recipe.raw_files(cfg)) == 8
    splits, meta = recipe.prepare(cfg)
    labels = [meta["class_names"][i] for split in ("train", "eval") for i in splits[split].rows["label"]]
    assert sorted(labels) == ["circle"] * 2 + ["square"] * 2 + ["triangle"] * 4
    ids, _ = read_inputs(recipe, cfg, tmp_path / "train")  # prediction lists folders the same way
    assert len(ids["file"]) == 8 and "triangle/more/000.png" in ids["file"]


def test_one_image_under_two_classes_is_refused(tmp_path):
    write_shapes(tmp_path / "train", 2, seed=0)
    (tmp_path / "train" / "square" / "also.png").symlink_to("../circle/001.png")
    recipe, cfg = parse(f"data.train_dir={tmp_path / 'train'}")
    with pytest.raises(
        DataError,
        match=r"circle/001.png \(class circle\) and .*square/also.png \(class square\) "
        r"are one file",
    ):
        recipe.raw_files(cfg)
    (tmp_path / "train" / "square" / "also.png").unlink()
    write_shapes(tmp_path / "shared", 1, seed=1)  # outside the tree, linked from two classes
    (tmp_path / "train" / "circle" / "shared").symlink_to(tmp_path / "shared")
    (tmp_path / "train" / "triangle" / "shared.png").symlink_to(tmp_path / "shared" / "square" / "000.png")
    with pytest.raises(
        DataError,
        match=r"circle/shared/square/000.png \(class circle\) and .*triangle/shared.png "
        r"\(class triangle\) are one file",
    ):
        recipe.raw_files(cfg)


def test_images_above_the_pixel_limit_name_the_setting(tmp_path):
    write_shapes(tmp_path / "train", 2, seed=0)
    bomb = png_claiming(tmp_path / "train" / "circle" / "huge.png", 20_000, 10_000)  # PIL's limit: 178,956,970
    # Images are decoded as the shards are written (shard_store.prepare), and when predicting.
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    recipe, cfg = parse(f"data.train_dir={tmp_path / 'train'}", "data.eval_fraction=0.5", "data.image_size=8", cache)
    message = f"(?s){bomb} is 20000x10000 = 200,000,000 pixels.*Fix: .* data.max_image_pixels=200000000"
    with pytest.raises(DataError, match=message):
        shard_store.prepare(recipe, cfg)
    with pytest.raises(DataError, match=message):  # predicting decodes by the same reader
        read_inputs(recipe, cfg, tmp_path / "train" / "circle")
    bomb.unlink()
    # The setting is the limit: the 40-60 px shapes are refused under 1,000 pixels, read under 3,600.
    recipe, cfg = parse(
        f"data.train_dir={tmp_path / 'train'}",
        "data.eval_fraction=0.5",
        "data.image_size=8",
        "data.max_image_pixels=1000",
        cache,
    )
    with pytest.raises(DataError, match="more than the 1,000 allowed"):
        shard_store.prepare(recipe, cfg)
    with pytest.raises(DataError, match="more than the 1,000 allowed"):
        read_inputs(recipe, cfg, tmp_path / "train")
    recipe, cfg = parse(
        f"data.train_dir={tmp_path / 'train'}",
        "data.eval_fraction=0.5",
        "data.image_size=8",
        "data.max_image_pixels=3600",
        cache,
    )
    assert len(shard_store.open_shards(shard_store.prepare(recipe, cfg))[0]["train"]) == 3
    with pytest.raises(ConfigError, match="data.max_image_pixels=0"):
        recipe.raw_files(parse(f"data.train_dir={tmp_path / 'train'}", "data.max_image_pixels=0")[1])


def test_one_class_folder_is_refused_naming_the_folder(tmp_path):
    """One class reached torchmetrics, which stopped with a traceback about num_classes."""
    write_shapes(tmp_path / "photos" / "train", 6, seed=0)
    for shape in SHAPES[1:]:
        for file in (tmp_path / "photos" / "train" / shape).iterdir():
            file.unlink()
        (tmp_path / "photos" / "train" / shape).rmdir()
    result = cli(
        common(
            tmp_path, "recipe=image_folder", "data.train_dir=photos/train", "data.image_size=8", "trainer.batch_size=2"
        ),
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "photos/train has one class folder, 'circle'" in result.stderr and "Traceback" not in result.stderr
    assert "Fix: add a folder of images for each other class" in result.stderr
    assert run_dirs(tmp_path / "runs", "image_folder") == []


def test_decoded_images_go_to_the_builds_scratch_folder_on_disk(tmp_path):
    # datasets.map keeps an in-memory dataset's results in memory: a prepare's memory grew with the number of
    # images. Inside a build, a recipe that decodes before it returns (image_rows: Omniglot's, whose files
    # live in a temporary folder) has map's workers write the rows to the build's scratch folder; the folder
    # goes when the build ends, and a killed build's is a temporary folder the next build removes.
    from pipeline import files
    from recipes._images import image_rows

    write_shapes(tmp_path / "train", 4, seed=0)
    _, cfg = parse(f"data.train_dir={tmp_path / 'train'}", "data.image_size=16")
    paths = sorted(str(p) for p in (tmp_path / "train").rglob("*.png"))
    labels = {"label": ([i % 3 for i in range(len(paths))], SHAPES)}
    target = tmp_path / "cache" / "shards"
    with files.scratch(target) as scratch:
        assert scratch.parent == target.parent and ".tmp-" in scratch.name
        rows = image_rows(paths, labels, partial(_read, channels=3), 3, cfg)
        assert rows.cache_files and all(Path(f["filename"]).parent == scratch for f in rows.cache_files)
        assert len(rows) == 12 and rows.with_format("numpy")[:]["image"].shape == (12, 3, 16, 16)
    assert not scratch.exists()
    assert files.scratch_folder() is None
    # Outside a build, the rows stay in memory as before.
    assert not image_rows(paths, labels, partial(_read, channels=3), 3, cfg).cache_files


# ---------------------------------------------------------------- size and channels from the data; resize modes


def write_grey_digits(folder: Path, per_class: int, width: int = 8, height: int = 8) -> Path:
    """<folder>/<0|1>/*.png: grayscale (mode L) images as scikit-learn's 8x8 digits are written."""
    rng = np.random.default_rng(0)
    for label in ("0", "1"):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), mode="L").save(
                folder / label / f"{i:03d}.png"
            )
    return folder


def test_size_and_channels_come_from_the_images_headers(tmp_path, capsys):
    write_grey_digits(tmp_path / "digits", 6, width=10)
    recipe, cfg = parse(f"data.train_dir={tmp_path / 'digits'}", "data.eval_fraction=0.5")
    assert cfg.data.image_size is None and cfg.data.channels is None
    splits, meta = recipe.prepare(cfg)
    assert (meta["image_size"], meta["channels"]) == (8, 1)  # the shorter side; every image grayscale
    assert meta["source_images"] == {
        "files": 12,
        "headers_read": 12,
        "median_size": [10, 8],
        "smallest": [10, 8],
        "largest": [10, 8],
        "median_shorter_side": 8,
        "grayscale": True,
    }
    assert np.array(splits["train"].decoded()[0]["image"]).shape == (1, 8, 8)
    said = capsys.readouterr().out
    assert (
        "train images 10x8 px (median; 10x8 to 10x8), grayscale (headers of 12 of 12 files) -> data.image_size=8 "
        "(the images), data.channels=1 (the images), data.resize=crop"
    ) in said and "WARNING" not in said
    assert recipe.model(cfg, meta)(torch.rand(2, 1, 8, 8)).shape == (2, 2)  # the model takes the shards' shape

    # Colour photos larger than the cap: RGB at 64 px, as the tutorial's Resize((64, 64)).
    write_shapes(tmp_path / "photos", 2, seed=0)
    for image in (tmp_path / "photos").rglob("*.png"):
        Image.open(image).resize((120, 90)).save(image)
    recipe, cfg = parse(f"data.train_dir={tmp_path / 'photos'}", "data.eval_fraction=0.5")
    splits, meta = recipe.prepare(cfg)
    assert (meta["image_size"], meta["channels"], meta["source_images"]["grayscale"]) == (64, 3, False)

    # A size given far above the images' is warned about, with the size the images would give.
    recipe, cfg = parse(
        f"data.train_dir={tmp_path / 'digits'}", "data.eval_fraction=0.5", "data.image_size=64", "data.channels=3"
    )
    splits, meta = recipe.prepare(cfg)
    assert (meta["image_size"], meta["channels"]) == (64, 3)
    assert np.array(splits["train"].decoded()[0]["image"]).shape == (3, 64, 64)
    said = capsys.readouterr().out
    assert "data.image_size=64 (given), data.channels=3 (given)" in said
    assert "WARNING: data.image_size=64 enlarges the images (median shorter side 8 px) 8x" in said
    assert "leave data.image_size unset to take 8 from the images" in said

    # Other data evaluated for a run takes the run's size and channels (data.statistics names its meta.json).
    run_meta = tmp_path / "meta.json"
    run_meta.write_text(json.dumps({"class_names": ["0", "1"], "image_size": 12, "channels": 3}))
    recipe, cfg = parse(
        f"data.train_dir={tmp_path / 'digits'}", "data.eval_fraction=0.5", f"data.statistics={run_meta}"
    )
    assert run_meta in recipe.raw_files(cfg)  # its content joins the fingerprint
    assert (recipe.prepare(cfg)[1]["image_size"], recipe.prepare(cfg)[1]["channels"]) == (12, 3)


def stripes(height: int, width: int) -> torch.Tensor:
    """A white RGB image [3, height, width] whose outer eighths of columns are black."""
    image = torch.full((3, height, width), 255, dtype=torch.uint8)
    image[..., : width // 8], image[..., width - width // 8 :] = 0, 0
    return image


def test_resize_modes_fit_a_wide_image_to_the_square():
    from recipes._images import fit

    wide = stripes(20, 40)  # 40 px wide, 20 high
    crop, pad, stretch = (fit(wide, 10, mode).int() for mode in ("crop", "pad", "stretch"))
    assert crop.shape == pad.shape == stretch.shape == (3, 10, 10)
    assert (crop == 255).all()  # the middle half of the width: the black edges are cut off
    assert (stretch[..., 0] < 64).all() and (stretch[..., 9] < 64).all()  # squashed: the black edges kept
    assert (stretch[..., 5] == 255).all() and (stretch[:, 0] == stretch[:, 9]).all()  # the full height
    # pad: the whole image, 10 wide x 5 high, centred between black rows; its own black edges kept
    assert (pad[:, :2] == 0).all() and (pad[:, 7:] == 0).all()
    assert (pad[:, 2:7, 5] == 255).all() and (pad[:, 2:7, 0] < 64).all()
    tall = wide.transpose(1, 2)  # 20 wide, 40 high: its black eighths at the top and bottom
    assert (fit(tall, 10, "crop") == 255).all()
    assert (fit(torch.zeros(3, 4, 4, dtype=torch.uint8), 8, "pad") == 0).all()  # small images grow to fill it


@pytest.mark.parametrize("mode", ["crop", "pad", "stretch"])
def test_every_resize_mode_prepares_and_predicts_the_same_pixels(tmp_path, mode):
    write_shapes(tmp_path / "photos", 2, seed=0)
    recipe, cfg = parse(
        f"data.train_dir={tmp_path / 'photos'}", "data.eval_fraction=0.5", "data.image_size=16", f"data.resize={mode}"
    )
    splits, meta = recipe.prepare(cfg)
    _, columns = read_inputs(recipe, cfg, tmp_path / "photos")  # prediction fits new images as prepare() did
    assert columns["image"].shape == (6, 3, 16, 16)
    stored = [np.array(image) for split in ("train", "eval") for image in splits[split].decoded()["image"]]
    assert all(any(np.array_equal(image, new) for new in columns["image"]) for image in stored)


# ---------------------------------------------------------------- random_resized_crop; large images, resnet50


def test_random_resized_crop_zooms_each_image_into_a_part_of_it():
    from recipes._augment import augment

    # Channel 0 rises left to right, channel 1 top to bottom: a crop's span of each is its width and height.
    n, side = 64, 32
    ramp = torch.linspace(0, 1, side)
    image = torch.stack([ramp.expand(side, side), ramp[:, None].expand(side, side), torch.zeros(side, side)])
    rng.DRAWS.at(0, 0, 0)
    out = augment(image[None].repeat(n, 1, 1, 1), ["random_resized_crop:0.25"])
    assert out.shape == (n, 3, side, side)
    assert (out[:, 0] - out[:, 0, :1]).abs().max() < 1e-5  # no turn or shear: every row alike
    width, height = out[:, 0, 0, -1] - out[:, 0, 0, 0], out[:, 1, -1, 0] - out[:, 1, 0, 0]
    assert (width <= 1 + 1e-5).all() and (height <= 1 + 1e-5).all() and (width * height >= 0.25 - 1e-4).all()
    assert ((width / height >= 3 / 4 - 1e-3) & (width / height <= 4 / 3 + 1e-3)).all()
    assert len(set(width.round(decimals=3).tolist())) > n // 2  # drawn per image
    rng.DRAWS.at(0, 0, 0)  # the same draws again: the same crops
    assert augment(image[None].repeat(n, 1, 1, 1), ["random_resized_crop:0.25"]).equal(out)


# Augments one global batch of 8 images on however many processes it is launched with: each process its slice,
# gathered; process 0 saves the whole batch.
AUGMENT_SLICES = """
import sys
import torch
from accelerate import PartialState
from accelerate.utils import gather
from pipeline import rng
from recipes._augment import augment

state = PartialState(cpu=True)
image = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
part = 8 // state.num_processes
rng.DRAWS.at(3, 1, 2)
mine = augment(image[state.process_index * part:(state.process_index + 1) * part],
               ["random_resized_crop:0.3", "hflip", "rotate:10"])
every = gather(mine)
if state.is_main_process:
    torch.save(every, sys.argv[1])
# Left up at exit, gloo's teardown can abort a process ("terminate called without an active exception").
state.destroy_process_group()
"""


@pytest.mark.slow
def test_random_resized_crop_is_the_same_for_the_global_batch_on_one_or_two_processes(tmp_path):
    import subprocess
    import sys

    from conftest import BIN, ROOT, environment

    script = tmp_path / "augment.py"
    script.write_text(AUGMENT_SLICES)
    env = {"PYTHONPATH": str(ROOT)}
    ok(
        subprocess.run(
            [sys.executable, str(script), str(tmp_path / "one.pt")],
            cwd=tmp_path,
            env=environment(1, env),
            capture_output=True,
            text=True,
            timeout=300,
        )
    )
    ok(
        subprocess.run(
            [
                str(BIN / "accelerate"),
                "launch",
                *launch_flags(2),
                str(script),
                str(tmp_path / "two.pt"),
            ],
            cwd=tmp_path,
            env=environment(2, env),
            capture_output=True,
            text=True,
            timeout=300,
        )
    )
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.shape == two.shape == (8, 3, 16, 16) and torch.equal(one, two)


@pytest.mark.slow
def test_resnet50_trains_on_224_px_photos(workdir):
    """Photos larger than the inferred cap, at a torchvision model's training size: a center crop to 224 px,
    random_resized_crop on the batch, one step of resnet50 and an evaluation."""
    write_shapes(workdir / "photos", 3, seed=0)
    for image in (workdir / "photos").rglob("*.png"):
        Image.open(image).resize((300, 240)).save(image)
    ok(
        cli(
            common(
                workdir,
                "recipe=image_folder",
                "data.train_dir=photos",
                "data.eval_fraction=0.3",
                "data.image_size=224",
                "data.augment=[random_resized_crop:0.35,hflip]",
                "model.arch=resnet50",
                "trainer.batch_size=2",
                "trainer.max_steps=1",
            ),
            cwd=workdir,
        )
    )
    s = summary(workdir / "runs", "image_folder")
    assert s["steps"] == 1 and s["eval/samples"] == 3 and np.isfinite(s["eval/loss"])
    meta = json.loads((run_dirs(workdir / "runs", "image_folder")[0] / "meta.json").read_text())
    assert (meta["image_size"], meta["channels"], meta["source_images"]["median_size"]) == (224, 3, [300, 240])

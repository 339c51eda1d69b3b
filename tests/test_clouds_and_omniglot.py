"""Image recipes end to end: the real CLI on ImageFolder trees of real JPEG files (clouds) and on the real
Omniglot subset in torchvision's layout (omniglot_multi).

.venv/bin/pytest tests/test_clouds_and_omniglot.py       # all, about 3 minutes on 2 cores
.venv/bin/pytest tests/test_clouds_and_omniglot.py -m "not slow"
"""

import json
import zipfile
from pathlib import Path

import conftest
import numpy as np
import pytest
import torch
from conftest import cli, common, ok, run_dirs, summary
from PIL import Image, ImageDraw

from pipeline import cli as pipeline_cli
from pipeline import shard_store, tensor_rows

CLOUDS = [
    "cirriform clouds",
    "clear sky",
    "cumulonimbus clouds",
    "cumulus clouds",
    "high cumuliform clouds",
    "stratiform clouds",
    "stratocumulus clouds",
]
OMNIGLOT_ZIP = Path(conftest.TEST_DATA) / "omniglot-small" / "images_background_small1.zip"
# small1: 5 alphabets, 136 characters, 20 drawers each; Korean has 40 of the characters.
ALPHABETS, CHARACTERS, DRAWERS = 5, 136, 20
MAJORITY_ALPHABET = 40 / 136  # what always answering "Korean" scores


def shards(workdir: Path, recipe: str, *args: str):
    """The prepared splits (as whole-column tensors) and meta of a run's configuration."""
    recipe, cfg = pipeline_cli.parse([f"recipe={recipe}", f"data.cache_dir={workdir / 'cache'}", *args])
    splits, meta = shard_store.open_shards(shard_store.shards_dir(recipe, cfg))
    return {name: tensor_rows.columns(split) for name, split in splits.items()}, meta


def failed(result) -> str:
    assert result.returncode == 2, f"expected exit 2, got {result.returncode}\n{result.stderr[-4000:]}"
    return result.stderr


# ---------------------------------------------------------------- clouds

# One colour per class: the blob keeps its colour under flips and rotations, and the white bar and black
# background pin every channel's range, so autocontrast cannot wash the colour out either.
COLOURS = [(230, 30, 30), (30, 200, 30), (40, 60, 230), (230, 220, 30), (30, 210, 220), (220, 40, 210), (240, 140, 20)]


def write_clouds(root: Path, train_per_class: int = 30, test_per_class: int = 10) -> Path:
    """`clouds_train/<class>/*.jpg` and `clouds_test/<class>/*.jpg`: real JPEGs of assorted sizes."""
    rng = np.random.default_rng(0)
    for folder, per_class in (("clouds_train", train_per_class), ("clouds_test", test_per_class)):
        for colour, name in zip(COLOURS, CLOUDS):
            (root / folder / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = (int(v) for v in rng.integers(48, 97, 2))
                image = Image.fromarray(rng.integers(0, 40, (h, w, 3), dtype=np.uint8))
                draw = ImageDraw.Draw(image)
                cx, cy = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 4, 3 * h // 4)
                r = int(rng.integers(min(w, h) // 6, min(w, h) // 3))
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
                s = min(w, h) // 8
                draw.rectangle([w // 2 - s, h // 2 - s // 2, w // 2 + s, h // 2 + s // 2], fill=(255, 255, 255))
                image.save(root / folder / name / f"{i:03d}.jpg", quality=90)
    return root


@pytest.mark.slow
def test_clouds_learns_and_reports_per_class_metrics(workdir):
    root = write_clouds(workdir / "data")
    ok(cli(common(workdir, "recipe=clouds", f"data.root={root}", "trainer.epochs=4"), cwd=workdir))
    s = summary(workdir / "runs", "clouds")

    # 30 photos per class, 10% held out stratified: 3 per class for eval; clouds_test is the test split.
    assert s["eval/samples"] == 21 and s["test/samples"] == 70
    assert s["eval/accuracy"] >= 0.5 and s["test/accuracy"] >= 0.5, s  # chance: 1/7
    for split in ("eval", "test"):
        for metric in ("precision", "recall", "f1"):
            assert {f"{split}/{metric}_micro", f"{split}/{metric}_macro"} <= s.keys()
            assert all(0.0 <= s[f"{split}/{metric}/{name}"] <= 1.0 for name in CLOUDS)
    confusion = np.array(s["test/confusion_matrix"])
    assert confusion.shape == (7, 7) and confusion.sum() == 70
    assert np.trace(confusion) / 70 == pytest.approx(s["test/accuracy"])

    columns, meta = shards(workdir, "clouds", f"data.root={root}")
    assert meta["class_names"] == CLOUDS  # the folder names, sorted
    image = columns["train"]["image"]
    assert image.dtype == torch.uint8 and tuple(image.shape[1:]) == (3, 64, 64)
    assert len(columns["train"]["label"]) == 189


def test_clouds_augments_training_batches_only():
    from recipes.clouds import transform

    image = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    plain = transform({"image": image}, False, {})["image"]
    assert plain.dtype == torch.float32 and torch.allclose(plain, image.float() / 255)
    torch.manual_seed(0)
    augmented = [transform({"image": image}, True, {})["image"] for _ in range(4)]
    assert all(a.shape == plain.shape and a.min() >= 0 and a.max() <= 1 for a in augmented)
    assert not any(torch.equal(a, plain) for a in augmented)  # rotation alone changes every batch
    # Drawn per image, as the tutorial's per-sample transforms: copies of one image come out different.
    same = transform({"image": image[:1].repeat(16, 1, 1, 1)}, True, {})["image"]
    assert len({tuple(x.flatten()[::97].tolist()) for x in same}) == 16
    # Each image turned by its own angle, pixel for pixel as torchvision's rotate turns it.
    from torchvision.transforms import v2

    from recipes.clouds import rotate

    images, degrees = torch.rand(4, 3, 64, 64), torch.tensor([0.0, 30.0, -45.0, 90.0])
    turned = rotate(images, degrees)
    for img, deg, out in zip(images, degrees.tolist(), turned):
        assert torch.equal(out, v2.functional.rotate(img, deg))


@pytest.mark.slow
def test_clouds_bad_files_stop_with_their_names(workdir):
    root = write_clouds(workdir / "data", train_per_class=2, test_per_class=1)
    (root / "clouds_train" / "clear sky" / "notes.txt").write_text("not an image, and not named like one")
    (root / "clouds_train" / "clear sky" / "broken.jpg").write_bytes(b"this is no JPEG")
    err = failed(cli(common(workdir, "recipe=clouds", f"data.root={root}"), cwd=workdir))
    assert "not a readable image" in err and str(root / "clouds_train" / "clear sky" / "broken.jpg") in err
    assert "notes.txt" not in err  # no image extension: skipped, as ImageFolder does
    assert run_dirs(workdir / "runs", "clouds") == []  # stopped before a run directory was made

    err = failed(cli(common(workdir, "recipe=clouds", f"data.root={workdir / 'nowhere'}"), cwd=workdir))
    assert str(workdir / "nowhere" / "clouds_train") in err and "<class name>/*.jpg" in err and "Fix:" in err


# ---------------------------------------------------------------- omniglot_multi


def unzip_omniglot(target: Path) -> Path:
    """The real small1 subset as `<target>/<Alphabet>/characterNN/*.png`."""
    with zipfile.ZipFile(OMNIGLOT_ZIP) as z:
        z.extractall(target.parent)
    (target.parent / "images_background_small1").rename(target)
    return target


@pytest.fixture(scope="session")
def omniglot_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("omniglot")
    unzip_omniglot(root / "images_background")
    return root


@pytest.fixture(scope="session")
def omniglot_py_root(tmp_path_factory) -> Path:
    """The same files where torchvision's Omniglot(download=True) puts them."""
    root = tmp_path_factory.mktemp("omniglot_py")
    (root / "omniglot-py").mkdir()
    unzip_omniglot(root / "omniglot-py" / "images_background")
    return root


@pytest.mark.slow
def test_omniglot_multi_output_learns_both_heads(workdir, omniglot_root):
    ok(cli(common(workdir, "recipe=omniglot_multi", f"data.root={omniglot_root}", "trainer.epochs=3"), cwd=workdir))
    s = summary(workdir / "runs", "omniglot_multi")
    assert s["eval/samples"] == CHARACTERS * 4  # 4 of each character's 20 drawers held out
    assert s["eval/alphabet/accuracy"] >= 0.4, s  # chance 0.2, always-Korean 0.29
    assert s["eval/character/accuracy"] >= 0.07, s  # chance 1/136 = 0.007
    assert "eval/accuracy" not in s

    columns, meta = shards(workdir, "omniglot_multi", f"data.root={omniglot_root}")
    assert len(meta["alphabet_names"]) == ALPHABETS and len(meta["character_names"]) == CHARACTERS
    assert meta["character_names"][0] == "Balinese/character01" and len(meta["eval_drawers"]) == 4
    train, evaluation = columns["train"], columns["eval"]
    assert len(train["image"]) == CHARACTERS * 16 and tuple(train["image"].shape[1:]) == (1, 64, 64)
    assert train["image"].dtype == torch.uint8
    # every character in both splits, each alphabet label consistent with its character's name
    assert set(train["character"].tolist()) == set(evaluation["character"].tolist()) == set(range(CHARACTERS))
    alphabet_of = {c: a for c, a in zip(train["character"].tolist(), train["alphabet"].tolist())}
    assert all(meta["character_names"][c].split("/")[0] == meta["alphabet_names"][a] for c, a in alphabet_of.items())


@pytest.mark.slow
def test_omniglot_multi_input_in_torchvision_layout(workdir, omniglot_py_root):
    ok(
        cli(
            common(
                workdir,
                "recipe=omniglot_multi",
                f"data.root={omniglot_py_root}",
                "model.mode=multi_input",
                "trainer.epochs=3",
            ),
            cwd=workdir,
        )
    )
    s = summary(workdir / "runs", "omniglot_multi")
    assert s["eval/character/accuracy"] >= 0.1, s  # knowing the alphabet helps: 0.23 here, chance 0.007
    assert not any(k.startswith("eval/alphabet/") for k in s)  # no alphabet head in this mode
    run = run_dirs(workdir / "runs", "omniglot_multi")[0]
    assert "mode: multi_input" in (run / "config.yaml").read_text()


@pytest.mark.slow
def test_omniglot_mistakes_are_named(workdir, omniglot_root):
    err = failed(cli(common(workdir, "recipe=omniglot_multi", "model.mode=multi_head"), cwd=workdir))
    assert "model.mode" in err and "multi_output" in err and "multi_input" in err

    err = failed(
        cli(common(workdir, "recipe=omniglot_multi", f"data.root={workdir}", "data.download=false"), cwd=workdir)
    )
    assert "images_background/<Alphabet>/characterNN" in err and "omniglot-py" in err and "Fix:" in err

    err = failed(
        cli(
            common(workdir, "recipe=omniglot_multi", f"data.root={omniglot_root}", f"data.eval_drawers={DRAWERS}"),
            cwd=workdir,
        )
    )
    assert f"data.eval_drawers={DRAWERS}" in err and "1..19" in err
    assert run_dirs(workdir / "runs", "omniglot_multi") == []


@pytest.mark.slow
def test_omniglot_multi_output_reaches_tutorial_accuracy(workdir, omniglot_root):
    """The recipe's defaults (10 epochs, Adam 1e-3, batch 32) on real small1: 0.55 / 0.39 measured."""
    ok(cli(common(workdir, "recipe=omniglot_multi", f"data.root={omniglot_root}"), cwd=workdir))
    s = summary(workdir / "runs", "omniglot_multi")
    assert s["epochs"] == 10
    assert s["eval/alphabet/accuracy"] >= 0.5 and s["eval/character/accuracy"] >= 0.3, s
    metrics = [json.loads(line) for line in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in metrics if "eval/character/accuracy" in m]) == 10


def test_omniglot_loss_weights_come_from_config():
    import torch

    from pipeline import cli as pipeline_cli
    from pipeline.recipe import loss_fn

    outputs = {"alphabet": torch.randn(4, 5), "character": torch.randn(4, 30)}
    batch = {"alphabet": torch.tensor([0, 1, 2, 3]), "character": torch.tensor([0, 5, 9, 29])}
    ce = torch.nn.functional.cross_entropy
    recipe, cfg = pipeline_cli.parse(["recipe=omniglot_multi", "loss.alphabet_weight=0.0", "loss.character_weight=2.0"])
    loss = loss_fn(recipe, cfg, {})(outputs, batch)
    assert torch.allclose(loss, 2.0 * ce(outputs["character"], batch["character"]))


def test_omniglot_loss_settings_must_be_keywords_of_its_loss():
    import dataclasses

    from pipeline.errors import ConfigError
    from pipeline.recipe import loss_fn

    recipe, cfg = pipeline_cli.parse(["recipe=omniglot_multi"])
    without = dataclasses.replace(recipe, loss=lambda outputs, batch, character_weight: 0.0)
    with pytest.raises(ConfigError, match="alphabet_weight"):
        loss_fn(without, cfg, {})


# ---------------------------------------------------------------- a recipe kept outside this repo


@pytest.mark.slow
def test_recipe_from_a_module_outside_the_repo_trains_by_its_dotted_path(workdir):
    """digits.py copied into <workdir>/myrecipes/tiny.py (name "tiny"), found from the current folder."""
    package = workdir / "myrecipes"
    package.mkdir()
    (package / "__init__.py").write_text("")
    source = (Path(conftest.ROOT) / "recipes" / "digits.py").read_text()
    (package / "tiny.py").write_text(source.replace('name="digits"', 'name="tiny"'))
    result = ok(cli(common(workdir, "recipe=myrecipes.tiny", "trainer.max_steps=2"), cwd=workdir))
    assert "data: preparing tiny" in result.stdout
    assert list((workdir / "cache" / "tiny").glob("*/meta.json"))  # shards under the recipe's name
    assert summary(workdir / "runs", "tiny")["steps"] == 2  # the run folder takes the recipe's name too
    # The shards' fingerprint covers the module's own source: an edit there makes new shards.
    (package / "tiny.py").write_text(source.replace('name="digits"', 'name="tiny"') + "\n# edited\n")
    ok(cli(common(workdir, "recipe=myrecipes.tiny", "trainer.max_steps=2"), cwd=workdir, script="prepare"))
    assert len(list((workdir / "cache" / "tiny").glob("*/meta.json"))) == 2


@pytest.mark.slow
def test_unknown_recipe_modules_are_named_with_what_was_tried(workdir):
    err = failed(cli(common(workdir, "recipe=nosuch.tiny"), cwd=workdir))
    assert "unknown recipe 'nosuch.tiny': no module nosuch" in err and str(workdir) in err and "PYTHONPATH" in err
    err = failed(cli(common(workdir, "recipe=nosuch"), cwd=workdir))
    assert "no module recipes.nosuch" in err and "digits" in err and "recipe=mypkg.my_recipe" in err
    assert not (workdir / "runs").exists()

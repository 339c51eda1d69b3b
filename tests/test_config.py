"""Configuration: defaults <- recipe defaults <- command line; errors name the key and the choices."""

import pytest
from conftest import cli, common

from pipeline import cli as pipeline_cli
from pipeline.config import ConfigError


def test_layers_pipeline_then_recipe_then_command_line():
    _, cfg = pipeline_cli.parse(["recipe=mnist_mlp", "optimizer.lr=0.01"])
    assert cfg.trainer.batch_size == 64 and cfg.trainer.epochs == 5  # the tutorial's
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.lr == 0.01  # command line wins
    assert cfg.seed == 42 and cfg.data.root == "data"  # pipeline defaults
    _, cfg = pipeline_cli.parse(["recipe=mnist_cnn"])
    assert cfg.optimizer.name == "adam" and cfg.optimizer.lr == 1e-3


def test_default_recipe_is_digits():
    recipe, cfg = pipeline_cli.parse([])
    assert recipe.name == cfg.recipe == "digits"


@pytest.mark.parametrize("argv, words", [
    (["trainer.epoch=3"], ["trainer.epoch", "epochs", "batch_size"]),
    (["bogus=1"], ["bogus", "recipe", "trainer"]),
    (["trainer.epochs=three"], ["trainer.epochs", "three"]),
    (["recipe=nope"], ["nope", "digits", "mnist_cnn", "fashion_mnist_mlp"]),
    (["optimizer.name=lion"], ["optimizer.name", "lion", "adamw", "rmsprop"]),
    (["trainer.epochs=0"], ["trainer.epochs", ">= 1"]),
    (["data.eval_fraction=1.5"], ["data.eval_fraction"]),
    (["epochs"], ["epochs", "key=value"]),
])
def test_bad_input_names_the_key_and_the_choices(argv, words):
    with pytest.raises(ConfigError) as e:
        pipeline_cli.parse(argv)
    for word in words:
        assert word in str(e.value)


def test_cli_stops_before_any_work(workdir):
    result = cli(common(workdir, "trainer.epoch=3"), cwd=workdir)
    assert result.returncode == 2
    assert "unknown config key 'trainer.epoch'" in result.stderr and "epochs" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "runs").exists() and not (workdir / "cache").exists()


def test_batch_that_does_not_split_is_refused(workdir):
    result = cli(common(workdir, "trainer.batch_size=30", "trainer.grad_accum_steps=4"), cwd=workdir)
    assert result.returncode == 2
    assert "trainer.batch_size=30" in result.stderr and "multiple of 4" in result.stderr


def test_help_lists_recipes(workdir):
    result = cli(["--help"], cwd=workdir)
    assert result.returncode == 0
    for name in ("digits", "mnist_mlp", "fashion_mnist_mlp", "mnist_cnn"):
        assert name in result.stdout
    assert "key.sub=value" in result.stdout


def test_print_config_shows_resolved_values(workdir):
    result = cli(["recipe=mnist_cnn", "trainer.epochs=2", "--print-config"], cwd=workdir)
    assert result.returncode == 0
    assert "epochs: 2" in result.stdout and "name: adam" in result.stdout

"""Configuration: defaults <- recipe defaults <- command line; errors name the key and the choices."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, cli, common, ok, run_dirs
from omegaconf import OmegaConf

from pipeline import cli as pipeline_cli
from pipeline import config, config_checks, optim
from pipeline.errors import ConfigError
from pipeline.recipe_contract import load_recipe

DIGITS = load_recipe("digits")


def test_layers_pipeline_then_recipe_then_command_line():
    _, cfg = pipeline_cli.parse(["recipe=mnist_mlp", "optimizer.lr=0.01"])
    assert cfg.trainer.batch_size == 64 and cfg.trainer.epochs == 5  # the tutorial's
    assert cfg.optimizer.name.name == "sgd" and cfg.optimizer.lr == 0.01  # command line wins
    assert cfg.seed == 42 and cfg.data.root == "data"  # pipeline defaults
    _, cfg = pipeline_cli.parse(["recipe=mnist_cnn"])
    assert cfg.optimizer.name.name == "adam" and cfg.optimizer.lr == 1e-3


def test_default_recipe_is_digits():
    recipe, cfg = pipeline_cli.parse([])
    assert recipe.name == cfg.recipe == "digits"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["trainer.epoch=3"], ["trainer.epoch", "epochs", "batch_size"]),
        (["bogus=1"], ["bogus", "recipe", "trainer"]),
        (["trainer.epochs=three"], ["trainer.epochs", "three"]),
        (["recipe=nope"], ["nope", "digits", "mnist_cnn", "fashion_mnist_mlp"]),
        (["optimizer.name=lion"], ["optimizer.name", "lion", "adamw", "rmsprop"]),
        (["scheduler.name=linear"], ["scheduler.name", "linear", "none, step, cosine, onecycle"]),
        (["model.init=he"], ["model.init", "he", "default", "xavier_uniform", "kaiming_normal"]),
        (["data.on_device=maybe"], ["data.on_device", "maybe", "auto, true, false"]),
        (["trainer.compile=1"], ["trainer.compile", "auto, true, false"]),
        (["tracking=tensorbored"], ["tracking", "tensorboard", "mlflow", "wandb", "none"]),
        (["trainer.epochs=0"], ["trainer.epochs", ">= 1"]),
        (["trainer.max_steps=-1"], ["trainer.max_steps=-1", ">= 1", "no limit"]),
        (["trainer.max_steps=0"], ["trainer.max_steps=0", ">= 1"]),
        (["trainer.clip_grad_norm=0"], ["trainer.clip_grad_norm", "> 0"]),
        (["scheduler.step_size=0"], ["scheduler.step_size=0", ">= 1"]),
        (["scheduler.warmup_steps=-5"], ["scheduler.warmup_steps=-5", ">= 0"]),
        (["scheduler.gamma=-0.1"], ["scheduler.gamma", "> 0"]),
        (["scheduler.name=onecycle", "scheduler.warmup_steps=3"], ["onecycle", "own warmup", "warmup_steps=0"]),
        (["optimizer.momentum=-0.9"], ["optimizer.momentum", ">= 0"]),
        (["optimizer.betas=[0.9,1.5]"], ["optimizer.betas", "[0, 1)"]),
        (["seed=-1"], ["seed=-1", ">= 0"]),
        (["data.num_workers=-2"], ["data.num_workers", ">= 0"]),
        (["data.eval_fraction=1.5"], ["data.eval_fraction"]),
        # Non-finite numbers, for every float key: NaN passes every `< 0` range check.
        (["optimizer.lr=nan"], ["optimizer.lr=nan", "finite"]),
        (["optimizer.lr=inf"], ["optimizer.lr=inf", "finite"]),
        (["optimizer.weight_decay=.nan"], ["optimizer.weight_decay=nan", "finite"]),
        (["trainer.clip_grad_norm=-inf"], ["trainer.clip_grad_norm=-inf", "finite"]),
        (["data.in_memory_budget_gb=nan"], ["data.in_memory_budget_gb=nan", "finite"]),
        (["scheduler.gamma=nan"], ["scheduler.gamma=nan", "finite"]),
        (["epochs"], ["epochs", "key=value"]),
        (["optimizer.betas=[0.9"], ["optimizer.betas=[0.9", "YAML"]),
        (["--config"], ["--config needs a YAML file"]),  # --config takes one file
        (["--config", "a.yaml", "--config=b.yaml"], ["twice", "a.yaml and b.yaml"]),
    ],
)
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


@pytest.mark.slow
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


# ---- choices: one registry each, any case, true/false as spelled


def test_choices_are_the_registries_keys():
    choices = config.enum_keys(config.schema(DIGITS))
    assert list(choices["optimizer.name"].__members__) == list(optim.OPTIMIZERS)
    assert list(choices["scheduler.name"].__members__) == list(optim.SCHEDULERS)
    assert list(choices["model.init"].__members__) == list(optim.INITS)


@pytest.mark.slow
def test_a_new_registry_entry_needs_no_other_edit():
    # A fresh interpreter: the registry grows before the config is built from it, as a user's code would.
    code = """
import torch
from pipeline import optim
optim.OPTIMIZERS["nadam"] = lambda p, c: torch.optim.NAdam(p, lr=c.lr)
from pipeline import config
from pipeline.recipe_contract import load_recipe
cfg = config.build(["optimizer.name=NAdam"], load_recipe("digits"))
print(type(optim.optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])).__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "NAdam"


@pytest.mark.parametrize(
    "key, registry",
    [("optimizer.name", optim.OPTIMIZERS), ("scheduler.name", optim.SCHEDULERS), ("model.init", optim.INITS)],
)
def test_every_registry_name_is_accepted_in_any_case(key, registry):
    for name in registry:
        for spelled in (name, name.upper(), name.title()):
            assert OmegaConf.select(config.build([f"{key}={spelled}"], DIGITS), key).name == name


@pytest.mark.parametrize(
    "value, meant",
    [
        ("false", "false"),
        ("False", "false"),
        ("FALSE", "false"),
        ("true", "true"),
        ("True", "true"),
        ("auto", "auto"),
        ("AUTO", "auto"),
    ],
)
def test_switches_mean_what_they_say(value, meant):
    cfg = config.build([f"data.on_device={value}", f"trainer.compile={value}"], DIGITS)
    assert cfg.data.on_device.name == meant and cfg.trainer.compile.name == meant
    assert config.flag(cfg.trainer.compile, cuda=True) == (meant != "false")
    assert config.flag(cfg.trainer.compile, cuda=False) == (meant == "true")


def test_recipe_choices_are_case_insensitive_too():
    omniglot, forecast = load_recipe("omniglot_multi"), load_recipe("electricity_forecast")
    assert config.build(["model.mode=Multi_Input"], omniglot).model.mode.name == "multi_input"
    assert config.build(["model.cell=LSTM"], forecast).model.cell.name == "lstm"
    with pytest.raises(ConfigError, match="model.mode.*multi_output, multi_input"):
        config.build(["model.mode=both"], omniglot)


def test_config_yaml_loads_back_into_the_same_config():
    cfg = config.build(
        [
            "optimizer.name=ADAMW",
            "scheduler.name=cosine",
            "model.init=kaiming_normal",
            "data.on_device=false",
            "trainer.compile=true",
            "tracking=none",
        ],
        DIGITS,
    )
    text = config.to_yaml(cfg)
    assert "name: adamw" in text and "init: kaiming_normal" in text
    assert OmegaConf.merge(config.schema(DIGITS), OmegaConf.create(text)) == cfg
    assert config.as_dict(cfg)["optimizer"]["name"] == "adamw"  # plain strings for trackers


# ---- run_name: one plain folder inside <output_dir>/<recipe>/


@pytest.mark.parametrize(
    "name, why",
    [
        ("../../x", "path separator"),
        ("a/b", "path separator"),
        ("/abs/dir", "path separator"),
        (f"a{os.sep}b", "path separator"),
        (".", "the recipe's folder itself"),
        ("..", "the folder above"),
        ('""', "empty"),
        ("", "empty"),
        ("x" * 256, "255"),
    ],
)
def test_run_name_must_be_one_plain_folder_name(name, why):
    with pytest.raises(ConfigError) as e:
        config.build([f"run_name={name}"], DIGITS)
    assert "run_name=" in str(e.value) and why in str(e.value) and "e.g. run_name=" in str(e.value)


def test_run_name_with_nul_is_refused():
    # A command line cannot carry NUL (nor does YAML read it); a name set in code can.
    with pytest.raises(ConfigError, match="NUL.*e.g. run_name="):
        config_checks.check_run_name("a\0b")


def test_plain_run_names_pass_and_the_last_one_wins():
    for name in ("slurm-123", "baseline.lr3e-4", "run 1", "x" * 255):
        assert config.build([f"run_name={name}"], DIGITS).run_name == name
    # launch/k8s/launch.sh puts run_name=$RUN_NAME first so that the user's own wins.
    assert config.build(["run_name=", "run_name=mine"], DIGITS).run_name == "mine"
    with pytest.raises(ConfigError, match="empty"):
        config.build(["run_name=mine", "run_name="], DIGITS)
    assert config.build(["run_name=null"], DIGITS).run_name is None  # a timestamp is chosen
    # Names YAML would read as other types keep their spelling (not the folder `True` or `1000.0`).
    for name in ("true", "1e3", "007", "2026-11-26"):
        assert config.build([f"run_name={name}"], DIGITS).run_name == name
    assert config.build(["run_name='my run'"], DIGITS).run_name == "my run"  # quotes are YAML's, as before


@pytest.mark.slow
def test_any_case_and_false_train_through_the_cli(workdir):
    args = [
        "optimizer.name=SGD",
        "scheduler.name=COSINE",
        "model.init=Xavier_Uniform",
        "data.on_device=false",
        "trainer.compile=False",
        "trainer.max_steps=2",
        "trainer.epochs=1",
        "run_name=cased",
    ]
    ok(cli(common(workdir, *args), cwd=workdir))
    run = run_dirs(workdir / "runs", "digits")[0]
    assert run.name == "cased" and (run / "summary.json").exists()
    written = OmegaConf.load(run / "config.yaml")
    assert (written.optimizer.name, written.scheduler.name, written.model.init) == ("sgd", "cosine", "xavier_uniform")
    assert (written.data.on_device, written.trainer.compile) == ("false", "false")
    assert OmegaConf.merge(config.schema(DIGITS), written) == config.build(common(workdir, *args), DIGITS)


# ---- --config FILE: a task kept as YAML, between the recipe's defaults and the command line


def test_print_config_is_a_config_file_that_gives_the_same_config(workdir):
    args = [
        "recipe=water_potability",
        "trainer.epochs=2",
        "optimizer.name=ADAM",
        "run_name=true",
        "optimizer.betas=[0.8,0.99]",
        "data.in_memory=false",
    ]
    printed = ok(cli([*args, "--print-config"], cwd=workdir)).stdout
    (workdir / "task.yaml").write_text(printed)
    _, from_file = pipeline_cli.parse([f"--config={workdir / 'task.yaml'}"])
    assert from_file == pipeline_cli.parse(args)[1] and from_file.run_name == "true"
    # The command line wins over the file; through the real CLI, whose printout is again such a file.
    again = ok(cli(["--config", "task.yaml", "trainer.epochs=3", "--print-config"], cwd=workdir)).stdout
    assert again == printed.replace("epochs: 2", "epochs: 3")


def test_config_file_layers_between_recipe_defaults_and_command_line(tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text("recipe: water_potability\ntrainer:\n  epochs: 7\noptimizer: {lr: 3e-4, name: AdamW}\n")
    recipe, cfg = pipeline_cli.parse(["--config", str(task), "optimizer.lr=0.01"])
    assert recipe.name == cfg.recipe == "water_potability"  # the file's recipe
    assert cfg.trainer.epochs == 7 and cfg.optimizer.name.name == "adamw"  # the file over the recipe's defaults
    assert cfg.optimizer.lr == 0.01  # the command line over the file
    assert cfg.trainer.batch_size == load_recipe("water_potability").defaults["trainer"]["batch_size"]
    _, cfg = pipeline_cli.parse(["--config", str(task), "recipe=digits"])
    assert cfg.recipe == "digits" and cfg.trainer.epochs == 7  # the command line's recipe wins too


@pytest.mark.parametrize(
    "text, words",
    [
        (None, ["missing.yaml", "does not exist", "--print-config"]),
        ("trainer: {epochs: [1,\n", ["task.yaml", "not valid YAML", "line 2"]),
        ("- recipe\n- digits\n", ["task.yaml", "a list, not keys"]),
        ("trainer:\n  epoch: 3\n", ["task.yaml", "unknown config key 'trainer.epoch'", "epochs"]),
        ("trainer:\n  epochs: three\n", ["task.yaml", "trainer.epochs", "three"]),
        ("optimizer: {name: lion}\n", ["task.yaml", "optimizer.name", "adamw"]),
        ("recipe: nope\n", ["task.yaml", "unknown recipe 'nope'", "digits"]),
        ("optimizer: {lr: -0.1}\n", ["task.yaml: bad value optimizer.lr=-0.1", "must be > 0"]),
        ("data: {eval_fraction: 1.5}\n", ["task.yaml: bad value data.eval_fraction=1.5"]),
    ],
)
def test_bad_config_file_names_the_file_and_the_key(tmp_path, text, words):
    path = tmp_path / ("missing.yaml" if text is None else "task.yaml")
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as e:
        pipeline_cli.parse(["--config", str(path), "trainer.epochs=2"])
    for word in words:
        assert word in str(e.value)


def test_a_bad_value_is_named_where_it_was_given(tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text("optimizer: {lr: -0.1}\n")
    _, cfg = pipeline_cli.parse(["--config", str(task), "optimizer.lr=0.1"])  # the command line wins
    assert cfg.optimizer.lr == 0.1
    task.write_text("optimizer: {lr: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        pipeline_cli.parse(["--config", str(task), "optimizer.lr=-0.1"])
    assert str(e.value).startswith("bad value optimizer.lr=-0.1") and "task.yaml" not in str(e.value)


def test_bad_config_file_stops_the_cli_with_exit_2(workdir):
    (workdir / "task.yaml").write_text("recipe: digits\ntrainer:\n  epoch: 3\n")
    result = cli(common(workdir, "--config", "task.yaml"), cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert "error: --config task.yaml: unknown config key 'trainer.epoch'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "runs").exists() and not (workdir / "cache").exists()


@pytest.mark.slow
def test_prepare_reads_the_config_file(workdir):
    (workdir / "task.yaml").write_text(f"recipe: digits\ndata:\n  cache_dir: {workdir / 'from-file'}\n")
    out = ok(cli(["--config", "task.yaml", "tracking=none"], cwd=workdir, script="prepare")).stdout
    assert "shards ready: " + str(workdir / "from-file" / "digits") in out


def test_agent_style_double_dash_arguments_are_overrides():
    # `wandb agent` runs `python launch/train.py --optimizer.lr=0.001 --trainer.batch_size=32` (its ${args}).
    _, cfg = pipeline_cli.parse(
        ["--recipe=water_potability", "--optimizer.lr=0.001", "--optimizer.betas=[0.8, 0.99]", "--trainer.tf32=False"]
    )
    assert cfg.recipe == "water_potability" and cfg.optimizer.lr == 0.001
    assert list(cfg.optimizer.betas) == [0.8, 0.99] and cfg.trainer.tf32 is False

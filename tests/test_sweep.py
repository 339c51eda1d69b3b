"""Sweeps: the local grid (launch/sweep.py), and the W&B sweep configs (launch/sweeps/*.yaml) as their agent
runs them."""

import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from conftest import BIN, ROOT, environment, ok, run_dirs
from omegaconf import OmegaConf

from pipeline import cli, sweep
from pipeline.errors import ConfigError

SWEEP = ROOT / "launch" / "sweep.py"
SWEEP_CONFIGS = sorted((ROOT / "launch" / "sweeps").glob("*.yaml"))
ONE_PROCESS = f"{BIN / 'accelerate'} launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"


def run_sweep(args: list[str], cwd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SWEEP), *args],
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def outputs(workdir, *extra: str) -> list[str]:
    return [f"output_dir={workdir / 'runs'}", f"data.cache_dir={workdir / 'cache'}", "tracking=none", *extra]


# ---- values: a comma outside brackets and quotes separates them


@pytest.mark.parametrize(
    "raw, values",
    [
        ("1e-3,3e-3", ["1e-3", "3e-3"]),
        ("[0.9,0.999]", ["[0.9,0.999]"]),  # a list is one value
        ("[0.9,0.999],[0.8,0.99]", ["[0.9,0.999]", "[0.8,0.99]"]),
        ("'a,b',c", ["'a,b'", "c"]),  # a quoted text keeps its comma
        ("{a: 1, b: 2},{a: 3}", ["{a: 1, b: 2}", "{a: 3}"]),
        ("32", ["32"]),
        ("", [""]),  # run_name= and other empty values pass on as typed
    ],
)
def test_values_split_at_top_level_commas(raw, values):
    assert sweep.split_values("key", raw) == values


def test_grid_is_every_combination_named_by_its_values(tmp_path):
    runs = sweep.plan(
        [
            f"output_dir={tmp_path}",
            "recipe=digits",
            "optimizer.lr=1e-3,3e-3",
            "optimizer.betas=[0.9,0.999],[0.8,0.99]",
            "trainer.batch_size=32,64,128",
        ],
        "s",
    )
    assert len(runs) == 12 and len({r.run_dir for r in runs}) == 12
    assert {r.run_dir.parent for r in runs} == {tmp_path / "digits"}  # one parent folder
    assert runs[0].run_dir.name == "s-01-lr=1e-3-betas=0.9,0.999-batch_size=32"  # no brackets: not a glob
    assert runs[-1].values == {"optimizer.lr": "3e-3", "optimizer.betas": "[0.8,0.99]", "trainer.batch_size": "128"}
    _, cfg = cli.parse(runs[-1].argv)  # each run's arguments are what launch/train.py gets
    assert (cfg.optimizer.lr, list(cfg.optimizer.betas), cfg.trainer.batch_size) == (3e-3, [0.8, 0.99], 128)
    assert cfg.run_name == runs[-1].run_dir.name
    # Every run in one W&B group, named after the sweep; a group given on the command line is kept.
    assert "tracking.group=s" in runs[-1].argv and cfg.tracking.group == "s"
    kept = sweep.plan(["optimizer.lr=1e-3,3e-3", "tracking.group=mine"], "s")
    assert all(cli.parse(r.argv)[1].tracking.group == "mine" for r in kept)
    # Two swept keys with the same last part are named in full.
    names = [r.run_dir.name for r in sweep.plan(["optimizer.name=sgd,adam", "scheduler.name=none,cosine"], "s")]
    assert names[0] == "s-1-optimizer.name=sgd-scheduler.name=none"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["optimizer.lr=1e-3,3e-3", "trainer.epoch=1,2"], ["run 1 of the sweep", "unknown config key 'trainer.epoch'"]),
        (["trainer.batch_size=32,0"], ["run 2 of the sweep", "trainer.batch_size=0", ">= 1"]),  # the last one too
        (["optimizer.lr=1e-3,"], ["empty value between commas"]),
        (["run_name=a,b"], ["--name"]),
        (["optimizer.lr"], ["not key=value"]),
    ],
)
def test_every_combination_is_checked_before_any_run(argv, words):
    with pytest.raises(ConfigError) as e:
        sweep.plan(argv, "s")
    for word in words:
        assert word in str(e.value)


# ---- the local grid, run for real


@pytest.mark.slow
def test_sweep_runs_every_combination_reports_a_failure_and_ends_with_the_table(workdir):
    # batch 30 does not split into 4 accumulation steps: that run fails when it starts, the others still run.
    args = [
        "--name",
        "grid",
        "recipe=digits",
        "trainer.max_steps=4",
        "trainer.epochs=1",
        "trainer.grad_accum_steps=4",
        "optimizer.lr=0.01",
        "trainer.batch_size=32,30,64",
        *outputs(workdir),
    ]
    started = time.perf_counter()
    result = run_sweep(args, cwd=workdir)
    print(f"3 runs in {time.perf_counter() - started:.1f} s")
    assert result.returncode == 1, result.stdout + result.stderr  # not all succeeded
    assert "multiple of 4" in result.stderr  # the failed run's own message
    out = result.stdout
    for line in (
        "[sweep] ok                grid-1-batch_size=32",
        "[sweep] failed (exit 2)   grid-2-batch_size=30",
        "[sweep] ok                grid-3-batch_size=64",
    ):
        assert line in out
    finished = [p.name for p in run_dirs(workdir / "runs", "digits") if (p / "summary.json").exists()]
    assert finished == ["grid-1-batch_size=32", "grid-3-batch_size=64"]
    table = out[out.index("| run |") :].splitlines()
    assert "trainer.batch_size" in table[0] and "eval/accuracy" in table[0]  # the key that differs, the results
    assert table[2].startswith("| grid-1-batch_size=32 | done | 32 |") and table[3].startswith("| grid-3-")
    for run in finished:
        written = OmegaConf.load(workdir / "runs" / "digits" / run / "config.yaml")
        assert written.run_name == run and written.optimizer.lr == 0.01
        assert written.tracking.group == "grid"  # one W&B group for the sweep


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_and_its_running_child(workdir):
    args = [
        "--name",
        "long",
        "--launcher",
        ONE_PROCESS,
        "recipe=digits",
        "trainer.epochs=500",
        "optimizer.lr=0.01,0.02",
        *outputs(workdir),
    ]
    proc = subprocess.Popen(
        [sys.executable, str(SWEEP), *args],
        cwd=workdir,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = workdir / "runs" / "digits" / "long-1-lr=0.01" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the first run is training (the launcher and its python both started)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 2, "expected accelerate launch and the training under the sweep"
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the sweep, the terminal's foreground process
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "[sweep] stopped           long-1-lr=0.01" in out and "[sweep] not run           long-2-lr=0.02" in out
    assert "stopped by SIGINT" in out and "--name long" in out
    assert not (workdir / "runs" / "digits" / "long-2-lr=0.02").exists()  # the next run never started
    time.sleep(1)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_dry_run_prints_each_command_with_the_launcher(workdir):
    result = ok(
        run_sweep(
            [
                "--dry-run",
                "--launcher",
                "accelerate launch --multi_gpu --num_processes 2",
                "--name",
                "d",
                "recipe=digits",
                "optimizer.lr=1e-3,3e-3",
                *outputs(workdir),
            ],
            cwd=workdir,
        )
    )
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2 and not (workdir / "runs").exists()
    assert lines[0][:5] == [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
    assert lines[0][5] == str(ROOT / "launch" / "train.py")
    assert "optimizer.lr=1e-3" in lines[0] and "run_name=d-1-lr=1e-3" in lines[0] and "run_name=d-2-lr=3e-3" in lines[1]
    with pytest.raises(ConfigError, match="no-such-launcher is not a command found on PATH"):
        sweep.launcher_command("no-such-launcher --x")


def test_sweep_reads_a_config_file(tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text(f"recipe: water_potability\noutput_dir: {tmp_path}\ntrainer: {{epochs: 3}}\n")
    runs = sweep.plan(["--config", str(task), "optimizer.lr=1e-3,3e-3"], "f")
    assert [r.run_dir for r in runs] == [
        tmp_path / "water_potability" / "f-1-lr=1e-3",
        tmp_path / "water_potability" / "f-2-lr=3e-3",
    ]
    _, cfg = cli.parse(runs[1].argv)
    assert cfg.trainer.epochs == 3 and cfg.optimizer.lr == 3e-3 and runs[1].argv[:2] == ["--config", str(task)]


# ---- W&B sweeps: each config run the way `wandb agent` runs it


def agent_command(sweep_config: dict) -> list[str]:
    """The command `wandb agent` starts for one run of this sweep (wandb_agent.Agent._command_run), with
    each parameter at its first value (a distribution: at its minimum)."""
    utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
    args = {}
    for key, spec in sweep_config["parameters"].items():
        value = spec["value"] if "value" in spec else spec["values"][0] if "values" in spec else spec["min"]
        args[key] = {"value": value}
    variables = utils.create_sweep_command_args({"args": args})
    variables.update(env=["/usr/bin/env"], interpreter=[sys.executable], program=[sweep_config["program"]])
    command = []
    for word in utils.create_sweep_command(sweep_config.get("command")):
        word = str(word)
        command += variables.get(word[2:-1]) or [] if word.startswith("${") and word.endswith("}") else [word]
    return command


@pytest.mark.parametrize("path", SWEEP_CONFIGS, ids=[p.stem for p in SWEEP_CONFIGS])
def test_wandb_sweep_configs_build_the_config_their_agent_asks_for(path):
    utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
    sweep_config = utils.load_sweep_config(str(path))  # what `wandb sweep FILE` reads
    assert (ROOT / sweep_config["program"]).is_file() and sweep_config["method"] in ("grid", "random", "bayes")
    assert sweep_config["metric"]["name"].startswith("eval/")
    command = agent_command(sweep_config)
    assert command[:3] == ["/usr/bin/env", sys.executable, "launch/train.py"]
    assert all(word.startswith("--") and "=" in word for word in command[3:])  # the agent's --key=value
    recipe, cfg = cli.parse(command[3:])
    assert cfg.project == sweep_config["project"]  # the runs log into the sweep's project
    for word in command[3:]:
        key, _, value = word[2:].partition("=")
        got = OmegaConf.select(cfg, key)
        assert str(getattr(got, "name", got)) == value or float(got) == float(value), (key, got, value)


def test_wandb_agent_values_null_and_booleans_read_as_yaml():
    # The agent writes each value with Python's str(): YAML's null arrives as None, true as True.
    command = agent_command(
        {
            "program": "launch/train.py",
            "parameters": {
                "recipe": {"value": "digits"},
                "trainer.max_steps": {"values": [None, 100]},
                "checkpoint.monitor": {"values": [None, "eval/loss"]},
                "trainer.tf32": {"values": [False, True]},
                "optimizer.betas": {"value": [0.9, 0.99]},
            },
        }
    )
    assert "--trainer.max_steps=None" in command and "--trainer.tf32=False" in command
    _, cfg = cli.parse(command[3:])
    assert cfg.trainer.max_steps is None and cfg.checkpoint.monitor is None and cfg.trainer.tf32 is False
    assert list(cfg.optimizer.betas) == [0.9, 0.99]


@pytest.mark.slow
def test_wandb_agent_command_runs(workdir):
    """The first sweep config's agent command, run as a process: its config prints and reads back."""
    utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
    command = agent_command(utils.load_sweep_config(str(ROOT / "launch" / "sweeps" / "water_potability.yaml")))
    result = ok(
        subprocess.run(
            [*command, "--print-config"], cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300
        )
    )
    printed = yaml.safe_load(result.stdout)
    assert printed["recipe"] == "water_potability" and printed["optimizer"]["lr"] == 0.001
    assert printed["trainer"]["batch_size"] == 32

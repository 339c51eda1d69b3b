"""End-to-end training through the real entry points: accelerate launch, python, several processes."""

import json

import pytest
import torch
from conftest import cli, common, ok, run_dirs, summary
from safetensors.torch import load_file

from pipeline import cli as pipeline_cli
from pipeline.recipe_contract import load_recipe


@pytest.mark.slow
def test_digits_through_accelerate_launch(workdir):
    result = ok(cli(common(workdir), cwd=workdir, launcher="accelerate"))
    s = summary(workdir / "runs", "digits")
    assert s["eval/accuracy"] >= 0.95
    assert s["eval/samples"] == 360 and s["num_processes"] == 1
    run = run_dirs(workdir / "runs", "digits")[0]
    assert {"config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "meta.json"} <= {
        p.name for p in run.iterdir()
    }
    # The record holds one line per logged step/epoch, with the names summary.json uses.
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval/accuracy" in line for line in lines) == 10
    assert [line for line in lines if "eval/accuracy" in line][-1]["eval/accuracy"] == s["eval/accuracy"]
    assert all("train/loss" in line for line in lines if "train/lr" in line)
    # Plain progress lines (not a terminal), one summary line; the resolved config goes to the run folder
    # (and --print-config), not the console, where it would bury an error under 50 lines.
    assert result.stdout.count("done: digits") == 1
    assert "epoch 10/10 eval/loss" in result.stdout
    assert "recipe: digits" not in result.stdout
    assert "recipe: digits" in (run_dirs(workdir / "runs", "digits")[0] / "config.yaml").read_text()
    # Weights are safetensors that load back into the recipe's model.
    _, cfg = pipeline_cli.parse([])
    model = load_recipe("digits").model(cfg, {})
    model.load_state_dict(load_file(run / "model.safetensors"))


@pytest.mark.slow
def test_mnist_cnn_on_real_mnist(workdir, mnist_root):
    ok(
        cli(
            common(workdir, "recipe=mnist_cnn", f"data.root={mnist_root}", "trainer.epochs=1"),
            cwd=workdir,
            launcher="accelerate",
        )
    )
    s = summary(workdir / "runs", "mnist_cnn")
    # One epoch over 9,000 real digits; the tutorial's network is past 0.95 after one full epoch.
    assert s["eval/accuracy"] >= 0.9 and s["eval/samples"] == 1000
    assert s["test/accuracy"] >= 0.9 and s["test/samples"] == 10000
    assert s["steps"] == 9000 // 64


@pytest.mark.slow
def test_two_processes_count_every_eval_sample_once(workdir):
    # 189 eval rows in global batches of 128: the last batch (61) does not split evenly over 2
    # processes, so Accelerate pads it; the padding must not be counted.
    args = common(workdir, "trainer.epochs=2", "data.eval_fraction=0.105", "trainer.eval_batch_size=128")
    two = ok(cli(args, cwd=workdir, processes=2))
    s2 = summary(workdir / "runs", "digits")
    assert s2["num_processes"] == 2
    assert s2["eval/samples"] == 189
    assert two.stdout.count("done: digits") == 1  # one progress stream, from the main process
    assert two.stdout.count("data: preparing digits") == 1
    assert len(list((workdir / "cache" / "digits").iterdir())) == 1  # shards built once
    # Same seed, same global batches, averaged gradients: the 1-process run gives the same numbers.
    one_dir = workdir / "one"
    ok(cli(common(one_dir, "trainer.epochs=2", "data.eval_fraction=0.105", "trainer.eval_batch_size=128"), cwd=workdir))
    s1 = summary(one_dir / "runs", "digits")
    assert s1["eval/samples"] == 189
    assert s2["eval/loss"] == pytest.approx(s1["eval/loss"], rel=1e-3)
    assert s2["eval/accuracy"] == pytest.approx(s1["eval/accuracy"], abs=1e-6)


def test_run_weights_are_unwrapped_tensors(workdir):
    ok(cli(common(workdir, "trainer.epochs=1", "trainer.max_steps=3"), cwd=workdir))
    run = run_dirs(workdir / "runs", "digits")[0]
    weights = load_file(run / "model.safetensors")
    assert weights and all(not k.startswith(("module.", "_orig_mod.")) for k in weights)
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert summary(workdir / "runs", "digits")["steps"] == 3

"""Faults during a run: divergence, unwritable or full output disks, compiled weights, launcher settings."""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import cli, common, ok
from safetensors.torch import load_file

from pipeline import cli as pipeline_cli
from pipeline.recipe_contract import load_recipe


@contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small file system of its own at `path` (needs mount rights: root in a container, as in CI)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the case is covered where CI runs as root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.slow
def test_diverging_run_stops_nonzero_without_summary(workdir):
    result = cli(common(workdir, "optimizer.lr=1e30", "trainer.log_every=5", "run_name=nan"), cwd=workdir)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "error: train/loss is nan at step 5" in result.stderr
    assert "lower optimizer.lr" in result.stderr and "No checkpoint was saved" in result.stderr
    assert "Traceback" not in result.stderr
    run = workdir / "runs" / "digits" / "nan"
    assert not (run / "summary.json").exists() and not (run / "model.safetensors").exists()
    # The record shows the bad line, so the user sees where it went wrong.
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 5 and last["train/loss"] is None  # NaN, written as JSON null


@pytest.mark.slow
def test_divergence_after_a_checkpoint_names_it(workdir):
    # The first epoch trains (lr 0.1); the resumed second epoch is given a learning rate that explodes.
    # A changed lr is refused on resume, so the explosion comes from the schedule instead: step decay with
    # gamma 1e30 multiplies the lr after epoch 1.
    args = common(
        workdir,
        "trainer.epochs=2",
        "scheduler.name=step",
        "scheduler.gamma=1e30",
        "run_name=late",
        "trainer.log_every=10",
    )
    result = cli(args, cwd=workdir)
    assert result.returncode == 3, result.stderr[-3000:]
    checkpoint = workdir / "runs" / "digits" / "late" / "checkpoints" / "step-00000044"
    assert f"The last checkpoint, {checkpoint}, was saved before the loss went bad" in result.stderr
    # The checkpoint holds the first epoch's finite weights.
    weights = load_file(checkpoint / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_output_dir_under_a_file_stops_before_any_work(workdir):
    (workdir / "afile").write_text("not a folder")
    result = cli(common(workdir, f"output_dir={workdir / 'afile' / 'runs'}"), cwd=workdir)
    assert result.returncode == 2
    assert f"output_dir={workdir / 'afile' / 'runs'}: {workdir / 'afile'} is a file, not a folder" in result.stderr
    assert not (workdir / "cache").exists()  # nothing was prepared
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_read_only_output_dir_stops_before_any_work(workdir):
    with tmpfs(workdir / "ro", "64k", read_only=True) as ro:
        result = cli(common(workdir, f"output_dir={ro / 'runs'}"), cwd=workdir)
    assert result.returncode == 2
    assert "is not writable by this user" in result.stderr
    assert not (workdir / "cache").exists()


@pytest.mark.slow
def test_full_disk_while_saving_a_checkpoint(workdir):
    # Room for the run's record, not for a checkpoint (~1.8 MB: weights and Adam's two moments), which comes
    # at step 10, before the first evaluation could write best.safetensors (0.6 MB).
    with tmpfs(workdir / "small", "256k") as small:
        result = cli(
            common(workdir, f"output_dir={small}", "trainer.epochs=2", "checkpoint.every_steps=10", "run_name=full"),
            cwd=workdir,
        )
        run = small / "digits" / "full"
        left = sorted(p.name for p in (run / "checkpoints").iterdir())
        files = {p.name for p in run.iterdir()}
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: disk full while writing a checkpoint to {run}" in result.stderr
    assert "free space there or point output_dir= at a larger disk" in result.stderr
    assert "Traceback" not in result.stderr
    assert left == []  # the incomplete checkpoint was removed, nothing looks resumable
    assert "summary.json" not in files


@pytest.mark.slow
@pytest.mark.parametrize("size, what", [("512k", "the best weights"), ("1m", "the final weights")])
def test_full_disk_while_saving_weights_leaves_no_partial_file(workdir, size, what):
    # No checkpoints; digits' weights are 0.6 MB: 512k has no room for best.safetensors after the first
    # evaluation, 1m has room for it but not for model.safetensors beside it.
    with tmpfs(workdir / "small", size) as small:
        result = cli(
            common(workdir, f"output_dir={small}", "trainer.epochs=1", "checkpoint.keep=0", "run_name=full"),
            cwd=workdir,
        )
        files = sorted(p.name for p in (small / "digits" / "full").iterdir())
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: disk full while writing {what}" in result.stderr and "Traceback" not in result.stderr
    assert not {".tmp-best", "model.safetensors", "summary.json"} & set(files), files
    assert ("best.safetensors" in files) == (what == "the final weights")


@pytest.mark.slow
def test_compiled_weights_are_plain_and_compile_false_means_off(workdir):
    # compile=true: the saved weights (final and checkpoint) carry no `_orig_mod.` and load into the
    # recipe's plain model; the dynamo log proves it compiled.
    env = {"TORCH_LOGS": "dynamo", "PIPELINE_VERBOSE": "1"}  # other tools' logs on the terminal too
    args = common(workdir, "trainer.compile=true", "trainer.epochs=2", "trainer.max_steps=3", "run_name=c")
    compiled = ok(cli(args, cwd=workdir, env=env))
    assert "start tracing" in compiled.stderr
    run = workdir / "runs" / "digits" / "c"
    weights = load_file(run / "model.safetensors")
    assert weights and not any(k.startswith(("_orig_mod.", "module.")) for k in weights)
    _, cfg = pipeline_cli.parse([])
    load_recipe("digits").model(cfg, {}).load_state_dict(weights)
    assert json.loads((run / "summary.json").read_text())["compile"] is True
    # compile=false with a launcher/config default that says inductor: nothing is compiled.
    plain = ok(
        cli(
            common(workdir, "trainer.compile=false", "trainer.max_steps=3", "run_name=p"),
            cwd=workdir,
            env={**env, "ACCELERATE_DYNAMO_BACKEND": "inductor"},
        )
    )
    assert "start tracing" not in plain.stderr
    assert json.loads((workdir / "runs" / "digits" / "p" / "summary.json").read_text())["compile"] is False


def test_checkpoints_load_across_compile_on_and_off(tmp_path):
    """A checkpoint of a compiled model (a GPU run's default) resumes into an uncompiled one, and back."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import TorchDynamoPlugin

    from pipeline.checkpoint import keep_plain_weights

    def prepared(backend: str, seed: int):
        AcceleratorState._reset_state(True)
        accelerator = Accelerator(cpu=True, dynamo_plugin=TorchDynamoPlugin(backend=backend))
        keep_plain_weights(accelerator)
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        model, optimizer = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
        return accelerator, model, net

    try:
        for save_backend, load_backend in (("inductor", "no"), ("no", "inductor")):
            accelerator, model, net = prepared(save_backend, 0)
            assert hasattr(model, "_orig_mod") == (save_backend == "inductor")
            folder = tmp_path / save_backend
            accelerator.save_state(str(folder))
            saved = load_file(folder / "model.safetensors")
            assert set(saved) == set(net.state_dict())  # plain keys
            expected = {k: v.clone() for k, v in net.state_dict().items()}
            accelerator, model, net = prepared(load_backend, 1)
            accelerator.load_state(str(folder))
            assert all(torch.equal(net.state_dict()[k], v) for k, v in expected.items())
    finally:
        AcceleratorState._reset_state(True)
        os.environ.pop("ACCELERATE_DYNAMO_BACKEND", None)


def test_resumed_epoch_keeps_non_blocking_copies():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    from pipeline import batching, tensor_rows
    from pipeline.resume import skip_batches

    AcceleratorState._reset_state(True)
    try:
        accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(non_blocking=True))
        rows = tensor_rows.Rows({"x": torch.arange(20.0).view(10, 2)})
        loader = accelerator.prepare(batching.loader(rows, 2, train=True, seed=0))
        assert loader._non_blocking
        resumed = skip_batches(accelerator, loader, 2)
        assert resumed._non_blocking and len(list(resumed)) == 3
    finally:
        AcceleratorState._reset_state(True)

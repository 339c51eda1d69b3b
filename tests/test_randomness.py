"""Randomness inside the model (dropout) is drawn per process; the data's draws stay alike on every process.

Model initialisation, the batch order and augmentation are the same on 1 or N processes (the global batch);
dropout masks differ between processes and continue on resume as the uninterrupted run draws them.
"""

import subprocess
import time

import pytest
import torch
from conftest import BIN, ROOT, TEST_DATA, cli, common, environment, free_port, launch_flags, needs_gpus, ok
from safetensors.torch import load_file
from test_checkpoint import kill, kill_after_checkpoint

from pipeline import batching, checkpoint, rng, tensor_rows

# water_potability: 2,620 train rows, 81 steps an epoch; the hidden layers get dropout.
WATER = ["recipe=water_potability", f"data.root={TEST_DATA / 'water-potability'}", "model.dropout=0.5"]
RESUMED = [*WATER, "trainer.epochs=2", "trainer.batch_size=128"]

# One training step through the real setup; prints how often rank 0's and rank 1's dropout masks agree at
# the same position of their slices (independent masks at p=0.5 agree about half the time).
MASKS = """
import sys
import torch
from pipeline import build, cli, loop

def run(recipe, cfg):
    run = build.setup(cfg, recipe)
    dropout = next(m for m in run.model.modules() if isinstance(m, torch.nn.Dropout))
    masks = []
    dropout.register_forward_hook(lambda module, args, out: masks.append((out == 0).float()))
    loop.train_step(run, next(iter(run.train_loader)), None)
    both = run.accelerator.gather(masks[0][None])
    run.accelerator.print(f"processes {run.accelerator.num_processes} device {both.device.type} "
                          f"agreement {(both[0] == both[1]).float().mean().item():.3f} "
                          f"dropped {both.mean().item():.3f}")

cli.main("train", "", run)
"""


def mask_agreement(tmp_path, gpu: bool = False) -> tuple[float, float, str]:
    script = tmp_path / "masks.py"
    script.write_text(MASKS)
    cmd = [
        str(BIN / "accelerate"),
        "launch",
        *launch_flags(2),
        str(script),
        *common(tmp_path, *WATER),
    ]
    out = ok(
        subprocess.run(
            cmd,
            cwd=tmp_path,
            env=environment(2, {"PYTHONPATH": str(ROOT)}, gpu=gpu),
            capture_output=True,
            text=True,
            timeout=300,
        )
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("processes "))
    words = line.split()
    assert words[1] == "2", line
    return float(words[5]), float(words[7]), words[3]


def test_the_data_side_never_draws_from_the_model_stream():
    # Reseeding torch's global stream per process (the model's dropout) must change no batch and no
    # augmentation: both depend on the seed and the position in the epoch alone.
    from recipes.image_folder import transform

    image = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    batches = batching.loader(tensor_rows.Rows({"image": image}), 4, train=True, seed=7)
    state = torch.get_rng_state()
    list(batches)  # a pass over the loader (its workers' seed is drawn at the start of each)
    assert torch.get_rng_state().equal(state)
    augment = ["hflip", "rotate:30", "brightness:0.5"]
    rng.DRAWS.at(7, 1, 3)
    torch.manual_seed(1)
    first = transform({"image": image}, True, {"augment": augment})["image"]
    rng.DRAWS.at(7, 1, 3)  # the same micro-batch again, under another model stream: the same draws
    torch.manual_seed(2)
    assert transform({"image": image}, True, {"augment": augment})["image"].equal(first)
    rng.DRAWS.at(7, 1, 4)  # the next micro-batch: other draws
    assert not transform({"image": image}, True, {"augment": augment})["image"].equal(first)


@pytest.mark.slow
def test_two_processes_draw_their_own_dropout_masks(tmp_path):
    agreement, dropped, device = mask_agreement(tmp_path)
    assert device == "cpu"
    assert 0.4 < dropped < 0.6
    # Drawn from one stream, every slice got the same masks: agreement 1.0.
    assert 0.4 < agreement < 0.6, f"masks agree at {agreement:.3f} of positions"


def final_weights(run_dir) -> dict:
    return load_file(run_dir / "model.safetensors")


@pytest.mark.slow
def test_a_run_with_dropout_resumed_mid_epoch_ends_as_the_uninterrupted_run(workdir):
    # 20 steps an epoch; killed after the checkpoint of step 25, past the one at epoch 1's end.
    args = [*RESUMED, "trainer.log_every=5", "checkpoint.every_steps=5", "checkpoint.keep=1"]
    ok(cli(common(workdir, *args, "run_name=whole"), cwd=workdir, processes=2))
    run_dir = workdir / "runs" / "water_potability" / "job"
    kill_after_checkpoint(common(workdir, *args, "run_name=job"), workdir, run_dir, 2, min_step=25)
    assert checkpoint.position(checkpoint.latest(run_dir))["batches"] > 0
    ok(cli(common(workdir, *args, "run_name=job"), cwd=workdir, processes=2))
    a, b = final_weights(run_dir), final_weights(workdir / "runs" / "water_potability" / "whole")
    assert sorted(a) == sorted(b)
    # A pass over the loader drew its workers' seed from the dropout stream: the resumed run drew once more.
    assert [k for k in b if not a[k].equal(b[k])] == []


@pytest.mark.slow
@pytest.mark.gpu
def test_two_gpus_draw_their_own_dropout_masks(tmp_path):
    needs_gpus(2)
    agreement, dropped, device = mask_agreement(tmp_path, gpu=True)
    assert device == "cuda"
    assert 0.4 < agreement < 0.6 and 0.4 < dropped < 0.6, (agreement, dropped)


def machines(args: list[str], workdir, per_machine: int) -> list[subprocess.Popen]:
    """2 processes on this host's first 2 GPUs: one machine with both (per_machine=2), or two machines of one
    GPU each (per_machine=1), where each process sees its GPU as cuda:0."""
    port, count = str(free_port()), 2 // per_machine
    first_two = (environment(gpu=True).get("CUDA_VISIBLE_DEVICES") or "0,1").split(",")[:2]
    procs = []
    for rank in range(count):
        cmd = [
            str(BIN / "accelerate"),
            "launch",
            *launch_flags(2, machines=count, rank=rank, port=port),
            str(ROOT / "launch" / "train.py"),
            *args,
        ]
        gpus = ",".join(first_two) if per_machine == 2 else first_two[rank]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=workdir,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=environment(2, {"CUDA_VISIBLE_DEVICES": gpus, "PYTHONUNBUFFERED": "1"}, gpu=True),
            )
        )
    return procs


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-3000:] for o in outs)
    return outs


@pytest.mark.slow
@pytest.mark.gpu
def test_a_resume_on_another_gpus_per_node_layout_ends_as_the_uninterrupted_run(workdir):
    # 1 machine x 2 GPUs -> 2 machines x 1 GPU: process 1 now sees its GPU as cuda:0, and Accelerate restores
    # CUDA states by device index (process 1 took the entry of process 0's device). Dropout on the GPU draws
    # from the device's stream, so only the right state gives the uninterrupted run's weights.
    needs_gpus(2)
    # 81 steps an epoch: long enough on a GPU for the kill to land mid-run.
    args = [*WATER, "trainer.epochs=10", "checkpoint.every_steps=10", "checkpoint.keep=1", "data.on_device=true"]
    finish(machines(common(workdir, *args, "run_name=whole"), workdir, per_machine=2))
    run_dir = workdir / "runs" / "water_potability" / "job"
    procs = machines(common(workdir, *args, "run_name=job"), workdir, per_machine=2)
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        newest = checkpoint.complete(run_dir)[-1:]
        if newest and checkpoint.position(newest[0])["step"] >= 25:
            break
        time.sleep(0.005)
    for p in procs:
        kill(p, run_dir)
    assert checkpoint.position(checkpoint.latest(run_dir))["batches"] > 0
    outs = finish(machines(common(workdir, *args, "run_name=job"), workdir, per_machine=1))
    assert "resuming from" in outs[0] and "device=cuda" in outs[0]
    a, b = final_weights(run_dir), final_weights(workdir / "runs" / "water_potability" / "whole")
    # The same masks give the same weights up to the GPU's float sums; another mask moves them by far more.
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in b)
    assert worst < 1e-4, f"weights differ by up to {worst:.2e}"

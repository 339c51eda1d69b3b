"""Elastic resume: a checkpoint saved by N processes continues on M (a requeued job on other nodes).

Weights, optimizer and schedule are saved once, the loaders yield global batches in an order drawn from
the seed and the epoch, and each process takes its slice: only the float sums' order differs with M.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import cli, common, ok
from omegaconf import OmegaConf
from test_checkpoint import kill_after_checkpoint

from pipeline import checkpoint, resume, rng
from pipeline.batch_sizes import check_batches
from pipeline.errors import ConfigError

ARGS = ["trainer.epochs=2", "trainer.log_every=5", "checkpoint.every_steps=10", "checkpoint.keep=1"]


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def logged_steps(run_dir) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rng_states(checkpoint_dir, process: int) -> dict:
    return torch.load(checkpoint_dir / f"random_states_{process}.pkl", weights_only=False)


def said_once(line: str, out: str) -> None:
    assert out.count(line) == 1, out[-3000:]  # from the main process only


@pytest.mark.slow
def test_a_job_requeued_on_2_then_1_then_2_then_1_processes_ends_as_the_uninterrupted_run(workdir):
    # The legs alternate the data paths too (whole tensors in memory, batches streamed from the shards):
    # each path resumes on another process count, and from a checkpoint the other path wrote.
    ok(cli(common(workdir, *ARGS, "run_name=whole"), cwd=workdir, processes=2))
    whole_dir = workdir / "runs" / "digits" / "whole"
    whole = summary(whole_dir)
    assert whole["num_processes"] == 2 and whole["steps"] == 2 * 44

    # Each attempt is SIGKILLed (a node lost) after a mid-epoch checkpoint; the next lands on another count.
    run_dir = workdir / "runs" / "digits" / "job"
    memory, stream = (common(workdir, *ARGS, "run_name=job", f"data.in_memory={x}") for x in ("true", "false"))
    kill_after_checkpoint(memory, workdir, run_dir, 2, min_step=20)
    saved = checkpoint.latest(run_dir)
    first = checkpoint.position(saved)
    assert first["num_processes"] == 2 and first["batches"] > 0, first  # the next one skips batches

    out = kill_after_checkpoint(stream, workdir, run_dir, 1, min_step=45)
    said_once(f"resuming from {saved}", out)
    said_once(
        "resuming a checkpoint saved by 2 processes on 1: each process takes its own RNG state; process 1's is unused",
        out,
    )
    assert checkpoint.position(checkpoint.latest(run_dir))["num_processes"] == 1

    out = kill_after_checkpoint(memory, workdir, run_dir, 2, min_step=65)
    said_once(
        "resuming a checkpoint saved by 1 process on 2: process 0 takes its own RNG state; process 1 takes process 0's",
        out,
    )
    # Each process saved its own stream for the model's randomness, seeded from (seed, process, step): the
    # state that a resume on any process count seeds again.
    newest = checkpoint.latest(run_dir)
    saved = checkpoint.position(newest)
    assert saved["num_processes"] == 2
    seed = OmegaConf.load(newest / "config.yaml").seed
    for process in (0, 1):
        own = torch.Generator().manual_seed(rng.derive(seed, process, saved["step"])).get_state()
        assert rng_states(newest, process)["torch_manual_seed"].equal(own), process

    out = ok(cli(stream, cwd=workdir, processes=1)).stdout
    assert "streamed from the shards" in out  # this leg reads the train split from the shards
    said_once("resuming a checkpoint saved by 2 processes on 1", out)
    again = summary(run_dir)
    assert again["num_processes"] == 1 and again["steps"] == whole["steps"]
    # The same batches in the same order: only the order of float sums differs (all-reduce vs one sum).
    assert again["eval/loss"] == pytest.approx(whole["eval/loss"], rel=1e-4)
    assert again["eval/accuracy"] == pytest.approx(whole["eval/accuracy"], abs=1 / 360)
    assert logged_steps(run_dir) == logged_steps(whole_dir)  # one record, each step once
    assert not checkpoint.folder(run_dir).exists()
    print(
        f"eval/loss {again['eval/loss']!r} after 3 requeues, {whole['eval/loss']!r} uninterrupted: "
        f"rel {abs(again['eval/loss'] / whole['eval/loss'] - 1):.1e}"
    )


def test_the_rng_mapping_is_said_for_any_two_counts():
    assert resume.rng_mapping(4, 2) == "each process takes its own RNG state; those of processes 2-3 are unused"
    assert resume.rng_mapping(2, 8) == "processes 0-1 take their own RNG states; processes 2-7 take process 0's"


def test_a_batch_that_does_not_split_names_the_process_counts_that_do():
    cfg = SimpleNamespace(trainer=SimpleNamespace(batch_size=64, grad_accum_steps=2, eval_batch_size=512))
    with pytest.raises(
        ConfigError,
        match=r"use a multiple of 6, or launch 2 or 4 processes \(a resumed run "
        r"keeps its batch size\)",
    ):
        check_batches(cfg, 3)
    assert check_batches(cfg, 4) == 8

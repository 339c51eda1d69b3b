"""Batch sizes against processes: the per-process micro-batch that must divide, the eval batch, and the
train batch made smaller for a small train split."""

from __future__ import annotations

import copy

from omegaconf import DictConfig, read_write

from pipeline import batching
from pipeline.errors import ConfigError


def check_batches(cfg, num_processes: int) -> int:
    """The per-process micro-batch: batch_size / (processes x accumulation), which must divide."""
    batch, accumulate = cfg.trainer.batch_size, cfg.trainer.grad_accum_steps
    if batch % (num_processes * accumulate):
        raise ConfigError(
            f"trainer.batch_size={batch} does not split into {num_processes} processes x {accumulate} "
            f"accumulation steps; use a multiple of {num_processes * accumulate}"
            + nearest_process_counts(batch, accumulate, num_processes)
        )
    check_eval_batch(cfg, num_processes)
    return batch // (num_processes * accumulate)


def check_eval_batch(cfg, num_processes: int) -> None:
    if cfg.trainer.eval_batch_size % num_processes:
        raise ConfigError(
            f"trainer.eval_batch_size={cfg.trainer.eval_batch_size} does not split into "
            f"{num_processes} processes; add trainer.eval_batch_size=<a multiple of {num_processes}>"
        )


def nearest_process_counts(batch: int, accumulate: int, num_processes: int) -> str:
    """The process counts next to `num_processes` that do split the batch. A resumed run keeps its batch
    size (resume.check_config): there the process count is what can change."""
    fits = [n for n in range(1, batch // accumulate + 1) if batch % (n * accumulate) == 0]
    below = [n for n in fits if n < num_processes][-1:]
    above = [n for n in fits if n > num_processes][:1]
    if not below + above:
        return ""
    return f", or launch {' or '.join(map(str, below + above))} processes (a resumed run keeps its batch size)"


def fit_batch(cfg, train_rows: int, num_processes: int, say) -> DictConfig:
    """`cfg` with trainer.batch_size halved until the train split makes trainer.min_steps_per_epoch optimizer steps
    an epoch (a small table would otherwise train one step an epoch), as far as the batch still splits into
    processes x accumulation steps. The run's config.yaml then holds the batch it trained with."""
    wanted, asked, batch = cfg.trainer.min_steps_per_epoch, cfg.trainer.batch_size, cfg.trainer.batch_size
    unit, complete = num_processes * cfg.trainer.grad_accum_steps, cfg.trainer.last_batch.name == "complete"

    def steps(b):
        return batching.train_samples(train_rows, b, complete) // b

    while steps(batch) < wanted and batch % 2 == 0 and (batch // 2) % unit == 0:
        batch //= 2
    if batch == asked:
        return cfg
    short = (
        (
            f"; fewer than {wanted}: a smaller batch would not split into {num_processes} process(es) x "
            f"{cfg.trainer.grad_accum_steps} accumulation step(s)"
        )
        if steps(batch) < wanted
        else ""
    )
    say(
        f"data: trainer.batch_size {asked} -> {batch}: the {train_rows:,} train rows make {steps(batch)} steps an "
        f"epoch (trainer.min_steps_per_epoch={wanted}){short}"
    )
    cfg = copy.deepcopy(cfg)
    with read_write(cfg):
        cfg.trainer.batch_size = batch
    return cfg

"""Batches: DataLoaders that fetch whole batches (`loader`), the epoch's shuffled order (`ShuffledBatches`)
and the check that DataLoader workers' shared memory is large enough.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from pipeline.errors import ConfigError


def loader(
    dataset, batch_size: int, train: bool, seed: int, step_batch: int | None = None, complete: bool = False, **workers
) -> DataLoader:
    """A DataLoader that fetches whole batches: the dataset's `__getitems__` slices all indices at once.
    `workers`: the DataLoader's `num_workers` (kept alive between epochs) and `pin_memory`.

    Training serves whole optimizer steps only (`step_batch`, the global batch of an optimizer step, when
    micro-batches are accumulated): equal steps on every process, the same optimization with or without
    accumulation, no recompiles under torch.compile. The ragged last step's samples are dropped, or with
    `complete` (trainer.last_batch=complete) the step is filled up from the start of the epoch's own order, so
    every row trains each epoch. Evaluation keeps every sample.
    """
    if train:
        step_batch = step_batch or batch_size
        used = train_samples(len(dataset), step_batch, complete)
        # A generator of its own (ShuffledBatches draws the order; this one is never used): on more than one
        # process Accelerate seeds a sampler without one from the global stream, which then runs one draw
        # ahead of a single process's, and per-batch augmentation would differ between the two.
        generator = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(dataset, num_samples=used or len(dataset), generator=generator)
        batches = ShuffledBatches(sampler, batch_size, seed, device=getattr(dataset, "device", None))
    else:
        batches = BatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=False)
    # Each pass draws its workers' base seed from `generator`, by default torch's global stream: that is the
    # model's dropout stream, one per process (rng.seed_model), which the data side must not draw from.
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=_whole_batch,
        persistent_workers=workers.get("num_workers", 0) > 0,
        **workers,
        generator=torch.Generator().manual_seed(seed),
    )


def train_samples(rows: int, step_batch: int, complete: bool) -> int:
    """Samples a training epoch serves: whole optimizer steps, the ragged last one dropped or completed (none when
    the batch is larger than the split)."""
    if complete and rows >= step_batch:
        return -(-rows // step_batch) * step_batch
    return rows - rows % step_batch


# DataLoader workers hand each batch over in shared memory (/dev/shm), `prefetch_factor` batches ahead each.
SHARED_MEMORY = Path("/dev/shm")
SHM_MARGIN = 2  # batches of one size in the estimate; the allocator and the pickled rest are not counted
SHM_FIXED = 2**16  # the workers' queues and semaphores, a page each


def check_shared_memory(loaders: list[DataLoader], shm: Path = SHARED_MEMORY) -> None:
    """Stops before any worker starts when /dev/shm cannot hold what the workers hand over: there they die
    with "unable to allocate shared memory" and the training waits for their batches forever. Docker gives a
    container 64 MB. The batches are global ones, so the need is the node's whatever the process count."""
    need = sum(shared_memory_need(loader) for loader in loaders)
    if not need or not shm.is_dir():
        return
    need += SHM_FIXED
    stats = os.statvfs(shm)
    free = stats.f_bavail * stats.f_frsize
    if need > free:
        workers = max(loader.num_workers for loader in loaders)
        raise ConfigError(
            f"{shm} has {free / 2**20:,.1f} MB free, but data.num_workers={workers} DataLoader workers need about "
            f"{need / 2**20:,.1f} MB there to hand their batches over (workers x prefetch x batch bytes, with a "
            f"margin); they would fail and the run would hang. Give the container more: `docker run "
            f"--shm-size=<size>` (podman the same; Kubernetes: an emptyDir with medium: Memory at {shm}), or "
            f"read the data in the training process: data.num_workers=0"
        )


def shared_memory_need(loader: DataLoader) -> int:
    if loader.num_workers == 0:
        return 0
    rows = min(loader.batch_sampler.batch_size, len(loader.dataset))
    batch = loader.dataset.__getitems__(list(range(rows)))
    per_batch = sum(t.numel() * t.element_size() for t in batch.values() if isinstance(t, torch.Tensor))
    return SHM_MARGIN * loader.num_workers * (loader.prefetch_factor or 2) * per_batch


class ShuffledBatches(BatchSampler):
    """Epoch `e` is the permutation drawn from `seed + e`, served as index tensors.

    `BatchSampler(RandomSampler(...))` builds every batch in a Python loop over sample indices, a
    fifth of a small model's step; this draws the epoch in one call. The order depends on the seed
    and the epoch alone (the loop sets `epoch`), so every process draws the same batches and a
    resumed run continues the order it left. Full batches only: as many samples as the sampler's
    `num_samples`, the permutation's start served again where that is more than the rows.
    """

    def __init__(self, sampler: RandomSampler, batch_size: int, seed: int, device=None):
        super().__init__(sampler, batch_size, drop_last=True)  # the sampler gives Accelerate the sizes
        self.seed, self.epoch = seed, 0
        self.device = device  # rows kept on a GPU are indexed there: one index copy an epoch, not a step

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.sampler.data_source), generator=generator)
        if self.device is not None:
            order = order.to(self.device)
        usable = self.sampler.num_samples - self.sampler.num_samples % self.batch_size
        if usable > len(order):  # the ragged last step completed by the epoch's first rows
            order = torch.cat([order, order[: usable - len(order)]])
        yield from order[:usable].split(self.batch_size)
        self.epoch += 1  # the next pass is the next epoch, unless the loop says otherwise


def _whole_batch(batch: dict) -> dict:
    return batch  # __getitems__ already returns the batch as tensors

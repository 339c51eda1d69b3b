"""A run's data: its shards prepared and opened, each split held in memory (on the GPU when it fits) or streamed
from its shards, the loaders over them, and the line that says which."""

from __future__ import annotations

import torch
from accelerate import PartialState

from pipeline import batching, console, runinfo, shard_store
from pipeline.config import Switch
from pipeline.errors import ConfigError
from pipeline.memory_budget import choose_paths
from pipeline.processes import all_agree, processes_on_node
from pipeline.recipe import Recipe, with_transform_keys
from pipeline.streaming import stream
from pipeline.tensor_rows import Rows, columns, nbytes


def load_data(cfg, recipe: Recipe, state: PartialState) -> tuple[dict, dict, dict | None]:
    """The recipe's shards (prepared once, the other processes waiting), their splits and meta, and their
    identity for run.json and checkpoints (on the main process)."""
    shards = shard_store.prepare(recipe, cfg, state, log=state.print)
    identity = runinfo.data_identity(recipe, cfg, shards) if state.is_main_process else None
    splits, meta = shard_store.open_shards(shards)
    meta = with_transform_keys(recipe, cfg, meta)  # e.g. data.augment: not in the shards
    return splits, meta, identity


def make_loaders(cfg, recipe, splits: dict, meta: dict, accelerator):
    """Each split as whole tensors in memory (on the GPU when they fit) or read from its shards a batch at a
    time; the same batches either way. Returns the train loader, the eval/test loaders, whether the rows
    live on the device, and each split's row count and path ({"path": "memory" | "stream", "why": ...})."""
    chosen = choose_paths(cfg, splits, processes_on_node(accelerator), recipe.dataset is not None)
    # Decided on each process from its node's memory; all must take the same path.
    in_memory = {name: all_agree(accelerator, keep) for name, (keep, _) in chosen.items()}
    paths = {
        name: {
            "path": "memory" if in_memory[name] else "stream",
            "why": why if in_memory[name] == keep else "another process's memory budget",
        }
        for name, (keep, why) in chosen.items()
    }
    tensors = {name: columns(split) for name, split in splits.items() if in_memory[name]}
    streamed = [name for name in splits if not in_memory[name]]
    if streamed and cfg.data.on_device is Switch.true and accelerator.device.type == "cuda":
        raise ConfigError(
            f"data.on_device=true keeps whole splits on the GPU, but {', '.join(streamed)} "
            f"would be read from the shards ({paths[streamed[0]]['why']}); add data.in_memory=true, "
            f"or leave data.on_device=auto"
        )
    on_device = not streamed and all_agree(accelerator, keep_on_device(cfg, accelerator, tensors))
    make = recipe.dataset or (lambda cols, meta, split: Rows(cols))
    rows = {
        name: make(tensors[name], meta, name) if in_memory[name] else stream(split) for name, split in splits.items()
    }
    if on_device:
        rows = {name: r.to(accelerator.device) for name, r in rows.items()}
    # Data that stays in host memory goes to the GPU from pinned pages, without waiting (non_blocking).
    workers = 0 if on_device else cfg.data.num_workers
    pin = accelerator.device.type == "cuda" and not on_device
    train_loader = batching.loader(
        rows["train"],
        cfg.trainer.batch_size // cfg.trainer.grad_accum_steps,
        train=True,
        seed=cfg.seed,
        num_workers=workers,
        step_batch=cfg.trainer.batch_size,
        pin_memory=pin,
        complete=cfg.trainer.last_batch.name == "complete",
    )
    if len(train_loader) == 0:
        raise ConfigError(
            f"trainer.batch_size={cfg.trainer.batch_size} is larger than the train split "
            f"({len(rows['train'])} rows); lower it"
        )
    eval_loaders = {
        name: batching.loader(
            rows[name], cfg.trainer.eval_batch_size, train=False, seed=cfg.seed, num_workers=workers, pin_memory=pin
        )
        for name in ("eval", "test")
        if name in rows
    }
    batching.check_shared_memory([train_loader, *eval_loaders.values()])
    return train_loader, eval_loaders, on_device, {name: {"rows": len(r), **paths[name]} for name, r in rows.items()}


def keep_on_device(cfg, accelerator, tensors: dict) -> bool:
    """Whole prepared data on the GPU when it takes under a quarter of the free memory."""
    if accelerator.device.type != "cuda" or cfg.data.on_device is Switch.false:
        return False
    if cfg.data.on_device is Switch.true:
        return True
    free, _ = torch.cuda.mem_get_info(accelerator.device)
    return sum(nbytes(t) for t in tensors.values()) < free / 4


def batches_move(accelerator, on_device: bool) -> bool:
    """Batches of rows that already live on the device need no per-step move (Accelerate's device placement
    walks every batch); rows in host memory for a GPU are moved as they come."""
    return not on_device and accelerator.device.type != "cpu"


def say_data(say, splits_read: dict, steps_per_epoch: int, eval_loaders: dict) -> None:
    """The splits' sizes and, in plain words, which are held in memory and which are read from the shards; why
    (the memory budget's arithmetic) is in summary.json's "data", and on the terminal with --verbose."""
    where = {"memory": "in memory", "stream": "streamed from the shards"}
    sizes = {
        "train": f"train {splits_read['train']['rows']:,} rows ({steps_per_epoch} steps/epoch)",
        **{k: f"{k} {splits_read[k]['rows']:,} rows" for k in eval_loaders},
    }
    paths = {splits_read[k]["path"] for k in sizes}
    if len(paths) == 1:
        say(f"data: {', '.join(sizes.values())}; {'all ' if len(sizes) > 1 else ''}{where[paths.pop()]}")
    else:
        say("data: " + ", ".join(f"{text} {where[splits_read[k]['path']]}" for k, text in sizes.items()))
    if console.verbose():
        for k, v in splits_read.items():
            say(f"data: {k} {where[v['path']]}: {v['why']}")

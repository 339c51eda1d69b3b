"""Building a run: the process state, the data and loaders, the run folder and resume point, the model,
optimizer and schedule under Accelerate, the trackers. Training (`loop`) and `runs` (evaluate) share these steps.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    TorchDynamoPlugin,
    parse_flag_from_env,
    set_seed,
)
from omegaconf import DictConfig, OmegaConf, read_write

from pipeline import batching, checkpoint, console, hooks, optim, patches, report, rng, runinfo, shard_store, tracking
from pipeline import recipe as recipe_registry
from pipeline.config import Switch, as_dict, flag, to_yaml
from pipeline.errors import ConfigError
from pipeline.files import write_json
from pipeline.guards import check_writable
from pipeline.memory_budget import check_in_memory, choose_paths
from pipeline.patches import Accelerator
from pipeline.run_folder import RunFolder, make_run_dir
from pipeline.streaming import stream
from pipeline.tensor_rows import Rows, columns, nbytes
from pipeline.together import all_or_none, shared_verdict

# The distributed types the loop supports; `accelerate launch` chooses the others by these variables (Accelerate
# itself only settles on them when the Accelerator is built, after the data is prepared).
SUPPORTED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
LAUNCH_CHOICES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                  "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
                  "ACCELERATE_USE_PARALLELISM_CONFIG": "a parallelism config (tensor, context or sharded parallel)"}


@dataclass
class Evaluation:
    """What `loop.evaluate` reads: a model and its eval loaders under one Accelerator, with the recipe's loss
    and metrics. A training `Run` is one; `runs` builds one for a finished run."""

    accelerator: Accelerator
    recipe: recipe_registry.Recipe
    meta: dict
    model: torch.nn.Module
    eval_loaders: dict
    metrics: dict
    loss_fn: Callable
    inputs: tuple  # the batch columns the model takes, in order


@dataclass
class Run(Evaluation):
    """What `setup` builds for one run and the loop's functions share."""

    cfg: DictConfig
    trainer: object  # cfg.trainer as a plain dataclass: the loop reads it on every step, OmegaConf is slow there
    run_dir: Path
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    train_loader: torch.utils.data.DataLoader
    batch_order: batching.ShuffledBatches  # the loop tells it the epoch
    steps_per_epoch: int
    layer_stats: hooks.LayerStats | None
    compiled: bool
    runtime: dict  # runinfo.runtime: git commit, processes, device, precision, compile
    resume_from: Path | None
    data_paths: dict  # {split: {"rows", "path": memory|stream, "why"}}
    data_identity: dict | None  # runinfo.data_identity on the main process (None on the others)
    record: dict | None = None  # run.json's contents (runinfo.start), kept up to date by the main process


def setup(cfg, recipe: recipe_registry.Recipe, folder: RunFolder | None = None) -> Run:
    """Checks, shards, the run directory (made and locked in `folder`), the Accelerator, loaders, model,
    optimizer and schedule, in the order that lets a mistake stop the run before it leaves anything behind."""
    folder = folder if folder is not None else RunFolder()
    cpu = not torch.accelerator.is_available()
    state = start_processes(cfg, cpu)
    check_batches(cfg, state.num_processes)  # before any work
    sync_batchnorm = check_sync_batchnorm(cfg, state)
    wandb_mode = check_before_work(cfg, recipe, state)
    # Shards first (built once, while the other processes wait): missing or damaged data stops the run
    # before it leaves a run directory behind.
    splits, meta, identity = load_data(cfg, recipe, state)
    cfg = fit_batch(cfg, len(splits["train"]), state.num_processes, state.print)  # before config.yaml is written
    micro_batch = check_batches(cfg, state.num_processes)
    run_dir = make_run_dir(cfg, state, recipe.name, folder)
    # An interrupted run (same run_name=) continues from its newest intact checkpoint, if this command
    # trains the same way (on the same data, too); damaged ones are set aside with a warning.
    resume_from = checkpoint.resume_point(run_dir, cfg, state, state.print, identity)
    compiled = decide_compile(cfg, state, sync_batchnorm, state.print)
    accelerator, init_kwargs = training_accelerator(cfg, state, compiled, run_dir, resume_from, wandb_mode)
    # One seed on every process: the model's initial weights are the same everywhere (the data's draws have
    # generators of their own). Once the model is built and wrapped, each process gets its own stream.
    set_seed(cfg.seed)
    start_run_dir(cfg, accelerator, run_dir, compiled, micro_batch)

    train_loader, eval_loaders, on_device, splits_read = make_loaders(cfg, recipe, splits, meta, accelerator)
    batch_order = train_loader.batch_sampler  # Accelerate wraps the loader below; the loop sets its epoch
    inputs = recipe_registry.model_inputs(recipe, cfg)
    # The columns the model and loss read, checked on one batch as the recipe's dataset and transform make
    # it, so a mistake is a message now and not a KeyError at the first step.
    recipe_registry.check_batch(recipe, cfg, recipe.transform(next(iter(eval_loaders["eval"])), False, meta))
    model, layer_stats = make_model(cfg, recipe, meta, sync_batchnorm)
    optimizer = optim.optimizer(cfg.optimizer, model.parameters())
    steps_per_epoch = optim.steps(len(train_loader), cfg.trainer.grad_accum_steps)
    scheduler = optim.scheduler(cfg.scheduler, optimizer, steps_per_epoch, cfg.trainer.epochs)
    loaders = [train_loader, *eval_loaders.values()]
    model, optimizer, train_loader, *prepared = accelerator.prepare(
        model, optimizer, *loaders, *([scheduler] if scheduler else []),
        device_placement=[True, True, *[batches_move(accelerator, on_device)] * len(loaders),
                          *([True] if scheduler else [])])

    # From here on each process has its own stream for the model's randomness (dropout): see rng.seed_model.
    rng.seed_model(cfg.seed, accelerator.process_index, 0)
    runtime = runinfo.runtime(accelerator, compiled)
    start_trackers(cfg, accelerator, runtime, init_kwargs, run_dir, meta)
    say_data(accelerator.print, splits_read, steps_per_epoch, eval_loaders)
    return Run(accelerator=accelerator, recipe=recipe, meta=meta, model=model,
               eval_loaders=dict(zip(eval_loaders, prepared)),
               metrics=make_metrics(recipe, cfg, meta, accelerator.device),
               loss_fn=recipe_registry.loss_fn(recipe, cfg), inputs=inputs,
               cfg=cfg, trainer=OmegaConf.to_object(cfg.trainer), run_dir=run_dir, optimizer=optimizer,
               scheduler=scheduler, train_loader=train_loader, batch_order=batch_order, steps_per_epoch=steps_per_epoch,
               layer_stats=layer_stats, compiled=compiled, runtime=runtime, resume_from=resume_from,
               data_paths=splits_read, data_identity=identity)


def check_before_work(cfg, recipe: recipe_registry.Recipe, state: PartialState) -> str | None:
    """What can stop the run before any data is prepared; returns the W&B mode (tracking.check)."""
    patches.apply(state.print)  # before the Accelerator exists: it reads which patches are on when it is built
    # Before any work (not after the data was prepared), on every process: each one writes there.
    shared_verdict(state, check_writable, cfg, everywhere=True)
    check_in_memory(cfg, recipe.dataset is not None)
    return tracking.check(cfg, state.is_main_process)  # a missing tracker package or a bad W&B login too


def load_data(cfg, recipe: recipe_registry.Recipe, state: PartialState) -> tuple[dict, dict, dict | None]:
    """The recipe's shards (prepared once, the other processes waiting), their splits and meta, and their
    identity for run.json and checkpoints (on the main process)."""
    shards = shard_store.prepare(recipe, cfg, state, log=state.print)
    identity = runinfo.data_identity(recipe, cfg, shards) if state.is_main_process else None
    splits, meta = shard_store.open_shards(shards)
    meta = recipe_registry.with_transform_keys(recipe, cfg, meta)  # e.g. data.augment: not in the shards
    return splits, meta, identity


def make_accelerator(cfg, cpu: bool, compiled: bool = False, **training) -> Accelerator:
    """The Accelerator for training (`training`: its accumulation and trackers) or evaluating, at the run's
    matmul precision."""
    accelerator = Accelerator(
        cpu=cpu,
        # The loaders yield GLOBAL batches; each process takes its slice, so the optimisation is
        # the same on 1 or N processes.
        dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=True),
        # "no" spelled out: without a plugin Accelerate reads ACCELERATE_DYNAMO_BACKEND / `accelerate
        # config` and compiles anyway, while this run's record would say compile=False.
        dynamo_plugin=TorchDynamoPlugin(backend="inductor" if compiled else "no"),
        **training,
    )
    use_tf32(accelerator, cfg.trainer.tf32)
    return accelerator


def training_accelerator(cfg, state: PartialState, compiled: bool, run_dir: Path, resume_from: Path | None,
                         wandb_mode) -> tuple[Accelerator, dict]:
    """The training Accelerator with the run's trackers; returns it and the trackers' init arguments."""
    # The local record keeps the lines up to the checkpoint (the steps after it are trained again);
    # a run that starts at step 0 starts a fresh record.
    resumed_step = checkpoint.position(resume_from)["step"] if resume_from else None
    log_with, init_kwargs = tracking.trackers(cfg, run_dir, resumed_step, state.is_main_process, wandb_mode)
    accelerator = make_accelerator(cfg, not torch.accelerator.is_available(), compiled,
                                   gradient_accumulation_steps=cfg.trainer.grad_accum_steps,
                                   log_with=log_with, project_dir=str(run_dir))
    checkpoint.keep_plain_weights(accelerator)
    if accelerator.device.type == "cuda":
        # cudnn.benchmark picks the fastest convolution for the (fixed, drop_last) training shapes once.
        torch.backends.cudnn.benchmark = True
    return accelerator, init_kwargs


def start_run_dir(cfg, accelerator, run_dir: Path, compiled: bool, micro_batch: int) -> None:
    """config.yaml in the run folder, and the run's line: where, how many processes, on what."""
    with all_or_none(accelerator):
        if accelerator.is_main_process:
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
    accelerator.print(f"run: {run_dir}  processes={accelerator.num_processes} device={accelerator.device.type} "
                      f"mixed_precision={accelerator.mixed_precision} compile={compiled} "
                      f"micro_batch/process={micro_batch}")
    if warning := fewer_processes_than_asked(accelerator.num_processes):
        accelerator.print(warning)


def make_model(cfg, recipe: recipe_registry.Recipe, meta: dict, sync_batchnorm: bool):
    """The recipe's model with its initial weights; returns it and its debug hooks (None when off)."""
    model = recipe.model(cfg, meta)
    optim.init_weights(model, cfg.model.init, recipe_registry.activation(recipe, cfg))
    if sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, hooks.LayerStats(model) if cfg.debug.hooks else None  # no hooks at all when off


def batches_move(accelerator, on_device: bool) -> bool:
    """Batches of rows that already live on the device need no per-step move (Accelerate's device placement
    walks every batch); rows in host memory for a GPU are moved as they come."""
    return not on_device and accelerator.device.type != "cpu"


def start_trackers(cfg, accelerator, runtime: dict, init_kwargs: dict, run_dir: Path, meta: dict) -> None:
    with all_or_none(accelerator):  # W&B starts on the main process alone: its refusal stops every process
        tracking.init(accelerator, cfg.project, {**as_dict(cfg), "runtime": runtime}, init_kwargs)
        if accelerator.is_main_process:
            write_json(run_dir / "meta.json", meta)


def say_data(say, splits_read: dict, steps_per_epoch: int, eval_loaders: dict) -> None:
    """The splits' sizes and, in plain words, which are held in memory and which are read from the shards; why
    (the memory budget's arithmetic) is in summary.json's "data", and on the terminal with --verbose."""
    where = {"memory": "in memory", "stream": "streamed from the shards"}
    sizes = {"train": f"train {splits_read['train']['rows']:,} rows ({steps_per_epoch} steps/epoch)",
             **{k: f"{k} {splits_read[k]['rows']:,} rows" for k in eval_loaders}}
    paths = {splits_read[k]["path"] for k in sizes}
    if len(paths) == 1:
        say(f"data: {', '.join(sizes.values())}; {'all ' if len(sizes) > 1 else ''}{where[paths.pop()]}")
    else:
        say("data: " + ", ".join(f"{text} {where[splits_read[k]['path']]}" for k, text in sizes.items()))
    if console.verbose():
        for k, v in splits_read.items():
            say(f"data: {k} {where[v['path']]}: {v['why']}")


def start_processes(cfg, cpu: bool) -> PartialState:
    """Accelerate's process state (its process group, under a launcher), whose collectives fail after
    trainer.dist_timeout_s; the Accelerator built later shares it. A distributed type this pipeline does not
    support stops here, before any data is prepared or run folder made."""
    check_distributed()  # before the group: Accelerate's DeepSpeed setup would import deepspeed first
    # Without any accelerator, Accelerate only forms a multi-process (gloo) group when told cpu=True.
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=cfg.trainer.dist_timeout_s))
    check_distributed(state)
    return state


def check_distributed(state: PartialState | None = None) -> None:
    """One process, or DDP over CPUs or GPUs on one or several machines. FSDP, DeepSpeed and the like shard
    the model and optimizer: the weights saved would be one process's shard, and the checkpoints would not
    resume on another number of processes."""
    chosen = [name for var, name in LAUNCH_CHOICES.items() if parse_flag_from_env(var)]
    if state is not None and state.distributed_type not in SUPPORTED:
        chosen.append(state.distributed_type.value)
    if chosen:
        raise ConfigError(
            f"accelerate config chose {chosen[0]}; this pipeline supports one process, DDP on CPUs or GPUs and "
            f"multi-node DDP, and {chosen[0]} would save one process's shard of the model as its weights.\nFix: "
            f"run `accelerate config` again without it, or launch with `accelerate launch --multi_gpu "
            f"--num_processes N ...` (or --config_file launch/accelerate/multi_gpu.yaml)")


def make_loaders(cfg, recipe, splits: dict, meta: dict, accelerator):
    """Each split as whole tensors in memory (on the GPU when they fit) or read from its shards a batch at a
    time; the same batches either way. Returns the train loader, the eval/test loaders, whether the rows
    live on the device, and each split's row count and path ({"path": "memory" | "stream", "why": ...})."""
    chosen = choose_paths(cfg, splits, processes_on_node(accelerator), recipe.dataset is not None)
    # Decided on each process from its node's memory; all must take the same path.
    in_memory = {name: all_agree(accelerator, keep) for name, (keep, _) in chosen.items()}
    paths = {name: {"path": "memory" if in_memory[name] else "stream",
                    "why": why if in_memory[name] == keep else "another process's memory budget"}
             for name, (keep, why) in chosen.items()}
    tensors = {name: columns(split) for name, split in splits.items() if in_memory[name]}
    streamed = [name for name in splits if not in_memory[name]]
    if streamed and cfg.data.on_device is Switch.true and accelerator.device.type == "cuda":
        raise ConfigError(f"data.on_device=true keeps whole splits on the GPU, but {', '.join(streamed)} "
                          f"would be read from the shards ({paths[streamed[0]]['why']}); add data.in_memory=true, "
                          f"or leave data.on_device=auto")
    on_device = not streamed and all_agree(accelerator, keep_on_device(cfg, accelerator, tensors))
    make = recipe.dataset or (lambda cols, meta, split: Rows(cols))
    rows = {name: make(tensors[name], meta, name) if in_memory[name] else stream(split)
            for name, split in splits.items()}
    if on_device:
        rows = {name: r.to(accelerator.device) for name, r in rows.items()}
    # Data that stays in host memory goes to the GPU from pinned pages, without waiting (non_blocking).
    workers = 0 if on_device else cfg.data.num_workers
    pin = accelerator.device.type == "cuda" and not on_device
    train_loader = batching.loader(rows["train"], cfg.trainer.batch_size // cfg.trainer.grad_accum_steps,
                                   train=True, seed=cfg.seed, num_workers=workers, step_batch=cfg.trainer.batch_size,
                                   pin_memory=pin, complete=cfg.trainer.last_batch.name == "complete")
    if len(train_loader) == 0:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} is larger than the train split "
                          f"({len(rows['train'])} rows); lower it")
    eval_loaders = {name: batching.loader(rows[name], cfg.trainer.eval_batch_size, train=False, seed=cfg.seed,
                                          num_workers=workers, pin_memory=pin)
                    for name in ("eval", "test") if name in rows}
    batching.check_shared_memory([train_loader, *eval_loaders.values()])
    return train_loader, eval_loaders, on_device, {name: {"rows": len(r), **paths[name]} for name, r in rows.items()}


def fewer_processes_than_asked(num_processes: int) -> str | None:
    """Accelerate's one-process launcher (`--cpu`, or a config whose distributed_type is NO or MULTI_CPU)
    starts one process whatever --num_processes says; asked for more, it sets MASTER_PORT, and torchrun's
    launcher (which starts them all) sets WORLD_SIZE. No variable carries the number asked for."""
    env = os.environ
    if num_processes == 1 and "ACCELERATE_USE_CPU" in env and "MASTER_PORT" in env and "WORLD_SIZE" not in env:
        return ("warning: `accelerate launch` was asked for more than one process (--num_processes/--num_machines), "
                "but its one-process launcher (--cpu, or a config with distributed_type NO or MULTI_CPU) started "
                "this one alone: processes=1. For N processes on the CPU: python launch/run.py --cpu "
                "--num_processes N ..., or --config_file launch/accelerate/cpu.yaml --num_processes N")
    return None


def processes_on_node(accelerator) -> int:
    # torchrun (and so `accelerate launch`) sets LOCAL_WORLD_SIZE; a single process has none.
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def use_tf32(accelerator, tf32: bool) -> None:
    """TF32 on CUDA keeps fp32's range with a 10-bit mantissa: several times the fp32 matmul speed on Ampere+
    for a precision that SGD noise swamps (`trainer.tf32`)."""
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32


def check_batches(cfg, num_processes: int) -> int:
    """The per-process micro-batch: batch_size / (processes x accumulation), which must divide."""
    batch, accumulate = cfg.trainer.batch_size, cfg.trainer.grad_accum_steps
    if batch % (num_processes * accumulate):
        raise ConfigError(
            f"trainer.batch_size={batch} does not split into {num_processes} processes x {accumulate} "
            f"accumulation steps; use a multiple of {num_processes * accumulate}"
            + nearest_process_counts(batch, accumulate, num_processes))
    check_eval_batch(cfg, num_processes)
    return batch // (num_processes * accumulate)


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
    short = (f"; fewer than {wanted}: a smaller batch would not split into {num_processes} process(es) x "
             f"{cfg.trainer.grad_accum_steps} accumulation step(s)") if steps(batch) < wanted else ""
    say(f"data: trainer.batch_size {asked} -> {batch}: the {train_rows:,} train rows make {steps(batch)} steps an "
        f"epoch (trainer.min_steps_per_epoch={wanted}){short}")
    cfg = copy.deepcopy(cfg)
    with read_write(cfg):
        cfg.trainer.batch_size = batch
    return cfg


def check_eval_batch(cfg, num_processes: int) -> None:
    if cfg.trainer.eval_batch_size % num_processes:
        raise ConfigError(f"trainer.eval_batch_size={cfg.trainer.eval_batch_size} does not split into "
                          f"{num_processes} processes; add trainer.eval_batch_size=<a multiple of {num_processes}>")


def nearest_process_counts(batch: int, accumulate: int, num_processes: int) -> str:
    """The process counts next to `num_processes` that do split the batch. A resumed run keeps its batch
    size (checkpoint.check_config): there the process count is what can change."""
    fits = [n for n in range(1, batch // accumulate + 1) if batch % (n * accumulate) == 0]
    below = [n for n in fits if n < num_processes][-1:]
    above = [n for n in fits if n > num_processes][:1]
    if not below + above:
        return ""
    return f", or launch {' or '.join(map(str, below + above))} processes (a resumed run keeps its batch size)"


def check_sync_batchnorm(cfg, state: PartialState) -> bool:
    """Whether BatchNorm layers become SyncBatchNorm: asked for, and more than one process to sync."""
    if not cfg.trainer.sync_batchnorm or state.num_processes == 1:
        return False
    if state.device.type != "cuda":
        raise ConfigError(
            f"trainer.sync_batchnorm=true needs CUDA devices; these {state.num_processes} processes run on "
            f"{state.device.type} (torch's SyncBatchNorm has no gloo/CPU path). Drop the option here: each "
            f"process then normalizes with the statistics of its own part of the batch.")
    return True


def decide_compile(cfg, state: PartialState, sync_batchnorm: bool, say) -> bool:
    """torch.compile where asked (auto: on CUDA), except with parts that recompile or break under it."""
    wanted = flag(cfg.trainer.compile, state.device.type == "cuda")
    if wanted and cfg.debug.hooks:
        # A hook inside the graph is a guard of its own: one recompile per hooked layer on the logged steps.
        say("compile: off because debug.hooks=true (hooks inside a compiled graph recompile every layer)")
        return False
    if wanted and sync_batchnorm:
        # SyncBatchNorm's all-gather of per-process counts is data-dependent: graph breaks at every layer.
        say("compile: off because trainer.sync_batchnorm=true (SyncBatchNorm breaks the compiled graph)")
        return False
    return wanted


def keep_on_device(cfg, accelerator, tensors: dict) -> bool:
    """Whole prepared data on the GPU when it takes under a quarter of the free memory."""
    if accelerator.device.type != "cuda" or cfg.data.on_device is Switch.false:
        return False
    if cfg.data.on_device is Switch.true:
        return True
    free, _ = torch.cuda.mem_get_info(accelerator.device)
    return sum(nbytes(t) for t in tensors.values()) < free / 4


def all_agree(accelerator, decision: bool) -> bool:
    """True only when every process decided True."""
    if accelerator.num_processes == 1:
        return decision
    votes = torch.tensor(float(decision), device=accelerator.device)
    return accelerator.reduce(votes, reduction="sum").item() == accelerator.num_processes


def make_metrics(recipe, cfg, meta, device) -> dict:
    """The recipe's metrics, updated with already-gathered values, so torchmetrics must not sync again."""
    metrics = report.with_confusion_matrix(recipe.metrics(cfg, meta), recipe, meta)
    for metric in metrics.values():
        for m in metric.modules():
            if hasattr(m, "distributed_available_fn"):
                m.distributed_available_fn = _never
    return {head: m.to(device, report.reporting_dtype(device)) for head, m in metrics.items()}


def _never() -> bool:
    return False





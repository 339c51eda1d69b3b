"""Building a run: the process state, the data and loaders, the run folder and resume point, the model,
optimizer and schedule under Accelerate, the trackers. Training (`loop`) and `runs` (evaluate) share these steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import DataLoaderConfiguration, TorchDynamoPlugin, set_seed
from omegaconf import DictConfig, OmegaConf

from pipeline import batching, checkpoint, hooks, optim, patches, report, resume, rng, runinfo, tracking
from pipeline.batch_sizes import check_batches, fit_batch
from pipeline.config import as_dict, flag, to_yaml
from pipeline.files import write_json
from pipeline.guards import check_writable
from pipeline.memory_budget import check_in_memory
from pipeline.patches import Accelerator
from pipeline.processes import check_sync_batchnorm, fewer_processes_than_asked, start_processes
from pipeline.recipe import Recipe, activation, loss_fn, model_inputs
from pipeline.recipe_contract import check_batch
from pipeline.run_data import batches_move, load_data, make_loaders, say_data
from pipeline.run_folder import RunFolder, make_run_dir
from pipeline.together import all_or_none, shared_verdict


@dataclass
class Evaluation:
    """What `loop.evaluate` reads: a model and its eval loaders under one Accelerator, with the recipe's loss
    and metrics. A `TrainingRun` is one; `runs` builds one for a finished run."""

    accelerator: Accelerator
    recipe: Recipe
    meta: dict
    model: torch.nn.Module
    eval_loaders: dict
    metrics: dict
    loss_fn: Callable
    inputs: tuple  # the batch columns the model takes, in order


@dataclass
class TrainingRun(Evaluation):
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


def setup(cfg, recipe: Recipe, folder: RunFolder | None = None) -> TrainingRun:
    """Checks, shards, the run directory (made and locked in `folder`), the Accelerator, loaders, model,
    optimizer and schedule, in the order that lets a mistake stop the run before it leaves anything behind."""
    folder = folder if folder is not None else RunFolder()
    state, sync_batchnorm, wandb_mode = check_before_work(cfg, recipe)
    # Shards first (built once, while the other processes wait): missing or damaged data stops the run
    # before it leaves a run directory behind.
    splits, meta, identity = load_data(cfg, recipe, state)
    cfg = fit_batch(cfg, len(splits["train"]), state.num_processes, state.print)  # before config.yaml is written
    micro_batch = check_batches(cfg, state.num_processes)
    run_dir = make_run_dir(cfg, state, recipe.name, folder)
    # An interrupted run (same run_name=) continues from its newest intact checkpoint, if this command
    # trains the same way (on the same data, too); damaged ones are set aside with a warning.
    resume_from = resume.resume_point(run_dir, cfg, state, state.print, identity)
    compiled = decide_compile(cfg, state, sync_batchnorm, state.print)
    accelerator, init_kwargs = training_accelerator(cfg, state, compiled, run_dir, resume_from, wandb_mode)
    # One seed on every process: the model's initial weights are the same everywhere (the data's draws have
    # generators of their own). Once the model is built and wrapped, each process gets its own stream.
    set_seed(cfg.seed)
    start_run_dir(cfg, accelerator, run_dir, compiled, micro_batch)
    train_loader, eval_loaders, on_device, splits_read = make_loaders(cfg, recipe, splits, meta, accelerator)
    batch_order = train_loader.batch_sampler  # Accelerate wraps the loader below; the loop sets its epoch
    # The columns the model and loss read, checked on one batch as the recipe's dataset and transform make
    # it, so a mistake is a message now and not a KeyError at the first step.
    check_batch(recipe, cfg, recipe.transform(next(iter(eval_loaders["eval"])), False, meta))
    model, layer_stats = make_model(cfg, recipe, meta, sync_batchnorm)
    optimizer, scheduler, steps_per_epoch = make_optimizer(cfg, model, len(train_loader))
    model, optimizer, train_loader, prepared = prepare_all(
        accelerator, on_device, (model, optimizer, scheduler), train_loader, eval_loaders
    )
    # From here on each process has its own stream for the model's randomness (dropout): see rng.seed_model.
    rng.seed_model(cfg.seed, accelerator.process_index, 0)
    runtime = runinfo.runtime(accelerator, compiled)
    start_trackers(cfg, accelerator, runtime, init_kwargs, run_dir, meta)
    say_data(accelerator.print, splits_read, steps_per_epoch, eval_loaders)
    return TrainingRun(
        accelerator=accelerator,
        recipe=recipe,
        meta=meta,
        model=model,
        eval_loaders=prepared,
        metrics=make_metrics(recipe, cfg, meta, accelerator.device),
        loss_fn=loss_fn(recipe, cfg),
        inputs=model_inputs(recipe, cfg),
        cfg=cfg,
        trainer=OmegaConf.to_object(cfg.trainer),
        run_dir=run_dir,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=train_loader,
        batch_order=batch_order,
        steps_per_epoch=steps_per_epoch,
        layer_stats=layer_stats,
        compiled=compiled,
        runtime=runtime,
        resume_from=resume_from,
        data_paths=splits_read,
        data_identity=identity,
    )


def make_optimizer(cfg, model: torch.nn.Module, train_batches: int) -> tuple:
    """The optimizer over the model's parameters, its schedule (None when off) and the optimizer steps an epoch."""
    optimizer = optim.optimizer(cfg.optimizer, model.parameters())
    steps_per_epoch = optim.steps(train_batches, cfg.trainer.grad_accum_steps)
    return optimizer, optim.scheduler(cfg.scheduler, optimizer, steps_per_epoch, cfg.trainer.epochs), steps_per_epoch


def prepare_all(accelerator, on_device: bool, training: tuple, train_loader, eval_loaders: dict) -> tuple:
    """Model, optimizer and loaders through `accelerator.prepare`; returns the model, the optimizer, the train
    loader and the eval loaders by name. The schedule goes through `prepare` too; the run keeps it as built."""
    model, optimizer, scheduler = training
    loaders = [train_loader, *eval_loaders.values()]
    model, optimizer, train_loader, *prepared = accelerator.prepare(
        model,
        optimizer,
        *loaders,
        *([scheduler] if scheduler else []),
        device_placement=[
            True,
            True,
            *[batches_move(accelerator, on_device)] * len(loaders),
            *([True] if scheduler else []),
        ],
    )
    return model, optimizer, train_loader, dict(zip(eval_loaders, prepared))


def check_before_work(cfg, recipe: Recipe) -> tuple[PartialState, bool, str | None]:
    """The processes, and what can stop the run before any data is prepared; returns the process state, whether
    BatchNorm becomes SyncBatchNorm, and the W&B mode (tracking.check_tracking)."""
    state = start_processes(cfg, not torch.accelerator.is_available())
    check_batches(cfg, state.num_processes)  # before any work
    sync_batchnorm = check_sync_batchnorm(cfg, state)
    patches.apply(state.print)  # before the Accelerator exists: it reads which patches are on when it is built
    # Before any work (not after the data was prepared), on every process: each one writes there.
    shared_verdict(state, check_writable, cfg, everywhere=True)
    check_in_memory(cfg, recipe.dataset is not None)
    # A missing tracker package or a bad W&B login stops it too.
    return state, sync_batchnorm, tracking.check_tracking(cfg, state.is_main_process)


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


def training_accelerator(
    cfg, state: PartialState, compiled: bool, run_dir: Path, resume_from: Path | None, wandb_mode
) -> tuple[Accelerator, dict]:
    """The training Accelerator with the run's trackers; returns it and the trackers' init arguments."""
    # The local record keeps the lines up to the checkpoint (the steps after it are trained again);
    # a run that starts at step 0 starts a fresh record.
    resumed_step = checkpoint.position(resume_from)["step"] if resume_from else None
    log_with, init_kwargs = tracking.trackers(cfg, run_dir, resumed_step, state.is_main_process, wandb_mode)
    accelerator = make_accelerator(
        cfg,
        not torch.accelerator.is_available(),
        compiled,
        gradient_accumulation_steps=cfg.trainer.grad_accum_steps,
        log_with=log_with,
        project_dir=str(run_dir),
    )
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
    accelerator.print(
        f"run: {run_dir}  processes={accelerator.num_processes} device={accelerator.device.type} "
        f"mixed_precision={accelerator.mixed_precision} compile={compiled} "
        f"micro_batch/process={micro_batch}"
    )
    if warning := fewer_processes_than_asked(accelerator.num_processes):
        accelerator.print(warning)


def make_model(cfg, recipe: Recipe, meta: dict, sync_batchnorm: bool):
    """The recipe's model with its initial weights; returns it and its debug hooks (None when off)."""
    model = recipe.model(cfg, meta)
    optim.init_weights(model, cfg.model.init, activation(recipe, cfg))
    if sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, hooks.LayerStats(model) if cfg.debug.hooks else None  # no hooks at all when off


def start_trackers(cfg, accelerator, runtime: dict, init_kwargs: dict, run_dir: Path, meta: dict) -> None:
    with all_or_none(accelerator):  # W&B starts on the main process alone: its refusal stops every process
        tracking.init(accelerator, cfg.project, {**as_dict(cfg), "runtime": runtime}, init_kwargs)
        if accelerator.is_main_process:
            write_json(run_dir / "meta.json", meta)


def use_tf32(accelerator, tf32: bool) -> None:
    """TF32 on CUDA keeps fp32's range with a 10-bit mantissa: several times the fp32 matmul speed on Ampere+
    for a precision that SGD noise swamps (`trainer.tf32`)."""
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32


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

"""The train/eval loop every recipe shares: the one place to follow a run from config to weights.

Accelerate owns devices, processes, precision, accumulation and trackers; this is its client.
`train` tells the story; a step, a log line, an epoch's end and the outputs are the functions it calls.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    TorchDynamoPlugin,
    broadcast_object_list,
    set_seed,
)
from omegaconf import DictConfig, OmegaConf

from pipeline import checkpoint, data, hooks, optim, patches, plots, report, runinfo, tracking
from pipeline import recipe as recipes
from pipeline.best import Best
from pipeline.config import ConfigError, Switch, as_dict, flag, to_yaml
from pipeline.guards import check_finite, check_weights, check_writable, disk_full_guard
from pipeline.patches import Accelerator

# best.safetensors is saved as one file, renamed into place whole (Accelerate would shard it past 10 GB).
BEST_SHARD_SIZE = "1000GB"


@dataclass
class Position:
    """Where a run stands: optimizer steps done, the epoch it is in, micro-batches into that epoch."""

    step: int = 0
    epoch: int = 1
    batches: int = 0

    @classmethod
    def of(cls, saved: dict) -> Position:
        return cls(saved["step"], saved["epoch"], saved["batches"])

    def as_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batches": self.batches}


@dataclass
class Run:
    """What `setup` builds for one run and the loop's functions share."""

    cfg: DictConfig
    recipe: recipes.Recipe
    meta: dict
    run_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    train_loader: torch.utils.data.DataLoader
    batch_order: data.ShuffledBatches  # the loop tells it the epoch
    eval_loaders: dict
    metrics: dict
    loss_fn: Callable
    inputs: tuple  # the batch columns the model takes, in order
    steps_per_epoch: int
    layer_stats: hooks.LayerStats | None
    compiled: bool
    runtime: dict  # runinfo.runtime: git commit, processes, device, precision, compile
    resume_from: Path | None
    data_paths: dict  # {split: {"rows", "path": memory|stream, "why"}}


def train(cfg, recipe: recipes.Recipe | None = None) -> dict:
    """Trains and evaluates a recipe (`cfg.recipe` unless given); returns the summary also written to
    `<run>/summary.json`."""
    started = time.perf_counter()
    run = setup(cfg, recipe or recipes.load(cfg.recipe))
    record = runinfo.start(run)  # run.json: "running" now, how it ended below
    position, saved = Position(), None
    if run.resume_from:
        saved = checkpoint.load(run.accelerator, run.resume_from)
        position = Position.of(saved)
        run.accelerator.print(f"resuming from {run.resume_from}: epoch {position.epoch}, step {position.step}")
    best = Best.of(cfg, (saved or {}).get("best"), run.accelerator.print)
    # Plain dataclasses on the hot path: an OmegaConf attribute read costs ~10 us, a step ~400 us.
    trainer = OmegaConf.to_object(cfg.trainer)
    speed = report.Speed(run.accelerator.device)
    progress = report.Progress(run.accelerator.is_main_process, run.steps_per_epoch * trainer.epochs)
    stop_signal = checkpoint.StopSignal(enabled=cfg.checkpoint.keep > 0)  # without checkpoints SIGTERM ends it
    results, epochs_done = {}, position.epoch - 1
    try:
        for epoch in range(position.epoch, trainer.epochs + 1):
            if epoch > position.epoch:
                position = Position(position.step, epoch, 0)
            at_max_steps = train_epoch(run, trainer, position, results, best, speed, progress, stop_signal)
            end_epoch(run, position, results, best, progress, last=at_max_steps or epoch == trainer.epochs)
            epochs_done = epoch
            if at_max_steps or best.stopped_early:
                break
        summary = finish(run, position.step, epochs_done, results, best, speed, started)
        runinfo.end(run, record)
        return summary
    except BaseException as e:
        runinfo.end(run, record, e)
        raise
    finally:
        stop_signal.close()
        progress.close()


def train_epoch(run: Run, trainer, position: Position, results: dict, best: Best, speed, progress,
                stop_signal) -> bool:
    """One pass over the training batches (the rest of one, when resumed mid-epoch). True when the run
    reached trainer.max_steps."""
    accelerator, layer_stats = run.accelerator, run.layer_stats
    hooks_every = run.cfg.debug.hooks_every
    every = run.cfg.checkpoint.every_steps if run.cfg.checkpoint.keep else 0
    # Accelerate's accumulate() skips the gradient sync of micro-batches between optimizer steps;
    # with one micro-batch a step it has nothing to skip, and its bookkeeping stays off the step.
    accumulating = trainer.grad_accum_steps > 1
    run.model.train()
    run.batch_order.epoch = position.epoch
    # A run resumed mid-epoch skips the batches it already trained on (indices only, no data read).
    loader = run.train_loader
    if position.batches:
        loader = checkpoint.skip_batches(accelerator, loader, position.batches)
    losses = []  # detached per-step losses, averaged at each log line (no sync, no extra op a step)
    stop = False
    speed.resume()
    for batch in loader:
        if layer_stats:
            layer_stats.active = (position.step + 1) % hooks_every == 0
        with accelerator.accumulate(run.model) if accumulating else nullcontext():
            losses.append(train_step(run, batch, trainer.clip_grad_norm))
        position.batches += 1
        if accumulating and not accelerator.sync_gradients:
            continue
        position.step += 1
        speed.step(trainer.batch_size)
        if layer_stats and layer_stats.active:
            accelerator.log(layer_stats.collect(), step=position.step)
        stop = bool(trainer.max_steps) and position.step >= trainer.max_steps
        if (position.step % trainer.log_every == 0 or position.step == run.steps_per_epoch * position.epoch
                or stop):
            log_line(run, position, losses, results, best, speed, progress, stop_signal)
        if every and position.step % every == 0 and position.batches < len(run.train_loader):
            save_checkpoint(run, position, best)
        if stop:
            break
    speed.pause()
    return stop


def train_step(run: Run, batch: dict, clip_grad_norm: float | None) -> torch.Tensor:
    """Forward, backward and optimizer step of one micro-batch; returns its detached loss."""
    accelerator, recipe = run.accelerator, run.recipe
    batch = recipe.transform(batch, True, run.meta)
    outputs = run.model(*(batch[k] for k in run.inputs))
    loss = run.loss_fn(outputs, batch)
    accelerator.backward(loss)
    if clip_grad_norm and accelerator.sync_gradients:
        accelerator.clip_grad_norm_(run.model.parameters(), clip_grad_norm)
    run.optimizer.step()
    if run.scheduler:
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def log_line(run: Run, position: Position, losses: list, results: dict, best: Best, speed, progress,
             stop_signal) -> None:
    """The mean loss since the last line, in one cross-process reduction (none on the other steps). It
    carries the SIGTERM flag too: any process that got one makes all of them stop after this step."""
    accelerator = run.accelerator
    flags = torch.stack([torch.stack(losses).mean().float(),
                         torch.tensor(float(stop_signal.received), device=accelerator.device)])
    train_loss, terminate = accelerator.reduce(flags, reduction="mean").tolist()
    losses.clear()
    logged = {"train/loss": train_loss, "train/lr": run.optimizer.param_groups[0]["lr"], "epoch": position.epoch}
    rate = speed.rate()  # 0 until the warm-up steps are over
    accelerator.log({**logged, **({"train/samples_per_s": rate} if rate else {})}, step=position.step)
    results.update(logged)
    progress.update(position.step, position.epoch, train_loss, rate)
    # NaN or inf on any process makes the mean so: every process stops at the same line.
    check_finite({"train/loss": train_loss}, position.step, run.run_dir, accelerator)
    if terminate > 0:
        saved = save_checkpoint(run, position, best)
        accelerator.end_training()
        raise checkpoint.Preempted(f"stopped on SIGTERM after step {position.step}; saved {saved}. "
                                   f"The same command with run_name={run.run_dir.name} resumes it.")


def end_epoch(run: Run, position: Position, results: dict, best: Best, progress, last: bool) -> None:
    """Evaluation on the held-out split, the best weights when it is the best so far, then a checkpoint to
    resume from (none after the last epoch, or when the run stops early: the weights and summary follow)."""
    evaluated = evaluate(run, "eval")
    results.update(evaluated)
    check_finite({"eval/loss": results["eval/loss"]}, position.step, run.run_dir, run.accelerator)
    improved = best.update(evaluated, position.step, position.epoch, run.accelerator)
    tracking.define_best(run.accelerator, best.monitor, best.mode)  # before the values it summarizes
    run.accelerator.log({**{k: v for k, v in results.items() if k.startswith("eval/") and report.scalar(v)},
                         "epoch": position.epoch}, step=position.step)
    progress.epoch(position.epoch, run.cfg.trainer.epochs, results)
    if improved:
        save_best(run, position.step)
    if best.stopped_early:
        run.accelerator.print(f"stopping early after epoch {position.epoch}: {best.stopped_early}")
    if run.cfg.checkpoint.keep and not last and not best.stopped_early:
        save_checkpoint(run, Position(position.step, position.epoch + 1, 0), best)


def save_checkpoint(run: Run, position: Position, best: Best) -> Path:
    check_weights(run.model, position.step, run.run_dir, run.accelerator)  # never a checkpoint of NaN weights
    with disk_full_guard(run.run_dir, "a checkpoint", run.accelerator):
        return checkpoint.save(run.accelerator, run.run_dir, position.as_dict(), run.cfg.checkpoint.keep,
                               {"best": best.state()})


def save_best(run: Run, step: int) -> None:
    """<run>/best.safetensors: written beside it and renamed, so a kill never leaves half a file under that name."""
    accelerator = run.accelerator
    check_weights(run.model, step, run.run_dir, accelerator)
    tmp = run.run_dir / ".tmp-best"
    with disk_full_guard(run.run_dir, "the best weights", accelerator, partial=(tmp.name,)):
        save_weights(accelerator, run.model, tmp, max_shard_size=BEST_SHARD_SIZE)  # one file to rename
        # save_model lists the folder on every process: none may still be in it when the main one removes it.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "model.safetensors").replace(run.run_dir / "best.safetensors")
            tmp.rmdir()
    accelerator.wait_for_everyone()


def save_weights(accelerator, model, folder: Path, **kwargs) -> None:
    # The plain module's weights: a compiled model's keys would carry `_orig_mod.` and load nowhere else.
    accelerator.save_model(accelerator.unwrap_model(model, keep_torch_compile=False), folder,
                           safe_serialization=True, **kwargs)
    if accelerator.is_main_process:
        checkpoint.as_umask_allows(Path(folder).glob("model*.safetensors"))


def finish(run: Run, step: int, epochs: int, results: dict, best: Best, speed, started: float) -> dict:
    """The test split (on the final weights), the final weights and summary.json with the best evaluation;
    a finished run keeps no checkpoints."""
    accelerator = run.accelerator
    if "test" in run.eval_loaders:
        test = evaluate(run, "test")
        accelerator.log({k: v for k, v in test.items() if report.scalar(v)}, step=step)
        results.update(test)
    accelerator.wait_for_everyone()
    check_weights(run.model, step, run.run_dir, accelerator)
    # A truncated model.safetensors would look like a finished run's weights: removed on a full disk.
    with disk_full_guard(run.run_dir, "the final weights", accelerator, partial=("model*.safetensors*",)):
        save_weights(accelerator, run.model, run.run_dir)
    timings = {"train/samples_per_s": speed.rate(), "time/first_step_s": speed.first,
               "time/total_s": time.perf_counter() - started}
    # Also as the trackers' last values, so the W&B summary holds them (W&B's summary is each key's last value).
    accelerator.log({k: v for k, v in {**best.summary(), **timings}.items() if report.scalar(v)}, step=step)
    class_names = run.meta.get("class_names")
    tracking.log_classifier(accelerator, results, class_names, step)
    if run.cfg.tracking.log_model:
        tracking.log_model(accelerator, run.run_dir)
    summary = {"recipe": run.recipe.name, "run_dir": str(run.run_dir), "steps": step, "epochs": epochs,
               "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
               "compile": run.compiled, "data": run.data_paths, **results, **best.summary(), **timings}
    if accelerator.is_main_process:
        tracking.write_json(run.run_dir / "summary.json", summary)
        checkpoint.remove_all(run.run_dir)  # only the folders it wrote: a person's files stay
        plots.write(run.run_dir, results, class_names, say=accelerator.print)
    accelerator.print(report.summary_line(summary))
    accelerator.end_training()
    return summary


@torch.no_grad()
def evaluate(run: Run, split: str) -> dict:
    """Loss and metrics over a whole split; every sample counts exactly once on any number of processes."""
    accelerator, recipe, metrics = run.accelerator, run.recipe, run.metrics
    run.model.eval()
    loss_sum, seen = torch.zeros((), device=accelerator.device, dtype=torch.float64), 0
    for batch in run.eval_loaders[split]:
        batch = recipe.transform(batch, False, run.meta)
        outputs = run.model(*(batch[k] for k in run.inputs))
        # gather_for_metrics drops the samples Accelerate repeated to even out the last batch.
        outputs, targets = accelerator.gather_for_metrics((outputs, {k: batch[k] for k in recipe.targets}))
        n = len(targets[recipe.targets[0]])
        loss_sum += run.loss_fn(outputs, targets).double() * n
        seen += n
        for head, (preds, target) in recipe.predictions(outputs, targets).items():
            metrics[head].update(preds, target)
    results = {f"{split}/loss": (loss_sum / max(seen, 1)).item(), f"{split}/samples": seen}
    for head, metric in metrics.items():
        name = f"{split}/{head}/" if head else f"{split}/"
        results.update(report.flatten(metric.compute(), name, run.meta.get("class_names")))
        metric.reset()
    return results


# ---------------------------------------------------------------- building a run


def setup(cfg, recipe: recipes.Recipe) -> Run:
    """Checks, shards, the run directory, the Accelerator, loaders, model, optimizer and schedule, in the
    order that lets a mistake stop the run before it leaves anything behind."""
    # Without any accelerator, Accelerate only forms a multi-process (gloo) group when told cpu=True.
    # PartialState is Accelerate's process state before a run exists; the Accelerator below shares it.
    cpu = not torch.accelerator.is_available()
    state = PartialState(cpu=cpu)
    micro_batch = check_batches(cfg, state.num_processes)
    sync_batchnorm = check_sync_batchnorm(cfg, state)
    say = state.print
    patches.apply(say)  # before the Accelerator exists: it reads which patches are on when it is built
    check_writable(cfg)  # before any work: not after the data was prepared
    data.check_in_memory(cfg, recipe.dataset is not None)
    wandb_mode = tracking.check(cfg, state.is_main_process)  # a missing tracker package or a bad W&B login too
    # Shards first (built once, while the other processes wait): missing or damaged data stops the run
    # before it leaves a run directory behind.
    shards = data.prepare(recipe, cfg, state, log=say)
    splits, meta = data.load(shards)
    meta = recipes.with_transform_keys(recipe, cfg, meta)  # e.g. data.augment, which the shards do not depend on
    run_dir = make_run_dir(cfg, state, recipe.name)
    # An interrupted run (same run_name=) continues from its newest intact checkpoint, if this command
    # trains the same way; damaged ones are set aside with a warning.
    resume_from = checkpoint.resume_point(run_dir, cfg, state, say)
    # The local record keeps the lines up to the checkpoint (the steps after it are trained again);
    # a run that starts at step 0 starts a fresh record.
    resumed_step = checkpoint.position(resume_from)["step"] if resume_from else None
    log_with, init_kwargs = tracking.trackers(cfg, run_dir, resumed_step, state.is_main_process, wandb_mode)
    compiled = decide_compile(cfg, state, sync_batchnorm, say)
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=cfg.trainer.grad_accum_steps,
        # The loaders yield GLOBAL batches; each process takes its slice, so the optimisation is
        # the same on 1 or N processes.
        dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=True),
        # "no" spelled out: without a plugin Accelerate reads ACCELERATE_DYNAMO_BACKEND / `accelerate
        # config` and compiles anyway, while this run's record would say compile=False.
        dynamo_plugin=TorchDynamoPlugin(backend="inductor" if compiled else "no"),
        log_with=log_with,
        project_dir=str(run_dir),
    )
    checkpoint.keep_plain_weights(accelerator)
    use_tf32(accelerator, cfg.trainer.tf32)
    if accelerator.device.type == "cuda":
        # cudnn.benchmark picks the fastest convolution for the (fixed, drop_last) training shapes once.
        torch.backends.cudnn.benchmark = True
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    say(f"run: {run_dir}  processes={accelerator.num_processes} device={accelerator.device.type} "
        f"mixed_precision={accelerator.mixed_precision} compile={compiled} micro_batch/process={micro_batch}")
    if warning := fewer_processes_than_asked(accelerator.num_processes):
        say(warning)

    train_loader, eval_loaders, on_device, splits_read = make_loaders(cfg, recipe, splits, meta, accelerator)
    batch_order = train_loader.batch_sampler  # Accelerate wraps the loader below; the loop sets its epoch
    inputs = recipes.model_inputs(recipe, cfg)
    # The columns the model and loss read, checked on one batch as the recipe's dataset and transform make
    # it, so a mistake is a message now and not a KeyError at the first step.
    recipes.check_batch(recipe, cfg, recipe.transform(next(iter(eval_loaders["eval"])), False, meta))

    model = recipe.model(cfg, meta)
    optim.init_weights(model, cfg.model.init, recipes.activation(recipe, cfg))
    if sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    layer_stats = hooks.LayerStats(model) if cfg.debug.hooks else None  # no hooks at all when off
    optimizer = optim.optimizer(cfg.optimizer, model.parameters())
    steps_per_epoch = optim.steps(len(train_loader), cfg.trainer.grad_accum_steps)
    scheduler = optim.scheduler(cfg.scheduler, optimizer, steps_per_epoch, cfg.trainer.epochs)
    # Batches of rows that already live on the training device need no per-step move (Accelerate's
    # device placement walks every batch); rows in host memory for a GPU are moved as they come.
    move_batches = not on_device and accelerator.device.type != "cpu"
    loaders = [train_loader, *eval_loaders.values()]
    model, optimizer, train_loader, *prepared = accelerator.prepare(
        model, optimizer, *loaders, *([scheduler] if scheduler else []),
        device_placement=[True, True, *[move_batches] * len(loaders), *([True] if scheduler else [])])

    runtime = runinfo.runtime(accelerator, compiled)
    tracking.init(accelerator, cfg.project, {**as_dict(cfg), "runtime": runtime}, init_kwargs)
    if accelerator.is_main_process:
        tracking.write_json(run_dir / "meta.json", meta)
    say(f"data: train {splits_read['train']['rows']:,} rows, {steps_per_epoch} steps/epoch; "
        + ", ".join(f"{k} {splits_read[k]['rows']:,} rows" for k in eval_loaders) + "; "
        + "; ".join(f"{k} {v['path']}: {v['why']}" for k, v in splits_read.items()))
    return Run(cfg=cfg, recipe=recipe, meta=meta, run_dir=run_dir, accelerator=accelerator, model=model,
               optimizer=optimizer, scheduler=scheduler, train_loader=train_loader, batch_order=batch_order,
               eval_loaders=dict(zip(eval_loaders, prepared)),
               metrics=make_metrics(recipe, cfg, meta, accelerator.device),
               loss_fn=recipes.loss_fn(recipe, cfg), inputs=inputs, steps_per_epoch=steps_per_epoch,
               layer_stats=layer_stats, compiled=compiled, runtime=runtime, resume_from=resume_from,
               data_paths=splits_read)


def make_loaders(cfg, recipe, splits: dict, meta: dict, accelerator):
    """Each split as whole tensors in memory (on the GPU when they fit) or read from its shards a batch at a
    time; the same batches either way. Returns the train loader, the eval/test loaders, whether the rows
    live on the device, and each split's row count and path ({"path": "memory" | "stream", "why": ...})."""
    chosen = data.choose_paths(cfg, splits, processes_on_node(accelerator), recipe.dataset is not None)
    # Decided on each process from its node's memory; all must take the same path.
    in_memory = {name: all_agree(accelerator, keep) for name, (keep, _) in chosen.items()}
    paths = {name: {"path": "memory" if in_memory[name] else "stream",
                    "why": why if in_memory[name] == keep else "another process's memory budget"}
             for name, (keep, why) in chosen.items()}
    tensors = {name: data.columns(split) for name, split in splits.items() if in_memory[name]}
    streamed = [name for name in splits if not in_memory[name]]
    if streamed and cfg.data.on_device is Switch.true and accelerator.device.type == "cuda":
        raise ConfigError(f"data.on_device=true keeps whole splits on the GPU, but {', '.join(streamed)} "
                          f"would be read from the shards ({paths[streamed[0]]['why']}); add data.in_memory=true, "
                          f"or leave data.on_device=auto")
    on_device = not streamed and all_agree(accelerator, keep_on_device(cfg, accelerator, tensors))
    make = recipe.dataset or (lambda cols, meta, split: data.Rows(cols))
    rows = {name: make(tensors[name], meta, name) if in_memory[name] else data.stream(split)
            for name, split in splits.items()}
    if on_device:
        rows = {name: r.to(accelerator.device) for name, r in rows.items()}
    # Data that stays in host memory goes to the GPU from pinned pages, without waiting (non_blocking).
    workers = 0 if on_device else cfg.data.num_workers
    pin = accelerator.device.type == "cuda" and not on_device
    train_loader = data.loader(rows["train"], cfg.trainer.batch_size // cfg.trainer.grad_accum_steps,
                               train=True, seed=cfg.seed, num_workers=workers, step_batch=cfg.trainer.batch_size,
                               pin_memory=pin)
    if len(train_loader) == 0:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} is larger than the train split "
                          f"({len(rows['train'])} rows); lower it")
    eval_loaders = {name: data.loader(rows[name], cfg.trainer.eval_batch_size, train=False, seed=cfg.seed,
                                      num_workers=workers, pin_memory=pin) for name in ("eval", "test") if name in rows}
    data.check_shared_memory([train_loader, *eval_loaders.values()])
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


def make_run_dir(cfg, state: PartialState, recipe_name: str) -> Path:
    """`<output_dir>/<recipe>/<run_name>/`, chosen on the main process and shared with the others."""
    name = [None]
    if state.is_main_process:
        base = Path(cfg.output_dir) / recipe_name
        run_name = cfg.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
        path = base / run_name
        if cfg.run_name and (path / "summary.json").exists():
            raise ConfigError(f"run {path} already finished; pick another run_name= or remove it")
        if cfg.run_name and not cfg.checkpoint.resume and checkpoint.latest(path):
            raise ConfigError(f"run {path} has checkpoints and checkpoint.resume=false would start it over; "
                              f"resume it (checkpoint.resume=true), pick another run_name=, or remove it")
        suffix = 1
        while not cfg.run_name and path.exists():  # two runs started in the same second
            suffix += 1
            path = base / f"{run_name}-{suffix}"
        path.mkdir(parents=True, exist_ok=True)
        name = [str(path)]
    if state.num_processes > 1:
        broadcast_object_list(name)
    return Path(name[0])


def keep_on_device(cfg, accelerator, tensors: dict) -> bool:
    """Whole prepared data on the GPU when it takes under a quarter of the free memory."""
    if accelerator.device.type != "cuda" or cfg.data.on_device is Switch.false:
        return False
    if cfg.data.on_device is Switch.true:
        return True
    free, _ = torch.cuda.mem_get_info(accelerator.device)
    return sum(data.nbytes(t) for t in tensors.values()) < free / 4


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
    return {head: m.to(device) for head, m in metrics.items()}


def _never() -> bool:
    return False




"""The train/eval loop every recipe shares: the one place to follow a run from config to weights.

Accelerate owns devices, processes, precision, accumulation and trackers; this is its client.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import accelerate
import accelerate.optimizer
import torch
from accelerate import PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    TorchDynamoPlugin,
    broadcast_object_list,
    set_seed,
)
from omegaconf import OmegaConf

from pipeline import checkpoint, data, hooks, optim, tracking
from pipeline import recipe as recipes
from pipeline.config import ConfigError, Switch, as_dict, flag, to_yaml

# Accelerate's optimizer step asks the file system twice per step whether the optional `lomo_optim`
# package is installed (importlib find_spec): ~100 us a step, a third of a small model's step on a
# CPU. The answer cannot change during a run, so it is asked once.
accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)
# Its zero_grad likewise reads the wrapped optimizer's signature on every call (inspect.signature
# unwraps torch's decorators: 7-25 us a step); the signature of a given optimizer's method is fixed.
accelerate.optimizer.inspect = SimpleNamespace(
    **{**vars(inspect), "signature": functools.lru_cache(maxsize=16)(inspect.signature)})


PLAIN_BACKWARD = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


class Accelerator(accelerate.Accelerator):
    """Accelerate's, minus one op a step on the plain path of `backward`."""

    def backward(self, loss, **kwargs):
        # Accelerate divides the loss by the accumulation steps before every backward, by 1 too: one more
        # op and autograd node a step (3-4% of mnist_mlp's ~350-us CPU step). Without accumulation, loss
        # scaling (fp16) or an engine of its own (DeepSpeed, Megatron, LOMO), its backward is exactly this.
        if (self.gradient_accumulation_steps == 1 and self.scaler is None and not kwargs
                and self.distributed_type in PLAIN_BACKWARD):
            loss.backward()
        else:
            super().backward(loss, **kwargs)


def train(cfg) -> dict:
    """Trains and evaluates `cfg.recipe`; returns the summary also written to `<run>/summary.json`."""
    started = time.perf_counter()
    recipe = recipes.load(cfg.recipe)
    # Without any accelerator, Accelerate only forms a multi-process (gloo) group when told cpu=True.
    cpu = not torch.accelerator.is_available()
    state = PartialState(cpu=cpu)
    micro_batch = check_batches(cfg, state.num_processes)
    sync_batchnorm = check_sync_batchnorm(cfg, state)
    say = state.print
    say(to_yaml(cfg).rstrip())
    # Shards first (built once, while the other processes wait): missing data stops the run before
    # it leaves a run directory behind.
    shards = data.prepare(recipe, cfg, state, log=say)
    run_dir = make_run_dir(cfg, state)
    # An interrupted run (same run_name=) continues from its newest intact checkpoint, if this command
    # trains the same way; damaged ones are set aside with a warning.
    resume_from = checkpoint.resume_point(run_dir, cfg, state, say)
    # The local record keeps the lines up to the checkpoint (the steps after it are trained again);
    # a run that starts at step 0 starts a fresh record.
    resumed_step = checkpoint.position(resume_from)["step"] if resume_from else None
    log_with, init_kwargs = tracking.trackers(cfg, run_dir, resumed_step, main=state.is_main_process)
    compile_model = flag(cfg.trainer.compile, state.device.type == "cuda")
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=cfg.trainer.grad_accum_steps,
        # The loaders yield GLOBAL batches; each process takes its slice, so the optimisation is
        # the same on 1 or N processes.
        dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=True),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if compile_model else None,
        log_with=log_with,
        project_dir=str(run_dir),
    )
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    say(f"run: {run_dir}  processes={accelerator.num_processes} device={accelerator.device.type} "
        f"mixed_precision={accelerator.mixed_precision} compile={compile_model} "
        f"micro_batch/process={micro_batch}")

    # ---- data: whole-split tensors indexed per batch
    splits, meta = data.load(shards)
    tensors = {name: data.columns(split) for name, split in splits.items()}
    on_device = keep_on_device(cfg, accelerator, tensors)
    make = recipe.dataset or (lambda cols, meta, split: data.Rows(cols))
    rows = {name: make(cols, meta, name) for name, cols in tensors.items()}
    if on_device:
        rows = {name: r.to(accelerator.device) for name, r in rows.items()}
    # Data that stays in host memory goes to the GPU from pinned pages, without waiting (non_blocking).
    workers = 0 if on_device else cfg.data.num_workers
    pin = accelerator.device.type == "cuda" and not on_device
    train_loader = data.loader(rows["train"], cfg.trainer.batch_size // cfg.trainer.grad_accum_steps,
                               train=True, seed=cfg.seed, num_workers=workers, step_batch=cfg.trainer.batch_size,
                               pin_memory=pin)
    eval_loaders = {name: data.loader(rows[name], cfg.trainer.eval_batch_size, train=False, seed=cfg.seed,
                                      num_workers=workers, pin_memory=pin) for name in ("eval", "test") if name in rows}
    batch_order = train_loader.batch_sampler  # the loop tells it the epoch; Accelerate wraps it below
    if len(train_loader) == 0:
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} is larger than the train split "
                          f"({len(rows['train'])} rows); lower it")

    # ---- model, optimizer, schedule
    model = recipe.model(cfg, meta)
    optim.init_weights(model, cfg.model.init, recipe.activation)
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
    eval_loaders = dict(zip(eval_loaders, prepared))
    metrics = make_metrics(recipe, cfg, meta, accelerator.device)
    loss_fn = recipes.loss_fn(recipe, cfg, meta)

    accelerator.init_trackers(cfg.project, config=as_dict(cfg), init_kwargs=init_kwargs)
    if accelerator.is_main_process:
        tracking.write_json(run_dir / "meta.json", meta)
    say(f"data: train {len(rows['train']):,} rows, {steps_per_epoch} steps/epoch; "
        + ", ".join(f"{k} {len(rows[k]):,} rows" for k in eval_loaders))

    # ---- resume
    position = {"step": 0, "epoch": 1, "batches": 0}
    if resume_from:
        position = checkpoint.load(accelerator, resume_from)
        say(f"resuming from {resume_from}: epoch {position['epoch']}, step {position['step']}")
    keep = cfg.checkpoint.keep
    every = cfg.checkpoint.every_steps if keep else 0
    stop_signal = checkpoint.StopSignal(enabled=keep > 0)  # without checkpoints SIGTERM just ends the run

    # ---- train and evaluate
    # Plain dataclasses on the hot path: an OmegaConf attribute read costs ~10 us, a step ~400 us.
    trainer, hooks_every = OmegaConf.to_object(cfg.trainer), cfg.debug.hooks_every
    # Accelerate's accumulate() skips the gradient sync of micro-batches between optimizer steps;
    # with one micro-batch a step it has nothing to skip, and its bookkeeping stays off the step.
    accumulating = trainer.grad_accum_steps > 1
    step, results, speed = position["step"], {}, Speed()
    progress = Progress(accelerator.is_main_process, steps_per_epoch * trainer.epochs)
    epoch = position["epoch"] - 1  # the epochs done, for the summary, if none are left to run
    for epoch in range(position["epoch"], trainer.epochs + 1):
        model.train()
        batch_order.epoch = epoch
        done = position["batches"] if epoch == position["epoch"] else 0  # micro-batches of this epoch
        # A run resumed mid-epoch skips the batches it already trained on (indices only, no data read).
        loader = accelerator.skip_first_batches(train_loader, done) if done else train_loader
        speed.resume()
        losses = []  # detached per-step losses, averaged at each log line (no sync, no extra op a step)
        for batch in loader:
            if layer_stats:
                layer_stats.active = (step + 1) % hooks_every == 0
            with accelerator.accumulate(model) if accumulating else nullcontext():
                batch = recipe.transform(batch, True, meta)
                outputs = model(*(batch[k] for k in recipe.inputs))
                loss = loss_fn(outputs, batch)
                accelerator.backward(loss)
                if trainer.clip_grad_norm and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), trainer.clip_grad_norm)
                optimizer.step()
                if scheduler:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            done += 1
            if accumulating and not accelerator.sync_gradients:
                continue
            step += 1
            speed.step(trainer.batch_size)
            if layer_stats and layer_stats.active:
                accelerator.log(layer_stats.collect(), step=step)
            stop = bool(trainer.max_steps) and step >= trainer.max_steps
            if step % trainer.log_every == 0 or step == steps_per_epoch * epoch or stop:
                # One cross-process reduction per log line, not per step: no sync on the hot path. It
                # carries the SIGTERM flags too: any process that got one makes all of them stop here.
                flags = torch.stack([torch.stack(losses).mean().float(),
                                     torch.tensor(float(stop_signal.received), device=accelerator.device)])
                train_loss, terminate = accelerator.reduce(flags, reduction="mean").tolist()
                losses.clear()
                logged = {"train/loss": train_loss, "train/lr": optimizer.param_groups[0]["lr"],
                          "epoch": epoch}
                accelerator.log(logged, step=step)
                results.update(logged)
                progress.update(step, epoch, train_loss, speed.rate())
                if terminate > 0:
                    saved = checkpoint.save(accelerator, run_dir, {"step": step, "epoch": epoch, "batches": done},
                                            keep)
                    stop_signal.close()
                    accelerator.end_training()
                    progress.close()
                    raise checkpoint.Preempted(f"stopped on SIGTERM after step {step}; saved {saved}. "
                                               f"The same command with run_name={run_dir.name} resumes it.")
            if every and step % every == 0 and done < len(train_loader):
                checkpoint.save(accelerator, run_dir, {"step": step, "epoch": epoch, "batches": done}, keep)
            if stop:
                break
        results.update(evaluate(model, eval_loaders["eval"], recipe, loss_fn, metrics, accelerator, meta, "eval"))
        accelerator.log({k: v for k, v in results.items() if k.startswith("eval/") and _scalar(v)}, step=step)
        progress.epoch(epoch, cfg.trainer.epochs, results)
        if cfg.trainer.max_steps and step >= cfg.trainer.max_steps:
            break
        if keep and epoch < trainer.epochs:  # after the last epoch the weights and summary follow
            checkpoint.save(accelerator, run_dir, {"step": step, "epoch": epoch + 1, "batches": 0}, keep)

    if "test" in eval_loaders:
        test = evaluate(model, eval_loaders["test"], recipe, loss_fn, metrics, accelerator, meta, "test")
        accelerator.log({k: v for k, v in test.items() if _scalar(v)}, step=step)
        results.update(test)

    # ---- outputs: weights, summary
    accelerator.wait_for_everyone()
    accelerator.save_model(model, run_dir, safe_serialization=True)
    summary = {"recipe": cfg.recipe, "run_dir": str(run_dir), "steps": step, "epochs": epoch,
               "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
               "compile": compile_model, **results, "train/samples_per_s": speed.rate(),
               "time/first_step_s": speed.first, "time/total_s": time.perf_counter() - started}
    if accelerator.is_main_process:
        tracking.write_json(run_dir / "summary.json", summary)
        # Checkpoints are for resuming an interrupted run; a finished one keeps its final weights.
        checkpoint.remove_all(run_dir)  # only the folders it wrote: a person's files stay
    stop_signal.close()
    progress.close()
    say(summary_line(summary))
    accelerator.end_training()
    return summary


@torch.no_grad()
def evaluate(model, loader, recipe, loss_fn, metrics, accelerator, meta, prefix: str) -> dict:
    """Loss and metrics over a whole split; every sample counts exactly once on any number of processes."""
    model.eval()
    loss_sum, seen = torch.zeros((), device=accelerator.device, dtype=torch.float64), 0
    for batch in loader:
        batch = recipe.transform(batch, False, meta)
        outputs = model(*(batch[k] for k in recipe.inputs))
        # gather_for_metrics drops the samples Accelerate repeated to even out the last batch.
        outputs, targets = accelerator.gather_for_metrics((outputs, {k: batch[k] for k in recipe.targets}))
        n = len(targets[recipe.targets[0]])
        loss_sum += loss_fn(outputs, targets).double() * n
        seen += n
        for head, (preds, target) in recipe.predictions(outputs, targets).items():
            metrics[head].update(preds, target)
    results = {f"{prefix}/loss": (loss_sum / max(seen, 1)).item(), f"{prefix}/samples": seen}
    for head, metric in metrics.items():
        name = f"{prefix}/{head}/" if head else f"{prefix}/"
        results.update(flatten(metric.compute(), name, meta.get("class_names")))
        metric.reset()
    return results


def make_metrics(recipe, cfg, meta, device) -> dict:
    """The recipe's metrics, updated with already-gathered values, so torchmetrics must not sync again."""
    metrics = recipe.metrics(cfg, meta)
    for metric in metrics.values():
        for m in metric.modules():
            if hasattr(m, "distributed_available_fn"):
                m.distributed_available_fn = _never
    return {head: m.to(device) for head, m in metrics.items()}


def _never() -> bool:
    return False


def flatten(values, prefix: str, class_names=None) -> dict:
    """torchmetrics results -> {name: float}; per-class vectors named by class; matrices kept as lists."""
    if not isinstance(values, dict):
        values = {"": values}
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}".rstrip("/")
        value = value.detach().cpu() if torch.is_tensor(value) else torch.as_tensor(value)
        if value.ndim == 0:
            out[name] = value.item()
        elif value.ndim == 1:
            labels = class_names if class_names and len(class_names) == len(value) else range(len(value))
            out.update({f"{name}/{label}": v.item() for label, v in zip(labels, value)})
        else:
            out[name] = value.tolist()
    return out


def _scalar(value) -> bool:
    return isinstance(value, (int, float))


def check_batches(cfg, num_processes: int) -> int:
    """The per-process micro-batch: batch_size / (processes x accumulation), which must divide."""
    parts = num_processes * cfg.trainer.grad_accum_steps
    if cfg.trainer.batch_size % parts:
        raise ConfigError(
            f"trainer.batch_size={cfg.trainer.batch_size} does not split into {num_processes} processes x "
            f"{cfg.trainer.grad_accum_steps} accumulation steps; use a multiple of {parts}")
    if cfg.trainer.eval_batch_size % num_processes:
        raise ConfigError(f"trainer.eval_batch_size={cfg.trainer.eval_batch_size} does not split into "
                          f"{num_processes} processes; use a multiple of {num_processes}")
    return cfg.trainer.batch_size // parts


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


def make_run_dir(cfg, state: PartialState) -> Path:
    """`<output_dir>/<recipe>/<run_name>/`, chosen on the main process and shared with the others."""
    name = [None]
    if state.is_main_process:
        base = Path(cfg.output_dir) / cfg.recipe
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


class Speed:
    """Training samples/s over train steps only (not evaluation), without the first step, which
    carries compilation and warm-up and is reported on its own."""

    def __init__(self):
        self.first, self.samples, self.elapsed, self.steps = None, 0, 0.0, 0
        self.last = time.perf_counter()

    def resume(self):
        self.last = time.perf_counter()

    def step(self, batch: int):
        now = time.perf_counter()
        spent, self.last = now - self.last, now
        self.steps += 1
        if self.steps == 1:
            self.first = spent
        else:
            self.samples += batch
            self.elapsed += spent

    def rate(self) -> float:
        return self.samples / self.elapsed if self.elapsed > 0 else 0.0


class Progress:
    """A bar on a terminal, plain lines in logs; main process only."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.tty = enabled, sys.stderr.isatty()
        self.bar = None
        if enabled and self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def update(self, step: int, epoch: int, loss: float, rate: float):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", samples_per_s=f"{rate:,.0f}")
        else:
            print(f"epoch {epoch} step {step} train/loss {loss:.4f} {rate:,.0f} samples/s", flush=True)

    def epoch(self, epoch: int, epochs: int, results: dict):
        if not self.enabled:
            return
        shown = {k: v for k, v in results.items()
                 if k.startswith("eval/") and _scalar(v) and k.count("/") <= 2 and not k.endswith("/samples")}
        line = f"epoch {epoch}/{epochs} " + " ".join(f"{k} {v:.4f}" for k, v in list(shown.items())[:8])
        (self.bar.write if self.bar is not None else print)(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def summary_line(summary: dict) -> str:
    keys = [k for k in summary if k.split("/")[0] in ("eval", "test") and _scalar(summary[k])
            and k.count("/") <= 2 and not k.endswith("/samples")][:8]
    shown = " ".join(f"{k}={summary[k]:.4f}" for k in keys)
    return (f"done: {summary['recipe']} {summary['epochs']} epochs {summary['steps']} steps "
            f"{summary['train/samples_per_s']:,.0f} samples/s {shown} -> {summary['run_dir']}")

"""The train/eval loop every recipe shares: the one place to follow a run from config to weights.

Accelerate owns devices, processes, precision, accumulation and trackers; this is its client.
"""

from __future__ import annotations

import errno
import functools
import inspect
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
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


# Steps before train/samples_per_s counts: the first carries compilation, the next ones the allocator's
# and autotuning's warm-up. launch/bench.py warms its other paths up for as many steps.
WARMUP_STEPS = 3

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
    # Checked before any work: an unwritable output_dir must not surface after the data was prepared.
    check_writable(cfg)
    # Shards first (built once, while the other processes wait): missing data stops the run before
    # it leaves a run directory behind.
    shards = data.prepare(recipe, cfg, state, log=say)
    splits, meta = data.load(shards)  # a damaged shard stops the run here too, before its directory exists
    run_dir = make_run_dir(cfg, state)
    # An interrupted run (same run_name=) continues from its newest intact checkpoint, if this command
    # trains the same way; damaged ones are set aside with a warning.
    resume_from = checkpoint.resume_point(run_dir, cfg, state, say)
    # The local record keeps the lines up to the checkpoint (the steps after it are trained again);
    # a run that starts at step 0 starts a fresh record.
    resumed_step = checkpoint.position(resume_from)["step"] if resume_from else None
    log_with, init_kwargs = tracking.trackers(cfg, run_dir, resumed_step, main=state.is_main_process)
    compile_model = decide_compile(cfg, state, sync_batchnorm, say)
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=cfg.trainer.grad_accum_steps,
        # The loaders yield GLOBAL batches; each process takes its slice, so the optimisation is
        # the same on 1 or N processes.
        dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=True),
        # "no" spelled out: without a plugin Accelerate reads ACCELERATE_DYNAMO_BACKEND / `accelerate
        # config` and compiles anyway, while this run's record would say compile=False.
        dynamo_plugin=TorchDynamoPlugin(backend="inductor" if compile_model else "no"),
        log_with=log_with,
        project_dir=str(run_dir),
    )
    keep_plain_weights(accelerator)
    if accelerator.device.type == "cuda":
        # TF32 keeps fp32's range with a 10-bit mantissa: several times the fp32 matmul speed on Ampere+ for
        # a precision that SGD noise swamps. cudnn.benchmark picks the fastest convolution for the (fixed,
        # drop_last) training shapes once.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.trainer.tf32
        torch.backends.cudnn.benchmark = True
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    say(f"run: {run_dir}  processes={accelerator.num_processes} device={accelerator.device.type} "
        f"mixed_precision={accelerator.mixed_precision} compile={compile_model} "
        f"micro_batch/process={micro_batch}")

    # ---- data: whole-split tensors indexed per batch
    tensors = {name: data.columns(split) for name, split in splits.items()}
    # Decided on each process from its own GPU's free memory; all must take the same path.
    on_device = all_agree(accelerator, keep_on_device(cfg, accelerator, tensors))
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

    tracking.init(accelerator, cfg.project, as_dict(cfg), init_kwargs)
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
    step, results, speed = position["step"], {}, Speed(accelerator.device)
    progress = Progress(accelerator.is_main_process, steps_per_epoch * trainer.epochs)
    epoch = position["epoch"] - 1  # the epochs done, for the summary, if none are left to run
    for epoch in range(position["epoch"], trainer.epochs + 1):
        model.train()
        batch_order.epoch = epoch
        done = position["batches"] if epoch == position["epoch"] else 0  # micro-batches of this epoch
        # A run resumed mid-epoch skips the batches it already trained on (indices only, no data read).
        loader = skip_batches(accelerator, train_loader, done) if done else train_loader
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
                # NaN or inf on any process makes the mean so: every process stops at the same line.
                check_finite({"train/loss": train_loss}, step, run_dir, accelerator)
                if terminate > 0:
                    check_weights(model, step, run_dir, accelerator)
                    with disk_full_guard(run_dir, "a checkpoint", accelerator):
                        saved = checkpoint.save(accelerator, run_dir,
                                                {"step": step, "epoch": epoch, "batches": done}, keep)
                    stop_signal.close()
                    accelerator.end_training()
                    progress.close()
                    raise checkpoint.Preempted(f"stopped on SIGTERM after step {step}; saved {saved}. "
                                               f"The same command with run_name={run_dir.name} resumes it.")
            if every and step % every == 0 and done < len(train_loader):
                check_weights(model, step, run_dir, accelerator)  # a checkpoint never holds NaN weights
                with disk_full_guard(run_dir, "a checkpoint", accelerator):
                    checkpoint.save(accelerator, run_dir, {"step": step, "epoch": epoch, "batches": done}, keep)
            if stop:
                break
        speed.pause()
        results.update(evaluate(model, eval_loaders["eval"], recipe, loss_fn, metrics, accelerator, meta, "eval"))
        check_finite({"eval/loss": results["eval/loss"]}, step, run_dir, accelerator)
        accelerator.log({k: v for k, v in results.items() if k.startswith("eval/") and _scalar(v)}, step=step)
        progress.epoch(epoch, cfg.trainer.epochs, results)
        if cfg.trainer.max_steps and step >= cfg.trainer.max_steps:
            break
        if keep and epoch < trainer.epochs:  # after the last epoch the weights and summary follow
            check_weights(model, step, run_dir, accelerator)
            with disk_full_guard(run_dir, "a checkpoint", accelerator):
                checkpoint.save(accelerator, run_dir, {"step": step, "epoch": epoch + 1, "batches": 0}, keep)

    if "test" in eval_loaders:
        test = evaluate(model, eval_loaders["test"], recipe, loss_fn, metrics, accelerator, meta, "test")
        accelerator.log({k: v for k, v in test.items() if _scalar(v)}, step=step)
        results.update(test)

    # ---- outputs: weights, summary
    accelerator.wait_for_everyone()
    # The plain module's weights: a compiled model's keys would carry `_orig_mod.` and load nowhere else.
    check_weights(model, step, run_dir, accelerator)
    with disk_full_guard(run_dir, "the final weights", accelerator):
        accelerator.save_model(accelerator.unwrap_model(model, keep_torch_compile=False), run_dir,
                               safe_serialization=True)
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


class Diverged(RuntimeError):
    """The loss became NaN or inf: the run stops, keeps its checkpoints and writes no summary."""

    exit_code = 3


def check_finite(values: dict, step: int, run_dir: Path, accelerator) -> None:
    """Stops the run on a non-finite loss (every process sees the same reduced value, so all stop)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if not bad:
        return
    accelerator.end_training()
    last = checkpoint.latest(run_dir)
    kept = (f"The last checkpoint, {last}, was saved before the loss went bad; the same command resumes from it."
            if last else "No checkpoint was saved before it.")
    raise Diverged(
        f"{', '.join(f'{k} is {v}' for k, v in bad.items())} at step {step}: training diverged and was stopped "
        f"(no summary.json or weights written). {kept}\nLikely causes: a learning rate too high (lower "
        f"optimizer.lr), non-finite or unscaled values in the input data, fp16 overflow (use bf16, or "
        f"trainer.clip_grad_norm=1.0). Start a new run with the fix: run_name=<new name>.")


def check_weights(model, step: int, run_dir: Path, accelerator) -> None:
    """Before any save: one pass over the weights (the loss of a step is taken before its update)."""
    bad = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all().logical_not().float()
    if accelerator.reduce(bad, reduction="sum").item():
        check_finite({"weights": float("nan")}, step, run_dir, accelerator)


@contextmanager
def disk_full_guard(run_dir: Path, what: str, accelerator):
    """A full disk while saving becomes one message; the incomplete checkpoint is removed."""
    try:
        yield
    except Exception as e:  # OSError, torch's zip writer (RuntimeError "unexpected pos"), SafetensorError
        free = shutil.disk_usage(run_dir).free
        full = any(getattr(x, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
                   or "No space left on device" in str(x) for x in _chain(e))
        if not full and free >= 1 << 20:
            raise
        if accelerator.is_main_process:
            for tmp in checkpoint.folder(run_dir).glob(".tmp-step-*"):
                shutil.rmtree(tmp, ignore_errors=True)
        last = checkpoint.latest(run_dir)
        raise data.DataError(
            f"disk full while writing {what} to {run_dir} ({free:,} bytes free; {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else e!r}).\nFix: free space there or point output_dir= at a "
            f"larger disk. " + (f"The last complete checkpoint, {last}, is intact: rerun the same command "
                                f"to resume from it." if last else "No complete checkpoint exists yet.")) from None


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def check_writable(cfg) -> None:
    """`output_dir` and `data.cache_dir` must be folders this process can write, or become ones."""
    for key in ("output_dir", "data.cache_dir"):
        path = Path(OmegaConf.select(cfg, key)).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"{key}={path}: {existing} is a file, not a folder; point {key}= at a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={path}: {existing} is not writable by this user; point {key}= at a "
                              f"writable folder (e.g. {key}=$HOME/{Path(OmegaConf.select(cfg, key)).name})")


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


def keep_plain_weights(accelerator) -> None:
    """Checkpoints hold the plain module's weights, so they load with compile on or off, on any device.

    Accelerate saves the prepared model as it is: `_orig_mod.` (torch.compile) and `module.` (DDP) end up
    in the keys, and a checkpoint loads only into a model wrapped the same way. FSDP and DeepSpeed save
    their own way and are left alone.
    """
    if accelerator.distributed_type not in PLAIN_BACKWARD:
        return

    def plain(model):
        return accelerator.unwrap_model(model, keep_torch_compile=False)

    def save(models, weights, output_dir):
        weights[:] = [plain(m).state_dict() for m in models]

    def load(models, input_dir):
        models[:] = [plain(m) for m in models]  # Accelerate's own list for this load, not its models

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def all_agree(accelerator, decision: bool) -> bool:
    """True only when every process decided True."""
    if accelerator.num_processes == 1:
        return decision
    votes = torch.tensor(float(decision), device=accelerator.device)
    return accelerator.reduce(votes, reduction="sum").item() == accelerator.num_processes


def skip_batches(accelerator, loader, batches: int):
    """`skip_first_batches`, keeping the loader's non-blocking host-to-GPU copies (Accelerate drops them)."""
    skipped = accelerator.skip_first_batches(loader, batches)
    if hasattr(loader, "_non_blocking"):
        skipped._non_blocking = loader._non_blocking
    return skipped


class Speed:
    """Training samples/s over train steps only (not evaluation), after WARMUP_STEPS steps; the first
    step, which carries compilation, is reported on its own.

    Steps run without a sync; on CUDA the clock is read after one at the measured boundaries (the end of
    the warm-up, the start and end of each epoch's steps), so the kernels still queued there count.
    """

    def __init__(self, device: torch.device):
        self.sync = functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else (lambda: None)
        self.first, self.samples, self.elapsed, self.steps = None, 0, 0.0, 0
        self.last = time.perf_counter()

    def resume(self):
        """An epoch's steps begin (evaluation before them is not timed)."""
        self.sync()
        self.last = time.perf_counter()

    def step(self, batch: int):
        self.steps += 1
        if self.steps in (1, WARMUP_STEPS):
            self.sync()
        now = time.perf_counter()
        spent, self.last = now - self.last, now
        if self.steps == 1:
            self.first = spent
        elif self.steps > WARMUP_STEPS:
            self.samples += batch
            self.elapsed += spent

    def pause(self):
        """An epoch's steps end: the GPU work still queued belongs to them."""
        if self.steps > WARMUP_STEPS:
            self.sync()
            now = time.perf_counter()
            self.elapsed, self.last = self.elapsed + now - self.last, now

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

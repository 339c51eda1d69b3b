"""The train/eval loop every recipe shares: the one place to follow a run from config to weights.

Accelerate owns devices, processes, precision, accumulation and trackers; this is its client.
`train` tells the story; a step, a log line, an epoch's end and the outputs are the functions it calls.
"""

from __future__ import annotations

import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline import checkpoint, console, files, plots, report, resume, rng, runinfo, tracking
from pipeline.best import Best
from pipeline.build import Evaluation, TrainingRun, setup
from pipeline.errors import Preempted
from pipeline.guards import check_finite, check_weights, disk_full_guard
from pipeline.recipe import Recipe
from pipeline.recipe_contract import load_recipe
from pipeline.run_folder import RunFolder
from pipeline.together import all_or_none

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
class LoopState:
    """What the loop carries from step to step: where the run stands, the latest results, the best evaluation
    so far, speed and progress lines, and the stop signal (SIGTERM, Ctrl-C)."""

    position: Position
    best: Best
    speed: report.Speed
    progress: report.Progress
    stop_signal: checkpoint.StopSignal
    started: float  # time.perf_counter() when the command started
    results: dict = field(default_factory=dict)
    epochs_done: int = 0

    def close(self) -> None:
        self.stop_signal.close()
        self.progress.close()


def train(cfg, recipe: Recipe | None = None) -> dict:
    """Trains and evaluates a recipe (`cfg.recipe` unless given); returns the summary also written to
    `<run>/summary.json`."""
    started = time.perf_counter()
    folder = RunFolder()  # setup makes and locks it; a start that fails gives it up again
    try:
        run = setup(cfg, recipe or load_recipe(cfg.recipe), folder)
    except BaseException:
        folder.abandon()
        raise
    console.attach(run.run_dir)  # other tools' output from here on (and held till now) into <run>/console.log
    record = run.record = runinfo.start(run)  # run.json: "running" now, how it ended below
    state = start_state(run, started)
    try:
        for epoch in range(state.position.epoch, run.trainer.epochs + 1):
            if epoch > state.position.epoch:
                state.position = Position(state.position.step, epoch, 0)
            at_max_steps = train_epoch(run, state)
            end_epoch(run, state, last=at_max_steps or epoch == run.trainer.epochs)
            state.epochs_done = epoch
            if at_max_steps or state.best.stopped_early:
                break
        summary = finish(run, state)
        runinfo.end(run, record)
        return summary
    except BaseException as e:
        runinfo.end(run, record, e)
        raise
    finally:
        state.close()
        folder.release()


def start_state(run: TrainingRun, started: float) -> LoopState:
    """The loop's state at its first step: from the checkpoint `setup` chose to resume from, or fresh."""
    accelerator, cfg = run.accelerator, run.cfg
    position, saved = Position(), None
    if run.resume_from:
        saved = resume.load_checkpoint(accelerator, run.resume_from)
        position = Position.of(saved)
        accelerator.print(f"resuming from {run.resume_from}: epoch {position.epoch}, step {position.step}")
        # Seeded as the checkpoint was saved, on any process count and device layout (Accelerate restores
        # only a saved process's own file, and CUDA states by device index).
        rng.seed_model(cfg.seed, accelerator.process_index, position.step)
    best = Best.of(cfg, (saved or {}).get("best"), accelerator.print)
    speed = report.Speed(accelerator.device)
    progress = report.Progress(
        accelerator.is_main_process, run.steps_per_epoch, run.trainer.epochs, run.trainer.batch_size
    )
    # Without checkpoints SIGTERM and Ctrl-C end the run at once: there is nothing to save for a resume.
    stop_signal = checkpoint.StopSignal(enabled=cfg.checkpoint.keep > 0, say=accelerator.print)
    return LoopState(position, best, speed, progress, stop_signal, started, epochs_done=position.epoch - 1)


def train_epoch(run: TrainingRun, state: LoopState) -> bool:
    """One pass over the training batches (the rest of one, when resumed mid-epoch). True when the run
    reached trainer.max_steps."""
    accelerator, layer_stats, trainer = run.accelerator, run.layer_stats, run.trainer
    position, speed = state.position, state.speed
    hooks_every, seed = run.cfg.debug.hooks_every, run.cfg.seed
    every = run.cfg.checkpoint.every_steps if run.cfg.checkpoint.keep else 0
    # Accelerate's accumulate() skips the gradient sync of micro-batches between optimizer steps;
    # with one micro-batch a step it has nothing to skip, and its bookkeeping stays off the step.
    accumulating = trainer.grad_accum_steps > 1
    run.model.train()
    run.batch_order.epoch = position.epoch
    # A run resumed mid-epoch skips the batches it already trained on (indices only, no data read).
    loader = run.train_loader
    if position.batches:
        loader = resume.skip_batches(accelerator, loader, position.batches)
    losses = []  # detached per-step losses, averaged at each log line (no sync, no extra op a step)
    stop = False
    speed.resume()
    for batch in loader:
        rng.DRAWS.at(seed, position.epoch, position.batches)  # this global micro-batch's augmentation
        if layer_stats:
            layer_stats.active = (position.step + 1) % hooks_every == 0
        with accelerator.accumulate(run.model) if accumulating else nullcontext():
            losses.append(train_step(run, batch, trainer.clip_grad_norm))
        position.batches += 1
        if accumulating and not accelerator.sync_gradients:
            continue
        position.step += 1
        speed.step(trainer.batch_size)
        state.progress.step(position.step, position.epoch)
        if layer_stats and layer_stats.active:
            accelerator.log(layer_stats.collect(), step=position.step)
        stop = bool(trainer.max_steps) and position.step >= trainer.max_steps
        if position.step % trainer.log_every == 0 or position.step == run.steps_per_epoch * position.epoch or stop:
            log_line(run, state, losses)
        if every and position.step % every == 0 and position.batches < len(run.train_loader):
            save_checkpoint(run, position, state.best)
        if stop:
            break
    speed.pause()
    return stop


def train_step(run: TrainingRun, batch: dict, clip_grad_norm: float | None) -> torch.Tensor:
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


def log_line(run: TrainingRun, state: LoopState, losses: list) -> None:
    """The mean loss since the last line, in one cross-process reduction (none on the other steps). It
    carries the stop flags too: any process that got SIGTERM or Ctrl-C makes all of them stop after this step."""
    accelerator, position, stop_signal = run.accelerator, state.position, state.stop_signal
    flags = torch.stack(
        [
            torch.stack(losses).mean().float(),
            torch.tensor(float(stop_signal.received), device=accelerator.device),
            torch.tensor(float(stop_signal.interrupted), device=accelerator.device),
        ]
    )
    train_loss, terminate, interrupted = accelerator.reduce(flags, reduction="mean").tolist()
    losses.clear()
    logged = {"train/loss": train_loss, "train/lr": run.optimizer.param_groups[0]["lr"], "epoch": position.epoch}
    rate = state.speed.rate()  # 0 until the warm-up steps are over
    accelerator.log({**logged, **({"train/samples_per_s": rate} if rate else {})}, step=position.step)
    state.results.update(logged)
    state.progress.update(position.step, position.epoch, train_loss, rate)
    # NaN or inf on any process makes the mean so: every process stops at the same line.
    check_finite({"train/loss": train_loss}, position.step, run.run_dir, accelerator)
    if terminate > 0:
        saved = save_checkpoint(run, position, state.best)
        accelerator.end_training()
        # Every process exits with one code: Ctrl-C's where any process had one (a terminal sends it to all).
        name, code = ("Ctrl-C", 128 + signal.SIGINT) if interrupted > 0 else ("SIGTERM", 128 + signal.SIGTERM)
        raise Preempted(
            f"stopped on {name} after step {position.step}; saved {saved}. "
            f"The same command with run_name={run.run_dir.name} resumes it.",
            code,
        )


def end_epoch(run: TrainingRun, state: LoopState, last: bool) -> None:
    """Evaluation on the held-out split, the best weights when it is the best so far, then a checkpoint to
    resume from (none after the last epoch, or when the run stops early: the weights and summary follow)."""
    position, results, best = state.position, state.results, state.best
    evaluated = evaluate(run, "eval")
    results.update(evaluated)
    check_finite({"eval/loss": results["eval/loss"]}, position.step, run.run_dir, run.accelerator)
    improved = best.update(evaluated, position.step, position.epoch, run.accelerator)
    tracking.define_best(run.accelerator, best.monitor, best.mode)  # before the values it summarizes
    run.accelerator.log(
        {**{k: v for k, v in results.items() if k.startswith("eval/") and report.scalar(v)}, "epoch": position.epoch},
        step=position.step,
    )
    state.progress.epoch(position.epoch, run.trainer.epochs, results)
    if improved:
        save_best(run, position.step)
    if best.stopped_early:
        run.accelerator.print(f"stopping early after epoch {position.epoch}: {best.stopped_early}")
    if run.cfg.checkpoint.keep and not last and not best.stopped_early:
        save_checkpoint(run, Position(position.step, position.epoch + 1, 0), best)


def save_checkpoint(run: TrainingRun, position: Position, best: Best) -> Path:
    check_weights(run.model, position.step, run.run_dir, run.accelerator)  # never a checkpoint of NaN weights
    # Seeded as a resume from this checkpoint seeds it, so that the resumed run continues as this one does.
    rng.seed_model(run.cfg.seed, run.accelerator.process_index, position.step)
    with disk_full_guard(run.run_dir, "a checkpoint", run.accelerator):
        return checkpoint.save(
            run.accelerator,
            run.run_dir,
            position.as_dict(),
            run.cfg.checkpoint.keep,
            {"best": best.state(), "data": run.data_identity},
        )


def save_best(run: TrainingRun, step: int) -> None:
    """<run>/best.safetensors: written beside it and renamed, so a kill never leaves half a file under that name."""
    accelerator = run.accelerator
    check_weights(run.model, step, run.run_dir, accelerator)
    tmp = run.run_dir / ".tmp-best"  # a fixed name inside the run folder, which one run at a time holds (run.lock)
    with disk_full_guard(run.run_dir, "the best weights", accelerator, partial=(tmp.name,)):
        # save_model lists the folder on every process: none may still be in it when the main one removes it.
        with all_or_none(accelerator):
            save_weights(accelerator, run.model, tmp, max_shard_size=BEST_SHARD_SIZE)  # one file to rename
        with all_or_none(accelerator):
            if accelerator.is_main_process:
                (tmp / "model.safetensors").replace(run.run_dir / "best.safetensors")
                tmp.rmdir()
                runinfo.weights_saved(run, "best.safetensors")


def save_weights(accelerator, model, folder: Path, **kwargs) -> None:
    # The plain module's weights: a compiled model's keys would carry `_orig_mod.` and load nowhere else.
    accelerator.save_model(
        accelerator.unwrap_model(model, keep_torch_compile=False), folder, safe_serialization=True, **kwargs
    )
    if accelerator.is_main_process:
        files.as_umask_allows(Path(folder).glob("model*.safetensors"))


def finish(run: TrainingRun, state: LoopState) -> dict:
    """The final weights, then the weights the run reports (checkpoint.weights: the best evaluation's by default)
    scored on the test split, and summary.json with both; a finished run keeps no checkpoints."""
    accelerator, step, results, best = run.accelerator, state.position.step, state.results, state.best
    accelerator.wait_for_everyone()
    check_weights(run.model, step, run.run_dir, accelerator)
    # A truncated model.safetensors would look like a finished run's weights: removed on a full disk.
    with (
        disk_full_guard(run.run_dir, "the final weights", accelerator, partial=("model*.safetensors*",)),
        all_or_none(accelerator),
    ):
        save_weights(accelerator, run.model, run.run_dir)
    runinfo.weights_saved(run, "model.safetensors")
    weights = reported_weights(run, state)
    if "test" in run.eval_loaders:
        test = evaluate(run, "test")
        accelerator.log({k: v for k, v in test.items() if report.scalar(v)}, step=step)
        results.update(test)
    timings = {
        "train/samples_per_s": state.speed.rate(),
        "time/first_step_s": state.speed.first,
        "time/total_s": time.perf_counter() - state.started,
    }
    # Also as the trackers' last values, so the W&B summary holds them (W&B's summary is each key's last value).
    accelerator.log({k: v for k, v in {**best.summary(), **timings}.items() if report.scalar(v)}, step=step)
    class_names = run.meta.get("class_names")
    tracking.log_classifier(accelerator, results, class_names, step)
    if run.cfg.tracking.log_model:
        tracking.log_model(accelerator, run.run_dir)
    summary = {
        "recipe": run.recipe.name,
        "run_dir": str(run.run_dir),
        "steps": step,
        "epochs": state.epochs_done,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "compile": run.compiled,
        "data": run.data_paths,
        **weights,
        **results,
        **best.summary(),
        **timings,
    }
    with all_or_none(accelerator):
        if accelerator.is_main_process:
            files.write_json(run.run_dir / "summary.json", summary)
            checkpoint.remove_all(run.run_dir)  # only the folders it wrote: a person's files stay
            plots.write(run.run_dir, summary, class_names, say=accelerator.print)
    accelerator.print(report.summary_line(summary))
    accelerator.end_training()
    return summary


def reported_weights(run: TrainingRun, state: LoopState) -> dict:
    """checkpoint.weights=best: the model takes best.safetensors for the test split and the summary, whose eval
    scores are evaluated again when those are not the weights it ended with; final (or no evaluation): as trained."""
    best = state.best
    if run.cfg.checkpoint.weights.name == "final" or best.step is None:
        return {"weights": "final"}
    if best.step != state.position.step:
        # Read to host memory and copied into the model where it lives (safetensors names a device by its own
        # rules: the "cpu:0" of a multi-process CPU run is not one).
        weights = load_file(run.run_dir / "best.safetensors")
        run.accelerator.unwrap_model(run.model, keep_torch_compile=False).load_state_dict(weights)
        state.results.update(evaluate(run, "eval"))
    return {"weights": "best"}


@torch.no_grad()
def evaluate(run: Evaluation, split: str) -> dict:
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
            metrics[head].update(report.wide(preds), report.wide(target))
    results = {f"{split}/loss": (loss_sum / max(seen, 1)).item(), f"{split}/samples": seen}
    for head, metric in metrics.items():
        name = f"{split}/{head}/" if head else f"{split}/"
        results.update(report.flatten(metric.compute(), name, run.meta.get("class_names")))
        metric.reset()
    return results

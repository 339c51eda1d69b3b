"""Resuming: the checkpoint a run continues from (damaged ones set aside), the checks that it trains the same
way on the same data, and its state loaded back on any number of processes."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

from accelerate.checkpointing import load_accelerator_state
from accelerate.utils import broadcast_object_list
from omegaconf import OmegaConf

from pipeline.checkpoint import CONFIG_FILE, complete, damage, folder, ours, position
from pipeline.config import to_yaml
from pipeline.errors import ConfigError
from pipeline.files import flat
from pipeline.fingerprints import NOT_CONTENT
from pipeline.runinfo import data_change

# Keys that may differ when a run resumes: where things are, what is logged, how fast data is read,
# when to stop. Any other difference changes the training and is refused (see `check_config`).
MAY_CHANGE = (
    "output_dir",
    "run_name",
    "tracking",
    "tracking.",
    "project",
    "trainer.log_every",
    "trainer.eval_batch_size",
    "trainer.max_steps",
    "trainer.early_stopping_patience",
    "checkpoint.",
    "debug.",
    *(f"data.{key}" for key in NOT_CONTENT),
)
# trainer.epochs may change too (a run extended or cut short), unless the LR schedule is spread over
# all the epochs: then the lr of every step depends on their number.
SCHEDULES_OVER_THE_RUN = ("cosine", "onecycle")


def resume_point(run_dir: Path, cfg, state, say=print, data: dict | None = None) -> Path | None:
    """The checkpoint this run continues from, or None to start at step 0. Chosen on the main process
    (which sets damaged checkpoints aside) and shared with the others; a refusal is raised on all.
    `data`: the main process's `runinfo.data_identity` of the shards this command trains on."""
    answer = ["", ""]  # checkpoint, error
    if state.is_main_process:
        try:
            answer[0] = str(_choose(Path(run_dir), cfg, state.num_processes, say, data) or "")
        except ConfigError as e:
            answer[1] = str(e)
    if state.num_processes > 1:
        broadcast_object_list(answer)
    if answer[1]:
        raise ConfigError(answer[1])
    return Path(answer[0]) if answer[0] else None


def _choose(run_dir: Path, cfg, num_processes: int, say, data: dict | None) -> Path | None:
    found = complete(run_dir)
    if not cfg.checkpoint.resume:
        # The run starts over (a run with an intact checkpoint is refused before this). Its damaged
        # checkpoints are set aside, so none can be mistaken for, or pruned instead of, the new run's.
        for path in found:
            if problem := damage(path):
                say(f"starting over: the damaged checkpoint {path} ({problem}) is set aside as {set_aside(path).name}")
        return None
    damaged = []
    for path in reversed(found):
        problem = damage(path)
        if problem is None:
            break
        damaged.append((path, problem))
    else:
        path = None
    if path is None and damaged:
        lines = "\n".join(f"  checkpoint {bad} is damaged: {problem}" for bad, problem in damaged)
        raise ConfigError(
            f"no intact checkpoint to resume from:\n{lines}\nTo start this run over (the damaged checkpoints "
            f"are set aside), run\n  {same_command('checkpoint.resume=false')}\nor train under another "
            f"name:\n  {same_command('run_name=<new name>')}"
        )
    if path is not None:
        check_config(path, cfg)
        check_data(path, cfg, data, say)
        if (saved := position(path).get("num_processes", num_processes)) != num_processes:
            say(
                f"resuming a checkpoint saved by {_processes(saved)} on {num_processes}: "
                f"{rng_mapping(saved, num_processes)}"
            )
    for bad, problem in damaged:
        say(
            f"warning: checkpoint {bad} is damaged ({problem}); resuming from the one before it. "
            f"The damaged one is set aside as {set_aside(bad).name}"
        )
    return path


def set_aside(checkpoint: Path) -> Path:
    """Renames a damaged checkpoint out of the way (kept to look at; removed when the run finishes)."""
    aside = checkpoint.with_name(f"damaged-{checkpoint.name}")
    if ours(aside):
        shutil.rmtree(aside)  # set aside by an earlier attempt
    checkpoint.rename(aside)
    return aside


def same_command(extra: str) -> str:
    """This process's command line with `extra` in place of the argument of the same key."""
    key = extra.split("=")[0] + "="
    args = [a for a in sys.argv[1:] if not a.removeprefix("--").startswith(key)]
    return shlex.join(["python", sys.argv[0], *args]) + " " + extra


def rng_mapping(saved: int, now: int) -> str:
    """Whose random-number state each of `now` processes takes from a checkpoint of `saved` processes.

    Weights, optimizer and schedule are saved once and the batch order depends on the seed and epoch only,
    so only the per-process RNG states tie a checkpoint to its process count; see `load_rng_state`."""
    if now < saved:
        unused = f"process {now}'s is" if saved - now == 1 else f"those of processes {now}-{saved - 1} are"
        return f"each process takes its own RNG state; {unused} unused"
    own = "process 0 takes its own RNG state" if saved == 1 else f"processes 0-{saved - 1} take their own RNG states"
    takers = f"process {saved} takes" if now - saved == 1 else f"processes {saved}-{now - 1} take"
    return f"{own}; {takers} process 0's"


def _processes(n: int) -> str:
    return f"{n} process" + ("es" if n != 1 else "")


def check_config(checkpoint: Path, cfg) -> None:
    """Stops when this command would train differently from the run that saved `checkpoint`: resuming
    would mix the two while the run's config.yaml shows only the new values."""
    saved_file = Path(checkpoint) / CONFIG_FILE
    if not saved_file.exists():  # saved before checkpoints kept their config
        return
    saved, now = flat(_plain(saved_file.read_text())), flat(_plain(to_yaml(cfg)))
    absent = "(absent)"
    changed = [
        key
        for key in sorted(saved.keys() | now.keys())
        if saved.get(key, absent) != now.get(key, absent) and not _may_change(key, saved, now)
    ]
    if changed:
        lines = "\n".join(
            f"  {key}: {saved.get(key, absent)} in the checkpoint, {now.get(key, absent)} now"
            + (" (the lr schedule spans all epochs)" if key == "trainer.epochs" else "")
            for key in changed
        )
        raise ConfigError(
            f"this command trains differently from the run that saved {checkpoint}, and resuming would "
            f"mix the two:\n{lines}\nResume with the checkpoint's values (they are in {saved_file}); or "
            f"train the new values as a new run:\n  {same_command('run_name=<new name>')}\nor start this "
            f"run over with them: remove its checkpoints (rm -r {folder(Path(checkpoint).parent.parent)}/step-*) "
            f"and run the command again"
        )


def check_data(checkpoint: Path, cfg, now: dict | None, say) -> None:
    """Stops when the shards this command trains on are not those `checkpoint` was trained on (their
    fingerprint differs): resuming would train one model on two data sets. `checkpoint.allow_data_change=true`
    lets it go on, said here and recorded in run.json."""
    if now is None:  # not the main process
        return
    saved = position(checkpoint).get("data")
    if saved is None:
        say(
            f"note: checkpoint {checkpoint} was saved before checkpoints recorded their data: it resumes "
            f"without a check that its data is the same"
        )
        return
    if saved["fingerprint"] == now["fingerprint"]:
        return
    change = data_change(saved, now)
    if cfg.checkpoint.allow_data_change:
        say(
            f"warning: resuming {checkpoint} on other data (checkpoint.allow_data_change=true): {change}. "
            f"The model continues on the new data; run.json records the change under data_changes"
        )
        return
    raise ConfigError(
        f"the data changed since checkpoint {checkpoint} was saved: {change}.\nResuming would train one model "
        f"on two data sets. Train on this data as a new run:\n  {same_command('run_name=<new name>')}\nor "
        f"continue this run on it knowingly (run.json records it):\n  "
        f"{same_command('checkpoint.allow_data_change=true')}\nor put back the data it was trained on"
    )


def _may_change(key: str, saved: dict, now: dict) -> bool:
    if any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE):
        return True
    schedules = {str(saved.get("scheduler.name")), str(now.get("scheduler.name"))}
    return key == "trainer.epochs" and not schedules & set(SCHEDULES_OVER_THE_RUN)


def _plain(text: str) -> dict:
    """Both configs go through the same YAML text, so values compare alike (Enums by name, tuples as lists)."""
    return OmegaConf.to_container(OmegaConf.create(text))


def load_checkpoint(accelerator, checkpoint: Path) -> dict:
    """Restores what `save` wrote into the prepared objects; returns the saved position."""
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as e:  # its files are as saved (see `damage`): they do not fit what this code built
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"checkpoint {checkpoint} does not fit the model or optimizer this command builds "
            f"({type(e).__name__}: {first}); was the recipe's code changed since it was saved? Restore that "
            f"code to resume, or train under another name: {same_command('run_name=<new name>')}"
        ) from None
    load_rng_state(accelerator, checkpoint)
    return position(checkpoint)


def load_rng_state(accelerator, checkpoint: Path) -> None:
    """A process the checkpoint has no RNG state for (it was saved by fewer processes) takes process 0's.

    `load_state` reads only `random_states_<own index>.pkl`; when that is missing it logs at info level and
    keeps the seed's state. What matters in it after a resume is Accelerate's step counter (it times the
    gradient sync of accumulated micro-batches), alike on every process: torch's CPU and CUDA streams are
    seeded again by the loop (rng.seed_model, from seed, process index and step) on any process count or
    device layout. Accelerate's own loader, given no objects, restores the states and the step counter.
    """
    saved = position(checkpoint).get("num_processes", accelerator.num_processes)
    if accelerator.process_index < saved:
        return  # its own state, loaded by load_state
    # The file is in the manifest, so `damage` checked it before this checkpoint was chosen.
    restored = load_accelerator_state(str(checkpoint), [], [], [], [], process_index=0)
    if "step" in restored:
        accelerator.step = restored["step"]


def skip_batches(accelerator, loader, batches: int):
    """`skip_first_batches`, keeping the loader's non-blocking host-to-GPU copies (Accelerate drops them)."""
    skipped = accelerator.skip_first_batches(loader, batches)
    if hasattr(loader, "_non_blocking"):
        skipped._non_blocking = loader._non_blocking
    return skipped

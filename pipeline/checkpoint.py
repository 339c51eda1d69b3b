"""Checkpoints: the whole training state through Accelerate's `save_state`, and finding it again to resume.

A checkpoint is written under a temporary name and renamed when complete, so a crash never leaves one
that looks usable; a manifest of its files (sizes, sha256) shows later damage before anything is loaded.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path

from accelerate.checkpointing import load_accelerator_state
from accelerate.utils import DistributedType, broadcast_object_list
from omegaconf import OmegaConf

from pipeline.config import to_yaml
from pipeline.errors import ConfigError, DataError
from pipeline.files import as_umask_allows, flat, sha256, write_json
from pipeline.fingerprints import NOT_CONTENT
from pipeline.runinfo import data_change
from pipeline.together import all_or_none

# Where the prepared model is the module itself, at most wrapped by DDP and torch.compile (FSDP and
# DeepSpeed shard and save their own way).
PLAIN_STATE = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
STATE_FILE = "trainer_state.json"  # where the loop stands: step, epoch, micro-batches into the epoch
CONFIG_FILE = "config.yaml"  # the run's config when the checkpoint was saved
MANIFEST = "manifest.json"  # every other file's size and sha256, written last
RNG_FILE = re.compile(r"random_states_\d+\.pkl")
# The only folders this module writes into checkpoints/, and so the only ones it ever removes.
OURS = re.compile(r"(\.tmp-|damaged-)?step-\d{8}")

# Keys that may differ when a run resumes: where things are, what is logged, how fast data is read,
# when to stop. Any other difference changes the training and is refused (see `check_config`).
MAY_CHANGE = ("output_dir", "run_name", "tracking", "tracking.", "project", "trainer.log_every",
              "trainer.eval_batch_size", "trainer.max_steps", "trainer.early_stopping_patience",
              "checkpoint.", "debug.",
              *(f"data.{key}" for key in NOT_CONTENT))
# trainer.epochs may change too (a run extended or cut short), unless the LR schedule is spread over
# all the epochs: then the lr of every step depends on their number.
SCHEDULES_OVER_THE_RUN = ("cosine", "onecycle")


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def ours(path: Path) -> bool:
    """A folder this module wrote: `step-N` (or one set aside as damaged) with its state, or a `.tmp-step-N`."""
    if not OURS.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
        return False
    return path.name.startswith(".tmp-") or (path / STATE_FILE).exists() or (path / MANIFEST).exists()


def complete(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints (renamed into place, intact or not), oldest first."""
    root = folder(run_dir)
    found = [p for p in root.glob("step-*") if OURS.fullmatch(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files are as they were saved."""
    return next((p for p in reversed(complete(run_dir)) if damage(p) is None), None)


def save(accelerator, run_dir: Path, position: dict, keep: int, loop_state: dict | None = None) -> Path:
    """Model, optimizer, scheduler, every process's RNG state, `position` (with the loop's own `loop_state`,
    e.g. the best evaluation so far) and the run's config; keeps the newest `keep`.

    Every process calls it at the same step (each writes its own RNG state); the output directory must
    be one that all processes see.
    """
    root = folder(run_dir)
    final = root / f"step-{position['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    # Each step ends on every process together, an error on one raised on all (pipeline/together.py).
    with all_or_none(accelerator):
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save
    with all_or_none(accelerator):
        accelerator.save_state(str(tmp))
    with all_or_none(accelerator):
        if accelerator.is_main_process:
            as_umask_allows(p for p in tmp.rglob("*") if p.is_file())
            write_json(tmp / STATE_FILE, {**position, **(loop_state or {}), "num_processes": accelerator.num_processes})
            if (Path(run_dir) / CONFIG_FILE).exists():  # what trained up to here, for `check_config`
                shutil.copyfile(Path(run_dir) / CONFIG_FILE, tmp / CONFIG_FILE)
            write_manifest(tmp)
            publish(tmp, final)
            for old in complete(run_dir)[:-keep]:
                shutil.rmtree(old)
    return final


def publish(tmp: Path, final: Path) -> None:
    """The finished `tmp` renamed to `final`, replacing a checkpoint of ours at that step (never a folder a
    person put there)."""
    if ours(final):
        shutil.rmtree(final)
    elif final.exists():
        raise DataError(f"{final} is in the way of the checkpoint of that step: it is not a checkpoint this "
                        f"pipeline wrote.\nFix: move it out of {final.parent}, or use another output_dir=.")
    tmp.rename(final)


def write_manifest(checkpoint: Path) -> None:
    # sha256 reads the files back once (~1.7 GB/s on one core): milliseconds for this pipeline's models.
    files = {p.relative_to(checkpoint).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    write_json(checkpoint / MANIFEST, {"files": files})



def damage(checkpoint: Path) -> str | None:
    """What is wrong with the files of `checkpoint` (None: they are as saved), naming each damaged file."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / MANIFEST).exists():  # saved before manifests: only its state can be checked
        try:
            return None if "step" in position(checkpoint) else f"{STATE_FILE} has no step"
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{STATE_FILE} is unreadable ({type(e).__name__})"
    try:
        files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    problems = []
    for name, saved in files.items():
        path = checkpoint / name
        if not path.is_file():
            problem = f"{name} is missing"
        elif path.stat().st_size != saved["size"]:
            problem = f"{name} has {path.stat().st_size:,} bytes, {saved['size']:,} were saved"
        elif sha256(path) != saved["sha256"]:
            problem = f"{name} differs from what was saved (sha256)"
        else:
            continue
        if RNG_FILE.fullmatch(name):  # Accelerate would skip it with an info log: an inexact resume
            problem += " - it is a random-number state: a resume without it would not repeat the same numbers"
        problems.append(problem)
    return "; ".join(problems) or None


def position(checkpoint: Path) -> dict:
    """Where the loop stood when `checkpoint` was saved: step, epoch, micro-batches into the epoch."""
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


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
                say(f"starting over: the damaged checkpoint {path} ({problem}) is set aside as "
                    f"{set_aside(path).name}")
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
            f"name:\n  {same_command('run_name=<new name>')}")
    if path is not None:
        check_config(path, cfg)
        check_data(path, cfg, data, say)
        if (saved := position(path).get("num_processes", num_processes)) != num_processes:
            say(f"resuming a checkpoint saved by {_processes(saved)} on {num_processes}: "
                f"{rng_mapping(saved, num_processes)}")
    for bad, problem in damaged:
        say(f"warning: checkpoint {bad} is damaged ({problem}); resuming from the one before it. "
            f"The damaged one is set aside as {set_aside(bad).name}")
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
    changed = [key for key in sorted(saved.keys() | now.keys())
               if saved.get(key, absent) != now.get(key, absent) and not _may_change(key, saved, now)]
    if changed:
        lines = "\n".join(f"  {key}: {saved.get(key, absent)} in the checkpoint, {now.get(key, absent)} now"
                          + (" (the lr schedule spans all epochs)" if key == "trainer.epochs" else "")
                          for key in changed)
        raise ConfigError(
            f"this command trains differently from the run that saved {checkpoint}, and resuming would "
            f"mix the two:\n{lines}\nResume with the checkpoint's values (they are in {saved_file}); or "
            f"train the new values as a new run:\n  {same_command('run_name=<new name>')}\nor start this "
            f"run over with them: remove its checkpoints (rm -r {folder(Path(checkpoint).parent.parent)}/step-*) "
            f"and run the command again")


def check_data(checkpoint: Path, cfg, now: dict | None, say) -> None:
    """Stops when the shards this command trains on are not those `checkpoint` was trained on (their
    fingerprint differs): resuming would train one model on two data sets. `checkpoint.allow_data_change=true`
    lets it go on, said here and recorded in run.json."""
    if now is None:  # not the main process
        return
    saved = position(checkpoint).get("data")
    if saved is None:
        say(f"note: checkpoint {checkpoint} was saved before checkpoints recorded their data: it resumes "
            f"without a check that its data is the same")
        return
    if saved["fingerprint"] == now["fingerprint"]:
        return
    change = data_change(saved, now)
    if cfg.checkpoint.allow_data_change:
        say(f"warning: resuming {checkpoint} on other data (checkpoint.allow_data_change=true): {change}. "
            f"The model continues on the new data; run.json records the change under data_changes")
        return
    raise ConfigError(
        f"the data changed since checkpoint {checkpoint} was saved: {change}.\nResuming would train one model "
        f"on two data sets. Train on this data as a new run:\n  {same_command('run_name=<new name>')}\nor "
        f"continue this run on it knowingly (run.json records it):\n  "
        f"{same_command('checkpoint.allow_data_change=true')}\nor put back the data it was trained on")


def _may_change(key: str, saved: dict, now: dict) -> bool:
    if any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE):
        return True
    schedules = {str(saved.get("scheduler.name")), str(now.get("scheduler.name"))}
    return key == "trainer.epochs" and not schedules & set(SCHEDULES_OVER_THE_RUN)


def _plain(text: str) -> dict:
    """Both configs go through the same YAML text, so values compare alike (Enums by name, tuples as lists)."""
    return OmegaConf.to_container(OmegaConf.create(text))


def load(accelerator, checkpoint: Path) -> dict:
    """Restores what `save` wrote into the prepared objects; returns the saved position."""
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as e:  # its files are as saved (see `damage`): they do not fit what this code built
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"checkpoint {checkpoint} does not fit the model or optimizer this command builds "
            f"({type(e).__name__}: {first}); was the recipe's code changed since it was saved? Restore that "
            f"code to resume, or train under another name: {same_command('run_name=<new name>')}") from None
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


def remove_all(run_dir: Path) -> None:
    """Removes a finished run's checkpoints: only the folders `save` wrote. Anything else a person put
    into checkpoints/ stays, and so does the folder then."""
    root = folder(run_dir)
    if not root.is_dir() or root.is_symlink():
        return
    for path in root.iterdir():
        if ours(path):
            shutil.rmtree(path)
    with contextlib.suppress(OSError):  # not empty: someone else's files
        root.rmdir()


def keep_plain_weights(accelerator) -> None:
    """Checkpoints hold the plain module's weights, so they load with compile on or off, on any device.

    Accelerate saves the prepared model as it is: `_orig_mod.` (torch.compile) and `module.` (DDP) end up
    in the keys, and a checkpoint loads only into a model wrapped the same way. FSDP and DeepSpeed save
    their own way and are left alone.
    """
    if accelerator.distributed_type not in PLAIN_STATE:
        return

    def plain(model):
        return accelerator.unwrap_model(model, keep_torch_compile=False)

    def save(models, weights, output_dir):
        weights[:] = [plain(m).state_dict() for m in models]

    def load(models, input_dir):
        models[:] = [plain(m) for m in models]  # Accelerate's own list for this load, not its models

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def skip_batches(accelerator, loader, batches: int):
    """`skip_first_batches`, keeping the loader's non-blocking host-to-GPU copies (Accelerate drops them)."""
    skipped = accelerator.skip_first_batches(loader, batches)
    if hasattr(loader, "_non_blocking"):
        skipped._non_blocking = loader._non_blocking
    return skipped


class StopSignal:
    """SIGTERM (a scheduler's preemption or time-limit warning) and the first Ctrl-C only raise a flag here.
    The loop sends the flag along with its next log-line reduction, so every process stops after the same
    step and saves. A second Ctrl-C stops at once (KeyboardInterrupt), saving nothing."""

    def __init__(self, enabled: bool = True, say=print):
        self.received, self.interrupted, self.previous, self.say = False, False, {}, say
        if enabled and threading.current_thread() is threading.main_thread():  # signals are set up there only
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._receive)

    def _receive(self, signum, frame):
        if signum == signal.SIGINT:
            if self.interrupted:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.interrupted = True
            self.say("Ctrl-C: stopping at the next log line and saving a checkpoint (Ctrl-C again stops at "
                     "once, unsaved)")
        self.received = True

    @property
    def name(self) -> str:
        return "Ctrl-C (SIGINT)" if self.interrupted else "SIGTERM"

    def close(self):
        """Gives the signals back to whoever had them (a test runner calling train() in-process, say)."""
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous = {}

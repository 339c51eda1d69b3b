"""Checkpoints: the whole training state through Accelerate's `save_state`, the last k kept, SIGTERM turned into
a save (finding one again and resuming from it: `resume`).

A checkpoint is written under a temporary name and renamed when complete, so a crash never leaves one
that looks usable; a manifest of its files (sizes, sha256) shows later damage before anything is loaded.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import threading
from pathlib import Path

from accelerate.utils import DistributedType

from pipeline.errors import DataError
from pipeline.files import as_umask_allows, sha256, write_json
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
        raise DataError(
            f"{final} is in the way of the checkpoint of that step: it is not a checkpoint this "
            f"pipeline wrote.\nFix: move it out of {final.parent}, or use another output_dir=."
        )
    tmp.rename(final)


def write_manifest(checkpoint: Path) -> None:
    # sha256 reads the files back once, which is small next to writing them for this pipeline's models.
    files = {
        p.relative_to(checkpoint).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file()
    }
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
            self.say(
                "Ctrl-C: stopping at the next log line and saving a checkpoint (Ctrl-C again stops at once, unsaved)"
            )
        self.received = True

    @property
    def name(self) -> str:
        return "Ctrl-C (SIGINT)" if self.interrupted else "SIGTERM"

    def close(self):
        """Gives the signals back to whoever had them (a test runner calling train() in-process, say)."""
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous = {}

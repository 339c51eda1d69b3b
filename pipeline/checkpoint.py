"""Checkpoints: the whole training state through Accelerate's `save_state`, and finding it again to resume.

A checkpoint is written under a temporary name and renamed when complete, so a crash never leaves one
that looks usable; `latest` only sees complete ones.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.tracking import write_json

STATE_FILE = "trainer_state.json"  # where the loop stands: step, epoch, micro-batches into the epoch


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    root = folder(run_dir)
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).exists()] if root.exists() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def latest(run_dir: Path) -> Path | None:
    found = complete(run_dir)
    return found[-1] if found else None


def save(accelerator, run_dir: Path, position: dict, keep: int) -> Path:
    """Model, optimizer, scheduler, every process's RNG state and `position`; keeps the newest `keep`.

    Every process calls it at the same step (each writes its own RNG state); the output directory must
    be one that all processes see.
    """
    root = folder(run_dir)
    final = root / f"step-{position['step']:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a crash during an earlier save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, {**position, "num_processes": accelerator.num_processes})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete(run_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def position(checkpoint: Path) -> dict:
    """Where the loop stood when `checkpoint` was saved: step, epoch, micro-batches into the epoch."""
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def check_resumable(checkpoint: Path, num_processes: int) -> None:
    """Stops before any work when the checkpoint was written by another number of processes."""
    saved = position(checkpoint).get("num_processes", num_processes)
    if saved != num_processes:
        raise ConfigError(
            f"{checkpoint} was saved by {saved} processes and this run has {num_processes}; resume with "
            f"{saved} processes (accelerate launch --num_processes {saved} ...), or start a new run_name=")


def load(accelerator, checkpoint: Path) -> dict:
    """Restores what `save` wrote into the prepared objects; returns the saved position."""
    accelerator.load_state(str(checkpoint))
    return position(checkpoint)


class Preempted(Exception):
    """The processes agreed to stop on SIGTERM and saved a checkpoint; the same command resumes."""

    exit_code = 128 + signal.SIGTERM


class StopSignal:
    """SIGTERM (a scheduler's preemption or time-limit warning) only raises a flag here. The loop sends
    the flag along with its next log-line reduction, so every process stops after the same step."""

    def __init__(self, enabled: bool = True):
        self.received, self.previous = False, None
        if enabled and threading.current_thread() is threading.main_thread():  # signals are set up there only
            self.previous = signal.signal(signal.SIGTERM, self._receive)

    def _receive(self, signum, frame):
        self.received = True

    def close(self):
        """Gives SIGTERM back to whoever had it (a test runner calling train() in-process, say)."""
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None

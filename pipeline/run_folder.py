"""The run's folder, `<output_dir>/<recipe>/<run_name>/`: chosen, made and locked by the main process, shared
with the others; given up again by a start that fails."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from accelerate import PartialState

from pipeline import checkpoint
from pipeline import lock as locks
from pipeline.errors import ConfigError
from pipeline.together import shared_verdict


@dataclass
class RunFolder:
    """The run's folder: made by this command (`created`) or an earlier attempt's; locked by the main process
    (`lock`), so one command at a time writes it."""

    path: Path | None = None
    created: bool = False
    lock: locks.Lock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def abandon(self) -> None:
        """After a failed start: a folder this command made holds only what the start wrote, and goes; an
        earlier attempt's folder (a resumed run) stays."""
        if self.lock is not None and self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        self.release()


def make_run_dir(cfg, state: PartialState, recipe_name: str, folder: RunFolder) -> Path:
    """`<output_dir>/<recipe>/<run_name>/`, chosen, made and locked on the main process and shared with the
    others; a refusal there stops every process with its message."""

    def choose() -> tuple[str, bool]:
        folder.path, folder.created = open_run_dir(cfg, recipe_name)
        folder.lock = locks.take(folder.path / locks.NAME, f"run {folder.path}", say=state.print)
        check_run_dir(cfg, folder)
        return str(folder.path), folder.created

    path, folder.created = shared_verdict(state, choose)
    folder.path = Path(path)
    return folder.path


def open_run_dir(cfg, recipe_name: str) -> tuple[Path, bool]:
    """The run's folder, made unless it exists (a run resumed by its run_name); True when made here."""
    base = Path(cfg.output_dir) / recipe_name
    base.mkdir(parents=True, exist_ok=True)
    run_name = cfg.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    path, suffix = base / run_name, 1
    while True:
        try:
            path.mkdir()
            return path, True
        except FileExistsError:
            if cfg.run_name:
                return path, False
        suffix += 1  # two runs started in the same second
        path = base / f"{run_name}-{suffix}"


def check_run_dir(cfg, folder: RunFolder) -> None:
    """Refuses a named run that finished, or whose checkpoints this command would start over; checked under
    the lock, so no live run is changing what is read. The lock is given back on a refusal."""
    path = folder.path
    try:
        if cfg.run_name and (path / "summary.json").exists():
            raise ConfigError(f"run {path} already finished; pick another run_name= or remove it")
        if cfg.run_name and not cfg.checkpoint.resume and checkpoint.latest(path):
            raise ConfigError(
                f"run {path} has checkpoints and checkpoint.resume=false would start it over; "
                f"resume it (checkpoint.resume=true), pick another run_name=, or remove it"
            )
    except ConfigError:
        folder.release()
        raise

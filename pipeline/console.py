"""The terminal during a run: the run's own lines and its errors. What other tools print (W&B's banner,
history and sync hints, Accelerate's, datasets' and torch's warnings) goes to `<run>/console.log` instead.

`--verbose` (or PIPELINE_VERBOSE=1) shows those lines on the terminal too, and the run's extra details.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from pathlib import Path

VERBOSE_ENV = "PIPELINE_VERBOSE"
LOG_FILE = "console.log"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class _Capture(io.TextIOBase):
    """Stands in for sys.stderr: text goes to console.log once the run folder is known (held until then),
    and to the terminal as well when verbose."""

    def __init__(self, terminal, echo: bool):
        super().__init__()
        self.terminal, self.echo = terminal, echo
        self.held, self.file = io.StringIO(), None

    def write(self, text: str) -> int:
        (self.file or self.held).write(text)
        if self.echo:
            self.terminal.write(text)
        return len(text)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()
        self.terminal.flush()

    def isatty(self) -> bool:
        return False  # no tool draws dynamic text into a file

    def fileno(self) -> int:
        return self.terminal.fileno()  # a child process started with the parent's stderr writes to the terminal

    def attach(self, path: Path) -> None:
        if self.file is None:
            self.file = open(path, "a", buffering=1)  # noqa: SIM115 (open while the run lasts; quiet() closes it)
            self.file.write(self.held.getvalue())
            self.held = io.StringIO()


_active: _Capture | None = None


def terminal():
    """The terminal's stream while the run's output is captured (for the progress bar), else sys.stderr."""
    return _active.terminal if _active is not None else sys.stderr


def attach(run_dir: Path) -> None:
    """From now on (and what was held before) into `<run_dir>/console.log`."""
    if _active is not None:
        _active.attach(Path(run_dir) / LOG_FILE)


@contextlib.contextmanager
def quiet():
    """Other tools' output into console.log for the duration of a run. Errors raised inside reach the terminal
    when they leave it; output held before the run folder existed is shown then, as it may explain them."""
    global _active
    saved = sys.stderr
    capture = _active = _Capture(saved, verbose())
    # Handlers made at import time (datasets' own) hold the stream itself, not sys.stderr (logging's last
    # resort reads sys.stderr each time: a property, not an attribute of its own).
    handlers = [h for h in all_handlers() if vars(h).get("stream") is saved]
    for handler in handlers:
        handler.setStream(capture)
    sys.stderr = capture
    try:
        yield capture
    except BaseException:
        finish_wandb()
        raise
    finally:
        sys.stderr, _active = saved, None
        for handler in handlers:
            handler.setStream(saved)
        if capture.file is not None:
            capture.file.close()
        elif not capture.echo:
            saved.write(capture.held.getvalue())


def all_handlers() -> list[logging.Handler]:
    named = list(logging.root.manager.loggerDict.values())  # placeholders for dotted names are not loggers
    loggers = [logging.root, *(logger for logger in named if isinstance(logger, logging.Logger))]
    return [handler for logger in loggers for handler in logger.handlers]


def finish_wandb() -> None:
    """A run that failed leaves its W&B run open, and W&B finishes it at exit, printing its summary to the
    terminal after the error: finished here, its summary goes to console.log."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        with contextlib.suppress(Exception):
            wandb.run.finish(exit_code=1)

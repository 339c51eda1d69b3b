"""The errors a command stops with for people to fix, each with the exit code it ends with and the status its
run records in run.json. `cli.main` handles them all in one place; `runinfo.outcome` reads them off the error.
"""

from __future__ import annotations

import signal


class PipelineError(Exception):
    """Stops a command with `error: <message>` and exit code 2; the message names the problem and the fix."""

    exit_code = 2
    status = "failed"  # the run's status in run.json
    prefix = "error: "  # before the message, as the command prints it


class ConfigError(PipelineError, ValueError):
    """A bad key or value; the message names it and the valid choices."""


class DataError(PipelineError, RuntimeError):
    """Raw data missing or unreadable; the message names the files and the fix."""


class DiskFull(DataError):
    """The disk filled up while writing; what was half-written is removed, and the message names the folder
    and how to free space or write elsewhere."""


class CompareError(PipelineError, ValueError):
    """A path that is not a run folder, or a metric no run logged; the message names it."""


class Diverged(PipelineError, RuntimeError):
    """The loss became NaN or inf: the run stops, keeps its checkpoints and writes no summary."""

    exit_code = 3
    status = "diverged"


class Preempted(PipelineError):
    """The processes agreed to stop on SIGTERM or Ctrl-C and saved a checkpoint; the same command resumes."""

    status = "preempted"
    prefix = ""  # not a mistake to fix: the message says where the run stopped and how it resumes

    def __init__(self, message: str, exit_code: int = 128 + signal.SIGTERM):
        super().__init__(message)
        self.exit_code = exit_code  # 143 for SIGTERM, 130 for Ctrl-C, as a shell reports them

"""One writer per folder: an exclusive lock file that names its holder (host, pid, since when), so a second
command on the same run folder stops with a message instead of writing into the live run.

The kernel's `flock` on the file is the lock: it is atomic, and it ends with its process however that process
ends (a SIGKILL too), so a lock left by a dead process on this host is taken over with a note. The text in the
file names the holder for the message, and decides where `flock` cannot: a lock written by another host is
not taken over, because this host cannot tell whether that run still writes (on a shared filesystem whose
locks do not reach across hosts, two hosts would both get the `flock`); its user removes the file once that
run is gone, as the message says. The one exception is a requeued Slurm job (same SLURM_JOB_ID, a higher
SLURM_RESTART_COUNT): Slurm requeues a job only once its earlier attempt has ended, on whatever node.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.files import pid_alive, process_start

NAME = "run.lock"  # in the run folder
# flock's answers on a filesystem without locks: the holder's text alone decides there.
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class Lock:
    """A lock taken by this process; `release` removes the file and ends the lock (also safe twice)."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):  # never another process's newer lock at this path
                self.path.unlink()
        finally:
            os.close(self.fd)  # ends the flock
            self.fd = None


def take(path: Path, what: str, say=print) -> Lock:
    """The lock file `path` for `what` (e.g. "run runs/digits/a"), or ConfigError naming its holder."""
    for _ in range(3):  # again when the holder removed the file between our open and our flock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder(path, wait=True)
            raise ConfigError(_held_message(what, path, holder, _alive_why(holder))) from None
        except OSError as e:
            if e.errno not in NO_LOCKS:
                os.close(fd)
                raise
        if not _same_file(fd, path):
            os.close(fd)
            continue
        try:
            _take_over(fd, path, what, say)
        except BaseException:
            os.close(fd)
            raise
        return Lock(path, fd)
    raise ConfigError(
        f"{what}: its lock file {path} keeps changing hands; another command is starting on it. "
        f"Wait for it, or use another folder"
    )


def me() -> dict:
    """What the lock file says about its holder."""
    pid, since = os.getpid(), datetime.now().astimezone().isoformat(timespec="seconds")
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "since": since,
        "process_start": process_start(pid),
        **_slurm_attempt(),
    }


def _slurm_attempt() -> dict:
    if not os.environ.get("SLURM_JOB_ID"):
        return {}
    return {"slurm_job": os.environ["SLURM_JOB_ID"], "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}


def _take_over(fd: int, path: Path, what: str, say) -> None:
    """Writes this process into the locked file; a holder written there before must be provably gone."""
    holder = _parse(os.pread(fd, 1 << 16, 0))
    if holder:
        gone = _gone(holder)
        if gone is None:
            raise ConfigError(_held_message(what, path, holder, _alive_why(holder)))
        say(f"note: {what} was locked by {_who(holder)}, which {gone}; this process takes the lock over")
    text = json.dumps(me()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, text, 0)
    os.fsync(fd)


def _gone(holder: dict) -> str | None:
    """How we know `holder` no longer runs, or None when we cannot know it (another host) or it runs."""
    mine = _slurm_attempt()
    if mine and holder.get("slurm_job") == mine["slurm_job"] and holder.get("slurm_restart", 0) < mine["slurm_restart"]:
        return f"was an earlier attempt of Slurm job {mine['slurm_job']}, which Slurm requeued"
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return "left no pid"
    if pid == os.getpid():
        return "is this process (a lock it did not release)"
    if not pid_alive(pid):
        return "no longer runs"
    started = holder.get("process_start")
    if started is not None and process_start(pid) not in (None, started):
        return "no longer runs (its pid now belongs to a newer process)"
    return None


def _alive_why(holder: dict) -> str:
    if holder.get("host") != socket.gethostname():
        return (
            "that is another host, which this one cannot check. If that run has ended (its host crashed or "
            "was reset), remove the lock file"
        )
    return "it is running"


def _held_message(what: str, path: Path, holder: dict, why: str) -> str:
    return (
        f"{what} is being written by {_who(holder)}: {why}. One folder takes one writer at a time.\n"
        f"Fix: wait until it ends, or give this one another name (run_name=<new name>); the lock is {path}"
    )


def _who(holder: dict) -> str:
    if not holder:
        return "another process (starting up)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"


def _holder(path: Path, wait: bool = False) -> dict:
    """The holder named in the file; with `wait`, for a moment: a holder writes its name just after its flock."""
    deadline = time.monotonic() + (2 if wait else 0)
    while True:
        try:
            holder = _parse(path.read_bytes())
        except OSError:
            holder = {}
        if holder or time.monotonic() >= deadline:
            return holder
        time.sleep(0.05)


def _parse(raw: bytes) -> dict:
    try:
        holder = json.loads(raw)
    except ValueError:  # empty (a holder about to write), or cut short by a crash
        return {}
    return holder if isinstance(holder, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False

"""Files and folders written whole or not at all, under names no other writer shares.

Each write goes to a new, uniquely named temporary file beside its target and is renamed into place, so
two writers of one target never mix their bytes (the last rename wins, whole), a person's own
`<name>.tmp` is never touched, and a kill leaves nothing under the target's name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from pathlib import Path

OWNER_FILE = ".owner.json"  # inside a temporary folder: which process writes it


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask sets it to read it)."""
    with suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    current = os.umask(0o022)
    os.umask(current)
    return current


def as_umask_allows(paths) -> None:
    """Gives files the mode a plain new file gets (0666 less the umask). safetensors writes its files as
    temporary files of mode 0600 and renames them (safetensors#782): weights that teammates on a shared
    filesystem could not read while they read everything else of the run."""
    mode = 0o666 & ~umask()
    for path in paths:
        os.chmod(path, mode)


@contextmanager
def replacing(path: Path, mode: str = "w", **open_kwargs) -> Iterator:
    """An open temporary file beside `path` that becomes `path` when the block ends without an error.

    Its permissions are those a plain `open(path, "w")` would give (mkstemp's are 0600: teammates reading
    a shared run folder could not open the result)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    with replacing(path) as f:
        f.write(text)


def temporary_folder(target: Path) -> Path:
    """A new, empty folder beside `target` (`<target>.tmp-<random>`) that records its writer (host, pid and
    the process's start time), so a later writer can tell a dead build's leftover from a live one's."""
    folder = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    folder.chmod(0o777 & ~umask())
    (folder / OWNER_FILE).write_text(json.dumps(owner()))
    return folder


def remove_dead_leftovers(target: Path, say=print) -> None:
    """Removes the temporary folders of `target` (and of its siblings) whose writer is provably gone: a
    process of this host that no longer exists. A live writer's folder, or another host's, is left alone."""
    for folder in target.parent.glob("*.tmp-*"):
        if folder.is_dir() and not owner_alive(_recorded_owner(folder)):
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            say(f"data: removing {folder} ({size / 2**20:.1f} MiB), left by a build that was killed")
            shutil.rmtree(folder, ignore_errors=True)


def _recorded_owner(folder: Path) -> dict | None:
    try:
        return json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        # Folders named `<name>.tmp-<pid>` (before owners were recorded) were always this host's.
        pid = folder.name.rpartition(".tmp-")[2]
        return {"host": socket.gethostname(), "pid": int(pid)} if pid.isdigit() else None


def owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid())}


def process_start(pid: int) -> int | None:
    """When the process started (clock ticks since boot, /proc/<pid>/stat field 22): a pid reused by another
    process has another start time. None where /proc does not tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def owner_alive(recorded: dict | None) -> bool:
    """False only when `recorded` names a process of this host that is gone (or whose pid now belongs to
    another process); anything unknown counts as alive, so nothing is removed on a guess."""
    if not recorded or recorded.get("host") != socket.gethostname() or not isinstance(recorded.get("pid"), int):
        return True
    pid = recorded["pid"]
    if not pid_alive(pid):
        return False
    started = recorded.get("started")
    return started is None or process_start(pid) in (None, started)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


_SCRATCH: ContextVar[Path | None] = ContextVar("scratch", default=None)


def scratch_folder() -> Path | None:
    """The folder for the intermediate files of the shard build under way (decoded rows that `datasets.map`'s
    workers write straight to disk, instead of returning them through this process's memory); None outside
    a build. It lies beside the shards, on the cache's disk, and is removed when the build ends."""
    return _SCRATCH.get()


@contextmanager
def scratch(target: Path):
    """A scratch folder for building `target` (see `scratch_folder`): a temporary folder, so that a killed
    build's is removed by the next build (`remove_dead_leftovers`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = temporary_folder(target.parent / f"{target.name}.scratch")
    token = _SCRATCH.set(folder)
    try:
        yield folder
    finally:
        _SCRATCH.reset(token)
        shutil.rmtree(folder, ignore_errors=True)


def write_json(path: Path, values: dict) -> None:
    write_text(path, dumps(values, indent=2) + "\n")


def dumps(values, **kwargs) -> str:
    """JSON that every reader parses: JSON has no NaN or Infinity, so a non-finite number is written as null."""
    return json.dumps(finite(values), allow_nan=False, **kwargs)


def finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def size_text(n: int) -> str:
    """Bytes as a person reads them: 1.2 GiB, 3.4 MiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def flat(config: dict, prefix: str = "") -> dict:
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}; values other than numbers and text as text."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out

"""`<run>/run.json`: what ran, where, with which code and libraries, and how it ended, with or without a tracker.

Written by the main process when training starts (status "running") and again when it ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipeline import fingerprints
from pipeline.errors import PipelineError
from pipeline.files import sha256, write_json

CODE = Path(__file__).resolve().parent.parent  # the checkout (or installed tree) holding this code
PACKAGES = ("torch", "accelerate", "datasets")
# Raw files a run's checkpoints name one by one (so a change names the file); above this, a count and a digest.
RAW_LISTED = 1000
GIT_SHA_ENV = "PIPELINE_GIT_SHA"  # set by the Dockerfile from `--build-arg GIT_SHA=...`: images carry no .git


def start(run) -> dict:
    """The record of this attempt, written as status "running". A resumed run keeps its first start time."""
    path = run.run_dir / "run.json"
    accelerator = run.accelerator
    earlier = read(path) if accelerator.is_main_process else {}
    record = {
        "status": "running",
        "exit_code": None,
        "error": None,
        "recipe": run.recipe.name,
        "run_dir": str(run.run_dir),
        "started": now(),
        "ended": None,
        "first_started": earlier.get("first_started") or earlier.get("started") or None,
        "attempt": earlier.get("attempt", 0) + 1,
        "resumed_from": str(run.resume_from) if run.resume_from else None,
        "git": run.runtime["git"],
        "versions": {"python": platform.python_version(), **{p: package_version(p) for p in PACKAGES}},
        "argv": sys.argv,
        "host": socket.gethostname(),
        **{k: v for k, v in run.runtime.items() if k != "git"},  # num_processes, device, mixed_precision, compile
        "data": {k: v for k, v in (run.data_identity or {}).items() if k != "raw"},
        "data_changes": earlier.get("data_changes", []) + data_changes(run),
        "weights": earlier.get("weights", {}),  # best.safetensors may be an earlier attempt's
    }
    record["first_started"] = record["first_started"] or record["started"]
    if accelerator.is_main_process:
        write_json(path, record)
    return record


def weights_saved(run, name: str) -> None:
    """Records the sha256 of the weights file `<run>/<name>` this run just wrote, so that evaluate and predict
    can tell the run's own weights from a file put there later."""
    path = run.run_dir / name
    if not run.accelerator.is_main_process or run.record is None or not path.is_file():
        return
    run.record["weights"][name] = sha256(path)
    write_json(run.run_dir / "run.json", run.record)


def data_identity(recipe, cfg, shards: Path) -> dict:
    """What a run trains on: the shards' fingerprint (their folder's name) and the raw files it was computed
    from, as a count and a digest, with each file (path: [size, mtime_ns]) up to RAW_LISTED of them."""
    stats = fingerprints.fingerprinted_stats(recipe, cfg)
    digest = hashlib.sha256("".join(f"{r}\0{s}\0{m}\n" for r, s, m in stats).encode()).hexdigest()[:16]
    record = {"fingerprint": Path(shards).name, "shards": str(shards), "raw_files": len(stats), "raw_digest": digest}
    if len(stats) <= RAW_LISTED:
        record["raw"] = {rel: [size, mtime_ns] for rel, size, mtime_ns in stats}
    return record


def data_change(saved: dict, now: dict) -> str:
    """What differs between two `data_identity` records: the raw files by name where both list them."""
    moved = f"the shards' fingerprint changed from {saved['fingerprint']} to {now['fingerprint']}"
    if saved.get("raw_digest") == now.get("raw_digest"):
        return (
            f"{moved}; the raw files are the same (paths, sizes, times), so the code that prepares them "
            f"changed (the recipe's prepare() or a helper it calls)"
        )
    if "raw" not in saved or "raw" not in now:
        return f"{moved}; the raw files differ ({saved['raw_files']:,} files then, {now['raw_files']:,} now)"
    before, after = saved["raw"], now["raw"]
    kinds = {
        "changed": [f for f in before if f in after and before[f] != after[f]],
        "added": [f for f in after if f not in before],
        "removed": [f for f in before if f not in after],
    }
    named = "; ".join(f"{kind}: {_named(files)}" for kind, files in kinds.items() if files)
    return f"raw files {named} ({moved})"


def _named(files: list[str], shown: int = 5) -> str:
    more = f" and {len(files) - shown:,} more" if len(files) > shown else ""
    return ", ".join(files[:shown]) + more


def data_changes(run) -> list[dict]:
    """This attempt's resume onto other data than its checkpoint's (allowed by checkpoint.allow_data_change)."""
    from pipeline import checkpoint

    if not run.resume_from or not run.data_identity:
        return []
    saved = checkpoint.position(run.resume_from).get("data")
    if not saved or saved["fingerprint"] == run.data_identity["fingerprint"]:
        return []
    return [
        {
            "checkpoint": str(run.resume_from),
            "from": saved["fingerprint"],
            "to": run.data_identity["fingerprint"],
            "change": data_change(saved, run.data_identity),
            "allowed_by": "checkpoint.allow_data_change=true",
            "at": now(),
        }
    ]


def runtime(accelerator, compiled: bool) -> dict:
    """What a run resolved at start-up and people filter runs by: the code's commit, the process count,
    the device, the precision and compile. In run.json and in the trackers' config (W&B's `runtime.*`)."""
    return {
        "git": git(),
        "num_processes": accelerator.num_processes,
        "device": device(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "compile": compiled,
    }


def end(run, record: dict, error: BaseException | None = None) -> None:
    """Rewrites the record with how the run ended: finished, or the error's status and exit code."""
    status, code = outcome(error)
    record.update(
        status=status,
        exit_code=code,
        ended=now(),
        error=(str(error).splitlines() or [type(error).__name__])[0][:500] if error else None,
    )
    if run.accelerator.is_main_process:
        write_json(run.run_dir / "run.json", record)


def outcome(error: BaseException | None) -> tuple[str, int]:
    """The status and the exit code launch/train.py ends with (see pipeline/cli.py)."""
    if error is None:
        return "finished", 0
    if isinstance(error, PipelineError):
        return error.status, error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", 130
    return "failed", 1


def git() -> dict:
    """The commit of the code that runs and whether its tracked or untracked files differ from it; from
    git where the code is a checkout, else from PIPELINE_GIT_SHA (an image's build argument)."""
    # Only the checkout this code is: an installed copy inside some other repository (a venv) is not its commit.
    top = _git("rev-parse", "--show-toplevel")
    sha = _git("rev-parse", "HEAD") if top and Path(top).resolve() == CODE else None
    if sha:
        status = _git("status", "--porcelain")
        return {"sha": sha, "dirty": None if status is None else bool(status), "source": "git"}
    if os.environ.get(GIT_SHA_ENV):
        return {"sha": os.environ[GIT_SHA_ENV], "dirty": None, "source": GIT_SHA_ENV}
    return {"sha": None, "dirty": None, "source": None}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(CODE), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):  # no git, or a hung file system
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def device(dev) -> str:
    """`cpu`, or `cuda (NVIDIA H100 80GB HBM3)`: the kind and, for GPUs, the model."""
    import torch

    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return dev.type


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}

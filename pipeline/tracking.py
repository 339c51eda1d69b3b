"""Experiment tracking behind Accelerate's tracker API: W&B, and a local record of every run.

The local record (config.yaml, metrics.jsonl, summary.json) is the source of truth offline.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process


class LocalRecord(GeneralTracker):
    """Appends every `accelerator.log(...)` call as one JSON line to `<run>/metrics.jsonl`."""

    name = "local"
    requires_logging_directory = False
    main_process_only = True

    @on_main_process
    def __init__(self, run_dir: Path, resumed_step: int | None = None):
        super().__init__()
        self.run_dir = Path(run_dir)
        path = self.run_dir / "metrics.jsonl"
        if resumed_step is not None and path.exists():
            keep_until(path, resumed_step)
        self.file = open(path, "a")

    @property
    def tracker(self):
        return self.file

    @on_main_process
    def store_init_configuration(self, values: dict):
        pass  # the resolved config is written as config.yaml before training starts

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    @on_main_process
    def finish(self):
        self.file.close()


def keep_until(path: Path, step: int) -> None:
    """Drops the lines logged after `step` (and a line cut short by a kill); written atomically."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if (json.loads(line).get("step") or 0) <= step:
                kept.append(line + "\n")
        except json.JSONDecodeError:
            pass
    write_atomic(path, "".join(kept))


def wandb_mode() -> str:
    """online when the user is logged in (WANDB_API_KEY or `wandb login`), offline otherwise.

    An explicit WANDB_MODE wins. Never prompts: wandb without a key would ask, or fail.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        if read_netrc_auth(host=os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")):
            return "online"
    except Exception:  # an internal helper of wandb; if it moves, offline is the safe answer
        pass
    return "offline"


def trackers(cfg, run_dir: Path, resumed_step: int | None = None, main: bool = True) -> tuple[list, dict]:
    """The `log_with` list for Accelerator and the matching `init_kwargs`; a run resumed from the
    checkpoint of `resumed_step` continues its local record (and its online W&B run) from there."""
    log_with: list = [LocalRecord(run_dir, resumed_step)]
    init_kwargs = {}
    if cfg.tracking.name == "wandb":
        log_with.append("wandb")
        mode = wandb_mode()
        init_kwargs["wandb"] = {"mode": mode, "dir": str(run_dir), "name": run_dir.name,
                                "group": cfg.recipe, "tags": [cfg.recipe]}
        # Online, every attempt of a run (a requeued job) logs into one W&B run, by an id kept in the
        # run directory. Offline runs get none: `wandb sync` of two offline parts with one id keeps
        # only one of them, so each attempt stays a run of its own. WANDB_RUN_ID, if set, wins.
        if mode == "online" and main and not os.environ.get("WANDB_RUN_ID"):
            init_kwargs["wandb"].update(id=wandb_run_id(run_dir), resume="allow")
    return log_with, init_kwargs


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory: made once, then read back by every attempt."""
    path = Path(run_dir) / "wandb_id"
    if not path.exists():
        write_atomic(path, secrets.token_hex(8) + "\n")
    return path.read_text().strip()


def write_json(path: Path, values: dict) -> None:
    write_atomic(path, json.dumps(values, indent=2) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Written to a temporary file and renamed, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)

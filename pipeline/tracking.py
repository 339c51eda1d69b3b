"""Experiment tracking behind Accelerate's tracker API: W&B, and a local record of every run.

The local record (config.yaml, metrics.jsonl, summary.json) is the source of truth offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process


class LocalRecord(GeneralTracker):
    """Appends every `accelerator.log(...)` call as one JSON line to `<run>/metrics.jsonl`."""

    name = "local"
    requires_logging_directory = False
    main_process_only = True

    @on_main_process
    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.file = open(self.run_dir / "metrics.jsonl", "a")

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


def trackers(cfg, run_dir: Path) -> tuple[list, dict]:
    """The `log_with` list for Accelerator and the matching `init_kwargs`."""
    log_with: list = [LocalRecord(run_dir)]
    init_kwargs = {}
    if cfg.tracking == "wandb":
        log_with.append("wandb")
        init_kwargs["wandb"] = {"mode": wandb_mode(), "dir": str(run_dir), "name": run_dir.name,
                                "group": cfg.recipe, "tags": [cfg.recipe]}
    return log_with, init_kwargs


def write_json(path: Path, values: dict) -> None:
    """Written to a temporary file and renamed, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(values, indent=2) + "\n")
    tmp.replace(path)

"""What stops a run cleanly instead of with a traceback or a result that looks valid: non-finite losses
and weights, a full disk while saving, output folders that cannot be written.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipeline import checkpoint
from pipeline.errors import ConfigError, DiskFull, Diverged


def check_finite(values: dict, step: int, run_dir: Path, accelerator) -> None:
    """Stops the run on a non-finite loss (every process sees the same reduced value, so all stop)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if not bad:
        return
    accelerator.end_training()
    last = checkpoint.latest(run_dir)
    kept = (
        f"The last checkpoint, {last}, was saved before the loss went bad; the same command resumes from it."
        if last
        else "No checkpoint was saved before it."
    )
    if (Path(run_dir) / "best.safetensors").exists():
        kept += f" {Path(run_dir) / 'best.safetensors'} holds the best evaluated weights from before it."
    raise Diverged(
        f"{', '.join(f'{k} is {v}' for k, v in bad.items())} at step {step}: training diverged and was stopped "
        f"(no summary.json or weights written). {kept}\nLikely causes: a learning rate too high (lower "
        f"optimizer.lr), non-finite or unscaled values in the input data, fp16 overflow (use bf16, or "
        f"trainer.clip_grad_norm=1.0). Start a new run with the fix: run_name=<new name>."
    )


def check_weights(model, step: int, run_dir: Path, accelerator) -> None:
    """Before any save: one pass over the weights (the loss of a step is taken before its update)."""
    bad = torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all().logical_not().float()
    if accelerator.reduce(bad, reduction="sum").item():
        check_finite({"weights": float("nan")}, step, run_dir, accelerator)


@contextmanager
def disk_full_guard(run_dir: Path, what: str, accelerator, partial: tuple[str, ...] = ()):
    """A full disk while saving becomes one message; what was half written is removed: an incomplete
    checkpoint, and the files of `run_dir` matching the `partial` patterns (what this save writes)."""
    try:
        yield
    except Exception as e:  # OSError, torch's zip writer (RuntimeError "unexpected pos"), SafetensorError
        free = shutil.disk_usage(run_dir).free
        full = any(
            getattr(x, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(x)
            for x in _chain(e)
        )
        if not full and free >= 1 << 20:
            raise
        if accelerator.is_main_process:
            half_written = [
                *checkpoint.folder(run_dir).glob(".tmp-step-*"),
                *(p for pattern in partial for p in run_dir.glob(pattern)),
            ]
            for path in half_written:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        last = checkpoint.latest(run_dir)
        raise DiskFull(
            f"disk full while writing {what} to {run_dir} ({free:,} bytes free; {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else e!r}).\nFix: free space there or point output_dir= at a "
            f"larger disk. "
            + (
                f"The last complete checkpoint, {last}, is intact: rerun the same command to resume from it."
                if last
                else "No complete checkpoint exists yet."
            )
        ) from None


def _chain(e: BaseException):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def check_writable(cfg) -> None:
    """`output_dir` and `data.cache_dir` must be folders this process can write, or become ones."""
    for key in ("output_dir", "data.cache_dir"):
        path = Path(OmegaConf.select(cfg, key)).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"{key}={path}: {existing} is a file, not a folder; point {key}= at a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{key}={path}: {existing} is not writable by this user; point {key}= at a "
                f"writable folder (e.g. {key}=$HOME/{Path(OmegaConf.select(cfg, key)).name})"
            )

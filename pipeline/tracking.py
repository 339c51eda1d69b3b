"""Experiment tracking behind Accelerate's tracker API: any tracker its `log_with` knows (W&B by
default, TensorBoard, MLflow, ...), and a local record of every run, the source of truth offline.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

from accelerate.tracking import GeneralTracker, get_available_trackers, on_main_process

from pipeline import files

# Speeds and durations go to the trackers and to summary.json, not into metrics.jsonl: the local record holds
from pipeline.errors import ConfigError

# what the training computed, so a resumed run's record is the same as an uninterrupted one's.
TIMINGS = ("train/samples_per_s", "time/")


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
        # A run that starts at step 0 (killed before its first checkpoint, or started over) starts a
        # fresh record: appending would repeat its steps.
        self.file = open(path, "a" if resumed_step is not None else "w")  # noqa: SIM115 (closed by finish())

    @property
    def tracker(self):
        return self.file

    @on_main_process
    def store_init_configuration(self, values: dict):
        pass  # the resolved config is written as config.yaml before training starts

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        values = {k: v for k, v in values.items() if not k.startswith(TIMINGS)}
        if not values:
            return
        self.file.write(files.dumps({"step": step, **values}) + "\n")
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
    files.write_text(path, "".join(kept))


# wandb.init waits this long for its service and server (wandb's default is 90 s); the login was
# verified just before, so a healthy server answers in seconds.
WANDB_INIT_TIMEOUT_S = 30


def wandb_mode(verify: bool = True) -> str:
    """online when the user is logged in (WANDB_API_KEY, `wandb login`'s netrc entry for wandb's
    configured host, or wandb's settings), offline otherwise; an explicit WANDB_MODE wins.

    With `verify` the credentials are checked with the server first: a bad key or no network stops the run
    here, with the fix, instead of failing in wandb.init after its own, longer timeout. Never prompts.
    """
    check_wandb_env()
    check_wandb_dirs()
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        return mode
    import wandb
    from wandb.errors import AuthenticationError, UsageError

    try:
        # wandb's public login check, for the host wandb is configured for: False without credentials.
        logged_in = wandb.login(prompt=False, verify=verify)
    except (AuthenticationError, UsageError) as e:
        raise ConfigError(wandb_login_failed(e)) from None
    if mode and not logged_in:
        raise ConfigError(
            f"WANDB_MODE={mode} but no W&B credentials were found (WANDB_API_KEY, `wandb login`). "
            f"Log in with `wandb login`, or log offline: unset WANDB_MODE or set WANDB_MODE=offline, "
            f"or tracking=none"
        )
    return mode or ("online" if logged_in else "offline")


# What W&B's settings read as a yes/no from a variable such as WANDB_SILENT; anything else stops wandb.Settings().
WANDB_BOOLS = ("true", "false", "1", "0", "yes", "no", "on", "off", "t", "f", "y", "n")
WANDB_SWITCHES = ("WANDB_SILENT", "WANDB_QUIET", "WANDB_SHOW_INFO", "WANDB_SHOW_WARNINGS", "WANDB_SHOW_ERRORS")


def check_wandb_env() -> None:
    """An empty WANDB_SILENT (`WANDB_SILENT= python ...`, a scheduler's blank variable) means unset; W&B itself
    would refuse it with a validation traceback. A value it cannot read is named here, with the fix."""
    for variable in WANDB_SWITCHES:
        value = os.environ.get(variable)
        if value is not None and not value.strip():
            del os.environ[variable]
        elif value is not None and value.strip().lower() not in WANDB_BOOLS:
            raise ConfigError(
                f"{variable}={value!r} is not a yes/no value W&B reads; set it to true or false, or unset it"
            )


def say_where(accelerator, say) -> None:
    """One line at the start: where the W&B run is, and for an offline run the command that uploads it."""
    run = wandb_run(accelerator)
    if run is None:
        return
    if run.offline:
        folder = Path(run.settings.sync_dir).resolve()
        folder = folder.relative_to(Path.cwd()) if folder.is_relative_to(Path.cwd()) else folder
        say(f"W&B: offline; upload with: wandb sync {folder}")
    else:
        say(f"W&B: {run.url}")


def check_wandb_dirs() -> None:
    """W&B stages the model artifact under ~/.local/share/wandb and caches under ~/.cache/wandb unless told
    otherwise; where HOME is not writable (a container under any uid: Kubernetes runAsUser, OpenShift) it
    fails at the end of the run, after all the training. Checked here instead, before any work."""
    from wandb import env

    home = os.environ.get("HOME", "~")
    for variable, path in (("WANDB_DATA_DIR", env.get_data_dir()), ("WANDB_CACHE_DIR", env.get_cache_dir())):
        if not writable(Path(path)):
            raise ConfigError(
                f"W&B writes into {path} ({variable}), which this user (uid {os.getuid()}) cannot write "
                f"(HOME={home}). Point it at a writable folder, e.g. {variable}=/tmp/wandb, or HOME at a "
                f'writable one (in a container image: see launch/CLUSTER.md, "Any uid"); or run with tracking=none'
            )


def writable(path: Path) -> bool:
    """Whether `path` is, or could be made as, a folder this process can write into."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def agreed_wandb_mode(main: bool) -> str:
    """The W&B mode, decided (and the login verified) by the main process alone and then shared, so a
    failed login stops every process at once, with one message, and the server sees one check."""
    import torch.distributed as dist

    mode, error = None, None
    if main:
        try:
            mode = wandb_mode()
        except ConfigError as e:
            error = str(e)
    shared = [mode, error]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(shared, src=0)
    mode, error = shared
    if error:
        raise ConfigError(error)
    return mode


def wandb_login_failed(e: Exception) -> str:
    source = "WANDB_API_KEY" if os.environ.get("WANDB_API_KEY") else "`wandb login` (~/.netrc)"
    return (
        f"W&B rejected the login from {source} or could not be reached: {str(e).rstrip('.')}. Nothing was trained. "
        f"Fix the key (`wandb login --relogin`; or unset WANDB_API_KEY to log offline), or run without "
        f"W&B's server: WANDB_MODE=offline (upload later with `wandb sync`) or tracking=none"
    )


def init(accelerator, project: str, config: dict, init_kwargs: dict) -> None:
    """`accelerator.init_trackers`, with W&B's failures (server gone since the login check, a run id
    it refuses) as one message that says what to do instead of a traceback."""
    try:
        accelerator.init_trackers(project, init_kwargs=init_kwargs)
    except Exception as e:
        import wandb

        if "wandb" not in init_kwargs or not isinstance(e, (wandb.Error, TimeoutError)):
            raise
        raise ConfigError(
            f"W&B could not start its run: {e}. Nothing was trained. Retry, or run without "
            f"W&B's server: WANDB_MODE=offline (upload later with `wandb sync`) or tracking=none"
        ) from None
    for tracker in accelerator.trackers:
        # TensorBoard's hparams take only flat scalars (a nested dict or a None raises); the others keep
        # the config's structure.
        tracker.store_init_configuration(files.flat(config) if tracker.name == "tensorboard" else config)
    say_where(accelerator, accelerator.print)


# The pip package behind each tracker is named as the tracker, except where Accelerate wants a version range.
PIP_PACKAGE = {"aim": "'aim<4'"}


def check_tracking(cfg, main: bool = True) -> str | None:
    """Before any work: the tracker's package is installed and, for W&B, the login works (checked once,
    on the main process). Returns the W&B mode for `trackers`, None for the other trackers."""
    check_installed(cfg)
    return agreed_wandb_mode(main) if tracker_name(cfg) == "wandb" else None


def check_installed(cfg) -> None:
    """A tracker whose package is missing stops the run here, with the install command: Accelerate
    itself would drop it from `log_with` without a word and the run would go unrecorded there."""
    name = tracker_name(cfg)
    if name == "none" or name in {t.value for t in get_available_trackers()}:
        return
    package = PIP_PACKAGE.get(name, name)
    raise ConfigError(
        f"tracking={name} needs the {name} package, which is not installed for {sys.executable}. "
        f"Install it (pip install {package}), or choose another tracker: tracking=wandb (the default) "
        f"or tracking=none (only the local record in <run>/metrics.jsonl)"
    )


def trackers(
    cfg, run_dir: Path, resumed_step: int | None = None, main: bool = True, mode: str | None = None
) -> tuple[list, dict]:
    """The `log_with` list for Accelerator (the local record, then `cfg.tracking` by Accelerate's name
    for it) and the matching `init_kwargs`; a run resumed from the checkpoint of `resumed_step`
    continues its local record (and its online W&B run) from there. The W&B `mode` is decided (and
    the login checked) here unless given."""
    check_installed(cfg)
    name = tracker_name(cfg)
    if name == "wandb":
        check_wandb_env()
    log_with: list = [] if name == "none" else [name]
    init_kwargs = {}
    if name == "wandb":
        import wandb

        mode = mode or agreed_wandb_mode(main)  # first: a failed W&B login leaves the run directory empty
        # console="off": W&B leaves sys.stdout/stderr alone (its own lines go where the run's console
        # sends them: <run>/console.log, see pipeline/console.py).
        init_kwargs["wandb"] = {
            "mode": mode,
            "dir": str(run_dir),
            "name": run_dir.name,
            **wandb_labels(cfg),
            "settings": wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S, console="off"),
        }
        # Online, every attempt of a run (a requeued job) logs into one W&B run, by an id kept in the
        # run directory. Offline runs get none: `wandb sync` of two offline parts with one id keeps
        # only one of them, so each attempt stays a run of its own. WANDB_RUN_ID, if set, wins.
        if mode == "online" and main and not os.environ.get("WANDB_RUN_ID"):
            init_kwargs["wandb"].update(id=wandb_run_id(run_dir), resume="allow")
    elif name == "mlflow":
        # The experiment is `project`; the tracking server is MLflow's own (MLFLOW_TRACKING_URI, else ./mlruns).
        init_kwargs["mlflow"] = {"run_name": run_dir.name, "tags": {"recipe": cfg.recipe}}
    return [LocalRecord(run_dir, resumed_step), *log_with], init_kwargs


def tracker_name(cfg) -> str:
    return cfg.tracking.name.name  # the Tracker member's name: wandb, tensorboard, ..., none


# W&B's own variable for each label key; where one is set, wandb.init reads it (an argument would win over it).
WANDB_ENV = {"tags": "WANDB_TAGS", "group": "WANDB_RUN_GROUP", "notes": "WANDB_NOTES", "job_type": "WANDB_JOB_TYPE"}


def wandb_labels(cfg) -> dict:
    """wandb.init's tags, group, notes and job_type from `tracking.*`, less those whose variable is set.
    Every run is tagged, and by default grouped, by its recipe."""
    t = cfg.tracking
    labels = {
        "tags": list(dict.fromkeys([cfg.recipe, *t.tags])),
        "group": t.group or cfg.recipe,
        "notes": t.notes,
        "job_type": t.job_type,
    }
    return {k: v for k, v in labels.items() if v is not None and not os.environ.get(WANDB_ENV[k])}


def wandb_run(accelerator):
    """The W&B run behind Accelerate's tracker, on the main process; None without one."""
    if not accelerator.is_main_process or "wandb" not in {t.name for t in accelerator.trackers}:
        return None
    return accelerator.get_tracker("wandb", unwrap=True)


def define_best(accelerator, monitor: str, mode: str) -> None:
    """The W&B summary keeps the best value of the monitored metric beside its last one (W&B's summary is
    otherwise each key's last value). Called before each evaluation is logged: a resumed run is a new W&B
    run offline, and a repeated definition is one small message."""
    run = wandb_run(accelerator)
    if run is not None:
        run.define_metric(monitor, summary=f"{mode},last")


def log_classifier(accelerator, results: dict, class_names: list | None, step: int) -> None:
    """W&B's confusion-matrix chart and a per-class table (precision, recall, F1, support) for each split
    that has a confusion matrix; built from the matrix itself (W&B's own helper wants every prediction)."""
    from pipeline import report  # here: report imports torchmetrics, which launch/compare.py does without

    run = wandb_run(accelerator)
    if run is None or not class_names:
        return
    import wandb

    values = {}
    for split in ("eval", "test"):
        matrix = results.get(f"{split}/confusion_matrix")
        if matrix is None or len(matrix) != len(class_names):
            continue
        cells = [[class_names[i], class_names[j], count] for i, row in enumerate(matrix) for j, count in enumerate(row)]
        table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=cells)
        values[f"{split}/confusion_matrix"] = wandb.plot_table(
            "wandb/confusion_matrix/v1",
            table,
            {k: k for k in table.columns},
            {"title": f"{split} confusion matrix (final weights)"},
        )
        rows = report.per_class(matrix, class_names)
        values[f"{split}/per_class"] = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
    if values:
        run.log(values, step=step)


# Files of a run that make its weights usable elsewhere: the weights, and what rebuilds the model around them.
MODEL_FILES = ("model.safetensors", "best.safetensors", "config.yaml", "meta.json")


def log_model(accelerator, run_dir: Path) -> None:
    """`tracking.log_model=true`: the final and best weights, with config.yaml and meta.json, as one W&B
    artifact of type "model", named model-<W&B run id> (as Lightning's WandbLogger names it)."""
    run = wandb_run(accelerator)
    if run is None:
        return
    import wandb

    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata={"run_dir": str(run_dir)})
    for name in MODEL_FILES:
        if (Path(run_dir) / name).is_file():
            artifact.add_file(str(Path(run_dir) / name), name=name)
    run.log_artifact(artifact)


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory: made once, then read back by every attempt."""
    path = Path(run_dir) / "wandb_id"
    if not path.exists():
        files.write_text(path, secrets.token_hex(8) + "\n")
    return path.read_text().strip()

"""A finished run rebuilt from its folder (config.yaml, meta.json, weights) and evaluated again.

The pieces are the training loop's own (shards, loaders, metrics, `loop.evaluate`), so a run's own
data gives back the metrics it reported; other data (data.* overrides) is prepared by the same code.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file

from pipeline import build, config, files, fingerprints, loop, patches, report, run_data, runinfo, shard_store
from pipeline.batch_sizes import check_eval_batch
from pipeline.errors import ConfigError, DataError
from pipeline.overrides import split_argv
from pipeline.processes import start_processes
from pipeline.recipe import Recipe, loss_fn, model_inputs
from pipeline.recipe_contract import load_recipe
from pipeline.shard_store import META_FILE
from pipeline.together import all_or_none

WEIGHTS = {"final": "model.safetensors", "best": "best.safetensors"}
SPLITS = ("eval", "test")
# What a command after training may change: where the data comes from and how it is read, the evaluation
# batch (to split it over another number of processes) and how long processes wait for each other. Never
# what was trained.
CHANGEABLE = ("data.", "trainer.eval_batch_size", "trainer.dist_timeout_s")
# data.* keys that say where or how fast, not which data: changing them keeps the run's own data.
READING_ONLY = tuple(k for k in fingerprints.NOT_CONTENT if k != "root")


@dataclass
class Request:
    """What `launch/evaluate.py` was asked: `run=`, `split=`, `weights=` and the data.* overrides."""

    run_dir: Path
    split: str = "eval"
    weights: str = "final"
    overrides: tuple = ()
    reported: str = "final"  # the weights the run's summary reports (see `reported_weights`)


def parse_argv(argv: list[str]) -> tuple[Recipe, object, Request]:
    """`run=DIR [split=eval|test] [weights=final|best|FILE] [data.KEY=VALUE ...]` -> the run's recipe, its config
    with the overrides applied, and the request (for `cli.main`)."""
    dotlist = split_argv(argv)
    own = {key: config.given(dotlist, key) for key in ("run", "split", "weights")}
    if not own["run"]:
        raise ConfigError("which run? Give its folder: run=runs/<recipe>/<run_name>")
    split, reported = own["split"] or "eval", reported_weights(Path(own["run"]))
    weights = own["weights"] or reported
    if split not in SPLITS:
        raise ConfigError(f"bad value split={split!r}; choose one of: {', '.join(SPLITS)}")
    overrides = [item for item in dotlist if item.partition("=")[0] not in own]
    recipe, cfg, _ = load_run(own["run"], overrides)
    if other_data(recipe, cfg, overrides, own["run"]) and "statistics" in cfg.data and not cfg.data.statistics:
        # Other data is prepared with the statistics the model was trained with (recipes that fit some), as
        # launch/predict.py prepares new inputs; fitting new ones on this data would score another preprocessing.
        meta = (Path(own["run"]) / META_FILE).resolve()
        recipe, cfg, _ = load_run(own["run"], [*overrides, f"data.statistics={meta}"])
    weights_file(Path(own["run"]), weights)  # before any work
    return recipe, cfg, Request(Path(own["run"]), split, weights, tuple(overrides), reported)


def reported_weights(run_dir: Path) -> str:
    """`best` or `final`: the weights whose scores the run's summary.json reports, which evaluate and predict
    use unless told `weights=`; final for a run whose summary does not say (trained before it did)."""
    try:
        reported = json.loads((Path(run_dir) / "summary.json").read_text()).get("weights")
    except (OSError, ValueError, AttributeError):
        return "final"
    return reported if reported in WEIGHTS else "final"


def load_run(run_dir, overrides=()) -> tuple[Recipe, object, dict]:
    """The recipe, config (through the typed schema, `overrides` on top) and meta of a finished run."""
    run_dir = Path(run_dir)
    check_finished(run_dir)
    for item in overrides:
        if not item.partition("=")[0].startswith(CHANGEABLE):
            raise ConfigError(
                f"{item!r} cannot change after training: a finished run takes data.* overrides "
                f"(e.g. data.root=/other/data), trainer.eval_batch_size and trainer.dist_timeout_s, "
                f"nothing that changes the model. To train differently, start a run: "
                f"python launch/train.py ..."
            )
    try:
        saved = OmegaConf.load(run_dir / "config.yaml")
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise damaged(run_dir, "config.yaml", e) from None
    meta = read_meta(run_dir)
    recipe = load_recipe(saved.get("recipe") or config.Config.recipe)
    cfg = config.restore(saved, recipe, list(overrides), f"{run_dir / 'config.yaml'}")
    return recipe, cfg, meta


def read_meta(run_dir) -> dict:
    """The run's meta.json: the facts its data was prepared with (classes, train statistics)."""
    try:
        meta = json.loads((Path(run_dir) / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise damaged(Path(run_dir), META_FILE, e) from None
    if not isinstance(meta, dict):
        raise damaged(
            Path(run_dir),
            META_FILE,
            f"it holds a JSON {type(meta).__name__}, not the object of facts (classes, statistics) a run keeps",
        )
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise damaged(Path(run_dir), META_FILE, f"its class_names is {json.dumps(names)[:60]}, not a list of names")
    return meta


def damaged(run_dir: Path, name: str, e: Exception) -> DataError:
    return DataError(
        f"{run_dir / name} is damaged: {str(e).splitlines()[0]}. It is written when the run starts "
        f"and never changed after; a copy of the run folder from before has it intact.\nFix: restore "
        f"{name} from such a copy, or train the run again"
    )


def check_finished(run_dir: Path) -> None:
    """A run folder whose training ended: its config and meta, and the final weights."""
    if not run_dir.is_dir():
        raise ConfigError(
            f"no run folder at {run_dir}; runs are in <output_dir>/<recipe>/<run_name>/ "
            f"(e.g. runs/digits/20250101-120000)"
        )
    missing = [name for name in ("config.yaml", META_FILE, WEIGHTS["final"]) if not (run_dir / name).exists()]
    if missing:
        raise ConfigError(
            f"{run_dir} is not a finished run: no {' or '.join(missing)}. A run writes model.safetensors "
            f"when its training ends; one that was stopped continues with the same train command and "
            f"run_name={run_dir.name}"
        )


def weights_file(run_dir: Path, weights: str = "final") -> Path:
    """`final` or `best` of the run, or a weights file given by its path."""
    if weights not in WEIGHTS:
        if not weights.endswith(".safetensors") or not Path(weights).is_file():
            raise ConfigError(
                f"bad value weights={weights!r}; choose one of: {', '.join(WEIGHTS)}, or the path of "
                f"an existing .safetensors file"
            )
        return Path(weights)
    path = Path(run_dir) / WEIGHTS[weights]
    if not path.exists():
        raise ConfigError(
            f"run {run_dir} has no {path.name}: best weights are kept when the run monitors a metric "
            f"(checkpoint.monitor); evaluate the final ones with weights=final"
        )
    return path


def load_model(run_dir, recipe: Recipe, cfg, meta: dict, weights: str = "final", say=print) -> torch.nn.Module:
    """The recipe's model for this config and meta, with the run's weights loaded strictly (on the CPU)."""
    path = weights_file(Path(run_dir), weights)
    try:  # read first: a file cut short is damaged, whatever its hash says
        state = load_file(path)
    except Exception as e:  # safetensors names what it could not read; any failure means the file is unusable
        other = {"final": "best", "best": "final"}.get(weights)
        instead = f"; weights={other} evaluates the run's other weights" if other else ""
        raise DataError(
            f"cannot read the weights {path}: {str(e).splitlines()[0]}. The file is damaged (cut short "
            f"or overwritten); a copy of the run folder from before, or training again, gives it back{instead}"
        ) from None
    check_own_weights(Path(run_dir), path, weights not in WEIGHTS, say)
    try:
        model = recipe.model(cfg, meta)
    except KeyError as e:  # a fact the recipe reads now that an older version did not keep
        raise ConfigError(
            f"{Path(run_dir) / META_FILE} has no {e} that recipe {recipe.name!r} reads now: the "
            f"run was trained by an older version of it.\nFix: evaluate it with that version's code"
            f"{trained_with(Path(run_dir))}, or train it again"
        ) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a fact of the wrong type (a recipe's own check, or where it failed)
        raise damaged(Path(run_dir), META_FILE, f"recipe {recipe.name!r} cannot use it: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise ConfigError(
            f"the weights {path} do not fit the model recipe {recipe.name!r} builds now: "
            f"{' '.join(line.strip() for line in lines[1:4] or lines)}.\nThe recipe's model changed "
            f"since this run was trained; evaluate it with the code of that run"
        ) from None
    return model


def check_own_weights(run_dir: Path, path: Path, explicit: bool, say) -> None:
    """The weights are the ones the run saved (their sha256 is in its run.json), or the user named the file
    (`weights=<path>`: said loudly when it is none of the run's). Runs recorded before run.json kept the
    hashes load unchecked."""
    recorded = runinfo.read(run_dir / "run.json").get("weights") or {}
    if not recorded:
        return
    actual = files.sha256(path)
    if explicit:
        if actual not in recorded.values():
            saved = ", ".join(f"{name} {sha}" for name, sha in recorded.items())
            say(
                f"WARNING: {path} is not one of run {run_dir}'s weights: its sha256 is {actual}, the run saved "
                f"{saved}. The results are this file's, with the run's config and statistics"
            )
        return
    expected = recorded.get(path.name)
    if expected and actual != expected:
        raise DataError(
            f"{path} is not the file this run saved: its sha256 is {actual}, run.json records {expected} "
            f"for {path.name}. It was replaced (copied from another run?).\nFix: put the run's own file "
            f"back, or name this one explicitly: weights={path} (evaluated with a warning)"
        )


def trained_with(run_dir: Path) -> str:
    """`(git checkout <sha>, from run.json)` where the run recorded the commit it was trained with."""
    try:
        sha = json.loads((run_dir / "run.json").read_text())["git"]["sha"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f" (git checkout {sha}, from its run.json)" if sha else ""


def load_split(recipe, cfg, meta: dict, split: str, state=None, say=print) -> tuple[dict, Path]:
    """The shards for `cfg` (built from the raw data if none exist), checked to hold `split` and the run's
    classes; returns {"train", split} for `run_data.make_loaders` and the shards' folder."""
    shards = shard_store.prepare(recipe, cfg, state, log=say)
    splits, shard_meta = shard_store.open_shards(shards)
    if split not in splits:
        raise DataError(
            f"the {recipe.name} shards in {shards} have no {split!r} split (they hold "
            f"{', '.join(splits)}); choose split={' or split='.join(s for s in SPLITS if s in splits)}"
        )
    if shard_meta.get("class_names") != meta.get("class_names"):
        raise DataError(
            f"the data in {shards} has the classes {shard_meta.get('class_names')}, the run was trained "
            f"on {meta.get('class_names')}: its scores would compare different things"
        )
    if cfg.data.get("statistics"):
        say(f"data: the run's train statistics ({cfg.data.statistics}) are applied to this data, not its own")
        return {"train": splits["train"], split: splits[split]}, shards
    # The recipe's transform keys (data.augment) come from the run's config, not from prepare().
    own = ("class_names", *recipe.transform_keys)
    differ = sorted(k for k in meta if k not in own and shard_meta.get(k) != meta[k])
    if differ:
        # Statistics a recipe applies inside prepare() (water_potability's scaling) are this data's own.
        say(
            f"data: this data's {', '.join(differ)} (computed by the recipe's prepare() on it) differ from the run's "
            f"meta.json; the run's are used where the model, transform and metrics read meta, but what prepare() "
            f"applied to the rows came from this data"
        )
    return {"train": splits["train"], split: splits[split]}, shards


def evaluate(recipe, cfg, request: Request) -> dict:
    """Loss and metrics of a finished run's weights on one split, on 1 or N processes; written to
    `<run>/evaluations/<name>.json` and returned."""
    started = time.perf_counter()
    cpu = not torch.accelerator.is_available()
    state = start_processes(cfg, cpu)
    say = state.print
    check_eval_batch(cfg, state.num_processes)
    meta = read_meta(request.run_dir)  # the run's own statistics, whatever data is evaluated
    model = load_model(request.run_dir, recipe, cfg, meta, request.weights, say)  # before the data: fails fast
    splits, shards = load_split(recipe, cfg, meta, request.split, state, say)
    own = own_data(recipe, cfg, request, shards, say)
    patches.apply(say)
    accelerator = build.make_accelerator(cfg, cpu)  # at the matmul precision the run evaluated with
    _, loaders, on_device, _ = run_data.make_loaders(cfg, recipe, splits, meta, accelerator)
    model, loader = accelerator.prepare(
        model, loaders[request.split], device_placement=[True, run_data.batches_move(accelerator, on_device)]
    )
    run = build.Evaluation(
        accelerator=accelerator,
        recipe=recipe,
        meta=meta,
        model=model,
        eval_loaders={request.split: loader},
        metrics=build.make_metrics(recipe, cfg, meta, accelerator.device),
        loss_fn=loss_fn(recipe, cfg),
        inputs=model_inputs(recipe, cfg),
    )
    results = loop.evaluate(run, request.split)
    record = {
        "run_dir": str(request.run_dir),
        "recipe": recipe.name,
        "split": request.split,
        "weights": WEIGHTS.get(request.weights, request.weights),
        "data": changed_data(request.overrides),
        "overrides": list(request.overrides),
        "shards": str(shards),
        "fingerprint": shards.name,
        "run_fingerprint": trained_on(request.run_dir),
        "own_data": own,
        "samples": results[f"{request.split}/samples"],
        "num_processes": accelerator.num_processes,
        "device": accelerator.device.type,
        "mixed_precision": accelerator.mixed_precision,
        "eval_batch_size": cfg.trainer.eval_batch_size,
        **results,
        "time/total_s": time.perf_counter() - started,
    }
    path = request.run_dir / "evaluations" / f"{output_name(request, shards, own)}.json"
    with all_or_none(accelerator):
        if accelerator.is_main_process:
            path.parent.mkdir(exist_ok=True)
            files.write_json(path, record)
    say(result_line(record, path))
    accelerator.end_training()
    return record


def changed_data(overrides) -> dict:
    """The data.* overrides that choose other data (not where the cache is or how fast it is read)."""
    changed = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.startswith("data.") and key.removeprefix("data.") not in READING_ONLY:
            changed[key] = value
    return changed


def trained_on(run_dir) -> str | None:
    """The fingerprint of the shards the run trained on, from its run.json (None: recorded before it kept one)."""
    return (runinfo.read(Path(run_dir) / "run.json").get("data") or {}).get("fingerprint")


def other_data(recipe, cfg, overrides, run_dir) -> bool:
    """Data other than the run's: chosen by data.* overrides, or the run's raw files (or the code that prepares
    them) changed since it trained. Either is prepared with the run's statistics, not statistics of its own."""
    trained = trained_on(run_dir)
    return bool(changed_data(overrides)) or (trained is not None and fingerprints.fingerprint(recipe, cfg) != trained)


def own_data(recipe, cfg, request: Request, shards: Path, say) -> bool | None:
    """Whether `shards` are those the run trained on (None: the run recorded no fingerprint); says so when not."""
    trained = trained_on(request.run_dir)
    if trained is None or shards.name == trained:
        return None if trained is None else True
    if changed_data(request.overrides):
        why = f"data.* overrides: {' '.join(request.overrides)}"
    else:
        saved = runinfo.read(request.run_dir / "run.json")["data"]
        now = runinfo.data_identity(recipe, cfg, shards)
        why = (
            "its raw files changed since it trained"
            if saved.get("raw_digest") != now["raw_digest"]
            else "the code that prepares its raw files changed since it trained"
        )
    say(f"data: not the run's own data ({why}): fingerprint {shards.name}, the run trained on {trained}")
    return False


def output_name(request: Request, shards: Path, own: bool | None = None) -> str:
    """`<split>` on the run's own data (the shards' fingerprint is the one its run.json records), else
    `<split>-<first 8 of the shards' fingerprint>`; `-best` or `-final` for the weights the run does not report,
    `-weights-<first 8 of its sha256>` for a file given by path. The fingerprint names the data's content, so the
    same data gets the same file whatever path it was given by."""
    other = request.weights in WEIGHTS and request.weights != request.reported
    name = request.split + (f"-{request.weights}" if other else "")
    if request.weights not in WEIGHTS:
        name += f"-weights-{files.sha256(Path(request.weights))[:8]}"
    return name if own else f"{name}-{shards.name[:8]}"


def result_line(record: dict, path: Path) -> str:
    split = record["split"]
    keys = [
        k
        for k in record
        if k.startswith(f"{split}/") and report.scalar(record[k]) and k.count("/") <= 2 and not k.endswith("/samples")
    ][:8]
    which = (
        ""
        if record["own_data"]
        else f" of data {record['fingerprint'][:8]}, "
        + ("not the run's own" if record["own_data"] is False else "the run recorded none to compare")
    )
    return (
        f"evaluated: {record['recipe']} {record['weights']} on {split}{which} ({record['samples']:,} samples, "
        f"{record['num_processes']} process{'es' if record['num_processes'] > 1 else ''}) "
        + " ".join(f"{k}={record[k]:.4f}" for k in keys)
        + f" -> {path}"
    )

"""Evaluating a finished run: its own data gives back the metrics it reported, on 1 or 2 processes;
other data gets a file of its own; a missing, unfinished or damaged run is one message."""

import json

import pandas as pd
import pytest
import torch
from conftest import cli, common, ok
from omegaconf import OmegaConf
from safetensors.torch import save_file
from test_checkpoint import prices_csv

from pipeline import cli as pipeline_cli
from pipeline import config, files, runs
from pipeline.config import OptimizerName
from pipeline.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def trained(digits_run):
    """A real two-epoch digits run (conftest's, shared): (its folder, its summary, its working folder)."""
    return digits_run


def evaluate(run, workdir, *args, processes=1):
    return ok(cli([f"run={run}", *args], cwd=workdir, processes=processes, script="evaluate"))


def same_metrics(evaluated: dict, summary: dict, split: str = "eval") -> None:
    assert evaluated[f"{split}/samples"] == summary[f"{split}/samples"]
    assert evaluated[f"{split}/accuracy"] == pytest.approx(summary[f"{split}/accuracy"], abs=1e-6)
    assert evaluated[f"{split}/loss"] == pytest.approx(summary[f"{split}/loss"], rel=1e-6)


@pytest.mark.slow
def test_evaluate_reproduces_the_runs_eval_metrics(trained):
    run, summary, workdir = trained
    result = evaluate(run, workdir, "split=eval")
    record = json.loads((run / "evaluations" / "eval.json").read_text())
    same_metrics(record, summary)
    # The weights the run reports (summary.json "weights": best by default), so the numbers are its own.
    assert summary["weights"] == "best"
    assert record["weights"] == "best.safetensors" and record["num_processes"] == 1 and record["data"] == {}
    assert result.stdout.count("evaluated: digits best.safetensors on eval (360 samples, 1 process)") == 1


@pytest.mark.slow
def test_evaluate_on_two_processes_counts_every_sample_once(trained):
    run, summary, workdir = trained
    # Two global batches of 180, 90 rows a process each; the gathered outputs are what count.
    evaluate(run, workdir, "trainer.eval_batch_size=180", processes=2)
    record = json.loads((run / "evaluations" / "eval.json").read_text())
    assert record["num_processes"] == 2 and record["eval_batch_size"] == 180
    same_metrics(record, summary)


@pytest.mark.slow
def test_other_data_is_prepared_by_the_same_code_and_kept_apart(trained):
    run, summary, workdir = trained
    # A larger held-out fraction is other data: new shards, a file named by their fingerprint.
    evaluate(run, workdir, "data.eval_fraction=0.3")
    [other] = [p for p in (run / "evaluations").iterdir() if p.name.startswith("eval-")]
    record = json.loads(other.read_text())
    assert record["eval/samples"] == 540 and record["data"] == {"data.eval_fraction": "0.3"}
    assert other.stem == f"eval-{record['shards'].rsplit('/', 1)[-1][:8]}"
    assert record["eval/accuracy"] > 0.5  # the trained weights, not fresh ones


# ---------------------------------------------------------------- errors, in this process


@pytest.fixture
def finished(tmp_path):
    """A run folder as training leaves it (config.yaml, meta.json, model.safetensors), with untrained weights."""
    recipe = runs.load_recipe("digits")
    cfg = config.build([f"output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "tracking=none"], recipe)
    run = tmp_path / "digits" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config.to_yaml(cfg))
    meta = {"class_names": [str(d) for d in range(10)]}
    (run / "meta.json").write_text(json.dumps(meta))
    save_file(recipe.model(cfg, meta).state_dict(), run / "model.safetensors")
    return run


def test_a_finished_run_loads_through_the_schema(finished):
    recipe, cfg, meta = runs.load_run(finished, ["data.cache_dir=/elsewhere"])
    assert recipe.name == "digits" and cfg.optimizer.name is OptimizerName.adam  # an Enum again, not a string
    assert cfg.data.cache_dir == "/elsewhere" and meta["class_names"][0] == "0"
    runs.load_model(finished, recipe, cfg, meta)  # strict: every key fits


def test_a_missing_or_unfinished_run_is_named(finished, tmp_path):
    with pytest.raises(ConfigError, match="no run folder at"):
        runs.parse_argv([f"run={tmp_path / 'nope'}"])
    (finished / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="is not a finished run: no model.safetensors"):
        runs.parse_argv([f"run={finished}"])
    with pytest.raises(ConfigError, match="which run"):
        runs.parse_argv(["split=eval"])


def test_only_data_may_change_after_training(finished):
    with pytest.raises(ConfigError, match="'optimizer.lr=3' cannot change after training"):
        runs.parse_argv([f"run={finished}", "optimizer.lr=3"])
    with pytest.raises(ConfigError, match="unknown config key 'data.nope'"):
        runs.parse_argv([f"run={finished}", "data.nope=1"])
    with pytest.raises(ConfigError, match="bad value split='train'"):
        runs.parse_argv([f"run={finished}", "split=train"])


def test_damaged_or_foreign_weights_are_named(finished):
    recipe, cfg, meta = runs.load_run(finished)
    weights = finished / "model.safetensors"
    (finished / "run.json").write_text(json.dumps({"weights": {"model.safetensors": files.sha256(weights)}}))
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    # Cut short, it is damaged (not "replaced", though its hash differs from the one run.json records).
    with pytest.raises(DataError, match="cannot read the weights .*model.safetensors: .*damaged.*weights=best"):
        runs.load_model(finished, recipe, cfg, meta)
    # Whole but another file: replaced, which names the fix (put it back, or name it explicitly).
    save_file({"net.0.weight": recipe.model(cfg, meta).state_dict()["net.0.weight"]}, weights)
    with pytest.raises(DataError, match="is not the file this run saved.*replaced"):
        runs.load_model(finished, recipe, cfg, meta)
    (finished / "run.json").unlink()  # a run recorded before the hashes: the file is loaded, and does not fit
    with pytest.raises(ConfigError, match="do not fit the model recipe 'digits' builds now: Missing key"):
        runs.load_model(finished, recipe, cfg, meta)
    with pytest.raises(ConfigError, match="has no best.safetensors"):
        runs.load_model(finished, recipe, cfg, meta, weights="best")


def test_a_config_from_another_version_is_named(finished):
    saved = OmegaConf.load(finished / "config.yaml")
    saved.trainer.gone = 1  # a key this code no longer has
    (finished / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    with pytest.raises(ConfigError, match="config.yaml no longer loads .*'trainer.gone'"):
        runs.load_run(finished)
    del saved.trainer["gone"]
    saved.optimizer.name = "lion"  # a choice this code no longer offers
    (finished / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    with pytest.raises(ConfigError, match="no longer loads .*optimizer.name='lion'; choose one of"):
        runs.load_run(finished)


def test_a_split_the_shards_lack_is_named(finished):
    recipe, cfg, meta = runs.load_run(finished)
    with pytest.raises(DataError, match="have no 'test' split .*choose split=eval"):
        runs.load_split(recipe, cfg, meta, "test", say=lambda *_: None)


def test_errors_exit_2_with_one_line(finished, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["evaluate.py", f"run={finished}", "weights=best"])
    with pytest.raises(SystemExit) as exited:
        pipeline_cli.main("evaluate", "", runs.evaluate, parse_argv=runs.parse_argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run ") and "Traceback" not in err and err.count("\n") == 1


def test_a_run_of_an_older_recipe_version_is_named_with_its_commit(tmp_path):
    """water_potability's meta.json before it became a preset of tabular had no `task`: named, not a KeyError."""
    recipe = runs.load_recipe("water_potability")
    cfg = config.build([f"output_dir={tmp_path}", "tracking=none"], recipe)
    run = tmp_path / "water_potability" / "old"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config.to_yaml(cfg))
    meta = {"task": "binary", "class_names": ["not potable", "potable"], "feature_names": list("abcdefghi")}
    save_file(recipe.model(cfg, meta).state_dict(), run / "model.safetensors")
    old = {k: v for k, v in meta.items() if k != "task"}
    (run / "meta.json").write_text(json.dumps(old))
    (run / "run.json").write_text(json.dumps({"git": {"sha": "abc1234", "dirty": False}}))
    with pytest.raises(
        ConfigError,
        match=r"(?s)meta.json has no 'task' that recipe 'water_potability' reads now.*"
        r"git checkout abc1234, from its run.json\), or train it again",
    ):
        runs.load_model(run, recipe, cfg, old)


def test_weights_that_are_not_the_runs_are_refused_or_named_loudly(finished, tmp_path):
    recipe, cfg, meta = runs.load_run(finished)
    own = finished / "model.safetensors"
    runs.load_model(finished, recipe, cfg, meta)  # a run recorded before run.json kept hashes: unchecked
    (finished / "run.json").write_text(json.dumps({"weights": {"model.safetensors": files.sha256(own)}}))
    runs.load_model(finished, recipe, cfg, meta)  # its own file
    kept, recorded = own.read_bytes(), files.sha256(own)
    torch.manual_seed(1)
    save_file(recipe.model(cfg, meta).state_dict(), own)  # another run's weights, same shape
    with pytest.raises(
        DataError,
        match=f"model.safetensors is not the file this run saved: its sha256 is "
        f"{files.sha256(own)}, run.json records {recorded}",
    ):
        runs.load_model(finished, recipe, cfg, meta)
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(own.read_bytes())
    own.write_bytes(kept)
    said = []
    runs.load_model(finished, recipe, cfg, meta, weights=str(foreign), say=said.append)  # named by the user
    assert len(said) == 1 and said[0].startswith(f"WARNING: {foreign} is not one of run {finished}'s weights")
    said.clear()
    runs.load_model(finished, recipe, cfg, meta, weights=str(own), say=said.append)
    assert said == []  # the run's own file, given by its path
    with pytest.raises(ConfigError, match="bad value weights='nope'; choose one of: final, best, or the path"):
        runs.load_model(finished, recipe, cfg, meta, weights="nope")


@pytest.mark.slow
def test_a_csv_edited_after_training_is_other_data_and_foreign_weights_stop_evaluate(workdir):
    csv = prices_csv(workdir / "data")
    ok(
        cli(
            common(
                workdir,
                "recipe=tabular",
                f"data.root={csv.parent}",
                "data.file=prices.csv",
                "data.target=price",
                "trainer.epochs=2",
                "run_name=job",
            ),
            cwd=workdir,
        )
    )
    run = workdir / "runs" / "tabular" / "job"
    record = json.loads((run / "run.json").read_text())
    assert record["weights"] == {name: files.sha256(run / name) for name in ("best.safetensors", "model.safetensors")}
    trained = record["data"]["fingerprint"]
    evaluate(run, workdir)
    first = json.loads((run / "evaluations" / "eval.json").read_text())
    assert first["own_data"] is True and first["fingerprint"] == first["run_fingerprint"] == trained

    table = pd.read_csv(csv)
    table.loc[0, "price"] += 1  # one label, in place
    table.to_csv(csv, index=False)
    edited = evaluate(run, workdir)
    assert "not the run's own data (its raw files changed since it trained): fingerprint " in edited.stdout
    assert "the run's train statistics" in edited.stdout  # not statistics refitted on the edited rows
    # The files it prepares from, by name: the table and the run's statistics (not their common folder).
    assert f"from {csv}, {run / 'meta.json'} -> " in edited.stdout, edited.stdout
    [other] = (run / "evaluations").glob("eval-*.json")
    again = json.loads(other.read_text())
    assert again["own_data"] is False and again["run_fingerprint"] == trained != again["fingerprint"]
    assert other.stem == f"eval-{again['fingerprint'][:8]}" and "not the run's own" in edited.stdout
    assert json.loads((run / "evaluations" / "eval.json").read_text()) == first  # the own-data result stays

    recipe, cfg, meta = runs.load_run(run)
    foreign = workdir / "other-run.safetensors"
    torch.manual_seed(1)
    save_file(recipe.model(cfg, meta).state_dict(), foreign)
    # Copied over the run's own: best.safetensors, the weights it reports, which evaluate and predict use.
    (run / "best.safetensors").write_bytes(foreign.read_bytes())
    for script, args in (("evaluate", []), ("predict", [f"input={csv}"])):
        refused = cli([f"run={run}", *args], cwd=workdir, script=script)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert (
            f"best.safetensors is not the file this run saved: its sha256 is {files.sha256(foreign)}, "
            f"run.json records {record['weights']['best.safetensors']}"
        ) in refused.stderr
    warned = evaluate(run, workdir, f"weights={foreign}")
    assert f"WARNING: {foreign} is not one of run {run}'s weights" in warned.stdout
    [named] = (run / "evaluations").glob("eval-weights-*.json")
    assert json.loads(named.read_text())["weights"] == str(foreign)

"""The streaming data path: splits read from their memory-mapped shards a batch at a time, with the same
batches, order and results as whole tensors in memory."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import cli, common, ok
from safetensors.torch import load_file

from pipeline import batching, memory_budget, streaming, tensor_rows
from pipeline.errors import ConfigError


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A prepared split with every kind of column recipes store, written as the pipeline writes shards:
    several files, each of several Arrow record batches (datasets writes at most 1,000 rows a batch)."""
    rng = np.random.default_rng(0)
    n = 3500
    table = datasets.Dataset.from_dict(
        {
            "image": rng.integers(0, 256, (n, 3, 4, 5), dtype=np.uint8),
            "label": rng.integers(0, 7, n),
            "features": rng.normal(size=(n, 6)).astype(np.float32),
            "value": rng.normal(size=n),
            "flag": rng.integers(0, 2, n).astype(bool),
            "small": rng.integers(-5, 5, n).astype(np.int8),
        },
        features=datasets.Features(
            {
                "image": datasets.Array3D((3, 4, 5), "uint8"),
                "label": datasets.ClassLabel(num_classes=7),
                "features": datasets.List(datasets.Value("float32"), length=6),
                "value": datasets.Value("float64"),
                "flag": datasets.Value("bool"),
                "small": datasets.Value("int8"),
            }
        ),
    )
    out = tmp_path_factory.mktemp("shards") / "split"
    table.save_to_disk(str(out), num_shards=3)
    return datasets.load_from_disk(str(out))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_stream_serves_exactly_the_rows_in_memory_does(split):
    assert len(split.cache_files) == 3 and split.data.table.column("image").num_chunks > 3  # files x batches
    rows, stream = tensor_rows.Rows(tensor_rows.columns(split)), streaming.stream(split)
    assert len(stream) == len(rows) == 3500
    assert set(stream.fixed) == {"image", "label", "features", "value", "small"}  # read by address
    assert set(stream.other) == {"flag"}  # bit-packed booleans: read with Arrow's take
    generator = torch.Generator().manual_seed(1)
    for size in (1, 7, 64, 3500):
        idx = torch.randperm(3500, generator=generator)[:size]
        assert same(stream[idx], rows[idx])
    edges = [0, 999, 1000, 1166, 1167, 2333, 2334, 3499]  # first/last rows of record batches and files
    assert same(stream[edges], rows[edges])
    assert same(pickle.loads(pickle.dumps(stream))[edges], rows[edges])  # what a spawned worker gets


def test_stream_and_rows_give_the_same_batches_in_the_same_order(split):
    rows, stream = tensor_rows.Rows(tensor_rows.columns(split)), streaming.stream(split)
    for train in (True, False):
        a = list(batching.loader(rows, 64, train=train, seed=3))
        b = list(batching.loader(stream, 64, train=train, seed=3, num_workers=2))
        assert len(a) == len(b) == (3500 // 64 if train else -(-3500 // 64))
        assert all(same(x, y) for x, y in zip(a, b))


def test_tensor_bytes_is_what_whole_tensors_take(split):
    assert memory_budget.tensor_bytes(split) == tensor_rows.nbytes(tensor_rows.columns(split))


def paths(budget=None, in_memory="auto", own_dataset=False, sizes=None):
    from pipeline import cli as pipeline_cli

    argv = [f"data.in_memory={in_memory}", *([f"data.in_memory_budget_gb={budget}"] if budget is not None else [])]
    return memory_budget.choose_paths(pipeline_cli.parse(argv)[1], sizes, 1, own_dataset)


class Sized:
    """A stand-in split of a given size for the budget arithmetic (tensor_bytes is tested above)."""

    def __init__(self, mib):
        self.mib = mib


def test_auto_keeps_splits_in_memory_while_they_fit_train_first(monkeypatch):
    monkeypatch.setattr(memory_budget, "tensor_bytes", lambda split: split.mib * 2**20)
    splits = {"eval": Sized(30), "train": Sized(60), "test": Sized(30)}
    chosen = paths(budget=100 / 1024, sizes=splits)
    assert list(chosen) == ["eval", "train", "test"]  # the recipe's order kept
    assert {k: v[0] for k, v in chosen.items()} == {"train": True, "eval": True, "test": False}
    assert chosen["train"][1] == "60.0 MiB <= budget 100.0 MiB, data.in_memory_budget_gb=0.0976562"
    assert chosen["eval"][1] == "30.0 MiB <= budget 40.0 MiB, data.in_memory_budget_gb=0.0976562"
    assert chosen["test"][1] == "30.0 MiB > budget 10.0 MiB, data.in_memory_budget_gb=0.0976562"
    assert not any(v[0] for v in paths(budget=0, sizes=splits).values())
    assert all(v[0] for v in paths(sizes=splits).values())  # a quarter of this machine's memory
    assert "GiB, a quarter of" in paths(sizes=splits)["train"][1]
    assert "GiB available / 1 process(es) on this node" in paths(sizes=splits)["train"][1]
    assert paths(in_memory="false", sizes=splits)["train"] == (False, "data.in_memory=false")
    assert paths(in_memory="true", budget=0, sizes=splits)["train"] == (True, "data.in_memory=true")
    # A recipe that builds its own dataset from whole columns (windows of a series) stays in memory.
    own = (True, "the recipe's dataset needs whole columns")
    assert paths(own_dataset=True, budget=0, sizes=splits)["train"] == own
    with pytest.raises(ConfigError, match="recipe 'digits' builds its own dataset from whole columns.*auto or true"):
        paths(own_dataset=True, in_memory="false", sizes=splits)


def test_available_memory_is_what_the_kernel_reports():
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal"))) * 1024
    assert 0 < memory_budget.available_memory() <= total


def memory_cgroup() -> tuple[Path, str]:
    """This process's memory cgroup folder and its limit file's name (v1 or v2)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory", path.lstrip("/")), "memory.limit_in_bytes"
        if hierarchy == "0" and not controllers:
            return Path("/sys/fs/cgroup", path.lstrip("/")), "memory.max"
    pytest.skip("no memory cgroup")


def test_available_memory_stays_within_a_cgroup_limit():
    # A container's or a SLURM job's memory limit: what auto may keep in memory stays inside it.
    parent, limit = memory_cgroup()
    group = parent / f"pytest-{os.getpid()}"
    try:
        group.mkdir()
        (group / limit).write_text(str(2**30))
    except OSError as e:
        pytest.skip(f"cannot make a memory cgroup here ({e})")
    try:
        code = "from pipeline.memory_budget import available_memory; print(available_memory())"
        out = subprocess.run(
            ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "{sys.executable}" -c "{code}"'],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert 0 < int(out.stdout) <= 2**30  # the limit less what the process already uses
    finally:
        group.rmdir()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data.in_memory=maybe"], "data.in_memory"),
        (["data.in_memory_budget_gb=-1"], "data.in_memory_budget_gb=-1.0: must be >= 0"),
    ],
)
def test_bad_streaming_settings_are_refused(argv, message):
    from pipeline import cli as pipeline_cli

    with pytest.raises(ConfigError, match=message):
        pipeline_cli.parse(argv)


def test_a_recipe_with_its_own_dataset_refuses_streaming_before_any_data_is_read(workdir):
    # The check comes before prepare: here there is not even data, and the message is about the setting.
    result = cli(
        common(workdir, "recipe=electricity_forecast", f"data.root={workdir / 'none'}", "data.in_memory=false"),
        cwd=workdir,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: recipe 'electricity_forecast' builds its own dataset from whole columns" in result.stderr
    assert not (workdir / "cache").exists() and not (workdir / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_streaming_trains_exactly_as_in_memory(workdir, processes):
    # auto with no budget left streams both splits: the mechanism a split larger than memory takes.
    args = ["trainer.epochs=2", "trainer.log_every=10"]
    ok(cli(common(workdir, *args, "data.in_memory=true", "run_name=memory"), cwd=workdir, processes=processes))
    streamed = ok(
        cli(common(workdir, *args, "data.in_memory_budget_gb=0", "run_name=stream"), cwd=workdir, processes=processes)
    )
    assert "data: train 1,437 rows (44 steps/epoch), eval 360 rows; all streamed from the shards" in streamed.stdout
    runs = workdir / "runs" / "digits"
    memory, stream = (json.loads((runs / name / "summary.json").read_text()) for name in ("memory", "stream"))
    assert memory["data"]["train"] == {"rows": 1437, "path": "memory", "why": "data.in_memory=true"}
    assert stream["data"]["eval"]["path"] == "stream" and stream["num_processes"] == processes
    assert stream["data"]["train"]["why"] == "101.0 KiB > budget 0 B, data.in_memory_budget_gb=0"
    assert stream["eval/loss"] == pytest.approx(memory["eval/loss"], rel=1e-6)
    a, b = load_file(runs / "memory" / "model.safetensors"), load_file(runs / "stream" / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)  # bitwise: the same batches, in the same order


@pytest.mark.slow
def test_a_streamed_split_takes_no_memory_of_its_own(workdir):
    # The mechanism of a split larger than memory, at CI size: 16,000 64x64 RGB images (197 MB as tensors)
    # held in memory raise a process's peak private memory by their size; streamed (auto, with a budget
    # they do not fit) they add nothing, the pages being the OS page cache's.
    from conftest import command, environment, peak_rss_anon

    data_args = ["recipe=synthetic", "data.rows=16000", "data.image_size=64", "data.channels=3", "data.num_proc=2"]
    ok(cli(common(workdir, *data_args), cwd=workdir, script="prepare"))
    train = [*data_args, "trainer.epochs=1", "trainer.max_steps=5"]
    peaks = {}
    for name, path in (("memory", "data.in_memory=true"), ("stream", "data.in_memory_budget_gb=0.01")):
        proc = subprocess.Popen(
            command(common(workdir, *train, path, f"run_name={name}")),
            cwd=workdir,
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        peaks[name] = peak_rss_anon(proc)
        assert proc.wait() == 0, proc.stderr.read()[-3000:]
    runs = workdir / "runs" / "synthetic"
    chosen = json.loads((runs / "stream" / "summary.json").read_text())["data"]
    assert chosen["train"]["path"] == chosen["eval"]["path"] == "stream", chosen
    size = 16000 * (3 * 64 * 64 + 8)
    print(
        f"peak RssAnon: {peaks['memory'] / 2**20:,.0f} MiB in memory, {peaks['stream'] / 2**20:,.0f} MiB streamed, "
        f"data {size / 2**20:,.0f} MiB"
    )
    assert peaks["memory"] - peaks["stream"] > 0.6 * size, {k: v / 2**20 for k, v in peaks.items()}

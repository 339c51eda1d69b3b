"""Preparing shards under several processes: no collective timeout on the wait, one fingerprint, errors reach
every process; a prepare shared by every process (each decodes its part of the shard files of an image folder) is
byte for byte the one-process build, a killed one is redone, an error in any process's part stops every process
with its message."""

import ctypes
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import ROOT, cli, command, common, environment, free_port, launch_flags, ok, run_dirs, summary
from PIL import Image

from pipeline import cli as pipeline_cli
from pipeline import decoded_shards, shard_store
from recipes import image_folder
from recipes._images import image_rows
from recipes._splits import split_train_eval

# digits whose prepare can be slowed or fail on one process, and whose raw_files logs which process called it
# (raw_files is what fingerprinting walks and stats).
SLOW_DIGITS = """
import dataclasses
import os
import time

from pipeline.errors import DataError
from recipes import digits


def raw_files(cfg):
    with open(os.environ["RAW_FILES_LOG"], "a") as f:
        f.write(os.environ.get("RANK", "0") + "\\n")
    return digits.raw_files(cfg)


def prepare(cfg):
    time.sleep(float(os.environ.get("PREPARE_SLEEP_S", "0")))
    if os.environ.get("PREPARE_FAILS_ON_RANK") == os.environ.get("RANK", "0"):
        raise DataError("the raw files of slow_digits are unreadable (a test)")
    return digits.prepare(cfg)


def model(cfg, meta):
    if os.environ.get("MODEL_SLOW_ON_RANK") == os.environ.get("RANK", "0"):
        time.sleep(30)
    return digits.recipe.model(cfg, meta)


recipe = dataclasses.replace(digits.recipe, name="slow_digits", prepare=prepare, raw_files=raw_files, model=model)
"""


@pytest.fixture
def slow_digits(workdir):
    """A working folder with the recipe above as `recipe=local.slow_digits`."""
    (workdir / "local").mkdir()
    (workdir / "local" / "slow_digits.py").write_text(SLOW_DIGITS)
    return workdir


def ranks_that_fingerprinted(workdir) -> list[str]:
    log = workdir / "raw_files.log"
    return log.read_text().split() if log.exists() else []


def machines(workdir, args_of: list[list[str]], env: dict, timeout: int = 300) -> list[tuple[int, str, float]]:
    """One `launch/run.py` "machine" of one process per item of `args_of`, on this host; each launcher's exit
    code is its process's. Returns (exit code, output, seconds until it ended) per machine."""
    port, procs, started = str(free_port()), [], time.monotonic()
    for rank, args in enumerate(args_of):
        cmd = [
            sys.executable,
            str(ROOT / "launch" / "run.py"),
            *launch_flags(len(args_of), machines=len(args_of), rank=rank, port=port),
            str(ROOT / "launch" / "train.py"),
            *args,
        ]
        log = workdir / f"machine{rank}.log"
        with open(log, "w") as out:
            procs.append(
                (subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=environment(1, env)), log)
            )
    ended = {}
    while len(ended) < len(procs) and time.monotonic() - started < timeout:
        ended.update(
            {i: time.monotonic() - started for i, (p, _) in enumerate(procs) if i not in ended and p.poll() is not None}
        )
        time.sleep(0.1)
    for proc, _ in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return [(proc.returncode, log.read_text(), ended.get(i, float("inf"))) for i, (proc, log) in enumerate(procs)]


@pytest.mark.slow
def test_a_prepare_longer_than_the_collective_timeout_still_trains(slow_digits):
    # The waiting process sits in no collective: a 20 s prepare outlasts trainer.dist_timeout_s=8.
    workdir = slow_digits
    result = ok(
        cli(
            common(
                workdir,
                "recipe=local.slow_digits",
                "trainer.epochs=1",
                "trainer.max_steps=5",
                "trainer.dist_timeout_s=8",
            ),
            cwd=workdir,
            processes=2,
            env={"PREPARE_SLEEP_S": "20", "RAW_FILES_LOG": str(workdir / "raw_files.log")},
        )
    )
    s = summary(workdir / "runs", "slow_digits")
    assert s["num_processes"] == 2 and s["eval/samples"] == 360
    assert result.stdout.count("data: preparing slow_digits") == 1
    assert ranks_that_fingerprinted(workdir) == ["0"]  # the other process was sent the shards' folder


@pytest.mark.slow
def test_training_collectives_time_out_after_dist_timeout_s(slow_digits):
    # Process 1 builds its model late: process 0 waits for it in DDP's first broadcast, for 8 s, not 30 min.
    workdir = slow_digits
    result = cli(
        common(workdir, "recipe=local.slow_digits", "trainer.epochs=1", "trainer.dist_timeout_s=8"),
        cwd=workdir,
        processes=2,
        launcher="run",
        env={"MODEL_SLOW_ON_RANK": "1", "RAW_FILES_LOG": str(workdir / "raw_files.log")},
    )
    assert result.returncode != 0 and "Timed out waiting 8000ms" in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_node_local_caches_build_once_per_node_from_one_fingerprint(slow_digits):
    # Two "machines" with a cache each (node-local): each node's main builds its own, from the folder name
    # that process 0 computed; only process 0 walks the raw files.
    workdir = slow_digits
    env = {"RAW_FILES_LOG": str(workdir / "raw_files.log")}
    args = [
        common(
            workdir,
            "recipe=local.slow_digits",
            "trainer.epochs=1",
            "trainer.max_steps=5",
            f"data.cache_dir={workdir / f'cache{m}'}",
        )
        for m in (0, 1)
    ]
    results = machines(workdir, args, env)
    assert [code for code, _, _ in results] == [0, 0], "\n".join(out[-3000:] for _, out, _ in results)
    assert ranks_that_fingerprinted(workdir) == ["0"]
    built = [sorted(p.name for p in (workdir / f"cache{m}" / "slow_digits").iterdir()) for m in (0, 1)]
    assert built[0] == built[1] and len(built[0]) == 1
    assert all((workdir / f"cache{m}" / "slow_digits" / built[0][0] / shard_store.META_FILE).exists() for m in (0, 1))
    assert summary(workdir / "runs", "slow_digits")["num_processes"] == 2


@pytest.mark.slow
def test_a_prepare_error_on_the_main_process_stops_every_process_with_its_message(slow_digits):
    # Only process 0 fails: the other would otherwise go on to build the shards itself and wait for it.
    workdir = slow_digits
    env = {"RAW_FILES_LOG": str(workdir / "raw_files.log"), "PREPARE_FAILS_ON_RANK": "0"}
    args = common(workdir, "recipe=local.slow_digits", "trainer.epochs=1", "trainer.dist_timeout_s=600")
    results = machines(workdir, [args, args], env, timeout=180)
    for code, out, _ in results:
        assert code == 2, out[-3000:]
        assert "error: the raw files of slow_digits are unreadable (a test)" in out, out[-3000:]
        assert "Traceback" not in out
    assert abs(results[0][2] - results[1][2]) < 30  # the second one did not wait for a timeout
    assert run_dirs(workdir / "runs", "slow_digits") == []


@pytest.mark.slow
def test_evaluate_on_other_data_waits_for_a_long_prepare_on_two_processes(slow_digits):
    # launch/evaluate.py with data.* overrides prepares new shards the same way as training.
    workdir = slow_digits
    log = {"RAW_FILES_LOG": str(workdir / "raw_files.log")}
    ok(
        cli(
            common(workdir, "recipe=local.slow_digits", "trainer.epochs=1", "trainer.max_steps=5"), cwd=workdir, env=log
        )
    )
    run = run_dirs(workdir / "runs", "slow_digits")[0]
    result = ok(
        cli(
            [f"run={run}", "data.eval_fraction=0.3", "trainer.eval_batch_size=64", "trainer.dist_timeout_s=8"],
            cwd=workdir,
            processes=2,
            script="evaluate",
            env={**log, "PREPARE_SLEEP_S": "20"},
        )
    )
    assert "540 samples, 2 processes" in result.stdout
    assert ranks_that_fingerprinted(workdir) == ["0", "0"]  # the training run's, then process 0's alone
    assert len(list((workdir / "cache" / "slow_digits").iterdir())) == 2


def test_the_waiting_process_says_whom_it_waits_for(capsys):
    with shard_store._waiting("process 1 waiting for process 0 to prepare the shards", speak=True, every=0.05):
        time.sleep(0.3)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 2 and lines[0] == "data: process 1 waiting for process 0 to prepare the shards (0 min)"
    with shard_store._waiting("process 2 waiting", speak=False, every=0.05):
        time.sleep(0.2)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- one prepare shared by every process

# image_folder, with decoding that can be slowed (so that a test can kill a build half way).
SLOW_IMAGES = """
import dataclasses
import os
import time
from functools import partial

from recipes import image_folder


def slowly(decode, batch):
    time.sleep(float(os.environ.get("DECODE_SLEEP_S", "0")))
    return decode(batch)


def prepare(cfg):
    splits, meta = image_folder.prepare(cfg)
    return {k: v.__class__(v.rows, partial(slowly, v.decode), v.features) for k, v in splits.items()}, meta


recipe = dataclasses.replace(image_folder.recipe, name="slow_images", prepare=prepare)
"""


def write_images(folder: Path, per_class: int = 30, classes: int = 3) -> Path:
    """PNG files of 20-40 px in `classes` class folders: noise around a class-coloured square."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(20, 41, 2))
            pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            pixels[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, c] = 220
            Image.fromarray(pixels).save(folder / f"class{c}" / f"{i:03d}.png")
    return folder


def prepare_args(workdir: Path, cache: str, *extra: str) -> list[str]:
    return [
        f"data.train_dir={workdir / 'images'}",
        "data.image_size=16",
        "data.num_shards=3",
        f"data.cache_dir={workdir / cache}",
        *extra,
    ]


def run_prepare(workdir: Path, processes: int, args: list[str], **popen) -> subprocess.CompletedProcess:
    """launch/prepare.py on `processes` processes, under launch/run.py (which passes the exit code on)."""
    return subprocess.run(
        command(args, processes, script="prepare", launcher="run"),
        cwd=workdir,
        env=environment(processes, popen.pop("env", None)),
        capture_output=True,
        text=True,
        timeout=300,
    )


def built(cache: Path) -> dict[str, bytes]:
    """Every file of the one shard folder under `cache`, by its path below the recipe's folder."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_processes_build_the_one_process_shards_byte_for_byte(workdir):
    write_images(workdir / "images")
    one = run_prepare(workdir, 1, ["recipe=image_folder", *prepare_args(workdir, "one")])
    two = run_prepare(workdir, 2, ["recipe=image_folder", *prepare_args(workdir, "two", "data.num_proc=2")])
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert "data: 2 processes decode 6 shard files" in two.stdout  # 3 for train and 3 for eval
    assert two.stdout.count("shards ready:") == 1  # the main process speaks
    first, second = built(workdir / "one"), built(workdir / "two")
    assert first.keys() == second.keys() and len([k for k in first if k.endswith(".arrow")]) == 6
    assert first == second  # one fingerprint (the folder's name), the same bytes in every file


@pytest.mark.slow
def test_a_killed_shared_build_is_redone_to_the_same_shards(workdir):
    write_images(workdir / "images")
    (workdir / "local").mkdir()
    (workdir / "local" / "slow_images.py").write_text(SLOW_IMAGES)
    args = ["recipe=local.slow_images", *prepare_args(workdir, "cache")]
    proc = subprocess.Popen(
        command(args, 2, script="prepare"),
        cwd=workdir,
        env=environment(2, {"DECODE_SLEEP_S": "2"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if "processes decode" in line:
            break
    time.sleep(3)  # every process is in its first batches
    for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        process.send_signal(signal.SIGKILL)  # the launcher and its workers, which run in sessions of their own
    proc.wait()
    recipe_folder = workdir / "cache" / "slow_images"
    assert not [p for p in recipe_folder.iterdir() if (p / shard_store.META_FILE).exists()]  # nothing looks finished
    assert [p for p in recipe_folder.iterdir() if ".tmp-" in p.name]  # what the killed build left
    again = run_prepare(workdir, 2, args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "left by a build that was killed" in again.stdout  # says it redoes the build
    clean = run_prepare(workdir, 1, ["recipe=local.slow_images", *prepare_args(workdir, "clean")])
    assert clean.returncode == 0
    assert built(workdir / "cache") == built(workdir / "clean")


@pytest.mark.slow
def test_a_broken_image_in_any_process_part_stops_every_process(workdir):
    write_images(workdir / "images")
    (workdir / "images" / "class1" / "broken.png").write_bytes(b"not a png")
    result = run_prepare(workdir, 2, ["recipe=image_folder", *prepare_args(workdir, "cache")])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("error: not a readable image:") == 1 and "broken.png" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    recipe_folder = workdir / "cache" / "image_folder"
    assert not recipe_folder.exists() or not [p for p in recipe_folder.iterdir()]  # nothing left behind


def test_decoding_while_writing_gives_the_rows_of_decoding_first(tmp_path):
    # Holding out by labels before decoding chooses the rows that holding out decoded images chose.
    write_images(tmp_path / "images", per_class=10)
    recipe, cfg = pipeline_cli.parse(
        [
            "recipe=image_folder",
            f"data.train_dir={tmp_path / 'images'}",
            "data.image_size=8",
            "data.eval_fraction=0.3",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    splits, _ = shard_store.open_shards(shard_store.prepare(recipe, cfg))
    folder = image_folder.read_folder(cfg, "train")
    read = image_folder.partial(image_folder.read_image, channels=3, max_pixels=cfg.data.max_image_pixels)
    decoded = image_rows([p for p, _ in folder.samples], {"label": (folder.targets, folder.classes)}, read, 3, cfg)
    train, held = split_train_eval(decoded, 0.3, cfg.data.split_seed)
    for name, expected in (("train", train), ("eval", held)):
        got = splits[name].with_format("numpy")[:]
        want = expected.with_format("numpy")[:]
        assert np.array_equal(got["image"], want["image"]) and np.array_equal(got["label"], want["label"])


def test_shard_files_depend_on_the_data_alone():
    import datasets

    features = datasets.Features({"image": datasets.Array3D(shape=(3, 224, 224), dtype="uint8")})
    rows = datasets.Dataset.from_dict({"path": ["x"] * 10_000})
    split = decoded_shards.Undecoded(rows, len, features)
    # 10,000 photographs of 224 px: 1.5 GB decoded, 12 files of at most 128 MiB, for 1 process or 64.
    assert decoded_shards.shard_count(split, 4) == 12
    jobs = decoded_shards.jobs({"train": split}, 4)
    for processes in (1, 2, 3, 64):
        parts = [decoded_shards.mine(jobs, p, processes) for p in range(processes)]
        assert sorted(job for part in parts for job in part) == sorted(jobs)


# A process that decodes a share of a build and has freed no large block yet (as one handed its share has not):
# 40 batches of 64 images of 3x64x64 (768 KiB a batch), and the minor page faults writing them took.
FRESH_DECODER = """
import resource, sys
from pathlib import Path
import datasets, numpy as np
from pipeline import decoded_shards

features = datasets.Features({"image": datasets.Array3D(shape=(3, 64, 64), dtype="uint8")})
def decode(batch):
    return {"image": np.stack([np.full((3, 64, 64), len(p), dtype=np.uint8) for p in batch["path"]])}
split = decoded_shards.Undecoded(datasets.Dataset.from_dict({"path": ["x"] * 64 * 40}), decode, features)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
decoded_shards.write_shard(split, 0, 1, Path(sys.argv[1]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="glibc's malloc only")
def test_a_fresh_decoding_process_reuses_its_batches_memory(tmp_path):
    # Without keep_freed_memory glibc maps each batch's arrays afresh: about 26,000 faults here, 130 batches' pages.
    result = subprocess.run(
        [sys.executable, "-c", FRESH_DECODER, str(tmp_path)],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    batch_pages = 64 * 3 * 64 * 64 // 4096
    assert int(result.stdout.split()[-1]) < 10 * batch_pages  # a few batches' pages, not new ones every batch

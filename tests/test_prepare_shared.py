"""A prepare shared by every process of a launch: each process decodes its part of the shard files of an image
folder, and the result is byte for byte the one-process build, under one fingerprint; a killed build is
redone; an error in any process's part stops every process with its message."""

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import command, environment
from PIL import Image

from pipeline import cli as pipeline_cli
from pipeline import decoded_shards, shard_store
from recipes import image_folder
from recipes._images import image_rows
from recipes._splits import split_train_eval

# image_folder, with decoding that can be slowed (so that a test can kill a build half way).
SLOW_IMAGES = '''
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
'''


def write_images(folder: Path, per_class: int = 30, classes: int = 3) -> Path:
    """PNG files of 20-40 px in `classes` class folders: noise around a class-coloured square."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(20, 41, 2))
            pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            pixels[h // 4: 3 * h // 4, w // 4: 3 * w // 4, c] = 220
            Image.fromarray(pixels).save(folder / f"class{c}" / f"{i:03d}.png")
    return folder


def prepare_args(workdir: Path, cache: str, *extra: str) -> list[str]:
    return [f"data.train_dir={workdir / 'images'}", "data.image_size=16", "data.num_shards=3",
            f"data.cache_dir={workdir / cache}", *extra]


def run_prepare(workdir: Path, processes: int, args: list[str], **popen) -> subprocess.CompletedProcess:
    """launch/prepare.py on `processes` processes, under launch/run.py (which passes the exit code on)."""
    return subprocess.run(command(args, processes, script="prepare", launcher="run"), cwd=workdir,
                          env=environment(processes, popen.pop("env", None)), capture_output=True, text=True,
                          timeout=300)


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
    proc = subprocess.Popen(command(args, 2, script="prepare"), cwd=workdir,
                            env=environment(2, {"DECODE_SLEEP_S": "2"}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
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
    recipe, cfg = pipeline_cli.parse(["recipe=image_folder", f"data.train_dir={tmp_path / 'images'}",
                                      "data.image_size=8", "data.eval_fraction=0.3",
                                      f"data.cache_dir={tmp_path / 'cache'}"])
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

"""Throughput of preparing a table or an image folder: generates one of a given size, prepares it (recipe=tabular
or recipe=image_folder) on 1..N processes of their own, and reports rows/s, MB/s and each process's peak memory.

python launch/bench_prepare.py --mb 1000 --folder /tmp/bench     # a CSV of ~9M rows x 10 columns
python launch/bench_prepare.py --mb 100 --folder /tmp/bench data.impute=mean   # more keys go to the recipe
python launch/bench_prepare.py --images 40000 --side 96 --processes 1,2 --repeat 2 --folder /tmp/bench --project 8x32
The CSV (8 numbers, one empty cell in 20 in x1, a category, a 3-class label) or the JPEGs (10 class folders) are
made once per size and seed and reused; the shards go to <folder>/cache and are rebuilt on every run.
`--project MxC` prints how long 1.28M images (ImageNet's train split) would take on M machines of C cores, from
the rate per process measured here (one process per core, as `data.num_proc` or launched processes use them).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS_PER_CHUNK = 100_000
PRIVATE_EVERY = 20  # samples of 50 ms


def generate(path: Path, mb: float, seed: int = 0) -> int:
    """Writes rows to `path` until it holds `mb` megabytes; returns the rows written."""
    import numpy as np
    import pyarrow as pa
    from pyarrow import csv as pa_csv

    rng, rows, tmp = np.random.default_rng(seed), 0, path.with_suffix(".tmp")
    colors = np.array(["red", "green", "blue", "amber", "violet"])
    with pa_csv.CSVWriter(
        tmp, pa.schema([*((f"x{i}", pa.float64()) for i in range(8)), ("color", pa.string()), ("label", pa.int64())])
    ) as writer:
        while tmp.stat().st_size < mb * 1e6:
            x = (rng.normal(size=(ROWS_PER_CHUNK, 8)) * [1, 10, 100, 1, 1, 5, 50, 1000]).round(8)
            color = rng.integers(0, len(colors), ROWS_PER_CHUNK)
            label = (x[:, 0] + x[:, 1] / 10 + (color == 2) > 0.5).astype(np.int64) + (x[:, 2] > 100)
            columns = {f"x{i}": pa.array(x[:, i]) for i in range(8)}
            columns["x1"] = pa.array(x[:, 1], mask=rng.random(ROWS_PER_CHUNK) < 0.05)  # empty: imputed
            writer.write_table(pa.table({**columns, "color": pa.array(colors[color]), "label": label}))
            rows += ROWS_PER_CHUNK
    tmp.rename(path)
    return rows


def generate_images(folder: Path, count: int, side: int, seed: int = 0) -> None:
    """`count` JPEGs of side x side px in 10 class folders: shifted noise, as varied as photographs to decode."""
    import numpy as np
    from PIL import Image

    rng, tmp = np.random.default_rng(seed), folder.with_name(folder.name + ".tmp")
    base = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    for c in range(10):
        (tmp / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.roll(base, i % side, axis=i % 2) ^ np.uint8(i % 251)
        Image.fromarray(pixels).save(tmp / f"class{i % 10}" / f"{i:07d}.jpg", quality=90)
    tmp.rename(folder)


def launched(processes: int, script_args: list[str]) -> list[str]:
    script = str(ROOT / "launch" / "prepare.py")
    if processes == 1:
        return [sys.executable, script, *script_args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), script, *script_args]


def timed(command: list[str], env: dict | None = None) -> tuple[str, tuple[int, int, int]]:
    """Runs `command`; returns its output and the memory of the one of its processes that took the most:
    (max RSS, peak private, peak anonymous). Max RSS is the kernel's high-water mark (VmHWM, what ru_maxrss and a
    cluster's memory limit count): memory of its own and the pages of files it maps (libraries, memory-mapped
    shards). Private (Private_Clean + Private_Dirty of smaps_rollup) leaves out pages other processes map too;
    anonymous (RssAnon) is what the kernel cannot drop. Anonymous memory is sampled every 50 ms, private memory
    and the processes' list every PRIVATE_EVERY samples: both walk much more (a process's page tables, every
    process), and at every sample they slowed the prepare they measured. `env`: the processes' environment
    (default this one's, with OMP_NUM_THREADS=1)."""
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": "1"} if env is None else env
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peaks: dict[int, tuple[int, int, int]] = {}
    family, sample = [], 0
    while proc.poll() is None:
        full = sample % PRIVATE_EVERY == 0
        if full:
            try:
                family = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
            except psutil.Error:
                family = []
        for pid in family:
            try:
                now = memory(pid, private=full)
            except OSError:  # the process ended
                continue
            peaks[pid] = tuple(max(a, b) for a, b in zip(peaks.get(pid, (0, 0, 0)), now))
        sample += 1
        time.sleep(0.05)
    output = proc.stdout.read()
    if proc.returncode:
        sys.exit(f"prepare failed (exit {proc.returncode}):\n{output}")
    return output, tuple(max((p[i] for p in peaks.values()), default=0) for i in range(3))


def memory(pid: int, private: bool = True) -> tuple[int, int, int]:
    """(VmHWM, Private_Clean + Private_Dirty (0 unless `private`), RssAnon) of process `pid`, in bytes."""
    texts = [Path(f"/proc/{pid}/status").read_text()]
    if private:
        texts.append(Path(f"/proc/{pid}/smaps_rollup").read_text())
    kb = {
        line.split(":")[0]: int(line.split()[1])
        for text in texts
        for line in text.splitlines()
        if line.split(":")[0] in ("VmHWM", "Private_Clean", "Private_Dirty", "RssAnon")
    }
    if "VmHWM" not in kb:  # a process that has ended, not yet reaped
        raise ProcessLookupError(pid)
    return kb["VmHWM"] * 1024, (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) * 1024, kb["RssAnon"] * 1024


def gib(peak: tuple[int, int, int]) -> str:
    return (
        f"max RSS {peak[0] / 2**30:.2f} GiB, peak private {peak[1] / 2**30:.2f} GiB (anonymous "
        f"{peak[2] / 2**30:.2f} GiB)"
    )


def bench_images(args, keys: list[str]) -> None:
    folder = args.folder / f"images-{args.images}x{args.side}px-seed{args.seed}"
    if not folder.exists():
        started = time.perf_counter()
        generate_images(folder, args.images, args.side, args.seed)
        print(f"generated {folder} ({args.images:,} JPEGs) in {time.perf_counter() - started:.0f} s")
    # Every count starts with the raw files in the page cache: the first would otherwise pay for reading them.
    for path in folder.rglob("*.jpg"):
        path.read_bytes()
    # The counts take turns (1, 2, 1, 2, ...), so that a change in the machine's other work weighs on each alike.
    seconds = {processes: [] for processes in args.processes}
    for _ in range(args.repeat):
        for processes in args.processes:
            seconds[processes].append(prepare_images(args, keys, folder, processes))
    first, best = args.processes[0], {processes: min(times) for processes, times in seconds.items()}
    for processes in args.processes[1:]:
        rounds = ", ".join(f"{mine / theirs:.2f}x" for mine, theirs in zip(seconds[processes], seconds[first]))
        print(
            f"{processes} vs {first} process(es): {best[processes] / best[first]:.2f}x the time (best of each; "
            f"each round: {rounds})"
        )
    if args.project:
        machines, cores = (int(n) for n in args.project.lower().split("x"))
        most = max(best)  # the rate per process where the most processes shared the work
        per_process = args.images / best[most] / most
        seconds = 1_281_167 / (per_process * machines * cores)
        print(
            f"projection: 1,281,167 images at {args.side} px on {machines} machine(s) x {cores} cores at "
            f"{per_process:,.0f} images/s per process: {seconds // 60:,.0f} min {seconds % 60:.0f} s (decoding JPEGs "
            f"this size; photographs of ~110 KB decode several times slower)"
        )


def prepare_images(args, keys: list[str], folder: Path, processes: int) -> float:
    """One prepare of `folder` into an empty cache on `processes` processes, started as a user starts them: one
    process with its defaults, several by torchrun (which gives each OMP_NUM_THREADS=1); returns its seconds."""
    # The last run's shards are removed first, not by --rebuild: deleting a GB of files is not preparing.
    shutil.rmtree(args.folder / "cache", ignore_errors=True)
    load, started, before = os.getloadavg()[0], time.perf_counter(), cpu_seconds()
    script_args = [
        "recipe=image_folder",
        f"data.train_dir={folder}",
        f"data.image_size={args.side}",
        f"data.cache_dir={args.folder / 'cache'}",
        *keys,
    ]
    output, peak = timed(launched(processes, script_args), env=dict(os.environ))
    wall, others = time.perf_counter() - started, cpu_seconds() - before
    own = re.search(r"prepared ([\d,]+) rows in ([\d.]+) s \(.*?, ([\d.,]+) (GB|MB) of shards", output)
    rows, seconds = int(own[1].replace(",", "")), float(own[2])
    print(
        f"{processes} process(es): {rows:,} images in {seconds:.1f} s: {rows / seconds:,.0f} images/s "
        f"({rows / seconds / processes:,.0f} per process), {own[3]} {own[4]} of shards; {wall:.1f} s with the "
        f"processes' start; load average {load:.2f} before, {others:.1f} CPU-s of other work meanwhile; one "
        f"process's {gib(peak)}",
        flush=True,
    )
    return seconds


def cpu_seconds() -> float:
    """CPU seconds the machine has spent on anything but this bench and the processes it ran and waited for:
    the other work that shares the cores with a measurement (the kernel's own included)."""
    import resource

    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    own = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return (user + nice + system + irq + softirq + steal) / ticks - sum(r.ru_utime + r.ru_stime for r in own)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="size of the CSV in megabytes")
    parser.add_argument("--folder", type=Path, default=Path("bench_prepare"), help="where the CSV and shards go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=0, help="benchmark an image folder of this many JPEGs")
    parser.add_argument("--side", type=int, default=96, help="the images' side in pixels (and data.image_size)")
    parser.add_argument(
        "--processes",
        type=lambda v: [int(n) for n in v.split(",")],
        default=[1],
        help="process counts to prepare with, e.g. 1,2",
    )
    parser.add_argument("--project", default="", help="MxC: project 1.28M images on M machines of C cores")
    parser.add_argument("--repeat", type=int, default=1, help="prepare with each process count this many times")
    args, keys = parser.parse_known_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    if args.images:
        bench_images(args, keys)
        return
    path = args.folder / f"table-{args.mb:g}mb-seed{args.seed}.csv"
    if not path.exists():
        started = time.perf_counter()
        rows = generate(path, args.mb, args.seed)
        print(
            f"generated {path} ({rows:,} rows, {path.stat().st_size / 1e6:,.0f} MB) in "
            f"{time.perf_counter() - started:.0f} s"
        )
    command = [
        sys.executable,
        str(ROOT / "launch" / "prepare.py"),
        "recipe=tabular",
        f"data.file={path}",
        "data.target=label",
        f"data.cache_dir={args.folder / 'cache'}",
        *keys,
        "--rebuild",
    ]
    started = time.perf_counter()
    output, peak = timed(command)
    seconds = time.perf_counter() - started
    # The preparation's own time, as launch/prepare.py prints it: the process's also holds Python's start.
    own = re.search(r"prepared ([\d,]+) rows in ([\d.]+) s", output)
    rows, prepare_s = int(own[1].replace(",", "")), float(own[2])
    size = path.stat().st_size
    print(
        f"prepared {rows:,} rows ({size / 1e6:,.0f} MB of CSV) in {prepare_s:.1f} s: {rows / prepare_s:,.0f} "
        f"rows/s, {size / 1e6 / prepare_s:,.1f} MB/s; the process took {seconds:.1f} s with its start, {gib(peak)}"
    )


if __name__ == "__main__":
    main()

"""In memory or streamed: what a split takes as tensors, what memory this process may use, and the choice
of path for each split (`choose_paths`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import datasets
import pyarrow as pa

from pipeline.errors import ConfigError
from pipeline.files import size_text
from pipeline.tensor_rows import feature_shape


def tensor_bytes(split: datasets.Dataset) -> int:
    """What a split takes as whole tensors (`columns`), from its schema: nothing is read."""
    row = 0
    for name, feature in split.features.items():
        arrow_type = split.data.schema.field(name).type
        arrow_type = arrow_type.storage_type if isinstance(arrow_type, pa.ExtensionType) else arrow_type
        while pa.types.is_fixed_size_list(arrow_type) or pa.types.is_list(arrow_type):
            arrow_type = arrow_type.value_type
        width = arrow_type.bit_width if pa.types.is_primitive(arrow_type) else 64
        row += math.prod(feature_shape(feature)) * max(width // 8, 1)
    return row * len(split)


def available_memory() -> int:
    """Bytes this process can still take: the kernel's MemAvailable, within its cgroup's memory limit (a
    container's, a SLURM job's) and those of the cgroups above it."""
    try:
        info = Path("/proc/meminfo").read_text()
        available = int(next(line.split()[1] for line in info.splitlines() if line.startswith("MemAvailable"))) * 1024
    except (OSError, StopIteration, ValueError):  # not Linux
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        groups = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return available
    for line in groups:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:  # cgroup v2
            folder, limit, usage = Path("/sys/fs/cgroup"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # cgroup v1
            folder, limit, usage = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        group = folder / path.lstrip("/")
        for level in [group, *group.parents]:  # a limit may sit on any cgroup above this one
            if not level.is_relative_to(folder):
                break
            try:
                cap, used = (level / limit).read_text().strip(), int((level / usage).read_text())
            except (OSError, ValueError):
                continue
            if cap.isdigit() and int(cap) < 2**60:
                available = min(available, max(int(cap) - used, 0))
    return available


def check_in_memory(cfg, own_dataset: bool) -> None:
    """A recipe's own dataset builds its rows (windows of a series, ...) from whole columns: never streamed."""
    if own_dataset and cfg.data.in_memory.name == "false":
        raise ConfigError(
            f"recipe {cfg.recipe!r} builds its own dataset from whole columns, which cannot be "
            f"read a batch at a time; use data.in_memory=auto or true"
        )


def choose_paths(cfg, splits: dict, processes_on_node: int, own_dataset: bool) -> dict[str, tuple[bool, str]]:
    """{split: (in memory?, why)}: `data.in_memory`, and for auto, whether the split's tensors fit in what is
    left of the budget (train first: it is read every step; eval and test once an epoch)."""
    wanted = cfg.data.in_memory.name
    check_in_memory(cfg, own_dataset)
    if own_dataset:
        return {name: (True, "the recipe's dataset needs whole columns") for name in splits}
    if wanted != "auto":
        return {name: (wanted == "true", f"data.in_memory={wanted}") for name in splits}
    if cfg.data.in_memory_budget_gb is not None:
        budget = int(cfg.data.in_memory_budget_gb * 2**30)
        rule = f"data.in_memory_budget_gb={cfg.data.in_memory_budget_gb:g}"
    else:
        available = available_memory()
        budget = available // 4 // processes_on_node
        rule = f"a quarter of {size_text(available)} available / {processes_on_node} process(es) on this node"
    paths = {}
    for name in sorted(splits, key=lambda n: n != "train"):
        size = tensor_bytes(splits[name])
        fits = size <= budget
        paths[name] = (fits, f"{size_text(size)} {'<=' if fits else '>'} budget {size_text(budget)}, {rule}")
        budget -= size if fits else 0
    return {name: paths[name] for name in splits}

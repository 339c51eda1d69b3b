"""Rows in memory: a prepared split as one tensor per column (read straight from Arrow), indexed a whole
batch at a time (`Rows`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch

from pipeline.shard_store import check_shards


def columns(split: datasets.Dataset) -> dict[str, torch.Tensor]:
    """Every column of a prepared split as one tensor, read straight from Arrow (no per-row Python)."""
    try:
        table = split.with_format("arrow")[:]
    except (pa.ArrowException, OSError):
        for out in {Path(f["filename"]).parent.parent for f in split.cache_files}:
            check_shards(out, full=True)  # names the damaged shard file, if that is the cause
        raise
    return {name: column_tensor(table.column(name), len(split), feature) for name, feature in split.features.items()}


def column_tensor(column: pa.ChunkedArray, rows: int, feature) -> torch.Tensor:
    # Chunk by chunk: Arrow's combine_chunks overflows the 32-bit list offsets of an image column past 2^31
    # values (2 GB of uint8), and one chunk stays a zero-copy view of the mapped file.
    parts = [arrow_values(chunk).to_numpy(zero_copy_only=False) for chunk in column.chunks]
    values = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0)
    with warnings.catch_warnings():  # Arrow buffers are read-only; nothing here writes to them
        warnings.simplefilter("ignore", UserWarning)
        values = torch.from_numpy(values)
    return values.view(rows, *feature_shape(feature)) if rows else values


def arrow_values(arr: pa.Array) -> pa.Array:
    """The flat values of a (nested) list or array column: one row's values after the other."""
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    while pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type):
        arr = arr.flatten()
    return arr


def feature_shape(feature) -> tuple:
    if hasattr(feature, "shape"):  # Array2D/3D/...
        return tuple(feature.shape)
    length = getattr(feature, "length", -1)  # fixed-length Sequence / List
    return (length,) if length and length > 0 else ()


class Rows(torch.utils.data.Dataset):
    """Tensors with one row per sample; `rows[indices]` returns a whole batch in one indexing op."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.length = len(next(iter(tensors.values())))
        self.device = next(iter(tensors.values())).device

    def __len__(self):
        return self.length

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        if idx.device != self.device:  # from pinned memory the copy does not wait for the GPU's queue
            idx = idx.pin_memory().to(self.device, non_blocking=True)
        # index_select, not v[idx]: a gather of whole rows along the first dimension; advanced indexing is slower
        # for image rows on a CPU.
        return {k: v.index_select(0, idx) for k, v in self.tensors.items()}

    __getitem__ = __getitems__

    def to(self, device) -> Rows:
        return Rows({k: v.to(device) for k, v in self.tensors.items()})


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())

"""Streaming: a prepared split read from its memory-mapped shard files a batch at a time (`Stream`), in the
same order and as the same tensors as the rows in memory.
"""

from __future__ import annotations

import ctypes
import math

import datasets
import numpy as np
import pyarrow as pa
import torch

from pipeline.tensor_rows import arrow_values, column_tensor, feature_shape


class Stream(torch.utils.data.Dataset):
    """A prepared split read from its memory-mapped Arrow files: `stream[indices]` copies just those rows.

    No process holds the split: the files' pages live in the OS page cache, which the processes of a node
    share. Every prepared column is fixed-width (see `recipe_contract.check_prepared`), so within a file a row's
    bytes sit at a fixed address: `starts[column][row]`. One `index_select` over a strided byte view of the
    mapped address range then copies a whole batch in one call. (pyarrow's `take` on a multi-chunk column
    concatenates the whole column first, so each batch would copy the split's column, not its rows.)
    A column that is not byte-addressable (booleans are bit-packed) or has nulls is read with `take`.
    """

    def __init__(self, files: list[str], features: datasets.Features):
        self.files, self.features = list(files), features
        self._open()

    def _open(self) -> None:
        # Zero-copy buffers over whole-file maps; kept here, so the addresses below stay mapped.
        self.maps = [pa.memory_map(f).read_buffer() for f in self.files]
        table = pa.concat_tables(pa.ipc.open_stream(pa.BufferReader(m)).read_all() for m in self.maps)
        self.length = len(table)
        base = min(m.address for m in self.maps)
        span = max(m.address + m.size for m in self.maps) - base
        # The address range from the first mapped file to the end of the last, as bytes; only the rows'
        # own bytes (inside the files) are ever read.
        whole = torch.from_numpy(
            np.ctypeslib.as_array(ctypes.cast(base, ctypes.POINTER(ctypes.c_uint8)), shape=(span,))
        )
        self.fixed, self.other = {}, {}
        for name, feature in self.features.items():
            starts = _row_starts(table.column(name), math.prod(feature_shape(feature)), base)
            if starts is None:
                self.other[name] = (table.column(name), feature)
                continue
            dtype = _torch_dtype(arrow_values(table.column(name).chunk(0)).type)
            width = math.prod(feature_shape(feature)) * dtype.itemsize
            # Row i of this view is the `width` bytes from address base + i: a batch is index_select(starts).
            window = torch.as_strided(whole, (span - width + 1, width), (1, 1))
            self.fixed[name] = (window, starts, dtype, feature_shape(feature))

    def __getstate__(self):  # DataLoader workers started by spawn map the files again
        return {"files": self.files, "features": self.features}

    def __setstate__(self, state):
        self.__init__(state["files"], state["features"])

    def __len__(self):
        return self.length

    def __getitems__(self, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        batch = {}
        for name in self.features:
            if name in self.fixed:
                window, starts, dtype, shape = self.fixed[name]
                batch[name] = window.index_select(0, starts.index_select(0, idx)).view(dtype).view(len(idx), *shape)
            else:
                column, feature = self.other[name]
                batch[name] = column_tensor(column.take(pa.array(idx.numpy())), len(idx), feature)
        return batch

    __getitem__ = __getitems__


def _row_starts(column: pa.ChunkedArray, per_row: int, base: int) -> torch.Tensor | None:
    """Each row's first byte as an offset from `base`, or None where rows are not evenly laid out bytes."""
    starts = []
    for chunk in column.chunks:
        values = arrow_values(chunk)
        width = values.type.bit_width if pa.types.is_primitive(values.type) else 0
        if width % 8 or width == 0 or chunk.null_count or values.null_count or len(values) != len(chunk) * per_row:
            return None
        size = width // 8
        first = values.buffers()[1].address + values.offset * size - base
        starts.append(first + np.arange(len(chunk), dtype=np.int64) * per_row * size)
    return torch.from_numpy(np.concatenate(starts)) if starts else None  # no rows: nothing to address


def _torch_dtype(arrow_type: pa.DataType) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=arrow_type.to_pandas_dtype())).dtype


def stream(split: datasets.Dataset) -> Stream:
    """A split's rows, read from its shard files batch by batch (see `Stream`)."""
    return Stream([f["filename"] for f in split.cache_files], split.features)

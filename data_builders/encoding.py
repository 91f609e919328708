"""Arrow encoding of a batch of built rows: image columns from one stacked numpy buffer per batch.

`_encode_rows` turns rows into the columns `ArrowWriter.write_batch` takes; its `ArrayXD` columns
are built by `arrow_tensor_column` (the storage `datasets` writes, without per-row Python lists).
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np


@functools.lru_cache(maxsize=32)
def _list_offsets(rows: int, shape: tuple) -> tuple:
    """int32 offsets of the nested Arrow lists holding `rows` arrays of `shape`, outermost first."""
    import pyarrow as pa

    offsets = []
    for size in shape:
        offsets.append(pa.array(np.arange(rows + 1, dtype=np.int32) * np.int32(size)))
        rows *= size
    return tuple(offsets)


def arrow_tensor_column(arrays: Sequence[np.ndarray], pa_type):
    """The Arrow array of an `ArrayXD` column (`pa_type`, its extension type) holding `arrays`.

    The same storage `datasets` writes (nested lists with int32 offsets over the flat values), but
    built from one stacked copy of the arrays instead of per-row flatten/convert/concatenate passes.
    """
    import pyarrow as pa

    shape = tuple(pa_type.shape)
    stacked = np.stack(arrays).astype(pa_type.value_type, copy=False)
    if stacked.shape[1:] != shape:
        raise ValueError(f"arrays of shape {stacked.shape[1:]} in a column of shape {shape}")
    storage = pa.array(stacked.reshape(-1))
    for offsets in reversed(_list_offsets(len(arrays), shape)):
        storage = pa.ListArray.from_arrays(offsets, storage)
    return pa.ExtensionArray.from_storage(pa_type, storage)


def _encode_rows(rows: list[dict], features) -> dict:
    """A batch of rows as columns for `ArrowWriter.write_batch`: the array columns already in
    Arrow, the scalar and sidecar columns as lists (encoded by `datasets` as before)."""
    from datasets import Array2D, Array3D
    from datasets.features.features import get_nested_type

    columns = {}
    for name, feature in features.items():
        values = [row[name] for row in rows]
        if isinstance(feature, (Array2D, Array3D)):
            values = arrow_tensor_column(values, get_nested_type(feature))
        columns[name] = values
    return columns

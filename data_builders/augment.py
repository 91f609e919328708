"""Training-time augmentation: the same random flip / 90-degree rotation for every image column.

    from data_builders.augment import make_train_transform, make_eval_transform
    loader = DataLoader(train_ds.with_format("numpy"), batch_size=8, collate_fn=make_train_transform().collate)

Training and evaluation read the Arrow data in numpy format and apply the transform when batches are collated
(the array work is numpy views and one copy: torch's multi-threaded rot90/stack are far slower on a busy CPU).
The transform never touches the stored Arrow data. Called on a batch it draws from torch's global RNG (one
`torch.randint` per batch); with a data loader that prefetches, which batch sees which RNG state depends on
timing, so the trainer's `training.data.TileDataset` calls it row by row under a torch RNG seeded by
(seed, epoch, row index) instead.

It also works with `Dataset.set_transform(make_train_transform())`, but `set_transform` hands the transform
Python lists (datasets' CustomFormatter converts Arrow to Python objects first), which costs ~20-25 ms per tile
whatever the transform does.

(bench/results/data_throughput.md has the numbers.)
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

SPATIAL_COLUMNS = ("target", "opt_v1", "valid_mask", "s1")
"""Columns whose last two axes are (H, W): flipped and rotated together."""

NUM_DIHEDRAL_OPS = 8
"""Identity, three rotations, and each of those followed by a left-right flip (the D4 group)."""

_COLUMN_DTYPES = {"target": np.float32, "opt_v1": np.float32, "s1": np.float32, "valid_mask": np.bool_}


def dihedral(x: torch.Tensor, op: int) -> torch.Tensor:
    """One of the 8 square symmetries on the last two axes: rot90 by `op % 4`, then a
    left-right flip when `op >= 4`."""
    out = torch.rot90(x, op % 4, dims=(-2, -1)) if op % 4 else x
    return out.flip(-1) if op >= 4 else out


def _dihedral_view(x: np.ndarray, op: int) -> np.ndarray:
    """`dihedral` as a numpy view (no copy)."""
    out = np.rot90(x, op % 4, axes=(-2, -1)) if op % 4 else x
    return out[..., ::-1] if op >= 4 else out


def apply_dihedral(batch, ops: torch.Tensor) -> torch.Tensor:
    """`dihedral(batch[i], ops[i])` for every sample, as a new tensor.

    `batch` is a tensor, an array or a list of per-sample arrays. The work is numpy views and
    one copy per sample: torch's multi-threaded rot90/flip/stack are 10-100x slower on a busy
    CPU (the main process of a DataLoader with 0 workers).
    """
    samples = batch.numpy() if isinstance(batch, torch.Tensor) else batch
    first = np.asarray(samples[0])
    if first.shape[-1] != first.shape[-2]:
        raise ValueError(f"rotations need square tiles, got {tuple(first.shape[-2:])}")
    out = np.empty((len(samples), *first.shape), dtype=first.dtype)
    for i, op in enumerate(ops.tolist()):
        out[i] = _dihedral_view(np.asarray(samples[i]), op)
    return torch.from_numpy(out)


def _image_samples(values: Any):
    """A batch of same-shape numeric images as a tensor, an array or a list of per-sample arrays
    (not copied), or None when `values` is something else."""
    if isinstance(values, torch.Tensor):
        return values
    if isinstance(values, np.ndarray):
        return values if values.dtype.kind in "biuf" else None
    if not isinstance(values, (list, tuple)) or len(values) == 0:
        return None
    arrays = [v.numpy() if isinstance(v, torch.Tensor) else v for v in values]
    first = arrays[0]
    if not isinstance(first, np.ndarray) or first.dtype.kind not in "biuf":
        return None
    if not all(isinstance(a, np.ndarray) and a.shape == first.shape and a.dtype == first.dtype for a in arrays):
        return None
    return arrays


def _to_array(name: str, values: Any) -> Any:
    """One column of a batch -> a numpy array (strings, None and ragged metadata stay lists)."""
    if isinstance(values, torch.Tensor):
        return values.numpy()
    if isinstance(values, np.ndarray):
        return values if values.dtype.kind in "biuf" else list(values)
    if not isinstance(values, (list, tuple)) or len(values) == 0:
        return values
    first = values[0]
    if isinstance(first, (np.ndarray, torch.Tensor)):
        samples = _image_samples(values)
        return list(values) if samples is None else np.stack(samples)
    if name in _COLUMN_DTYPES:  # nested Python lists from set_transform
        return np.asarray(values, dtype=_COLUMN_DTYPES[name])
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return np.asarray(values, dtype=bool)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values):
        return np.asarray(values, dtype=np.int64)
    if all(isinstance(v, (float, np.floating)) for v in values):
        return np.asarray(values, dtype=np.float32)
    return list(values)


def _refuse_unstackable_images(name: str, values: Any) -> None:
    """Per-sample images of one spatial column that differ in shape or dtype: refused, since passed on unrotated
    they would no longer line up with the columns that were (rows of one Arrow column always share both)."""
    if isinstance(values, np.ndarray) and values.dtype == object:  # ragged rows in numpy format
        values = list(values)
    if not isinstance(values, (list, tuple)) or not values or not isinstance(values[0], (np.ndarray, torch.Tensor)):
        return
    kinds = sorted({f"{tuple(v.shape)} {v.dtype}" if isinstance(v, (np.ndarray, torch.Tensor)) else type(v).__name__
                    for v in values})
    raise ValueError(f"column {name!r}: the batch's images differ in shape or dtype ({', '.join(kinds)}), so they "
                     "cannot be flipped and rotated with the other image columns; give every row the same shape and "
                     "dtype")


def _as_tensor(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value if value.flags.writeable else value.copy())
    return value


class TileTransform:
    """Batched transform for `Dataset.set_transform` (or a collate function, see `collate`).

    Args:
        augment: draw a random flip/rotation per sample (training) or only convert (evaluation).
        spatial_columns: the columns transformed together.
    """

    def __init__(self, augment: bool, spatial_columns: Sequence[str] = SPATIAL_COLUMNS):
        self.augment = augment
        self.spatial_columns = tuple(spatial_columns)

    def __call__(self, batch: dict) -> dict:
        out, ops = {}, None
        for name, values in batch.items():
            if self.augment and name in self.spatial_columns:
                samples = _image_samples(values)
                if samples is None:  # nested Python lists (set_transform)
                    _refuse_unstackable_images(name, values)
                    converted = _to_array(name, values)
                    samples = converted if isinstance(converted, np.ndarray) else None
                if samples is not None:
                    if ops is None:  # one draw per batch from torch's global RNG, shared by all columns
                        ops = torch.randint(0, NUM_DIHEDRAL_OPS, (len(samples),))
                    out[name] = apply_dihedral(samples, ops)
                    continue
            out[name] = _as_tensor(_to_array(name, values))
        return out

    def collate(self, rows: Sequence[dict]) -> dict:
        """`collate_fn` for a DataLoader over a numpy- or torch-formatted dataset."""
        if not rows:
            raise ValueError("cannot collate an empty list of rows")
        return self({name: [row[name] for row in rows] for name in rows[0]})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(augment={self.augment}, spatial_columns={self.spatial_columns})"


def make_train_transform() -> TileTransform:
    """Tensors + the same random flip / 90-degree rotation for target, opt_v1, valid_mask, s1."""
    return TileTransform(augment=True)


def make_eval_transform() -> TileTransform:
    """Tensors only: no augmentation."""
    return TileTransform(augment=False)

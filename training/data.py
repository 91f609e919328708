"""What training reads: the Arrow splits as rows of tensors (`TileDataset`, with seeded per-row augmentation)."""
from __future__ import annotations

import math

import numpy as np
import torch

from data_builders.tiles import fill_invalid_pixels

BATCH_COLUMNS = ("target", "opt_v1", "month", "biome", "valid_mask")
"""The columns of a training or evaluation batch."""

# Tiles per batch of `split_batches` (bounded memory: ~7 MB of float32 per 32 tiles of 4 bands).
SPLIT_BATCH_TILES = 32


def split_batches(dataset, columns):
    """The `columns` of a `datasets.Dataset` split (those it has), `SPLIT_BATCH_TILES` rows at a time, as dicts of
    numpy arrays: one pass over a split of any size in bounded memory (the fits of `training.linear_fit` and
    `training.spectral_range`)."""
    view = dataset.select_columns([name for name in columns if name in dataset.column_names]).with_format("numpy")
    for start in range(0, len(view), SPLIT_BATCH_TILES):
        yield view[start : start + SPLIT_BATCH_TILES]


def redrawn_opt_v1(redraw, targets, tile_ids, valid_masks, draw: int):
    """(N, bands, H, W) float32: the degradation's draw `draw` of each tile's synthetic `opt_v1` (`redraw`: a
    `data_builders.degrade.DegradationRedraw`, or any callable `(target, tile_id, valid_mask, draw)`)."""
    masks = valid_masks if valid_masks is not None else [None] * len(targets)
    return np.stack([redraw(target, tile_id, mask, draw) for target, tile_id, mask in zip(targets, tile_ids, masks)])


def model_input_opt_v1(opt_v1, valid_masks):
    """`opt_v1` (N, bands, H, W) as the model is given it: where `valid_masks` (N, H, W) is False, the mean of that
    tile's valid pixels per band instead of the stored 0 (`data_builders.tiles.fill_invalid_pixels`, the fill of the
    synthetic degradation and of inference too); `opt_v1` itself (no copy) without a mask or with every pixel valid.
    numpy arrays, or tensors (returned on `opt_v1`'s device, in its dtype)."""
    if valid_masks is None or bool(valid_masks.all()):
        return opt_v1
    if isinstance(opt_v1, torch.Tensor):
        filled = fill_invalid_pixels(opt_v1.detach().cpu().float().numpy(), valid_masks.detach().cpu().numpy())
        return torch.from_numpy(filled).to(device=opt_v1.device, dtype=opt_v1.dtype)
    return fill_invalid_pixels(opt_v1, np.asarray(valid_masks, dtype=bool)).astype(opt_v1.dtype, copy=False)


class TileDataset(torch.utils.data.Dataset):
    """Rows of a data-builders split as tensors, optionally with the training augmentation.

    `dataset` is a `datasets.Dataset` (read in numpy format, which is much faster than `set_transform`'s
    Python lists); `transform` is `data_builders.make_train_transform()` / `make_eval_transform()`. Each row is
    transformed under its own torch RNG seeded by (seed, epoch, row index): a row gets the same flip/rotation
    whatever the batch size, the number of processes or the order in which the data loader prefetches rows, so
    resumed, accumulated and distributed runs see exactly the augmentations of an uninterrupted single run.
    The trainer calls `set_epoch` at the start of each epoch.

    `brightness_range=(low, high)` also multiplies `target` and `opt_v1` of a row by one factor drawn
    log-uniformly from that range (an exposure augmentation: it shows the refiner dark scenes such as water, whose
    indices are the most sensitive to small absolute errors, even when the training tiles have few of them).

    `redraw` (a `data_builders.degrade.DegradationRedraw`, `--redraw_degradation`) replaces a row's synthetic
    `opt_v1` by the degradation's draw number `epoch` of that tile (before the flips): epoch 0 reads the dataset's own
    draw, each later epoch a new one, the same in every process and on resume.

    A row's `opt_v1` comes out with its invalid pixels (where `valid_mask` is False) filled as the model is given
    them in evaluation and inference (`model_input_opt_v1`), not the stored 0; the losses and metrics mask those
    pixels, so they score it as they score the stored `opt_v1`. A row without an invalid pixel is left as it is.
    """

    def __init__(self, dataset, transform, seed: int = 0, columns=BATCH_COLUMNS, brightness_range=None,
                 redraw=None):
        self.columns = [name for name in columns if name in dataset.column_names]
        self.redraw = redraw
        if redraw is not None:
            missing = sorted({"tile_id", "target", "opt_v1"} - set(dataset.column_names))
            if missing:
                raise ValueError(f"redrawing opt_v1 needs the columns {missing}, which the dataset lacks.")
            self.tile_ids = list(dataset["tile_id"])
        self.dataset = dataset.with_format("numpy", columns=self.columns)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        if brightness_range is not None:
            low, high = (float(v) for v in brightness_range)
            if not 0 < low <= high < math.inf:  # an infinite factor makes the row's target and opt_v1 infinite
                raise ValueError(f"brightness_range must be (low, high) with 0 < low <= high, both finite, got "
                                 f"{brightness_range}.")
            brightness_range = (low, high)
        self.brightness_range = brightness_range

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _row_seed(self, index: int) -> int:
        return (self.seed * 1_000_003 + self.epoch * 7_919 + int(index) * 104_729) % (2**63 - 1)

    def __getitems__(self, indices) -> list[dict]:
        batch = self.dataset[list(indices)]
        rows = []
        for position, index in enumerate(indices):
            single = {name: batch[name][position:position + 1] for name in self.columns}
            if self.redraw is not None and self.epoch > 0:
                single["opt_v1"] = redrawn_opt_v1(self.redraw, single["target"], [self.tile_ids[int(index)]],
                                                  single.get("valid_mask"), self.epoch)
            if "opt_v1" in single:
                single["opt_v1"] = model_input_opt_v1(single["opt_v1"], single.get("valid_mask"))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self._row_seed(index))
                out = self.transform(single)
                if self.brightness_range is not None:
                    low, high = self.brightness_range
                    factor = math.exp(math.log(low) + (math.log(high) - math.log(low)) * float(torch.rand(())))
                    for name in ("target", "opt_v1"):
                        out[name] = out[name] * factor
            rows.append({name: value[0] for name, value in out.items()})
        return rows

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


def as_tile_dataset(dataset, transform, seed: int = 0):
    """`dataset` as the trainer reads it: a `datasets.Dataset` split (whose string columns, `tile_id` and the
    sidecar's, the default collator cannot batch) becomes a `TileDataset` with `transform`, as `stage2-train` wraps
    its splits; a dict of datasets (several evaluation sets) each; anything else is returned as it is."""
    import datasets

    if isinstance(dataset, dict):
        return {name: as_tile_dataset(value, transform, seed) for name, value in dataset.items()}
    return TileDataset(dataset, transform, seed=seed) if isinstance(dataset, datasets.Dataset) else dataset

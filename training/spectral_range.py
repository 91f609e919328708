"""Where the training spectra end: the statistics a refiner with `out_of_range_fallback` keeps `opt_v1` beyond.

A correction fitted on some spectra extrapolates on others (a cloud or snow tile, a colour cast no training tile
had), and there it can be worse than Stage 1's own image. `fit_spectral_range` describes the valid training pixels'
log spectra (`modeling_stage2.modeling_stage2.log_spectra`, as the spectral MLP sees them) by their mean and
covariance, and sets the threshold at a quantile of their own Mahalanobis distances; the refiner's
`Stage2SpectralRange` blends `opt_v1` back in beyond it. Two passes over the data: the moments (float64 sums, exact
across batches), then the distances.

    spectral_range = fit_spectral_range_of_dataset(dataset_dict["train"], log_offset=0.05)
    set_spectral_range(model, spectral_range)        # the refiner's trained copy, saved with the adapter
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

# The default threshold: the training pixels' 99th percentile of distance (a 1 % tail), chosen before measuring.
OUT_OF_RANGE_QUANTILE = 0.99
# At most this many distances are kept for the quantile (every k-th valid pixel beyond it; 128 MB of float64).
_MAX_QUANTILE_PIXELS = 1 << 24
# Below this ratio of its smallest to largest eigenvalue a covariance counts as singular.
_DEGENERATE = 1e-10


@dataclass(frozen=True)
class SpectralRangeFit:
    """The training spectra's range: `Stage2SpectralRange.set_range(mean, precision, threshold)`.

    Args:
        mean (`torch.Tensor` of shape `(bands,)`): float64 mean of the valid pixels' log spectra.
        precision (`torch.Tensor` of shape `(bands, bands)`): float64 inverse of their covariance.
        threshold (`float`): the `quantile` of the valid pixels' own Mahalanobis distances.
        quantile (`float`): which quantile.
        pixels (`int`): valid pixels it was fitted on.
        tiles (`int`): tiles it was fitted on.
    """

    mean: torch.Tensor
    precision: torch.Tensor
    threshold: float
    quantile: float
    pixels: int
    tiles: int

    def distance(self, opt_v1: torch.Tensor, log_offset: float) -> torch.Tensor:
        """(B, bands, H, W) reflectance -> (B, H, W) float64 distance from the training spectra."""
        from modeling_stage2.modeling_stage2 import spectral_distance

        return spectral_distance(opt_v1, self.mean, self.precision, log_offset)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "precision": self.precision.tolist(), "threshold": self.threshold,
                "quantile": self.quantile, "pixels": self.pixels, "tiles": self.tiles}


def fit_spectral_range(batches: Callable[[], Iterable], log_offset: float,
                       quantile: float = OUT_OF_RANGE_QUANTILE) -> SpectralRangeFit:
    """The range of the valid pixels of `batches()`, an iterable of `(opt_v1, valid_mask)` ((B, bands, H, W)
    reflectance, (B, H, W) bool or None) that can be iterated twice. Pixels that are not finite do not count."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}.")
    moments = _moments(batches, log_offset)
    pixels, tiles = moments["pixels"], moments["tiles"]
    bands = moments["sum"].numel()
    if pixels <= bands:
        raise ValueError(f"A spectral range of {bands} bands needs more than {bands} valid training pixels, "
                         f"got {pixels}.")
    shifted_mean = moments["sum"] / pixels
    mean = moments["shift"] + shifted_mean
    covariance = (moments["outer"] - pixels * torch.outer(shifted_mean, shifted_mean)) / (pixels - 1)
    spread = torch.linalg.eigvalsh(covariance)
    if not bool(spread[0] > _DEGENERATE * spread[-1]):
        raise ValueError("The training pixels' log spectra are degenerate (a band is constant or a linear mix of "
                         "the others): their range has no inverse covariance.")
    precision = torch.linalg.inv(covariance)
    stride = max(1, math.ceil(pixels / _MAX_QUANTILE_PIXELS))
    distances = _distances(batches, log_offset, mean, precision, stride)
    threshold = float(np.quantile(distances, quantile))
    return SpectralRangeFit(mean=mean, precision=precision, threshold=threshold, quantile=quantile, pixels=pixels,
                            tiles=tiles)


def fit_spectral_range_of_dataset(dataset, log_offset: float,
                                  quantile: float = OUT_OF_RANGE_QUANTILE) -> SpectralRangeFit:
    """`fit_spectral_range` of a `datasets.Dataset` split with an `opt_v1` (and optionally `valid_mask`) column."""
    if "opt_v1" not in dataset.column_names:
        raise ValueError("The dataset lacks the column 'opt_v1' needed for the range of the training spectra.")
    from training.data import split_batches

    def batches():
        for batch in split_batches(dataset, ("opt_v1", "valid_mask")):
            yield np.asarray(batch["opt_v1"]), np.asarray(batch["valid_mask"]) if "valid_mask" in batch else None

    return fit_spectral_range(batches, log_offset, quantile)


def _valid_pixels(opt_v1, valid_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch as a float64 (B, bands, H, W) tensor and the (B, H, W) mask of its valid, finite pixels."""
    opt_v1 = torch.as_tensor(opt_v1).to(torch.float64)
    if opt_v1.ndim != 4:
        raise ValueError(f"opt_v1 must be (batch, bands, height, width), got {tuple(opt_v1.shape)}.")
    valid = torch.isfinite(opt_v1).all(dim=1)
    if valid_mask is not None:
        valid_mask = torch.as_tensor(valid_mask, dtype=torch.bool)
        if valid_mask.shape != valid.shape:  # an (H, W) mask would be broadcast to every tile of the batch
            raise ValueError(f"valid_mask must be (batch, height, width) = {tuple(valid.shape)}, got "
                             f"{tuple(valid_mask.shape)}.")
        valid &= valid_mask
    return opt_v1, valid


def _moments(batches, log_offset: float) -> dict:
    from modeling_stage2.modeling_stage2 import log_spectra

    total, outer, shift, pixels, tiles = None, None, None, 0, 0
    for batch in batches():
        opt_v1, valid = _valid_pixels(*batch)
        points = log_spectra(opt_v1, log_offset).permute(0, 2, 3, 1)[valid]  # (N, bands)
        if total is None:
            total = torch.zeros(points.shape[1], dtype=torch.float64)
            outer = torch.zeros(points.shape[1], points.shape[1], dtype=torch.float64)
        if shift is None and len(points):
            # Moments about a training pixel, not about 0: sums of raw squares lose a band's spread to rounding
            # (a constant band at 2.0 kept ~1e-10 of noise over 1.8M pixels); shifted ones keep it (a constant is 0).
            shift = points[0].clone()
        if shift is not None:
            points = points - shift
        total += points.sum(dim=0)
        outer += points.T @ points
        pixels += int(points.shape[0])
        tiles += int(opt_v1.shape[0])
    if total is None:
        raise ValueError("There is no training tile to fit the range of the training spectra on.")
    if shift is None:  # no valid pixel: the pixel count refuses the fit
        shift = torch.zeros_like(total)
    return {"sum": total, "outer": outer, "shift": shift, "pixels": pixels, "tiles": tiles}


def _distances(batches, log_offset: float, mean, precision, stride: int) -> np.ndarray:
    """The distances of every `stride`-th valid pixel (counted across batches)."""
    from modeling_stage2.modeling_stage2 import spectral_distance

    kept, seen = [], 0
    for batch in batches():
        opt_v1, valid = _valid_pixels(*batch)
        distances = spectral_distance(opt_v1, mean, precision, log_offset)[valid]
        first = (-seen) % stride  # this batch's first pixel whose index across batches is a multiple of `stride`
        kept.append(distances[first::stride].numpy())
        seen += int(distances.shape[0])
    return np.concatenate(kept)


def spectral_ranges(model) -> list:
    """The `Stage2SpectralRange` modules a refiner computes with, if any: in a peft model the copy saved with the
    adapter (`modules_to_save`), not the frozen original that peft keeps beside it."""
    from modeling_stage2.modeling_stage2 import Stage2SpectralRange

    return [module for name, module in model.named_modules()
            if isinstance(module, Stage2SpectralRange) and "original_module" not in name.split(".")]


def set_spectral_range(model, fit: SpectralRangeFit) -> None:
    """Give the refiner (its copy saved with the adapter) the range of its training spectra."""
    modules = spectral_ranges(model)
    if not modules:
        raise ValueError("The model keeps no range of its training spectra; build it with out_of_range_fallback=True.")
    for module in modules:
        module.set_range(fit.mean, fit.precision, fit.threshold)


__all__ = [
    "OUT_OF_RANGE_QUANTILE",
    "SpectralRangeFit",
    "fit_spectral_range",
    "fit_spectral_range_of_dataset",
    "set_spectral_range",
    "spectral_ranges",
]

"""What every benchmark script records about the machine it ran on."""
from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path


# The quality goal of the studies: the refined output beats the least-squares colour fit by at least GOAL_MARGIN on
# each of these metrics (lower is better), on the held-out test tiles.
SPECTRAL = ("ndvi_rmse", "evi_rmse", "sam")
GOAL_MARGIN = 0.10


def meets_goal(refined: dict, colour_fit: dict) -> bool:
    """Whether `refined` scores (metric -> value) beat `colour_fit`'s by `GOAL_MARGIN` on every `SPECTRAL` metric."""
    return all(refined[m] <= (1 - GOAL_MARGIN) * colour_fit[m] for m in SPECTRAL)


def in_range_tiles(test_opt_v1, test_valid, train_opt_v1, train_valid):
    """(B,) bool tensor: the test tiles whose mean valid `opt_v1` reflectance is not above every training tile's (the
    others are brighter than anything a correction was fitted on: it extrapolates there)."""
    def brightness(image, valid):
        mask = valid[:, None].to(image.dtype)
        return (mask * image).sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) * image.shape[1]).clamp(min=1)

    return brightness(test_opt_v1, test_valid) <= brightness(train_opt_v1, train_valid).max()


def in_range_evi_rmse(output, target, opt_v1, valid, in_range):
    """EVI RMSE (`training.metrics`, as every table's) of the tiles `in_range` selects; None if it selects none."""
    from training.metrics import evaluate_pair

    if not bool(in_range.any()):
        return None
    return evaluate_pair(output[in_range], target[in_range], opt_v1[in_range], valid[in_range])["refined"]["evi_rmse"]


# Where a test pixel counts as outside the training spectra: its Mahalanobis distance from the training pixels' log
# spectra beyond this quantile of the training pixels' own distances (`OUT_OF_RANGE_QUANTILE`); the blend towards
# `opt_v1` grows linearly from there and is complete at `OUT_OF_RANGE_RAMP` times that distance. Chosen before
# measuring (a 1 % tail, a ramp as wide as the threshold), not tuned.
OUT_OF_RANGE_QUANTILE = 0.99
OUT_OF_RANGE_RAMP = 2.0


def training_spectra_range(opt_v1, valid, log_offset: float, quantile: float = OUT_OF_RANGE_QUANTILE) -> dict:
    """{"mean", "precision", "threshold"} of the valid training pixels' log spectra (`log_spectra(opt_v1,
    log_offset)`, what the refiner's spectral MLP sees): their mean, the inverse of their covariance, and the
    `quantile` of their own Mahalanobis distances (float64)."""
    import torch

    from modeling_stage2.modeling_stage2 import log_spectra

    pixels = log_spectra(opt_v1.double(), log_offset).permute(1, 0, 2, 3)[:, valid].T  # (N, bands)
    spectra_range = {"mean": pixels.mean(dim=0), "precision": torch.linalg.inv(torch.cov(pixels.T))}
    distances = _mahalanobis(pixels, spectra_range)
    spectra_range["threshold"] = float(torch.quantile(distances, quantile))
    return spectra_range


def _mahalanobis(pixels, spectra_range):
    import torch

    centred = pixels - spectra_range["mean"]
    return torch.einsum("...i,ij,...j->...", centred, spectra_range["precision"], centred).clamp(min=0).sqrt()


def out_of_range_weight(opt_v1, spectra_range: dict, log_offset: float, ramp: float = OUT_OF_RANGE_RAMP):
    """(B, 1, H, W) weight of `opt_v1` in an output left as Stage 1 made it outside the training spectra
    (`training_spectra_range`): 0 up to the threshold distance, 1 from `ramp` times it, linear between."""
    from modeling_stage2.modeling_stage2 import log_spectra

    distances = _mahalanobis(log_spectra(opt_v1.double(), log_offset).permute(0, 2, 3, 1), spectra_range)
    threshold = spectra_range["threshold"]
    return ((distances - threshold) / ((ramp - 1) * threshold)).clamp(0, 1)[:, None].to(opt_v1.dtype)


def opt_v1_out_of_range(output, opt_v1, weight):
    """`output` with `opt_v1` blended in by `weight` (`out_of_range_weight`): Stage 1's pixels kept where the
    training spectra end."""
    return output + weight * (opt_v1 - output)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. '0.7 1.0 1.2' (how busy the shared machine was)."""
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def mean_range_cell(values: list, digits: int) -> str:
    """A table cell of results over seeds: 'mean (min-max)', the value alone for one seed, or '-' where a value is None
    (a run recorded before the column existed)."""
    if any(value is None for value in values):
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def load_span(load_at_start: str) -> str:
    """'<load at the start> at the start, <load now> at the end', for a study's header."""
    return f"{load_at_start} at the start, {load_average()} at the end"


def record_study(output: str | Path, text: str, record: dict) -> None:
    """Writes a study's tables to `output`, every number to the same name with `.json`, and prints the tables."""
    output = Path(output)
    output.write_text(text)
    output.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(text)

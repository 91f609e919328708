"""Quality metrics of Stage 2: refined output and the opt_v1 baseline against the target.

Metrics (`METRIC_NAMES`), each over the valid pixels of a whole evaluation set:

| name | definition | set-level aggregation |
| --- | --- | --- |
| `ndvi_rmse` | RMSE of NDVI(output) vs NDVI(target) | sqrt(sum of squared errors / valid pixels), pooled |
| `evi_rmse` | RMSE of EVI(output) vs EVI(target) | pooled like NDVI |
| `sam` | spectral angle (radians) output vs target | mean over valid pixels |
| `identity_l1` | |output - opt_v1|, mean over bands | mean over valid pixels (0 for opt_v1 itself) |
| `edge_l1` | |Sobel(output) - Sobel(opt_v1)|, band mean | mean over pixels with a valid 3x3 window (0 for opt_v1) |
| `psnr` | 10 log10(1 / MSE), data range 1.0 | MSE pooled over valid pixels and bands; capped at 100 dB |
| `ssim` | SSIM per band, then band mean (*) | mean over unpadded positions with a valid 11x11 window |

(*) gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03, data range 1.0.

"Pooled" means every valid pixel of the set weighs the same, whatever tile it is in: the set
value is not the mean of per-tile values. Everything reduces to per-tile sums and counts
(`TILE_STATISTICS`), which add up exactly across batches, processes and the `evaluate` module
in `training/stage2_metric`. A metric with no counted pixel in the set is NaN, and so is every metric of a set where
an output is NaN or Inf on a valid pixel (`not_finite_metrics`): no target is met by it.

NDVI, EVI, the spectral angle and the Sobel filter are those of `training.losses`, so the losses
and the metrics agree.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .losses import (
    check_image,
    check_same_shape,
    check_valid_mask,
    evi,
    in_full_precision,
    ndvi,
    sobel_magnitude,
    spectral_angle,
    stencil_valid_mask,
    zero_invalid,
)

METRIC_NAMES: tuple[str, ...] = ("ndvi_rmse", "evi_rmse", "sam", "identity_l1", "edge_l1", "psnr", "ssim")
# The design's targets; all are upper bounds (lower is better). psnr and ssim have none.
DESIGN_TARGETS: dict[str, float] = {
    "ndvi_rmse": 0.05,
    "evi_rmse": 0.05,
    "sam": 0.1,
    "identity_l1": 0.05,
    "edge_l1": 0.02,
}
# The metrics the refined output is judged on against its baselines, `opt_v1` and the colour fit (the demo's exit
# status, the quality studies' goal, `training.bootstrap`).
GAIN_METRICS: tuple[str, ...] = ("ndvi_rmse", "evi_rmse", "sam")
HIGHER_IS_BETTER: dict[str, bool] = {name: name in ("psnr", "ssim") for name in METRIC_NAMES}
METRIC_UNITS: dict[str, str] = {"sam": "rad", "psnr": "dB"}

PSNR_DATA_RANGE = 1.0
# MSE floor of PSNR: identical images give 100 dB rather than inf (JSON has no inf).
PSNR_MSE_FLOOR = 1e-10
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_DATA_RANGE = 1.0
EDGE_STENCIL = 3

# Per-tile sums and counts every metric is computed from (float64).
TILE_STATISTICS: tuple[str, ...] = (
    "valid_pixels",  # number of valid pixels
    "ndvi_sq_err_sum",  # sum over valid pixels of (NDVI(output) - NDVI(target))^2
    "evi_sq_err_sum",  # same for EVI
    "sam_sum",  # sum over valid pixels of the spectral angle output vs target (radians)
    "identity_abs_err_sum",  # sum over valid pixels of mean over bands |output - opt_v1|
    "sq_err_sum",  # sum over valid pixels of mean over bands (output - target)^2
    "edge_pixels",  # number of pixels whose 3x3 window is valid
    "edge_abs_err_sum",  # sum over those of mean over bands |Sobel(output) - Sobel(opt_v1)|
    "ssim_pixels",  # number of SSIM window positions whose 11x11 window is valid
    "ssim_sum",  # sum over those of the band-mean SSIM
)
_ERROR_SUMS = tuple(name for name in TILE_STATISTICS if name.endswith("_sum"))  # the sums of the output's errors


# ----------------------------------------------------------------------------- SSIM
def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


def _separable_blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Depthwise gaussian filter without padding: (B, C, H, W) -> (B, C, H - k + 1, W - k + 1)."""
    channels, size = x.shape[1], window.numel()
    x = F.conv2d(x, window.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    return F.conv2d(x, window.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


@in_full_precision
def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-band SSIM map (B, C, H - 10, W - 10) of (B, C, H, W) images, unpadded 11x11 gaussian window."""
    channels = x.shape[1]
    window = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, x.dtype, x.device)
    moments = _separable_blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), window)
    mu_x, mu_y, e_xx, e_yy, e_xy = moments.split(channels, dim=1)
    var_x, var_y, cov_xy = e_xx - mu_x**2, e_yy - mu_y**2, e_xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * SSIM_DATA_RANGE) ** 2, (SSIM_K2 * SSIM_DATA_RANGE) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


# ----------------------------------------------------------------------------- per-tile statistics
def _as_tensor(name: str, value) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        # A float16 array is cast up as `in_full_precision` casts a float16 tensor argument (it sees only tensors):
        # squares of small differences underflow in half precision.
        value = torch.from_numpy(value.astype(np.float32) if value.dtype == np.float16 else value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}.")
    return value


def _sum_where(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum(dim=(1, 2), dtype=torch.float64)


@torch.no_grad()
@in_full_precision
def tile_statistics(output, target, opt_v1, valid_mask=None) -> dict[str, torch.Tensor]:
    """Per-tile sums and counts (`TILE_STATISTICS`) of `output` against `target` and `opt_v1`.

    Args:
        output: (B, 4, H, W) image to score (the refined output, or opt_v1 itself).
        target: (B, 4, H, W) reference reflectance.
        opt_v1: (B, 4, H, W) Stage 1 input (identity and edge terms).
        valid_mask: optional (B, H, W) bool, True where the target is valid.

    Returns:
        dict of float64 tensors of shape (B,).
    """
    output, target, opt_v1 = (_as_tensor(n, v)
                             for n, v in zip(("output", "target", "opt_v1"), (output, target, opt_v1)))
    check_image("output", output)
    check_same_shape(output=output, target=target, opt_v1=opt_v1)
    if valid_mask is not None:
        valid_mask = _as_tensor("valid_mask", valid_mask)
    mask = check_valid_mask(valid_mask, output)
    if mask is None:
        mask = torch.ones((output.shape[0], *output.shape[-2:]), dtype=torch.bool, device=output.device)
    output, target, opt_v1 = (zero_invalid(x, mask) for x in (output, target, opt_v1))

    ndvi_err = ndvi(output) - ndvi(target)
    evi_err = evi(output) - evi(target)
    stats = {
        "valid_pixels": mask.sum(dim=(1, 2), dtype=torch.float64),
        "ndvi_sq_err_sum": _sum_where(mask, ndvi_err * ndvi_err),
        "evi_sq_err_sum": _sum_where(mask, evi_err * evi_err),
        "sam_sum": _sum_where(mask, spectral_angle(output, target)),
        "identity_abs_err_sum": _sum_where(mask, (output - opt_v1).abs().mean(dim=1)),
        "sq_err_sum": _sum_where(mask, ((output - target) ** 2).mean(dim=1)),
    }
    edge_mask = stencil_valid_mask(mask, EDGE_STENCIL, same_size=True)
    edge_err = (sobel_magnitude(output) - sobel_magnitude(opt_v1)).abs().mean(dim=1)
    stats["edge_pixels"] = edge_mask.sum(dim=(1, 2), dtype=torch.float64)
    stats["edge_abs_err_sum"] = _sum_where(edge_mask, edge_err)
    if min(output.shape[-2:]) >= SSIM_WINDOW:
        ssim_mask = stencil_valid_mask(mask, SSIM_WINDOW, same_size=False)
        stats["ssim_pixels"] = ssim_mask.sum(dim=(1, 2), dtype=torch.float64)
        stats["ssim_sum"] = _sum_where(ssim_mask, ssim_map(output, target).mean(dim=1))
    else:  # tiles smaller than the SSIM window have no SSIM
        zeros = torch.zeros(output.shape[0], dtype=torch.float64, device=output.device)
        stats["ssim_pixels"], stats["ssim_sum"] = zeros, zeros.clone()
    # An output that is not finite on a valid pixel makes every sum of its tile NaN: the guarded arithmetic reads NaN
    # and Inf as small errors in places (the Sobel magnitude's `safe_sqrt` as 0), which would meet their targets.
    finite = torch.isfinite(output).flatten(1).all(dim=1)  # invalid pixels are 0 here
    for name in _ERROR_SUMS:
        stats[name] = torch.where(finite, stats[name], math.nan)
    return {name: stats[name] for name in TILE_STATISTICS}


def paired_tile_statistics(refined, target, opt_v1, valid_mask=None) -> dict[str, dict[str, torch.Tensor]]:
    """`tile_statistics` of the refined output and of the opt_v1 baseline, in one batched pass.

    Returns `{"refined": {...}, "opt_v1": {...}}`, each a dict of (B,) float64 tensors.
    """
    refined, target, opt_v1 = (_as_tensor(n, v)
                              for n, v in zip(("refined", "target", "opt_v1"), (refined, target, opt_v1)))
    check_image("refined", refined)
    check_same_shape(refined=refined, target=target, opt_v1=opt_v1)
    batch = refined.shape[0]
    masks = None
    if valid_mask is not None:
        masks = check_valid_mask(_as_tensor("valid_mask", valid_mask), refined)
        masks = torch.cat([masks, masks])
    # One dtype for the concatenation, never below float32 (a bf16 output must not round the target).
    dtype = torch.promote_types(torch.promote_types(refined.dtype, target.dtype), opt_v1.dtype)
    dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    refined, target, opt_v1 = (x.to(dtype) for x in (refined, target, opt_v1))
    both = tile_statistics(
        torch.cat([refined, opt_v1]), torch.cat([target, target]), torch.cat([opt_v1, opt_v1]), masks
    )
    return {
        "refined": {name: value[:batch] for name, value in both.items()},
        "opt_v1": {name: value[batch:] for name, value in both.items()},
    }


# ----------------------------------------------------------------------------- statistics -> metrics
def _ratio(numerator: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.where(count > 0, numerator / count.clamp(min=1), torch.full_like(numerator, math.nan))


def metrics_from_statistics(stats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Metrics from (summed) statistics; works elementwise, so (B,) per-tile sums give per-tile metrics."""
    missing = [name for name in TILE_STATISTICS if name not in stats]
    if missing:
        raise KeyError(f"statistics lack {missing}; expected the keys of TILE_STATISTICS = {TILE_STATISTICS}.")
    s = {name: torch.as_tensor(stats[name], dtype=torch.float64) for name in TILE_STATISTICS}
    n = s["valid_pixels"]
    mse = _ratio(s["sq_err_sum"], n)
    return {
        "ndvi_rmse": torch.sqrt(_ratio(s["ndvi_sq_err_sum"], n)),
        "evi_rmse": torch.sqrt(_ratio(s["evi_sq_err_sum"], n)),
        "sam": _ratio(s["sam_sum"], n),
        "identity_l1": _ratio(s["identity_abs_err_sum"], n),
        "edge_l1": _ratio(s["edge_abs_err_sum"], s["edge_pixels"]),
        "psnr": 10 * torch.log10(PSNR_DATA_RANGE**2 / mse.clamp(min=PSNR_MSE_FLOOR)),
        "ssim": _ratio(s["ssim_sum"], s["ssim_pixels"]),
    }


def per_tile_metrics(output, target, opt_v1, valid_mask=None) -> dict[str, torch.Tensor]:
    """Every metric of each tile of a batch: dict of (B,) float64 tensors (NaN where nothing counts)."""
    return metrics_from_statistics(tile_statistics(output, target, opt_v1, valid_mask))


# ----------------------------------------------------------------------------- accumulation
class MetricAccumulator:
    """Accumulates the metrics of the refined output and of the opt_v1 baseline over batches.

    >>> acc = MetricAccumulator()
    >>> for batch in loader:
    ...     acc.update(refined, batch["target"], batch["opt_v1"], batch["valid_mask"])
    >>> results = acc.compute()  # {"refined": {...}, "opt_v1": {...}, "n_tiles": N}

    Under several processes, gather `paired_tile_statistics(...)` (per-tile tensors, so
    `accelerator.gather_for_metrics` drops padded duplicates) and feed it to `add_statistics`.

    With `keep_tiles=True` it also keeps each tile's statistics, in the order added (`tile_statistics_of`), for a
    tile bootstrap (`training.bootstrap`); ten numbers per tile and role.
    """

    def __init__(self, keep_tiles: bool = False):
        self.keep_tiles = keep_tiles
        self.reset()

    def reset(self) -> None:
        self._totals = {role: torch.zeros(len(TILE_STATISTICS), dtype=torch.float64) for role in ("refined", "opt_v1")}
        self._tiles: dict[str, list[torch.Tensor]] = {role: [] for role in self._totals}
        self.n_tiles = 0

    def update(self, refined, target, opt_v1, valid_mask=None) -> None:
        self.add_statistics(paired_tile_statistics(refined, target, opt_v1, valid_mask))

    def add_statistics(self, paired: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Add `paired_tile_statistics` output ({"refined": {...}, "opt_v1": {...}}, (B,) tensors)."""
        columns = {}
        for role in self._totals:
            if role not in paired:
                raise KeyError(f"statistics lack the {role!r} entry; pass the output of paired_tile_statistics.")
            stats = paired[role]
            missing = [name for name in TILE_STATISTICS if name not in stats]
            if missing:
                raise KeyError(f"{role} statistics lack {missing}; expected TILE_STATISTICS = {TILE_STATISTICS}.")
            columns[role] = torch.stack(
                [torch.as_tensor(stats[name], dtype=torch.float64).cpu().reshape(-1) for name in TILE_STATISTICS]
            )
        sizes = {role_columns.shape[1] for role_columns in columns.values()}
        if len(sizes) != 1:
            raise ValueError(f"refined and opt_v1 statistics cover different numbers of tiles: {sorted(sizes)}.")
        # Checked in full before anything is added: a refused batch leaves the accumulator as it was.
        for role, totals in self._totals.items():
            totals += columns[role].sum(dim=1)
            if self.keep_tiles:
                self._tiles[role].append(columns[role])
        self.n_tiles += sizes.pop()

    def tile_statistics_of(self, role: str) -> dict[str, torch.Tensor]:
        """Each tile's statistics of `role` ("refined" or "opt_v1"): `TILE_STATISTICS` name -> (n_tiles,) float64,
        in the order the tiles were added. Needs `keep_tiles=True`."""
        if not self.keep_tiles:
            raise ValueError("this MetricAccumulator does not keep per-tile statistics; build it with keep_tiles=True.")
        if role not in self._tiles:
            raise KeyError(f"no role {role!r}; expected one of {sorted(self._tiles)}.")
        columns = (torch.cat(self._tiles[role], dim=1) if self._tiles[role]
                   else torch.zeros(len(TILE_STATISTICS), 0, dtype=torch.float64))
        return dict(zip(TILE_STATISTICS, columns))

    def compute(self) -> dict:
        """{"refined": {metric: float}, "opt_v1": {metric: float}, "n_tiles": int}."""
        if self.n_tiles == 0:
            raise ValueError("MetricAccumulator.compute() called before any update(); add at least one batch.")
        results: dict = {}
        for role, totals in self._totals.items():
            metrics = metrics_from_statistics(dict(zip(TILE_STATISTICS, totals)))
            results[role] = {name: float(metrics[name]) for name in METRIC_NAMES}
        results["n_tiles"] = self.n_tiles
        return results


def evaluate_pair(refined, target, opt_v1, valid_mask=None) -> dict:
    """One-shot `MetricAccumulator`: the metrics of `refined` and of `opt_v1` on one batch."""
    accumulator = MetricAccumulator()
    accumulator.update(refined, target, opt_v1, valid_mask)
    return accumulator.compute()


def evaluate_module_inputs(refined, target, opt_v1, valid_mask=None) -> dict[str, list[dict[str, float]]]:
    """Inputs of the `evaluate` module (training/stage2_metric) for one batch.

    Returns `{"predictions": [...], "references": [...]}`: one dict of `TILE_STATISTICS` per tile,
    for the refined output (predictions) and the opt_v1 baseline (references); pass it to
    `metric.add_batch(**inputs)`.
    """
    paired = paired_tile_statistics(refined, target, opt_v1, valid_mask)

    def rows(stats):
        columns = {name: stats[name].tolist() for name in TILE_STATISTICS}
        return [dict(zip(TILE_STATISTICS, values)) for values in zip(*columns.values())]

    return {"predictions": rows(paired["refined"]), "references": rows(paired["opt_v1"])}


# ----------------------------------------------------------------------------- report
def _format_value(name: str, value: float, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    digits = 2 if name == "psnr" else 4
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def not_finite_metrics(results: Mapping) -> list[str]:
    """The metrics of `results` (`MetricAccumulator.compute()`) that are NaN or Inf for the refined output while finite
    for `opt_v1`: those of an output that was not finite on a valid pixel (`tile_statistics`); none otherwise."""
    return [name for name in METRIC_NAMES
            if not math.isfinite(results["refined"][name]) and math.isfinite(results["opt_v1"][name])]


def _meets_target(name: str, value: float) -> str:
    if name not in DESIGN_TARGETS:
        return "-"
    if not math.isfinite(value):
        return "n/a"
    return "yes" if value < DESIGN_TARGETS[name] else "no"


def baseline_labels(results: Mapping) -> dict[str, str]:
    """Role -> the name tables give each baseline of `results` (`opt_v1`; the colour fit with the split it was fitted
    on, from `linear_fit_fitted_on`)."""
    fitted_on = results.get("linear_fit_fitted_on") or {}
    fit = f"colour fit ({fitted_on['split']})" if "split" in fitted_on else "colour fit"
    return {"opt_v1": "opt_v1", "linear_fit": fit}


def format_metrics_table(results: Mapping) -> str:
    """Markdown table: one row per metric; columns opt_v1 | [linear fit] | refined | change | design target | met?.

    The linear-fit column (the least-squares colour fit baseline, `training.linear_fit`) appears when `results`
    has a `"linear_fit"` block. `change` is refined - opt_v1; `met?` says whether the refined value is below the
    design target.
    """
    for role in ("refined", "opt_v1"):
        if role not in results:
            raise KeyError(f"results lack {role!r}; expected the output of MetricAccumulator.compute().")
    fit = results.get("linear_fit")
    fit_label = baseline_labels(results)["linear_fit"]
    lines = [
        f"Evaluated tiles: {results.get('n_tiles', 'unknown')}",
        "",
        "| metric | opt_v1 | " + (f"{fit_label} | " if fit else "") + "refined | change | design target | met? |",
        "| --- | ---: | " + ("---: | " if fit else "") + "---: | ---: | ---: | :---: |",
    ]
    for name in METRIC_NAMES:
        baseline, refined = float(results["opt_v1"][name]), float(results["refined"][name])
        unit = METRIC_UNITS.get(name)
        label = f"{name} ({unit})" if unit else name
        target = f"< {DESIGN_TARGETS[name]:g}" if name in DESIGN_TARGETS else "-"
        change = refined - baseline
        fit_cell = f"{_format_value(name, float(fit[name]))} | " if fit else ""
        lines.append(
            f"| {label} | {_format_value(name, baseline)} | {fit_cell}{_format_value(name, refined)} | "
            f"{_format_value(name, change, signed=True)} | {target} | {_meets_target(name, refined)} |"
        )
    return "\n".join(lines)


__all__ = [
    "DESIGN_TARGETS",
    "GAIN_METRICS",
    "HIGHER_IS_BETTER",
    "METRIC_NAMES",
    "MetricAccumulator",
    "TILE_STATISTICS",
    "baseline_labels",
    "evaluate_module_inputs",
    "evaluate_pair",
    "format_metrics_table",
    "metrics_from_statistics",
    "not_finite_metrics",
    "paired_tile_statistics",
    "per_tile_metrics",
    "ssim_map",
    "tile_statistics",
]

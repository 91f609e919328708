"""Stage 2 refinement quality: NDVI/EVI RMSE, spectral angle, identity/edge L1, PSNR, SSIM.

An `evaluate` metric module, loaded offline from its folder:

    import evaluate
    metric = evaluate.load("path/to/training/stage2_metric")

It is fed per-tile sums and counts, not images (evaluate stores its inputs in Arrow, which is
slow for 4 x 120 x 120 arrays), so the set-level values are exact: every valid pixel of the set
weighs the same. `training.metrics.evaluate_module_inputs(refined, target, opt_v1, valid_mask)`
computes the inputs of one batch; `training.metrics.MetricAccumulator` gives the same numbers.

This file depends on numpy, datasets and evaluate only (no torch, no project code), so it can be
copied and reused on its own.
"""
import math

import datasets
import evaluate
import numpy as np

# Per-tile statistics (float64), identical to training.metrics.TILE_STATISTICS.
TILE_STATISTICS = (
    "valid_pixels",
    "ndvi_sq_err_sum",
    "evi_sq_err_sum",
    "sam_sum",
    "identity_abs_err_sum",
    "sq_err_sum",
    "edge_pixels",
    "edge_abs_err_sum",
    "ssim_pixels",
    "ssim_sum",
)
COUNTS = ("valid_pixels", "edge_pixels", "ssim_pixels")
METRIC_NAMES = ("ndvi_rmse", "evi_rmse", "sam", "identity_l1", "edge_l1", "psnr", "ssim")
DESIGN_TARGETS = {"ndvi_rmse": 0.05, "evi_rmse": 0.05, "sam": 0.1, "identity_l1": 0.05, "edge_l1": 0.02}
PSNR_DATA_RANGE = 1.0
PSNR_MSE_FLOOR = 1e-10

_DESCRIPTION = """\
Quality of Stage 2 refined Sentinel-2 reflectance (bands B02, B03, B04, B08, values 0..1) against
the target, beside the same metrics for the Stage 1 input opt_v1 (the do-nothing baseline):
NDVI RMSE, EVI RMSE, spectral angle (SAM, radians), identity L1 (output vs opt_v1), edge L1
(Sobel gradient magnitudes, output vs opt_v1), PSNR (data range 1.0) and SSIM (gaussian 11x11,
sigma 1.5). All are pooled over the valid pixels of the whole set. Design targets (lower is
better): NDVI RMSE < 0.05, EVI RMSE < 0.05, SAM < 0.1 rad, identity L1 < 0.05, edge L1 < 0.02.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions: one dict per tile with the statistics of the refined output, keys
        valid_pixels, ndvi_sq_err_sum, evi_sq_err_sum, sam_sum, identity_abs_err_sum,
        sq_err_sum, edge_pixels, edge_abs_err_sum, ssim_pixels, ssim_sum (floats), as made by
        `training.metrics.evaluate_module_inputs` / `tile_statistics`.
    references: the same statistics of the opt_v1 baseline on the same tiles (opt_v1 scored
        against the same targets), in the same order.
Returns:
    {"refined": {metric: float}, "opt_v1": {metric: float}, "n_tiles": int} with metrics
    ndvi_rmse, evi_rmse, sam, identity_l1, edge_l1, psnr, ssim (NaN when no pixel counts).
Examples:
    >>> import evaluate
    >>> from training.metrics import evaluate_module_inputs
    >>> metric = evaluate.load("training/stage2_metric")
    >>> for batch in loader:
    ...     metric.add_batch(**evaluate_module_inputs(refined, target, opt_v1, valid_mask))
    >>> results = metric.compute()
"""

_CITATION = """\
@article{wang2004ssim,
  title={Image quality assessment: from error visibility to structural similarity},
  author={Wang, Zhou and Bovik, Alan C and Sheikh, Hamid R and Simoncelli, Eero P},
  journal={IEEE Transactions on Image Processing}, volume={13}, number={4}, pages={600--612}, year={2004}
}
"""


def _ratio(numerator, count):
    return numerator / count if count > 0 else math.nan


def metrics_from_totals(totals):
    """The seven metrics from statistics summed over a set (dict of floats)."""
    n = totals["valid_pixels"]
    mse = _ratio(totals["sq_err_sum"], n)
    return {
        "ndvi_rmse": math.sqrt(_ratio(totals["ndvi_sq_err_sum"], n)),
        "evi_rmse": math.sqrt(_ratio(totals["evi_sq_err_sum"], n)),
        "sam": _ratio(totals["sam_sum"], n),
        "identity_l1": _ratio(totals["identity_abs_err_sum"], n),
        "edge_l1": _ratio(totals["edge_abs_err_sum"], totals["edge_pixels"]),
        "psnr": mse if math.isnan(mse) else 10 * math.log10(PSNR_DATA_RANGE**2 / max(mse, PSNR_MSE_FLOOR)),
        "ssim": _ratio(totals["ssim_sum"], totals["ssim_pixels"]),
    }


def _totals(rows, role):
    table = np.array([[row[name] for name in TILE_STATISTICS] for row in rows], dtype=np.float64)
    table = table.reshape(-1, len(TILE_STATISTICS))
    if not np.isfinite(table).all():
        bad = sorted({TILE_STATISTICS[j] for j in np.argwhere(~np.isfinite(table))[:, 1]})
        raise ValueError(f"{role} hold non-finite statistics in {bad}; statistics are finite sums and counts.")
    counts = table[:, [TILE_STATISTICS.index(name) for name in COUNTS]]
    if (counts < 0).any():
        raise ValueError(f"{role} hold negative pixel counts; counts ({', '.join(COUNTS)}) must be >= 0.")
    return dict(zip(TILE_STATISTICS, table.sum(axis=0).tolist()))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Stage2Metric(evaluate.Metric):
    def _info(self):
        statistics = {name: datasets.Value("float64") for name in TILE_STATISTICS}
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": dict(statistics), "references": dict(statistics)}),
            reference_urls=["https://doi.org/10.1109/TIP.2003.819861"],
        )

    def _compute(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError(
                f"{len(predictions)} predictions but {len(references)} references; pass one of each per tile."
            )
        return {
            "refined": metrics_from_totals(_totals(predictions, "predictions")),
            "opt_v1": metrics_from_totals(_totals(references, "references")),
            "n_tiles": len(predictions),
        }

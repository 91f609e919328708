"""Behaviour of the quality metrics (`training.metrics`) and the range of the training spectra
(`training.spectral_range`) that plausible bugs used to get past the suite (a mutation audit): tiles narrower than
the SSIM window in one dimension, the edge metric's band mean and absolute value, numpy masks, mixed input dtypes
scored without rounding, the errors that name what is missing, per-tile statistics kept only on request, the table's
cells for undefined values; and the range's pixel minimum, degeneracy cut-off, refused quantiles and shapes, pixel
budget, empty first batch, a dataset's masks, log offset and saved fields. Tiny tensors and hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modeling_stage2.modeling_stage2 import SPECTRAL_MLP_LOG_CENTRE
from training.metrics import (
    MetricAccumulator,
    evaluate_pair,
    format_metrics_table,
    metrics_from_statistics,
    paired_tile_statistics,
    per_tile_metrics,
    tile_statistics,
)
from training.spectral_range import SpectralRangeFit, fit_spectral_range

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOG_OFFSET = 0.05
# A constant target and output (blue, green, red, NIR): NDVI 2/3 and 0.6, so an NDVI error of 1/15.
TARGET, OUTPUT = (0.05, 0.08, 0.1, 0.5), (0.05, 0.08, 0.1, 0.4)


def constant_tiles(spectrum, height: int, width: int) -> torch.Tensor:
    return torch.tensor(spectrum, dtype=torch.float64)[None, :, None, None].expand(1, 4, height, width).clone()


# ----------------------------------------------------------------------------------------------- SSIM window
@pytest.mark.parametrize("size", [(14, 10), (10, 14)], ids=["14x10", "10x14"])
def test_a_tile_narrower_than_the_ssim_window_in_one_dimension_has_no_ssim(size):
    """SSIM needs an 11x11 window in both dimensions: a 14x10 (or 10x14) tile has none, and its other metrics stay."""
    target, output = constant_tiles(TARGET, *size), constant_tiles(OUTPUT, *size)
    stats = tile_statistics(output, target, target)
    assert stats["ssim_pixels"].tolist() == [0.0] and stats["ssim_sum"].tolist() == [0.0]
    tiles = per_tile_metrics(output, target, target)
    assert math.isnan(tiles["ssim"].item())
    assert tiles["ndvi_rmse"].item() == pytest.approx(1 / 15, rel=1e-9)
    assert tiles["psnr"].item() == pytest.approx(10 * math.log10(1 / 0.0025), rel=1e-9)  # NIR 0.1 off: MSE 0.01 / 4


# ----------------------------------------------------------------------------------------------- edges
def test_the_edge_metric_is_the_band_mean_of_absolute_sobel_differences():
    """A ramp of 0.01 per column in NIR only, flat elsewhere: its Sobel magnitude is 0.01 inside and 0.005 on the
    two border columns, so against a flat image the band mean is a quarter of that, whichever of the two is the
    output (the difference is taken in absolute value). A numpy mask is taken like a tensor."""
    flat = torch.full((1, 4, 12, 12), 0.2, dtype=torch.float64)
    ramp = flat.clone()
    ramp[:, 3] = torch.arange(12, dtype=torch.float64) * 0.01
    expected = (10 * 0.01 + 2 * 0.005) / 12 / 4
    assert per_tile_metrics(ramp, flat, flat)["edge_l1"].item() == pytest.approx(expected, rel=1e-9)
    assert per_tile_metrics(flat, flat, ramp)["edge_l1"].item() == pytest.approx(expected, rel=1e-9)
    # column 3 invalid: the 9 columns whose 3x3 window is valid hold 0.005, 0.01 x 7 and 0.005 (tests/test_metrics.py)
    mask = np.ones((1, 12, 12), dtype=bool)
    mask[:, :, 3] = False
    assert per_tile_metrics(flat, flat, ramp, mask)["edge_l1"].item() == pytest.approx(0.08 / 9 / 4, rel=1e-9)


# ----------------------------------------------------------------------------------------------- input dtypes
@pytest.mark.parametrize("refined_dtype, target_dtype", [(torch.float32, torch.float64),
                                                         (torch.float64, torch.float32)],
                         ids=["float32-output", "float64-output"])
def test_mixed_precision_inputs_are_scored_at_the_widest_precision(refined_dtype, target_dtype):
    """A float64 target beside a float32 output is not rounded to float32, nor is a float32 target scored in float32
    beside a float64 output: errors of 1e-9, far below what float32 resolves, keep the value they have when every
    input is float64."""
    generator = torch.Generator().manual_seed(0)
    base = (0.05 + 0.4 * torch.rand(2, 4, 12, 12, generator=generator, dtype=torch.float64)).float().double()
    nudged = base + 1e-9 * torch.randn(base.shape, generator=generator, dtype=torch.float64)
    # the float32 input holds `base` (exact in float32), the float64 one `nudged`
    refined, target = (base, nudged) if refined_dtype == torch.float32 else (nudged, base)
    reference = evaluate_pair(refined, target, refined)
    got = evaluate_pair(refined.to(refined_dtype), target.to(target_dtype), refined.to(refined_dtype))
    assert reference["refined"]["ndvi_rmse"] > 1e-10  # not 0: the errors are there to be kept
    for name in ("ndvi_rmse", "evi_rmse", "sam"):
        assert got["refined"][name] == pytest.approx(reference["refined"][name], rel=1e-6), name


# ----------------------------------------------------------------------------------------------- messages
def test_statistics_that_lack_a_field_are_refused_by_name():
    x = torch.full((1, 4, 12, 12), 0.2)
    stats = tile_statistics(x, x, x)
    with pytest.raises(KeyError, match=r"statistics lack \['edge_pixels'\]; expected the keys of TILE_STATISTICS"):
        metrics_from_statistics({name: value for name, value in stats.items() if name != "edge_pixels"})
    paired = paired_tile_statistics(x, x, x)
    with pytest.raises(KeyError, match="statistics lack the 'opt_v1' entry"):
        MetricAccumulator().add_statistics({"refined": paired["refined"]})


def test_per_tile_statistics_are_kept_only_when_asked_for():
    x = torch.full((2, 4, 12, 12), 0.2)
    plain = MetricAccumulator()
    plain.update(x, x, x)
    with pytest.raises(ValueError, match="keep_tiles=True"):
        plain.tile_statistics_of("refined")
    kept = MetricAccumulator(keep_tiles=True)
    assert kept.tile_statistics_of("opt_v1")["valid_pixels"].shape == (0,)  # nothing added yet
    with pytest.raises(KeyError, match="no role 'linear_fit'"):
        kept.tile_statistics_of("linear_fit")


# ----------------------------------------------------------------------------------------------- the table
def test_the_table_shows_undefined_values_as_n_a():
    """A metric no pixel counted (NaN) reads "n/a" in its cells and its "met?" column, not "nan" or "no"."""
    x = torch.full((1, 4, 12, 12), 0.2)
    results = evaluate_pair(x, x, x, torch.zeros(1, 12, 12, dtype=torch.bool))
    del results["n_tiles"]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in format_metrics_table(results).splitlines()}
    assert format_metrics_table(results).splitlines()[0] == "Evaluated tiles: unknown"
    assert rows["ndvi_rmse"] == "| ndvi_rmse | n/a | n/a | n/a | < 0.05 | n/a |"
    assert rows["psnr (dB)"] == "| psnr (dB) | n/a | n/a | n/a | - | - |"


def test_a_table_of_results_without_a_role_says_which():
    with pytest.raises(KeyError, match="results lack 'opt_v1'"):
        format_metrics_table({"refined": {}, "n_tiles": 1})


# ----------------------------------------------------------------------------------------------- spectral range
def test_a_range_of_four_bands_needs_more_than_four_pixels():
    with pytest.raises(ValueError, match="more than 4 valid training pixels, got 4"):
        fit_spectral_range(lambda: [(torch.rand(1, 4, 2, 2, generator=torch.Generator().manual_seed(0)), None)],
                           LOG_OFFSET)


def test_a_band_that_is_a_linear_mix_of_the_others_is_degenerate():
    """Log NIR the mean of log blue and log green: the covariance's smallest eigenvalue is rounding noise (~1e-17,
    above 0) or, 1e-7 off the mix, ~1e-14: both far below 1e-10 of the largest, so the range is refused rather than
    given a precision of 1e14 or more."""
    generator = torch.Generator().manual_seed(0)
    log_spectra = 1.0 + 0.1 * torch.randn(2, 4, 10, 10, generator=generator, dtype=torch.float64)
    log_spectra[:, 3] = 0.5 * (log_spectra[:, 0] + log_spectra[:, 1])
    for noise in (0.0, 1e-7):  # exactly a mix, or within 1e-7 of one (an eigenvalue ratio of ~1e-12)
        mixed = log_spectra.clone()
        mixed[:, 3] += noise * torch.randn(2, 10, 10, generator=generator, dtype=torch.float64)
        opt_v1 = torch.exp(mixed + SPECTRAL_MLP_LOG_CENTRE) - LOG_OFFSET  # all above 0: none clamped
        with pytest.raises(ValueError, match="linear mix of the others"):
            fit_spectral_range(lambda: [(opt_v1, None)], LOG_OFFSET)


def test_a_quantile_of_0_and_a_batch_that_is_not_4d_are_refused():
    opt_v1 = torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\), got 0.0"):
        fit_spectral_range(lambda: [(opt_v1, None)], LOG_OFFSET, quantile=0.0)
    with pytest.raises(ValueError, match=r"opt_v1 must be \(batch, bands, height, width\), got \(4, 8, 8\)"):
        fit_spectral_range(lambda: [(opt_v1[0], None)], LOG_OFFSET)


def test_a_million_pixels_all_count_in_the_quantile(monkeypatch):
    """The distances' quantile keeps every pixel up to 2^24 of them (16.8M): 2^20 + 1 pixels are not thinned."""
    from training import spectral_range

    kept = []
    original = spectral_range.np.quantile
    monkeypatch.setattr(spectral_range.np, "quantile",
                        lambda values, q: kept.append(len(values)) or original(values, q))
    opt_v1 = torch.rand(1, 4, 1, (1 << 20) + 1, generator=torch.Generator().manual_seed(0))
    fit = fit_spectral_range(lambda: [(opt_v1, None)], LOG_OFFSET)
    assert kept == [fit.pixels] == [(1 << 20) + 1]


def test_a_mask_of_one_tile_is_refused_for_a_batch():
    """An (H, W) mask would be broadcast to every tile of the batch: it is refused with the shape it needs."""
    opt_v1 = torch.rand(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"valid_mask must be \(batch, height, width\) = \(3, 8, 8\), got \(8, 8\)"):
        fit_spectral_range(lambda: [(opt_v1, torch.ones(8, 8, dtype=torch.bool))], LOG_OFFSET)


def test_a_first_batch_without_valid_pixels_adds_nothing():
    opt_v1 = torch.rand(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(3, 8, 8, dtype=torch.bool)
    empty = torch.zeros(1, 8, 8, dtype=torch.bool)
    fit = fit_spectral_range(lambda: [(opt_v1[:1], empty), (opt_v1[1:], valid[1:])], LOG_OFFSET)
    alone = fit_spectral_range(lambda: [(opt_v1[1:], valid[1:])], LOG_OFFSET)
    assert (fit.pixels, fit.tiles) == (128, 3)
    torch.testing.assert_close(fit.mean, alone.mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(fit.precision, alone.precision, atol=1e-9, rtol=1e-9)
    assert fit.threshold == pytest.approx(alone.threshold, rel=1e-12)


def test_the_fit_of_a_dataset_leaves_out_its_invalid_pixels():
    """`fit_spectral_range_of_dataset` passes each batch's `valid_mask` on: bright garbage under invalid pixels
    counts neither in the pixels nor in the moments."""
    import datasets

    from training.spectral_range import fit_spectral_range_of_dataset

    opt_v1 = 0.05 + 0.3 * torch.rand(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(3, 8, 8, dtype=torch.bool)
    valid[:, :, :3] = False
    opt_v1[:, :, :, :3] = 5.0
    table = datasets.Dataset.from_dict({"opt_v1": opt_v1.numpy(), "valid_mask": valid.numpy()})
    fit = fit_spectral_range_of_dataset(table, LOG_OFFSET)
    direct = fit_spectral_range(lambda: [(opt_v1, valid)], LOG_OFFSET)
    assert (fit.pixels, fit.tiles) == (3 * 8 * 5, 3)
    torch.testing.assert_close(fit.mean, direct.mean, atol=1e-12, rtol=0)
    assert fit.threshold == pytest.approx(direct.threshold, rel=1e-10)


def test_the_distance_uses_the_log_offset_it_is_given():
    """`distance(opt_v1, log_offset)`: the distance of log(opt_v1 + offset) - log(0.1) from the mean, under the
    precision. A pixel of reflectance 0.05 in every band: log(0.1) - log(0.1) = 0 at offset 0.05, log(2) at 0.15."""
    fit = SpectralRangeFit(torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64), 1.0, 0.99, 10, 1)
    pixel = torch.full((1, 4, 1, 1), 0.05, dtype=torch.float64)
    assert fit.distance(pixel, 0.05).item() == pytest.approx(0.0, abs=1e-12)
    assert fit.distance(pixel, 0.15).item() == pytest.approx(2 * math.log(2), rel=1e-9)  # sqrt(4 log(2)^2)


def test_the_saved_range_keeps_every_field():
    fit = SpectralRangeFit(torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64), 1.5, 0.95, 10, 3)
    assert fit.to_dict() == {"mean": [0.0] * 4, "precision": torch.eye(4).tolist(), "threshold": 1.5,
                             "quantile": 0.95, "pixels": 10, "tiles": 3}

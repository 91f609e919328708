"""`out_of_range_fallback`: the range of the training spectra (`training.spectral_range`), the refiner's
`Stage2SpectralRange` that keeps `opt_v1` beyond it, and how it travels with adapters and training (issue:
refinement quality)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modeling_stage2 import Stage2RefinerModel
from modeling_stage2.modeling_stage2 import SPECTRAL_MLP_LOG_CENTRE, Stage2SpectralRange, keep_opt_v1
from training.spectral_range import (
    SpectralRangeFit,
    fit_spectral_range,
    fit_spectral_range_of_dataset,
    set_spectral_range,
    spectral_ranges,
)

from _refiner_helpers import tiny_inputs, tiny_refiner_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOG_OFFSET = 0.05
# 99 % and 95 % quantiles of the chi-square distribution with 4 degrees of freedom (the squared distance of a
# 4-band Gaussian from its mean)
CHI2_4_99, CHI2_4_95 = 13.2767, 9.4877


def reflectance_of_log_spectra(log_spectra: torch.Tensor) -> torch.Tensor:
    """The reflectance whose `modeling_stage2.log_spectra` is `log_spectra` (the inverse of that transform)."""
    return torch.exp(log_spectra + SPECTRAL_MLP_LOG_CENTRE) - LOG_OFFSET


def gaussian_tiles(tiles: int = 40, size: int = 50, seed: int = 0):
    """Tiles whose log spectra are Gaussian with a known mean and covariance."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.tensor([1.0, 1.2, 1.1, 2.0], dtype=torch.float64)
    mixing = torch.tensor([[0.2, 0.0, 0.0, 0.0], [0.1, 0.2, 0.0, 0.0], [0.0, 0.1, 0.15, 0.0], [-0.1, 0.0, 0.0, 0.3]],
                          dtype=torch.float64)
    log_spectra = mean[None, :, None, None] + torch.einsum(
        "ij,bjhw->bihw", mixing, torch.randn(tiles, 4, size, size, generator=generator, dtype=torch.float64))
    return reflectance_of_log_spectra(log_spectra), mean, mixing @ mixing.T


def at_distances(distances: torch.Tensor) -> torch.Tensor:
    """(1, 4, 1, N) float32 reflectance whose log spectra lie `distances` from 0 under the precision 4 I."""
    log_spectra = torch.zeros(1, 4, 1, len(distances), dtype=torch.float64)
    log_spectra[0, 2, 0] = distances / 2  # the precision doubles the distance
    return reflectance_of_log_spectra(log_spectra).float()


def fallback_model(**overrides) -> Stage2RefinerModel:
    torch.manual_seed(0)
    return Stage2RefinerModel(tiny_refiner_config(**{"out_of_range_fallback": True, **overrides}))


# ------------------------------------------------------------------------------------------------ the fit
def test_the_range_is_the_mean_covariance_and_distance_quantile_of_the_valid_pixels():
    opt_v1, mean, covariance = gaussian_tiles()
    valid = torch.ones(opt_v1.shape[0], *opt_v1.shape[2:], dtype=torch.bool)
    valid[:, :5] = False
    opt_v1[:, :, :5] = 5.0  # invalid pixels far outside must not count
    opt_v1[0, 1, 20, 20] = math.nan  # nor a pixel that is not finite
    fit = fit_spectral_range(lambda: [(opt_v1[:15], valid[:15]), (opt_v1[15:], valid[15:])], LOG_OFFSET)
    assert fit.tiles == 40 and fit.pixels == 40 * 45 * 50 - 1 and fit.quantile == 0.99
    torch.testing.assert_close(fit.mean, mean, atol=0.005, rtol=0)
    torch.testing.assert_close(torch.linalg.inv(fit.precision), covariance, atol=0.002, rtol=0)
    assert fit.threshold == pytest.approx(CHI2_4_99 ** 0.5, rel=0.01)
    at_95 = fit_spectral_range(lambda: [(opt_v1, valid)], LOG_OFFSET, quantile=0.95)
    assert at_95.threshold == pytest.approx(CHI2_4_95 ** 0.5, rel=0.01)
    # batches add up exactly: one batch or two give the same numbers
    whole = fit_spectral_range(lambda: [(opt_v1, valid)], LOG_OFFSET)
    torch.testing.assert_close(whole.precision, fit.precision, atol=1e-9, rtol=1e-9)
    assert whole.threshold == pytest.approx(fit.threshold, rel=1e-12)
    assert fit.to_dict()["threshold"] == fit.threshold and len(fit.to_dict()["precision"]) == 4
    # and exactly the sample moments and distance quantile of those pixels, computed here in numpy (float64)
    spectra = opt_v1.permute(0, 2, 3, 1)[valid].numpy()
    points = np.log(spectra[np.isfinite(spectra).all(axis=1)] + LOG_OFFSET) - math.log(0.1)
    precision = np.linalg.inv(np.cov(points.T, ddof=1))
    np.testing.assert_allclose(fit.mean.numpy(), points.mean(axis=0), rtol=1e-12, atol=0)
    np.testing.assert_allclose(fit.precision.numpy(), precision, rtol=1e-9, atol=1e-9)
    centred = points - points.mean(axis=0)
    distances = np.sqrt(np.einsum("ni,ij,nj->n", centred, precision, centred))
    assert fit.threshold == pytest.approx(np.quantile(distances, 0.99), rel=1e-9)


def test_above_a_pixel_budget_the_quantile_uses_every_kth_pixel(monkeypatch):
    from training import spectral_range

    opt_v1, _, _ = gaussian_tiles(tiles=10, size=40)
    valid = torch.ones(10, 40, 40, dtype=torch.bool)
    valid[0, 0, :5] = False  # 4,795 + 11,200 pixels: neither the first batch nor the total a multiple of 16

    def batches():
        return [(opt_v1[:3], valid[:3]), (opt_v1[3:], valid[3:])]

    exact = fit_spectral_range(batches, LOG_OFFSET)
    kept = []
    monkeypatch.setattr(spectral_range, "_MAX_QUANTILE_PIXELS", 1000)  # 15,995 pixels -> every 16th
    original = spectral_range.np.quantile
    monkeypatch.setattr(spectral_range.np, "quantile", lambda values, q: kept.append(values) or original(values, q))
    strided = fit_spectral_range(batches, LOG_OFFSET)
    # every 16th pixel counted across the two batches (the second batch starts at its 6th pixel): 1,000
    every_pixel = exact.distance(opt_v1, LOG_OFFSET)[valid].numpy()
    assert len(kept) == 1 and len(kept[0]) == 1000
    np.testing.assert_allclose(kept[0], every_pixel[::16], rtol=1e-12, atol=0)
    torch.testing.assert_close(strided.precision, exact.precision, atol=0, rtol=0)  # the moments use every pixel
    assert strided.threshold == pytest.approx(exact.threshold, rel=0.05) and strided.threshold != exact.threshold


def test_a_fit_without_enough_pixels_or_with_a_constant_band_says_so():
    with pytest.raises(ValueError, match="no training tile"):
        fit_spectral_range(lambda: [], LOG_OFFSET)
    with pytest.raises(ValueError, match="more than 4 valid training pixels, got 3"):
        fit_spectral_range(lambda: [(torch.rand(1, 4, 1, 3), None)], LOG_OFFSET)
    constant = torch.rand(2, 4, 10, 10)
    constant[:, 2] = 0.1
    with pytest.raises(ValueError, match="degenerate"):
        fit_spectral_range(lambda: [(constant, None)], LOG_OFFSET)
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\)"):
        fit_spectral_range(lambda: [(torch.rand(1, 4, 10, 10), None)], LOG_OFFSET, quantile=1.0)


def test_a_constant_band_is_degenerate_at_any_value_over_many_pixels():
    """Moments summed about 0 kept float64 rounding noise for a constant band (about 1e-10 of the largest spread over
    1.8M pixels at reflectance 2.0, above the degeneracy cut-off): its range was accepted, with a precision of ~1e10."""
    generator = torch.Generator().manual_seed(0)
    for value in (2.0, 9.0):
        opt_v1 = torch.rand(128, 4, 120, 120, generator=generator) * 0.5  # 1,843,200 pixels
        opt_v1[:, 3] = value
        with pytest.raises(ValueError, match="degenerate"):
            fit_spectral_range(lambda: [(opt_v1[:64], None), (opt_v1[64:], None)], LOG_OFFSET)


def test_a_narrow_range_far_from_the_origin_keeps_its_covariance():
    """Spectra whose log spread (1e-4) is small beside their distance from the origin (~3): the covariance is numpy's
    two-pass one to 1e-6, not what is left of it after sums of squares about 0 cancel."""
    generator = torch.Generator().manual_seed(1)
    log_spectra = 3.0 + 1e-4 * torch.randn(200, 4, 60, 60, generator=generator, dtype=torch.float64)
    opt_v1 = reflectance_of_log_spectra(log_spectra)
    fit = fit_spectral_range(lambda: [(opt_v1[:100], None), (opt_v1[100:], None)], LOG_OFFSET)
    points = log_spectra.permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    np.testing.assert_allclose(torch.linalg.inv(fit.precision).numpy(), np.cov(points.T, ddof=1), rtol=1e-6,
                               atol=1e-15)


def test_the_fit_of_a_dataset_equals_the_fit_of_its_tensors(sample_dataset_dir):
    from datasets import load_from_disk

    train = load_from_disk(str(sample_dataset_dir))["train"]
    fit = fit_spectral_range_of_dataset(train, LOG_OFFSET)
    rows = train.with_format("torch")[:]
    direct = fit_spectral_range(lambda: [(rows["opt_v1"], rows["valid_mask"])], LOG_OFFSET)
    assert fit.tiles == len(train) and fit.pixels == direct.pixels == int(rows["valid_mask"].sum())
    torch.testing.assert_close(fit.mean, direct.mean, atol=1e-12, rtol=0)
    assert fit.threshold == pytest.approx(direct.threshold, rel=1e-10)
    # 1 % of the training pixels lie beyond the threshold (the quantile's definition)
    beyond = (fit.distance(rows["opt_v1"], LOG_OFFSET) > fit.threshold)[rows["valid_mask"]]
    assert float(beyond.double().mean()) == pytest.approx(0.01, abs=1e-4)
    with pytest.raises(ValueError, match="lacks the column 'opt_v1'"):
        fit_spectral_range_of_dataset(train.remove_columns("opt_v1"), LOG_OFFSET)


# --------------------------------------------------------------------------------------------- the module
def test_config_default_has_no_range_and_checks_its_fields():
    config = tiny_refiner_config()
    assert config.out_of_range_fallback is False and config.out_of_range_ramp == 2.0
    model = Stage2RefinerModel(config).eval()
    assert model.spectral_range is None and not any("spectral_range" in name for name in model.state_dict())
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    assert model(opt_v1, month, biome).out_of_range_weight is None
    with pytest.raises(ValueError, match="out_of_range_fallback must be True or False"):
        tiny_refiner_config(out_of_range_fallback="yes")
    for bad in (1.0, 0.5, "two"):
        with pytest.raises(ValueError, match="out_of_range_ramp must be"):
            tiny_refiner_config(out_of_range_fallback=True, out_of_range_ramp=bad)


def test_a_fresh_range_keeps_nothing_and_the_weight_ramps_from_the_threshold():
    model = fallback_model(out_of_range_ramp=3.0).eval()
    spectral_range = model.spectral_range
    assert isinstance(spectral_range, Stage2SpectralRange) and not spectral_range.is_fitted
    assert math.isinf(float(spectral_range.threshold)) and torch.equal(spectral_range.precision, torch.eye(4))
    distances = torch.tensor([0.0, 0.5, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0], dtype=torch.float64)
    opt_v1 = at_distances(distances)
    assert torch.equal(spectral_range(opt_v1), torch.zeros(1, 1, 1, len(distances)))
    spectral_range.set_range(torch.zeros(4), torch.eye(4) * 4, 1.0)
    assert spectral_range.is_fitted
    weight = spectral_range(opt_v1)
    assert weight.shape == (1, 1, 1, len(distances)) and weight.dtype == torch.float32
    # 0 up to the threshold, 1 from 3 times it (the config's ramp), linear between
    expected = torch.tensor([0.0, 0.0, 0.0, 0.125, 0.25, 0.5, 1.0, 1.0])
    torch.testing.assert_close(weight[0, 0, 0], expected, atol=1e-6, rtol=0)
    output = torch.full_like(opt_v1, 0.5)
    blended = keep_opt_v1(output, opt_v1, weight)
    torch.testing.assert_close(blended[..., :3], output[..., :3], atol=0, rtol=0)  # in range: the output
    torch.testing.assert_close(blended[..., -2:], opt_v1[..., -2:], atol=1e-7, rtol=0)  # far out: opt_v1
    torch.testing.assert_close(blended[..., 5], 0.5 * (output[..., 5] + opt_v1[..., 5]), atol=1e-7, rtol=0)
    for bad, match in (((torch.zeros(3), torch.eye(4), 1.0), "needs a"), ((torch.zeros(4), torch.eye(4), 0.0),
                       "threshold positive"), ((torch.zeros(4), torch.eye(4) * math.nan, 1.0), "must be finite")):
        with pytest.raises(ValueError, match=match):
            spectral_range.set_range(*bad)
    assert float(spectral_range.threshold) == 1.0  # a refused range changes nothing


def test_the_refiner_keeps_opt_v1_outside_its_training_spectra_and_says_where():
    plain = Stage2RefinerModel(tiny_refiner_config(spectral_mlp_hidden_size=8, nonnegative_output=True)).eval()
    model = fallback_model(spectral_mlp_hidden_size=8, nonnegative_output=True).eval()
    model.load_state_dict(plain.state_dict(), strict=False)  # the same refiner, plus the range
    with torch.no_grad():
        for module in (plain, model):
            module.head.output_projection.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(3))
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    opt_v1 = 0.4 * opt_v1  # training spectra: every band 0..0.2
    far = opt_v1.clone()
    far[:, :, :10] = 0.8  # a snow-bright band across both tiles
    fit = fit_spectral_range(lambda: [(opt_v1, None)], LOG_OFFSET)
    set_spectral_range(model, fit)
    with torch.no_grad():
        expected = plain(far, month, biome).refined
        output = model(far, month, biome)
    weight = output.out_of_range_weight
    assert weight.shape == (2, 1, 28, 28)
    assert torch.equal(weight[:, :, :10], torch.ones_like(weight[:, :, :10]))
    torch.testing.assert_close(output.refined[:, :, :10], far[:, :, :10], atol=0, rtol=0)  # Stage 1's pixels
    inside = weight[:, 0] == 0
    assert float(inside[:, 10:].double().mean()) > 0.97  # the rest: all but (some of) the training's 1 % tail
    assert torch.equal(output.refined.permute(0, 2, 3, 1)[inside], expected.permute(0, 2, 3, 1)[inside])
    assert float((expected[:, :, :10] - far[:, :, :10]).abs().max()) > 1e-3  # the refiner would have changed them


def test_a_saved_refiner_keeps_its_range(tmp_path):
    model = fallback_model().eval()
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    set_spectral_range(model, fit_spectral_range(lambda: [(opt_v1[:1], None)], LOG_OFFSET, quantile=0.5))
    model.save_pretrained(tmp_path)
    reloaded = Stage2RefinerModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.out_of_range_fallback and reloaded.spectral_range.is_fitted
    with torch.no_grad():
        expected = model(opt_v1, month, biome)
        actual = reloaded(opt_v1, month, biome)
    assert 0 < float(expected.out_of_range_weight.mean()) < 1
    torch.testing.assert_close(actual.out_of_range_weight, expected.out_of_range_weight, atol=0, rtol=0)
    torch.testing.assert_close(actual.refined, expected.refined, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ adapters and training
@pytest.mark.parametrize("quantization", ["none", "8bit"])
def test_the_range_is_saved_with_the_adapter(quantization, tmp_path):
    from modeling_stage2.adapters import build_trainable_model, load_trained_model, save_trained_model

    model = build_trainable_model(tiny_refiner_config(out_of_range_fallback=True), quantization=quantization,
                                  print_summary=False)
    assert "spectral_range" in model.peft_config["default"].modules_to_save
    opt_v1, month, biome = tiny_inputs(batch=2, size=(28, 28))
    fit = fit_spectral_range(lambda: [(opt_v1[:1], None)], LOG_OFFSET, quantile=0.5)
    set_spectral_range(model, fit)
    copy = model.base_model.model.spectral_range.modules_to_save["default"]
    assert spectral_ranges(model) == [copy] and float(copy.threshold) == pytest.approx(fit.threshold)
    assert not model.base_model.model.spectral_range.original_module.is_fitted  # the frozen base is left as it was
    model.eval()
    with torch.no_grad():
        expected = model(opt_v1, month, biome)
    assert 0 < float(expected.out_of_range_weight.mean()) < 1
    save_trained_model(model, tmp_path / "saved")
    reloaded = load_trained_model(tmp_path / "saved", quantization=quantization)
    with torch.no_grad():
        actual = reloaded(opt_v1, month, biome)
    torch.testing.assert_close(actual.out_of_range_weight, expected.out_of_range_weight, atol=0, rtol=0)
    torch.testing.assert_close(actual.refined, expected.refined, atol=1e-6, rtol=0)


def test_setting_a_range_on_a_refiner_without_one_says_how_to_build_it():
    fit = SpectralRangeFit(torch.zeros(4), torch.eye(4), 1.0, 0.99, 10, 1)
    with pytest.raises(ValueError, match="out_of_range_fallback=True"):
        set_spectral_range(Stage2RefinerModel(tiny_refiner_config()), fit)


def test_training_fits_the_range_on_the_training_split_unless_resuming(sample_dataset_dir, tmp_path):
    from datasets import load_from_disk

    from training.args import Stage2TrainingArguments
    from training.train import refiner_config
    from training.warm_start import start_spectral_range
    from training.trainer import CHECKPOINT_COMPLETE_NAME

    train_split = load_from_disk(str(sample_dataset_dir))["train"]
    arguments = dict(output_dir=str(tmp_path), quantization="none", report_to="none")
    args = Stage2TrainingArguments(out_of_range_fallback=True, out_of_range_quantile=0.95, out_of_range_ramp=3.0,
                                   **arguments)
    config = refiner_config(args)
    assert config.out_of_range_fallback and config.out_of_range_ramp == 3.0
    assert not refiner_config(Stage2TrainingArguments(**arguments)).out_of_range_fallback  # off by default
    model = fallback_model()
    said = start_spectral_range(model, train_split, args)
    assert said == f"95th percentile of {len(train_split)} training tiles"
    expected = fit_spectral_range_of_dataset(train_split, model.config.spectral_mlp_log_offset, quantile=0.95)
    assert float(model.spectral_range.threshold) == pytest.approx(expected.threshold, rel=1e-6)
    torch.testing.assert_close(model.spectral_range.precision, expected.precision.float())
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / CHECKPOINT_COMPLETE_NAME).write_text('{"global_step": 4, "files": {}}')
    resumed = fallback_model()
    assert start_spectral_range(resumed, train_split, Stage2TrainingArguments(
        resume_from_checkpoint="latest", out_of_range_fallback=True, **arguments)) is None
    assert not resumed.spectral_range.is_fitted  # the checkpoint holds the range
    assert start_spectral_range(Stage2RefinerModel(tiny_refiner_config()), train_split, args) is None
    for bad, match in (({"out_of_range_quantile": 1.5}, "out_of_range_quantile must be in"),
                       ({"out_of_range_ramp": 1.0}, "out_of_range_ramp must be > 1")):
        with pytest.raises(ValueError, match=match):
            Stage2TrainingArguments(**bad, **arguments)

"""`bench/_common.py`: the table cells, the tiles in the training range and the in-range EVI RMSE the quality studies
share, and how a study is recorded."""
from __future__ import annotations

import json
import sys

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def common(repo_root):
    sys.path.insert(0, str(repo_root))
    from bench import _common

    return _common


def test_a_cell_is_the_mean_and_range_over_seeds_or_a_dash_for_a_missing_run(common):
    assert common.mean_range_cell([0.1, 0.3, 0.2], 2) == "0.20 (0.10-0.30)"
    assert common.mean_range_cell([0.12345], 4) == "0.1235"
    assert common.mean_range_cell([0.1, None, 0.2], 2) == "-"


def test_in_range_tiles_are_those_no_brighter_than_the_brightest_training_tile(common):
    train = torch.stack([torch.full((4, 2, 2), 0.1), torch.full((4, 2, 2), 0.3)])
    test = torch.stack([torch.full((4, 2, 2), 0.2), torch.full((4, 2, 2), 0.3), torch.full((4, 2, 2), 0.31)])
    test[0, :, 0, 0] = 5.0  # an invalid pixel does not count
    valid = torch.ones(3, 2, 2, dtype=torch.bool)
    valid[0, 0, 0] = False
    in_range = common.in_range_tiles(test, valid, train, torch.ones(2, 2, 2, dtype=torch.bool))
    assert in_range.tolist() == [True, True, False]


def test_in_range_evi_rmse_is_the_metric_of_the_selected_tiles_only(common):
    from training.metrics import evaluate_pair

    torch.manual_seed(0)
    target = torch.rand(3, 4, 8, 8) * 0.3
    output = target.clone()
    output[2, 3] += 0.2  # only the last tile's NIR is wrong
    valid = torch.ones(3, 8, 8, dtype=torch.bool)
    in_range = torch.tensor([True, True, False])
    assert common.in_range_evi_rmse(output, target, target, valid, in_range) == 0.0
    everything = common.in_range_evi_rmse(output, target, target, valid, torch.ones(3, dtype=torch.bool))
    assert everything == pytest.approx(evaluate_pair(output, target, target, valid)["refined"]["evi_rmse"], rel=1e-12)
    assert everything > 0.05
    assert common.in_range_evi_rmse(output, target, target, valid, torch.zeros(3, dtype=torch.bool)) is None


def test_a_study_is_recorded_as_tables_and_json(common, tmp_path, capsys):
    common.record_study(tmp_path / "study.md", "# table\n", {"x": [1, 2]})
    assert (tmp_path / "study.md").read_text() == "# table\n"
    assert json.loads((tmp_path / "study.json").read_text()) == {"x": [1, 2]}
    assert "# table" in capsys.readouterr().out


def _reflectance_of_log_spectra(log_spectra, log_offset):
    """The reflectance whose `modeling_stage2.log_spectra` is `log_spectra` (the inverse of that transform)."""
    from modeling_stage2.modeling_stage2 import SPECTRAL_MLP_LOG_CENTRE

    return torch.exp(log_spectra + SPECTRAL_MLP_LOG_CENTRE) - log_offset


def test_the_training_spectra_range_is_the_mean_covariance_and_distance_quantile_of_valid_pixels(common):
    generator = torch.Generator().manual_seed(0)
    mean = torch.tensor([1.0, 1.2, 1.1, 2.0], dtype=torch.float64)
    mixing = torch.tensor([[0.2, 0.0, 0.0, 0.0], [0.1, 0.2, 0.0, 0.0], [0.0, 0.1, 0.15, 0.0], [-0.1, 0.0, 0.0, 0.3]],
                          dtype=torch.float64)
    log_spectra = mean[None, :, None, None] + torch.einsum(
        "ij,bjhw->bihw", mixing, torch.randn(40, 4, 50, 50, generator=generator, dtype=torch.float64))
    opt_v1 = _reflectance_of_log_spectra(log_spectra, 0.05)
    valid = torch.ones(40, 50, 50, dtype=torch.bool)
    valid[:, :5] = False
    opt_v1[:, :, :5] = 5.0  # invalid pixels far outside must not count
    spectra_range = common.training_spectra_range(opt_v1, valid, 0.05)
    torch.testing.assert_close(spectra_range["mean"], mean, atol=0.005, rtol=0)
    covariance = mixing @ mixing.T
    torch.testing.assert_close(torch.linalg.inv(spectra_range["precision"]), covariance, atol=0.002, rtol=0)
    # Gaussian log spectra: the squared distance is chi-square with 4 degrees of freedom, 99 % quantile 13.277
    assert spectra_range["threshold"] == pytest.approx(13.2767 ** 0.5, rel=0.01)
    assert common.training_spectra_range(opt_v1, valid, 0.05, quantile=0.95)["threshold"] == pytest.approx(
        9.4877 ** 0.5, rel=0.01)


def test_the_out_of_range_weight_ramps_from_the_threshold_to_twice_it_and_blends_in_opt_v1(common):
    assert common.OUT_OF_RANGE_RAMP == 2.0
    spectra_range = {"mean": torch.zeros(4, dtype=torch.float64), "precision": torch.eye(4, dtype=torch.float64) * 4,
                     "threshold": 1.0}
    distances = torch.tensor([0.0, 0.5, 1.0, 1.25, 1.5, 2.0, 3.0])
    log_spectra = torch.zeros(1, 4, 1, len(distances), dtype=torch.float64)
    log_spectra[0, 2, 0] = distances / 2  # the precision doubles the distance
    opt_v1 = _reflectance_of_log_spectra(log_spectra, 0.05).float()
    weight = common.out_of_range_weight(opt_v1, spectra_range, 0.05)
    assert weight.shape == (1, 1, 1, len(distances)) and weight.dtype == torch.float32
    torch.testing.assert_close(weight[0, 0, 0], torch.tensor([0.0, 0.0, 0.0, 0.25, 0.5, 1.0, 1.0]), atol=1e-6, rtol=0)
    wider = common.out_of_range_weight(opt_v1, spectra_range, 0.05, ramp=3.0)  # complete at 3x the threshold
    torch.testing.assert_close(wider[0, 0, 0], torch.tensor([0.0, 0.0, 0.0, 0.125, 0.25, 0.5, 1.0]), atol=1e-6, rtol=0)
    output = torch.full_like(opt_v1, 0.5)
    blended = common.opt_v1_out_of_range(output, opt_v1, weight)
    torch.testing.assert_close(blended, output + weight * (opt_v1 - output), atol=0, rtol=0)
    torch.testing.assert_close(blended[..., 0], output[..., 0], atol=0, rtol=0)  # in range: the output
    torch.testing.assert_close(blended[..., -1], opt_v1[..., -1], atol=1e-7, rtol=0)  # far out: opt_v1

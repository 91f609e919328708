"""`bench/study_tile_conditioning.py`: the tile-level and neighbourhood inputs it compares with the refiner's pixel MLP
do what they say, it runs as a script, and the figures docs/quality.md quotes from it are the recorded ones."""
from __future__ import annotations

import json
import math
import statistics
import sys

import pytest
import torch

from _study_helpers import run_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def study_module(repo_root):
    sys.path.insert(0, str(repo_root))
    from bench import study_tile_conditioning

    return study_tile_conditioning


def test_tile_statistics_are_each_bands_quantiles_over_the_tile(study_module):
    image = torch.arange(2 * 4 * 3 * 7, dtype=torch.float64).view(2, 4, 3, 7)  # 21 pixels a band
    stats = study_module.tile_statistics(image)
    assert stats.shape == (2, 12)
    # Band 1 of tile 1 holds 105 .. 125: quantiles 5 / 50 / 95 % by linear interpolation over 21 values.
    assert stats[1, 3:6].tolist() == pytest.approx([105 + 0.05 * 20, 115, 105 + 0.95 * 20])


def _with_output_weights(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    torch.nn.init.normal_(module.output.weight, std=0.5)
    return module


@pytest.mark.parametrize("variant", ["pixel + tile statistics", "tile affine + pixel", "3x3 neighbourhood"])
def test_each_correction_starts_as_no_correction(study_module, variant):
    spectra = torch.rand(2, 4, 8, 8) * 0.4
    assert torch.equal(study_module.build_correction(variant)(spectra), spectra)


def test_what_each_correction_sees_of_other_pixels(study_module):
    """Brightening a far corner of the tile changes a pixel's correction where the tile's statistics go in, not
    through the 3x3 neighbourhood; changing a neighbour changes it through the neighbourhood; the refiner's pixel MLP
    sees its own pixel alone."""
    torch.manual_seed(0)
    spectra = torch.rand(1, 4, 8, 8) * 0.4
    far, near = spectra.clone(), spectra.clone()
    far[..., 7, 7] = 0.9  # a bright pixel far from (0, 0), enough to move the tile's 95 % quantiles
    far[..., 6, 7] = 0.9
    far[..., 7, 6] = 0.9
    near[..., 0, 1] += 0.2  # a neighbour of (0, 0)
    changed = {}
    for variant in study_module.VARIANTS:
        correction = _with_output_weights(study_module.build_correction(variant))
        if variant == "tile affine + pixel":
            torch.nn.init.normal_(correction.tile_affine.weight, std=0.5)
        with torch.no_grad():
            base = correction(spectra)[..., 0, 0]
            changed[variant] = (not torch.allclose(correction(far)[..., 0, 0], base, atol=1e-6),
                                not torch.allclose(correction(near)[..., 0, 0], base, atol=1e-6))
    assert changed["pixel"] == (False, False) and changed["3x3 neighbourhood"] == (False, True)
    assert changed["pixel + tile statistics"][0] and changed["tile affine + pixel"][0]


def test_an_unknown_variant_is_refused(study_module):
    with pytest.raises(ValueError, match="unknown variant 'tile'"):
        study_module.ConditionedSpectralMLP("tile")


def _run(repo_root, *args):
    return run_study(repo_root, "study_tile_conditioning.py", *args)


def test_the_study_runs_as_a_script_and_records_what_it_prints(repo_root, tmp_path):
    output = tmp_path / "tile.md"
    result = _run(repo_root, "--datasets", "mixture", "--seeds", "0", "--steps", "2", "--jobs", "1",
                  "--variants", "pixel", "3x3 neighbourhood", "--output", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(output.with_suffix(".json").read_text())
    data = record["datasets"]["mixture"]
    assert data["scored_on"] == "mild" and set(data["variants"]) == {"pixel", "3x3 neighbourhood"}
    fit, pixel = data["baselines"]["colour fit"], data["variants"]["pixel"][0]
    for scores in (*data["baselines"].values(), pixel):
        assert all(0 < scores[m] < 1 for m in ("ndvi_rmse", "evi_rmse", "sam"))
    # opt_v1 of the mild test tiles, whatever the training set: the recorded mild demo figures.
    assert data["baselines"]["opt_v1"]["evi_rmse"] == pytest.approx(0.1189, abs=1e-4)
    text = output.read_text()
    assert "## trained on `mixture`, scored on the `mild` test split" in text
    row = next(line for line in text.splitlines() if line.startswith("| pixel |"))
    assert f"| {pixel['evi_rmse']:.4f} |" in row and f"| {pixel['evi_rmse'] / fit['evi_rmse']:.2f} |" in row


def test_bad_arguments_exit_2(repo_root, tmp_path):
    result = _run(repo_root, "--steps", "0", "--output", str(tmp_path / "x.md"))
    assert result.returncode == 2 and "--steps must be >= 1" in result.stderr
    assert not (tmp_path / "x.md").exists()


# ------------------------------------------------------------------------------------------------ recorded figures
@pytest.fixture(scope="module")
def recorded(repo_root) -> dict:
    return json.loads((repo_root / "bench" / "results" / "tile_conditioning.json").read_text())


def test_the_recorded_study_covers_every_dataset_variant_and_seed(recorded, study_module):
    assert recorded["seeds"] == [0, 1, 2] and recorded["steps"] == 300
    assert set(recorded["datasets"]) == set(study_module.DATASETS)
    for data in recorded["datasets"].values():
        assert set(data["variants"]) == set(study_module.VARIANTS)
        assert all(len(runs) == 3 for runs in data["variants"].values())


def test_docs_quote_the_recorded_ratios(recorded, repo_root):
    """docs/quality.md quotes, for each dataset and variant, the mean test EVI and SAM ratios to the colour fit."""
    training = " ".join((repo_root / "docs" / "quality.md").read_text().split())
    for name, data in recorded["datasets"].items():
        fit = data["baselines"]["colour fit"]
        cells = []
        for runs in data["variants"].values():
            ratios = [statistics.fmean(run[m] / fit[m] for run in runs) for m in ("ndvi_rmse", "evi_rmse", "sam")]
            assert all(math.isfinite(value) for value in ratios)
            cells.append(" / ".join(f"{value:.2f}" for value in ratios))
        row = f"| `{name}` | " + " | ".join(cells) + " |"
        assert row in training, row
    # The EVI RMSEs quoted beside the table.
    proxy, mixture = recorded["datasets"]["proxy"], recorded["datasets"]["mixture"]
    tile_affine_proxy = statistics.fmean(run["evi_rmse"] for run in proxy["variants"]["tile affine + pixel"])
    quoted = (f"Proxy EVI RMSE drops to {tile_affine_proxy:.3f}, but `opt_v1` scores "
              f"{proxy['baselines']['opt_v1']['evi_rmse']:.3f}, so it is "
              f"{100 * (1 - tile_affine_proxy / proxy['baselines']['opt_v1']['evi_rmse']):.0f} % better")
    assert quoted in training, quoted
    mild_pixel = statistics.fmean(run["evi_rmse"] for run in recorded["datasets"]["mild"]["variants"]["pixel"])
    mixture_tile = statistics.fmean(run["evi_rmse"] for run in mixture["variants"]["tile affine + pixel"])
    quoted = f"EVI RMSE on the `mild` tiles is {mixture_tile:.3f}, against {mild_pixel:.3f} for the pixel MLP"
    assert quoted in training, quoted

"""`bench/study_correction_bounds.py`: its oracle bounds and blind per-tile corrections find known answers, it runs as
a script, and the figures docs/quality.md quotes from it are the recorded ones."""
from __future__ import annotations

import json
import math
import statistics
import sys

import pytest
import torch

from _study_helpers import run_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOG_OFFSET = 0.01


@pytest.fixture(scope="module")
def study(repo_root):
    sys.path.insert(0, str(repo_root))
    from bench import study_correction_bounds

    return study_correction_bounds


def _scenes(count: int, seed: int, brightness: float = 0.2) -> torch.Tensor:
    """(count, 4, 16, 16) reflectance, every tile drawn from the same distribution."""
    generator = torch.Generator().manual_seed(seed)
    return brightness * (0.5 + torch.rand(count, 4, 16, 16, generator=generator, dtype=torch.float64))


def _all_valid(image: torch.Tensor) -> torch.Tensor:
    return torch.ones(image.shape[0], *image.shape[2:], dtype=torch.bool)


def _affine(image: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", matrix, image) + bias[None, :, None, None]


def test_the_oracles_undo_what_they_can_express_and_only_that(study):
    target = _scenes(3, seed=0)
    gains = torch.tensor([[0.8, 1.1, 1.0, 1.3], [1.2, 0.9, 0.7, 1.0], [1.0, 1.0, 1.05, 0.6]], dtype=torch.float64)
    cast = target / gains[:, :, None, None]
    valid = _all_valid(target)
    assert torch.allclose(study.oracle_gain(cast, target, valid), target, atol=1e-12)
    mixed = _affine(target, torch.eye(4, dtype=torch.float64) + 0.1, torch.full((4,), 0.02, dtype=torch.float64))
    assert torch.allclose(study.oracle_affine(mixed, target, valid), target, atol=1e-9)
    # A gain cannot undo band mixing and an offset: its error stays far above the affine oracle's.
    gain_error = (study.oracle_gain(mixed, target, valid) - target).abs().mean()
    assert gain_error > 0.01
    # One correction for every tile undoes an error the tiles share, not one that differs from tile to tile.
    assert torch.allclose(study.oracle_global_affine(mixed, target, valid), target, atol=1e-9)
    global_error = (study.oracle_global_affine(cast, target, valid) - target).abs().mean()
    assert global_error > 0.01 > (study.oracle_affine(cast, target, valid) - target).abs().mean()


def test_a_weighted_fit_is_the_colour_fit_of_the_tiles_it_weighs(study):
    from training.linear_fit import LinearColorFit

    target = _scenes(4, seed=1)
    opt_v1 = _affine(target, torch.eye(4, dtype=torch.float64) * 0.9, torch.zeros(4, dtype=torch.float64))
    opt_v1 += 0.01 * torch.randn(opt_v1.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    valid = _all_valid(target)
    fits = study.tile_fits(opt_v1, target, valid)
    every = LinearColorFit()
    every.update(opt_v1, target, valid)
    assert torch.allclose(study.weighted_fit(fits, torch.ones(4)).matrix, every.solve().matrix, atol=1e-10)
    first_two = LinearColorFit()
    first_two.update(opt_v1[:2], target[:2], valid[:2])
    dropped = study.weighted_fit(fits, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(dropped.matrix, first_two.solve().matrix, atol=1e-10) and dropped.tiles == 2


def test_the_kernel_fit_gives_each_kind_of_tile_its_own_correction(study):
    """Dark tiles and bright tiles whose Stage 1 errs differently: leave-one-tile-out picks a finite bandwidth, and a
    new tile of each kind gets nearly its own kind's correction, where the one global colour fit fits neither."""
    dark, bright = _scenes(8, seed=3, brightness=0.05), _scenes(8, seed=4, brightness=0.4)
    dark_error = (torch.eye(4, dtype=torch.float64) * 0.8, torch.full((4,), 0.02, dtype=torch.float64))
    bright_error = (torch.eye(4, dtype=torch.float64) * 1.2, torch.full((4,), -0.05, dtype=torch.float64))
    target = torch.cat([dark, bright]).float()
    opt_v1 = torch.cat([_affine(dark, *dark_error), _affine(bright, *bright_error)]).float()
    kernel = study.KernelColourFit(opt_v1, target, _all_valid(target), LOG_OFFSET)
    assert not math.isinf(kernel.bandwidth) and kernel.cv_loss[kernel.bandwidth] < kernel.cv_loss[math.inf]

    new_target = torch.cat([_scenes(1, seed=5, brightness=0.05), _scenes(1, seed=6, brightness=0.4)])
    new_opt_v1 = torch.cat([_affine(new_target[:1], *dark_error), _affine(new_target[1:], *bright_error)]).float()
    kernel_error = (kernel(new_opt_v1) - new_target).abs().mean()
    colour_fit = study.weighted_fit(kernel.fits, torch.ones(16))
    global_error = (colour_fit.apply(new_opt_v1) - new_target).abs().mean()
    assert kernel_error < 1e-5 and global_error > 1e-3, (kernel_error, global_error)

    # Its change from the colour fit, added to another start: on the colour fit itself, the kernel fit; with an
    # infinite bandwidth (every tile weighs the same), no change at all.
    assert torch.allclose(kernel.change_on(colour_fit, colour_fit, new_opt_v1), kernel(new_opt_v1), atol=1e-5)
    start = study.ColorFitResult(matrix=torch.eye(4, dtype=torch.float64) * 1.1, bias=torch.zeros(4, dtype=torch.float64),
                                 pixels=0, tiles=0)
    kernel.bandwidth = math.inf
    assert torch.allclose(kernel.change_on(start, colour_fit, new_opt_v1), start.apply(new_opt_v1), atol=1e-5)


def test_grey_world_recovers_casts_when_scenes_do_not_differ(study):
    """Every tile the same kind of scene, each with its own per-band gain: the tile's mean colour tells its cast, the
    fitted slopes are close to -1, and the cast of a new tile comes off; the global colour fit cannot do that."""
    generator = torch.Generator().manual_seed(7)
    gains = torch.exp(0.2 * torch.randn(13, 4, generator=generator, dtype=torch.float64))
    target = _scenes(13, seed=8)
    opt_v1 = (target * gains[:, :, None, None]).float()
    target, valid = target.float(), _all_valid(target)
    identity = lambda image: image  # noqa: E731
    grey = study.GreyWorld(identity, opt_v1[:12], target[:12], valid[:12], LOG_OFFSET)
    assert grey.slope.tolist() == pytest.approx([-1.0] * 4, abs=0.1)
    corrected = grey(opt_v1[12:], valid[12:])
    assert (corrected - target[12:]).abs().mean() < 0.1 * (opt_v1[12:] - target[12:]).abs().mean()


def _run(repo_root, *args):
    return run_study(repo_root, "study_correction_bounds.py", *args)


def test_the_study_runs_as_a_script_and_records_what_it_prints(repo_root, tmp_path):
    output = tmp_path / "bounds.md"
    result = _run(repo_root, "--datasets", "mild", "--steps", "2", "--output", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(output.with_suffix(".json").read_text())
    rows = record["datasets"]["mild"]["rows"]
    assert rows["opt_v1"]["evi_rmse"] == pytest.approx(0.1189, abs=1e-4)  # the recorded mild demo figure
    # Bounds are bounds: each oracle beats the colour fit of the training tiles, the affine one beats the gain.
    for metric in ("ndvi_rmse", "evi_rmse", "sam"):
        assert rows["per-tile affine (oracle)"][metric] < rows["per-tile gain (oracle)"][metric]
        assert rows["per-tile affine (oracle)"][metric] < rows["colour fit"][metric]
    row = next(line for line in output.read_text().splitlines() if line.startswith("| kernel colour fit |"))
    assert f"| {rows['kernel colour fit']['sam']:.4f} |" in row


def test_bad_arguments_exit_2(repo_root, tmp_path):
    result = _run(repo_root, "--steps", "0", "--output", str(tmp_path / "x.md"))
    assert result.returncode == 2 and "--steps must be >= 1" in result.stderr
    assert not (tmp_path / "x.md").exists()


# ------------------------------------------------------------------------------------------------ recorded figures
@pytest.fixture(scope="module")
def recorded(repo_root) -> dict:
    return json.loads((repo_root / "bench" / "results" / "correction_bounds.json").read_text())


def test_the_recorded_study_covers_every_dataset_and_row(recorded, study):
    assert recorded["steps"] == 300 and set(recorded["datasets"]) == set(study.DATASETS)
    for data in recorded["datasets"].values():
        assert set(data["rows"]) == {*study.REFERENCES, *study.BOUNDS, *study.BLIND}


def test_docs_quote_the_recorded_figures(recorded, repo_root):
    """docs/quality.md's table: EVI RMSE on all test tiles and on those in range, per dataset and row."""
    training = " ".join((repo_root / "docs" / "quality.md").read_text().split())
    assert "EVI RMSE on all 18 test tiles / on the 16 that are no brighter than the brightest training tile" in training
    for name, data in recorded["datasets"].items():
        assert (data["tiles"], data["out_of_range_tiles"]) == (18, 2), name
        rows = data["rows"]
        cells = [f"{rows[row]['evi_rmse']:.3f} / {rows[row]['evi_rmse_in_range']:.3f}"
                 for row in ("opt_v1", "colour fit", "spectral fit", "global affine (oracle)", "per-tile gain (oracle)",
                             "per-tile affine (oracle)", "grey world", "kernel colour fit", "spectral fit + kernel change")]
        line = f"| `{name}` | " + " | ".join(cells) + " |"
        assert line in training, line
    # What the text says of the rows: the spectral fit ties the colour fit on the mild tiles in range; the kernel change
    # on the spectral fit makes NDVI and SAM worse everywhere, EVI too except on the mixture.
    mild = recorded["datasets"]["mild"]["rows"]
    assert f"{mild['spectral fit']['evi_rmse_in_range']:.3f}" in training
    assert abs(mild["spectral fit"]["evi_rmse_in_range"] / mild["colour fit"]["evi_rmse_in_range"] - 1) < 0.05
    for name, data in recorded["datasets"].items():
        start, changed = data["rows"]["spectral fit"], data["rows"]["spectral fit + kernel change"]
        assert changed["ndvi_rmse"] > start["ndvi_rmse"] and changed["sam"] > start["sam"]
        assert (changed["evi_rmse"] < start["evi_rmse"]) == (name == "mixture")
    # The refiner trained on `mild`, on the tiles in range: the quality study's new column.
    quality = json.loads((repo_root / "bench" / "results" / "quality.json").read_text())
    in_range = [run["test"]["refined"]["evi_rmse_in_range"] for run in quality["runs"]["mild/after"]]
    fit_in_range = quality["runs"]["mild/after"][0]["test"]["linear_fit"]["evi_rmse_in_range"]
    assert (f"{statistics.fmean(in_range):.3f} ({min(in_range):.3f}-{max(in_range):.3f}) over its 3 seeds, "
            f"{statistics.fmean(in_range) / fit_in_range:.2f} of the colour fit's") in training
    # The refiner trained on `mild` the kernel fit on the `mixture` is compared with: the quality study's mean.
    mild = [run["test"]["refined"]["evi_rmse"] for run in quality["runs"]["mild/after"]]
    assert f"does not reach the {sum(mild) / len(mild):.3f} of the refiner trained on `mild`" in training


def test_docs_quote_the_global_oracle_on_the_proxy(recorded, repo_root):
    """The proxy's EVI goal (30 % better than `opt_v1`) is beyond one correction for every tile, even one fitted on the
    test tiles' own targets; the refiner trained on the proxy beats that oracle on the tiles in range."""
    training = " ".join((repo_root / "docs" / "quality.md").read_text().split())
    rows = recorded["datasets"]["proxy"]["rows"]
    goal = 0.7 * rows["opt_v1"]["evi_rmse"]
    oracle = rows["global affine (oracle)"]
    assert oracle["evi_rmse"] > goal
    assert f"EVI RMSE {goal:.3f} or less" in training
    assert f"the best global 4x4 + bias reaches {oracle['evi_rmse']:.3f} ({oracle['evi_rmse_in_range']:.3f} on" in training
    quality = json.loads((repo_root / "bench" / "results" / "quality_proxy.json").read_text())
    refined = statistics.fmean(run["test"]["refined"]["evi_rmse_in_range"] for run in quality["runs"]["proxy/after"])
    assert refined < oracle["evi_rmse_in_range"]
    assert f"`bench/results/quality_proxy.md`: {refined:.3f})" in training
    assert f"would take EVI RMSE to {rows['per-tile gain (oracle)']['evi_rmse']:.3f}" in training
    fitted = sorted(rows[name]["evi_rmse"] for name in ("colour fit", "spectral fit"))
    assert f"(colour fit, spectral fit) stay at {fitted[0]:.3f}-{fitted[1]:.3f}." in training
    # Fitted on the tiles it scores, the oracle beats the training tiles' colour fit on EVI everywhere (a least-squares
    # fit of reflectance does not promise that for EVI, so it is checked).
    for name, data in recorded["datasets"].items():
        assert data["rows"]["global affine (oracle)"]["evi_rmse"] < data["rows"]["colour fit"]["evi_rmse"], name


def test_docs_quote_the_colour_fit_clamped_at_0(recorded, repo_root):
    """docs/quality.md: the colour fit as every study scores it and clamped at 0, on the `mild` test
    tiles, and the refiner (`after`, mean over seeds) against the clamped one on both presets."""
    training = " ".join((repo_root / "docs" / "quality.md").read_text().split())
    quality = json.loads((repo_root / "bench" / "results" / "quality.json").read_text())["runs"]
    metrics = ("ndvi_rmse", "evi_rmse", "sam")

    def slashed(values, digits: int = 2) -> str:
        return " / ".join(f"{value:.{digits}f}" for value in values)

    ratios = {}
    for preset in ("mild", "strong"):
        rows = recorded["datasets"][preset]["rows"]
        raw, clamped = rows["colour fit"], rows["colour fit, clamped at 0"]
        runs = quality[f"{preset}/after"]
        assert all(abs(runs[0]["test"]["linear_fit"][m] - raw[m]) < 1e-6 for m in metrics)  # one baseline, two studies
        ratios[preset] = [statistics.fmean(run["test"]["refined"][m] for run in runs) / clamped[m] for m in metrics]
    mild = recorded["datasets"]["mild"]["rows"]
    assert (f"the colour fit's `mild` test NDVI RMSE / EVI RMSE / SAM are "
            f"{slashed([mild['colour fit, clamped at 0'][m] for m in metrics], 3)}, against "
            f"{slashed([mild['colour fit'][m] for m in metrics], 3)}: the refiner is then {slashed(ratios['mild'])} of "
            "it") in training
    assert f"On `strong` clamping changes little: {slashed(ratios['strong'])}." in training
    leads = [100 * (1 - ratios["mild"][index]) for index in (0, 2)]
    assert f"lead on NDVI RMSE and SAM is {leads[0]:.0f} % and {leads[1]:.0f} %" in training
    assert mild["colour fit, clamped at 0"]["ndvi_rmse"] < 0.9 * mild["colour fit"]["ndvi_rmse"]  # it matters here

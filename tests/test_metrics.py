"""Quality metrics: hand-computed values, pooled set-level aggregation, SSIM against an
independent implementation, the opt_v1 baseline, the table, real tiles, and the `evaluate`
module loaded by path."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.metrics import (
    DESIGN_TARGETS,
    METRIC_NAMES,
    TILE_STATISTICS,
    MetricAccumulator,
    evaluate_module_inputs,
    evaluate_pair,
    format_metrics_table,
    paired_tile_statistics,
    per_tile_metrics,
    ssim_map,
    tile_statistics,
)

METRIC_MODULE_DIR = Path(__file__).resolve().parents[1] / "training" / "stage2_metric"
C1, C2 = 0.01**2, 0.03**2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def constant_tile(spectrum, size=12) -> torch.Tensor:
    return torch.tensor(spectrum, dtype=torch.float64)[:, None, None].expand(4, size, size).clone()


def acos_angle(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return math.acos(dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b)))


def ndvi_of(s):
    return (s[3] - s[2]) / (s[3] + s[2])


def evi_of(s):
    return 2.5 * (s[3] - s[2]) / (s[3] + 6 * s[2] - 7.5 * s[0] + 1)


# Tile A: all 144 pixels valid. Tile B: rows 0..5 valid (72 pixels), NaN target below.
TARGET_A, REFINED_A, OPT_V1_A = (0.05, 0.08, 0.1, 0.5), (0.05, 0.08, 0.1, 0.4), (0.06, 0.08, 0.1, 0.45)
TARGET_B, REFINED_B = (0.1, 0.1, 0.3, 0.2), (0.1, 0.1, 0.1, 0.3)


@pytest.fixture
def two_tiles():
    target = torch.stack([constant_tile(TARGET_A), constant_tile(TARGET_B)])
    refined = torch.stack([constant_tile(REFINED_A), constant_tile(REFINED_B)])
    opt_v1 = torch.stack([constant_tile(OPT_V1_A), constant_tile(REFINED_B)])
    mask = torch.ones(2, 12, 12, dtype=torch.bool)
    mask[1, 6:] = False
    target[1, :, 6:] = float("nan")
    return refined, target, opt_v1, mask


def test_per_tile_metrics_hand_values(two_tiles):
    refined, target, opt_v1, mask = two_tiles
    tiles = per_tile_metrics(refined, target, opt_v1, mask)
    a_ndvi_err = ndvi_of(REFINED_A) - ndvi_of(TARGET_A)  # 0.6 - 2/3
    assert tiles["ndvi_rmse"].tolist() == pytest.approx([abs(a_ndvi_err), 0.7], rel=1e-9)
    assert tiles["evi_rmse"].tolist() == pytest.approx(
        [abs(evi_of(REFINED_A) - evi_of(TARGET_A)), 0.5 / 1.15 + 1 / 9], rel=1e-9
    )
    assert tiles["sam"].tolist() == pytest.approx([acos_angle(REFINED_A, TARGET_A), acos_angle(REFINED_B, TARGET_B)], rel=1e-7)
    assert tiles["identity_l1"].tolist() == pytest.approx([(0.01 + 0.05) / 4, 0.0], abs=1e-12)
    assert tiles["edge_l1"].tolist() == pytest.approx([0.0, 0.0], abs=1e-15)  # flat images
    # MSE over bands: A (0, 0, 0, 0.01) -> 0.0025; B (0, 0, 0.04, 0.01) -> 0.0125
    assert tiles["psnr"].tolist() == pytest.approx([10 * math.log10(1 / 0.0025), 10 * math.log10(1 / 0.0125)], rel=1e-9)
    # constant images: SSIM = (2 x y + C1) / (x^2 + y^2 + C1) per band; only NIR differs in tile A
    nir_ssim = (2 * 0.4 * 0.5 + C1) / (0.4**2 + 0.5**2 + C1)
    assert tiles["ssim"][0].item() == pytest.approx((3 + nir_ssim) / 4, rel=1e-9)
    assert math.isnan(tiles["ssim"][1].item())  # no 11x11 window of tile B is valid


def test_set_values_pool_every_valid_pixel(two_tiles):
    refined, target, opt_v1, mask = two_tiles
    stats = tile_statistics(refined, target, opt_v1, mask)
    assert stats["valid_pixels"].tolist() == [144, 72]
    assert stats["edge_pixels"].tolist() == [144, 60]  # tile B: rows 0..4 (row 5's window reaches row 6)
    assert stats["ssim_pixels"].tolist() == [4, 0]  # 12x12 -> 2x2 window positions
    results = evaluate_pair(refined, target, opt_v1, mask)
    assert results["n_tiles"] == 2
    got = results["refined"]
    a_sq_ndvi, b_sq_ndvi = (ndvi_of(REFINED_A) - ndvi_of(TARGET_A)) ** 2, 0.49
    assert got["ndvi_rmse"] == pytest.approx(math.sqrt((144 * a_sq_ndvi + 72 * b_sq_ndvi) / 216), rel=1e-9)
    a_sq_evi, b_sq_evi = (evi_of(REFINED_A) - evi_of(TARGET_A)) ** 2, (0.5 / 1.15 + 1 / 9) ** 2
    assert got["evi_rmse"] == pytest.approx(math.sqrt((144 * a_sq_evi + 72 * b_sq_evi) / 216), rel=1e-9)
    sam = (144 * acos_angle(REFINED_A, TARGET_A) + 72 * acos_angle(REFINED_B, TARGET_B)) / 216
    assert got["sam"] == pytest.approx(sam, rel=1e-7)
    assert got["identity_l1"] == pytest.approx(144 * 0.015 / 216, rel=1e-9)
    assert got["psnr"] == pytest.approx(10 * math.log10(216 / (144 * 0.0025 + 72 * 0.0125)), rel=1e-9)
    nir_ssim = (2 * 0.4 * 0.5 + C1) / (0.4**2 + 0.5**2 + C1)
    assert got["ssim"] == pytest.approx((3 + nir_ssim) / 4, rel=1e-9)
    # pooled, not the mean of per-tile values
    tiles = per_tile_metrics(refined, target, opt_v1, mask)
    assert abs(got["ndvi_rmse"] - tiles["ndvi_rmse"].mean().item()) > 0.01


def test_opt_v1_baseline_column(two_tiles):
    refined, target, opt_v1, mask = two_tiles
    results = evaluate_pair(refined, target, opt_v1, mask)
    baseline = results["opt_v1"]
    assert baseline["identity_l1"] == 0.0 and baseline["edge_l1"] == 0.0
    b_ndvi_sq = (ndvi_of(OPT_V1_A) - ndvi_of(TARGET_A)) ** 2  # tile B: opt_v1 == refined, error 0.7
    assert baseline["ndvi_rmse"] == pytest.approx(math.sqrt((144 * b_ndvi_sq + 72 * 0.49) / 216), rel=1e-9)
    # refining nothing reproduces the baseline column
    same = evaluate_pair(opt_v1, target, opt_v1, mask)
    assert same["refined"] == pytest.approx(same["opt_v1"], rel=1e-12)


def test_edge_metric_on_a_ramp():
    ramp = (torch.arange(12, dtype=torch.float64) * 0.01).expand(1, 4, 12, 12).clone()
    flat = torch.full_like(ramp, 0.2)
    # Sobel magnitude: 0.01 inside, 0.005 on the two border columns
    assert per_tile_metrics(ramp, flat, flat)["edge_l1"].item() == pytest.approx((10 * 0.01 + 2 * 0.005) / 12, rel=1e-9)
    # Column 3 invalid: only pixels whose 3x3 window is valid count (not columns 2..4, where zeroing column 3 makes
    # edges): 0.005, 0.01 and 0.01 x 6, 0.005 over 9 columns.
    mask = torch.ones(1, 12, 12, dtype=torch.bool)
    mask[:, :, 3] = False
    assert per_tile_metrics(ramp, flat, flat, mask)["edge_l1"].item() == pytest.approx(0.08 / 9, rel=1e-9)


def _numpy_ssim(x: np.ndarray, y: np.ndarray, valid: np.ndarray) -> float:
    """Direct definition: every 11x11 window, 2-D gaussian weights, per band, then averaged."""
    coords = np.arange(11) - 5.0
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    weights = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for r in range(x.shape[1] - 10):
        for c in range(x.shape[2] - 10):
            if not valid[r : r + 11, c : c + 11].all():
                continue
            per_band = []
            for band in range(x.shape[0]):
                wx, wy = x[band, r : r + 11, c : c + 11], y[band, r : r + 11, c : c + 11]
                mx, my = (weights * wx).sum(), (weights * wy).sum()
                vx, vy = (weights * (wx - mx) ** 2).sum(), (weights * (wy - my) ** 2).sum()
                cxy = (weights * (wx - mx) * (wy - my)).sum()
                per_band.append((2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2)))
            values.append(np.mean(per_band))
    return float(np.mean(values))


def test_ssim_matches_an_independent_implementation():
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 0.4, (4, 13, 13))
    output = target + rng.normal(0, 0.05, target.shape)
    valid = np.ones((13, 13), dtype=bool)
    valid[12, 12] = False  # removes the window at (2, 2): 8 of 9 positions remain
    got = per_tile_metrics(torch.from_numpy(output)[None], torch.from_numpy(target)[None], torch.from_numpy(target)[None], torch.from_numpy(valid)[None])
    assert got["ssim"].item() == pytest.approx(_numpy_ssim(output, target, valid), rel=1e-10)
    assert ssim_map(torch.from_numpy(target)[None], torch.from_numpy(target)[None]) == pytest.approx(torch.ones(1, 4, 3, 3, dtype=torch.float64))
    # an 11x11 tile has one window position; a 10x10 one has none
    small = per_tile_metrics(torch.from_numpy(output[None, :, :11, :11]), torch.from_numpy(target[None, :, :11, :11]),
                             torch.from_numpy(target[None, :, :11, :11]))
    assert small["ssim"].item() == pytest.approx(_numpy_ssim(output[:, :11, :11], target[:, :11, :11],
                                                             valid[:11, :11]), rel=1e-10)
    tiny = [torch.from_numpy(x[None, :, :10, :10]) for x in (output, target, target)]
    assert math.isnan(per_tile_metrics(*tiny)["ssim"])


def test_identical_images_and_degenerate_sets():
    x = torch.rand(2, 4, 12, 12)
    results = evaluate_pair(x, x, x)
    assert results["refined"]["psnr"] == pytest.approx(100.0)  # capped, not inf
    assert results["refined"]["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert all(results["refined"][name] == 0.0 for name in ("ndvi_rmse", "evi_rmse", "sam", "identity_l1", "edge_l1"))
    empty = evaluate_pair(x, x, x, torch.zeros(2, 12, 12, dtype=torch.bool))
    assert empty["n_tiles"] == 2 and all(math.isnan(value) for value in empty["refined"].values())
    with pytest.raises(ValueError, match="before any update"):
        MetricAccumulator().compute()
    with pytest.raises(ValueError, match=r"output has shape \(2, 3, 12, 12\)"):
        per_tile_metrics(torch.rand(2, 3, 12, 12), x[:, :3], x[:, :3])
    with pytest.raises(ValueError, match="valid_mask has shape"):
        evaluate_pair(x, x, x, torch.ones(2, 12, 11, dtype=torch.bool))


def test_accumulating_batches_equals_one_pass():
    torch.manual_seed(0)
    target = torch.rand(7, 4, 16, 16) * 0.5
    opt_v1 = target + 0.05 * torch.randn_like(target)
    refined = target + 0.02 * torch.randn_like(target)
    mask = torch.rand(7, 16, 16) > 0.02
    accumulator = MetricAccumulator()
    for start in range(0, 7, 3):
        part = slice(start, start + 3)
        accumulator.update(refined[part], target[part], opt_v1[part], mask[part])
    batched, one_pass = accumulator.compute(), evaluate_pair(refined, target, opt_v1, mask)
    assert batched["n_tiles"] == one_pass["n_tiles"] == 7
    for role in ("refined", "opt_v1"):
        assert batched[role] == pytest.approx(one_pass[role], rel=1e-12)
    assert batched["refined"]["psnr"] > batched["opt_v1"]["psnr"]  # less noise than opt_v1
    # gathered statistics (several processes) add up the same way
    gathered = MetricAccumulator()
    gathered.add_statistics(paired_tile_statistics(refined, target, opt_v1, mask))
    assert gathered.compute()["refined"] == pytest.approx(one_pass["refined"], rel=1e-12)


def test_half_precision_outputs_do_not_round_the_target():
    torch.manual_seed(0)
    target = torch.rand(2, 4, 12, 12) * 0.5
    opt_v1 = target + 1e-3 * torch.randn_like(target)  # finer than bf16 resolves
    refined = (target + 0.01 * torch.randn_like(target)).bfloat16()
    got = evaluate_pair(refined, target.numpy(), opt_v1)  # numpy inputs are accepted too
    expected = evaluate_pair(refined.float(), target, opt_v1)
    for role in ("refined", "opt_v1"):
        assert got[role] == pytest.approx(expected[role], rel=1e-12)
    rounded = evaluate_pair(refined.float(), target.bfloat16().float(), opt_v1.bfloat16().float())
    assert abs(rounded["opt_v1"]["psnr"] - got["opt_v1"]["psnr"]) > 1.0  # rounding would show


def test_float16_numpy_images_are_scored_in_full_precision_like_float16_tensors():
    # Dark pixels (0.01-0.02) and errors of ~1e-4: their squares (~1e-8) underflow in float16, which put PSNR at
    # 90.8 dB instead of 80.4 when the arrays, not tensors, reached the per-pixel arithmetic in half precision.
    generator = np.random.default_rng(0)
    target = generator.uniform(0.01, 0.02, (1, 4, 12, 12)).astype(np.float16)
    refined = (target.astype(np.float32) + generator.normal(0, 1e-4, target.shape)).astype(np.float16)
    from_arrays = per_tile_metrics(refined, target, target)
    from_tensors = per_tile_metrics(*(torch.from_numpy(x) for x in (refined, target, target)))
    assert from_tensors["psnr"].item() == pytest.approx(80.39, abs=0.05)
    for name in METRIC_NAMES:
        torch.testing.assert_close(from_arrays[name], from_tensors[name], rtol=1e-12, atol=0)


def test_a_refused_batch_leaves_the_accumulator_as_it_was():
    torch.manual_seed(0)
    target = torch.rand(3, 4, 12, 12) * 0.5
    refined, opt_v1 = target + 0.01, target + 0.02
    accumulator = MetricAccumulator(keep_tiles=True)
    accumulator.update(refined[:2], target[:2], opt_v1[:2])
    before = accumulator.compute()
    good = paired_tile_statistics(refined, target, opt_v1)
    uneven = {"refined": good["refined"], "opt_v1": {name: value[:2] for name, value in good["opt_v1"].items()}}
    lacking = {"refined": good["refined"], "opt_v1": {name: good["opt_v1"][name] for name in TILE_STATISTICS[:-1]}}
    with pytest.raises(ValueError, match="different numbers of tiles"):
        accumulator.add_statistics(uneven)
    with pytest.raises(KeyError, match="ssim_sum"):
        accumulator.add_statistics(lacking)
    assert accumulator.compute() == before  # neither batch added its refined tiles
    assert accumulator.tile_statistics_of("refined")["valid_pixels"].tolist() == [144.0, 144.0]
    # each role keeps its own tiles: refined is 0.01 from opt_v1's input (target + 0.02), opt_v1 is it
    assert accumulator.tile_statistics_of("refined")["identity_abs_err_sum"].tolist() == pytest.approx([1.44, 1.44])
    assert accumulator.tile_statistics_of("opt_v1")["identity_abs_err_sum"].tolist() == [0.0, 0.0]


def test_format_metrics_table():
    results = {
        "refined": dict(ndvi_rmse=0.04, evi_rmse=0.06, sam=0.05, identity_l1=0.03, edge_l1=0.01, psnr=31.5, ssim=0.9),
        "opt_v1": dict(ndvi_rmse=0.08, evi_rmse=0.09, sam=0.12, identity_l1=0.0, edge_l1=0.0, psnr=28.25, ssim=0.8),
        "n_tiles": 12,
    }
    table = format_metrics_table(results)
    lines = table.splitlines()
    assert lines[0] == "Evaluated tiles: 12"
    assert lines[2] == "| metric | opt_v1 | refined | change | design target | met? |"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[4:]}
    assert len(rows) == len(METRIC_NAMES)
    assert rows["ndvi_rmse"] == "| ndvi_rmse | 0.0800 | 0.0400 | -0.0400 | < 0.05 | yes |"
    assert rows["evi_rmse"].endswith("| < 0.05 | no |")
    assert rows["sam (rad)"] == "| sam (rad) | 0.1200 | 0.0500 | -0.0700 | < 0.1 | yes |"
    assert rows["psnr (dB)"] == "| psnr (dB) | 28.25 | 31.50 | +3.25 | - | - |"
    assert set(DESIGN_TARGETS) < set(METRIC_NAMES)
    # "met?" means below the target: a value at the target is not met
    results["refined"]["identity_l1"] = DESIGN_TARGETS["identity_l1"]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in format_metrics_table(results).splitlines()[4:]}
    assert rows["identity_l1"].endswith("| < 0.05 | no |")
    # the colour fit's column, labelled with the split it was fitted on, sits between opt_v1 and refined
    results["linear_fit"] = dict(ndvi_rmse=0.06, evi_rmse=0.07, sam=0.1, identity_l1=0.02, edge_l1=0.0, psnr=30.0,
                                 ssim=0.85)
    results["linear_fit_fitted_on"] = {"split": "train"}
    lines = format_metrics_table(results).splitlines()
    assert lines[2] == "| metric | opt_v1 | colour fit (train) | refined | change | design target | met? |"
    assert lines[3] == "| --- | ---: | ---: | ---: | ---: | ---: | :---: |"
    assert lines[4] == "| ndvi_rmse | 0.0800 | 0.0600 | 0.0400 | -0.0400 | < 0.05 | yes |"


def test_the_standalone_evaluate_module_restates_the_metric_facts_exactly():
    """`training/stage2_metric` is a self-contained `evaluate` module (no project imports, so it can be copied
    alone): the one place that must restate the metric facts. They must equal training.metrics' own."""
    import importlib.util

    from training import metrics

    spec = importlib.util.spec_from_file_location("standalone_stage2_metric", METRIC_MODULE_DIR / "stage2_metric.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.DESIGN_TARGETS == metrics.DESIGN_TARGETS
    assert module.METRIC_NAMES == metrics.METRIC_NAMES and module.TILE_STATISTICS == metrics.TILE_STATISTICS
    assert (module.PSNR_DATA_RANGE, module.PSNR_MSE_FLOOR) == (metrics.PSNR_DATA_RANGE, metrics.PSNR_MSE_FLOOR)


def test_real_tiles_give_finite_metrics_where_the_plain_formulas_explode(shared_dir):
    """Real BigEarthNet tiles include cloud, snow and water: the guarded indices stay usable."""
    paths = sorted((shared_dir / "data" / "bigearthnet_sample" / "tiles").glob("*/*.npz"))
    if not paths:
        pytest.skip("no BigEarthNet sample tiles in ../shared")
    tiles = []
    for path in paths:
        with np.load(path, allow_pickle=False) as npz:
            tiles.append(np.stack([npz[key] for key in ("s2_b2", "s2_b3", "s2_b4", "s2_b8")]).astype(np.float32) * 1e-4)
    target = torch.from_numpy(np.stack(tiles))
    noisy = target + 0.002 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    results = evaluate_pair(noisy, target, target)
    assert all(math.isfinite(value) for value in results["refined"].values())
    assert results["refined"]["evi_rmse"] < 0.05  # 20-DN noise
    assert 0 < results["refined"]["sam"] < 0.1
    blue, red, nir = (target[:, i].double() for i in (0, 2, 3))
    n_blue, n_red, n_nir = (noisy[:, i].double() for i in (0, 2, 3))
    plain_evi = 2.5 * (nir - red) / (nir + 6 * red - 7.5 * blue + 1)
    plain_noisy = 2.5 * (n_nir - n_red) / (n_nir + 6 * n_red - 7.5 * n_blue + 1)
    assert ((plain_noisy - plain_evi) ** 2).mean().sqrt() > 10  # the unguarded formula is useless here


# ----------------------------------------------------------------------------- evaluate module
def test_evaluate_module_loaded_by_path_matches_the_accumulator(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import evaluate

    metric = evaluate.load(str(METRIC_MODULE_DIR), cache_dir=str(tmp_path), keep_in_memory=True)
    torch.manual_seed(0)
    target = torch.rand(5, 4, 16, 16) * 0.5
    opt_v1 = target + 0.05 * torch.randn_like(target)
    refined = target + 0.02 * torch.randn_like(target)
    mask = torch.ones(5, 16, 16, dtype=torch.bool)
    mask[1, :3] = False
    mask[4] = False  # a tile without valid pixels counts as a tile and adds nothing
    accumulator = MetricAccumulator()
    for part in (slice(0, 2), slice(2, 5)):
        inputs = evaluate_module_inputs(refined[part], target[part], opt_v1[part], mask[part])
        assert set(inputs["predictions"][0]) == set(TILE_STATISTICS)
        metric.add_batch(**inputs)
        accumulator.update(refined[part], target[part], opt_v1[part], mask[part])
    from_module, expected = metric.compute(), accumulator.compute()
    assert from_module["n_tiles"] == expected["n_tiles"] == 5
    for role in ("refined", "opt_v1"):
        assert set(from_module[role]) == set(METRIC_NAMES)
        assert from_module[role] == pytest.approx(expected[role], rel=1e-12)
    # one-shot compute with the same inputs
    one_shot = metric.compute(**evaluate_module_inputs(refined, target, opt_v1, mask))
    assert one_shot["refined"] == pytest.approx(expected["refined"], rel=1e-12)


def test_evaluate_module_rejects_bad_statistics(tmp_path):
    import evaluate

    metric = evaluate.load(str(METRIC_MODULE_DIR), cache_dir=str(tmp_path), keep_in_memory=True)
    x = torch.rand(1, 4, 12, 12)
    inputs = evaluate_module_inputs(x, x, x)
    inputs["predictions"][0]["valid_pixels"] = -1.0
    with pytest.raises(ValueError, match="negative pixel counts"):
        metric.compute(**inputs)
    inputs = evaluate_module_inputs(x, x, x)
    inputs["references"][0]["sam_sum"] = None
    with pytest.raises(ValueError, match=r"references hold non-finite statistics in \['sam_sum'\]"):
        metric.compute(**inputs)
    inputs = evaluate_module_inputs(x, x, x)
    del inputs["references"][0]["sam_sum"]
    with pytest.raises(KeyError, match="sam_sum"):
        metric.compute(**inputs)

"""Hostile inputs of a robustness walk: a scene below the reflectance floor, a model whose output is NaN, a sidecar
holding an integer Python will not read."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _data_helpers import make_tile_dir, write_tile
from _refiner_helpers import ScaledRefiner, tiny_refiner_config

from data_builders.build import REJECTED_FILE, build_dataset
from data_builders.tiles import REFLECTANCE_MIN, TileError, reflectance_floor_problem
from inference_stage2 import InferenceInputError, refine_arrays, refine_scene
from inference_stage2.cli import main
from inference_stage2.windows import window_starts
from modeling_stage2.bands import BAND_NAMES
from training.metrics import DESIGN_TARGETS, METRIC_NAMES, evaluate_pair, format_metrics_table

rasterio = pytest.importorskip("rasterio")
from test_inference import PixelwiseRefiner, smooth_scene, write_geotiff  # noqa: E402

FLOOR_PROBLEM = f"below the tolerance of {REFLECTANCE_MIN:g} (L2A's BOA offset); a wrong offset or scale?"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny refiner saved as it is ("finite") and with its head's output weights NaN ("nan", a diverged training)."""
    from modeling_stage2 import Stage2RefinerModel

    torch.manual_seed(0)
    model = Stage2RefinerModel(tiny_refiner_config())
    root = tmp_path_factory.mktemp("models")
    model.save_pretrained(root / "finite")
    with torch.no_grad():
        model.head.output_projection.weight.fill_(float("nan"))
    model.save_pretrained(root / "nan")
    return {"finite": root / "finite", "nan": root / "nan"}


def run_refine(argv, capsys) -> tuple[int, str]:
    code = main([*argv, "--no_progress"])
    return code, capsys.readouterr().err


def assert_left_as_it_was(output, earlier: bytes) -> None:
    """The earlier output is untouched and nothing else (a partial file, GDAL's .aux.xml) lies beside it."""
    assert output.read_bytes() == earlier
    assert sorted(p.name for p in output.parent.iterdir()) == [output.name]


# ----------------------------------------------------------------------------- 1. a scene below the reflectance floor
def below_floor_scenes(tmp_path):
    """int16 digital numbers -2000..-3000 (nodata -9999 in a corner), and digital numbers whose declared offset is
    in digital numbers (-1000) where L2A's is in reflectance (-0.1)."""
    int16 = -(smooth_scene(60, 70) % 1000).astype(np.int16) - 2000
    int16[:, :5, :5] = -9999
    offset = smooth_scene(60, 70, seed=1)
    return {
        "int16": write_geotiff(tmp_path / "int16.tif", int16, nodata=-9999),
        "offset": write_geotiff(tmp_path / "offset.tif", offset, nodata=0, scales=[1e-4] * 4, offsets=[-1000.0] * 4),
    }


@pytest.mark.parametrize("kind, lowest", [("int16", "-0.2999"), ("offset", "-999.9")])
def test_a_scene_below_the_reflectance_floor_is_refused_like_a_tile(model_dirs, tmp_path, capsys, kind, lowest):
    scene = below_floor_scenes(tmp_path)[kind]
    output = tmp_path / "out" / "refined.tif"
    output.parent.mkdir()
    output.write_bytes(b"an earlier run's scene")
    code, err = run_refine(["--model", str(model_dirs["finite"]), "--input", str(scene), "--month", "7",
                            "--biome", "4", "--output", str(output)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"stage2-refine: error: {scene}: band {BAND_NAMES[0]}")
    assert f"reflectance down to {lowest}" in err and err.rstrip().endswith(FLOOR_PROBLEM)
    assert_left_as_it_was(output, b"an earlier run's scene")


def test_the_floor_counts_valid_pixels_only_and_is_checked_in_every_strip(tmp_path):
    data = smooth_scene(300, 130).astype(np.int16)
    data[:, 100, 100] = -1000  # reflectance -0.1, L2A's floor: kept
    data[:, :40, :40] = -9999  # nodata, far below the floor
    scene = write_geotiff(tmp_path / "scene.tif", data, nodata=-9999)
    output = tmp_path / "out" / "refined.tif"
    refine_scene(PixelwiseRefiner(), scene, output, 7, 4, progress=False)
    data[3, 250, 100] = -1001  # one pixel below the floor, in the last strips only
    scene = write_geotiff(tmp_path / "scene.tif", data, nodata=-9999)
    earlier = output.read_bytes()
    model = PixelwiseRefiner()
    with pytest.raises(InferenceInputError) as refused:
        refine_scene(model, scene, output, 7, 4, progress=False)
    assert str(refused.value) == f"{scene}: band {BAND_NAMES[3]}: reflectance down to -0.1001, {FLOOR_PROBLEM}"
    assert model.calls == sum(row + 120 <= 250 for row in window_starts(300, 120, 32)) == 2  # strips refined first
    assert_left_as_it_was(output, earlier)


def test_the_floor_rule_is_one_for_tiles_and_scenes():
    reflectance = np.zeros((4, 3, 3), np.float32)
    reflectance[:, 0, 0] = [np.nan, -0.5, np.float32(REFLECTANCE_MIN), 0.2]
    valid = np.ones((3, 3), bool)
    assert reflectance_floor_problem(reflectance) == (1, f"reflectance down to -0.5, {FLOOR_PROBLEM}")
    valid[0, 0] = False
    assert reflectance_floor_problem(reflectance, valid) is None  # a nodata pixel does not count
    assert reflectance_floor_problem(reflectance[2:]) is None  # -0.1 itself is kept, NaN never counts


# ----------------------------------------------------------------------------- 2. a model whose output is NaN
def test_a_nan_model_refines_no_scene_and_keeps_the_earlier_output(model_dirs, tmp_path, capsys):
    scene = write_geotiff(tmp_path / "scene.tif", smooth_scene(60, 70), nodata=0)
    output = tmp_path / "out" / "refined.tif"
    output.parent.mkdir()
    output.write_bytes(b"an earlier run's scene")
    code, err = run_refine(["--model", str(model_dirs["nan"]), "--input", str(scene), "--month", "7", "--biome", "4",
                            "--output", str(output)], capsys)
    assert code == 2 and err.count("\n") == 1
    count = 4 * 120 * 120  # the one window, padded to the model's 120 px
    assert err.startswith(f"stage2-refine: error: model {model_dirs['nan']} returned NaN/Inf for finite input "
                          f"({count} of {count} refined values)")
    assert_left_as_it_was(output, b"an earlier run's scene")


def test_a_nan_model_writes_no_tile(model_dirs, tmp_path, capsys):
    tiles = make_tile_dir(tmp_path / "tiles", per_split=1, s1=False)
    code, err = run_refine(["--model", str(model_dirs["nan"]), "--input", str(tiles), "--output_dir",
                            str(tmp_path / "refined")], capsys)
    assert code == 2 and err.count("\n") == 1 and f"model {model_dirs['nan']} returned NaN/Inf" in err
    assert not list((tmp_path / "refined").rglob("*.npz"))


def test_refine_arrays_refuses_a_non_finite_output_and_not_a_finite_one():
    image = smooth_scene(24, 30).astype(np.float32) * np.float32(1e-4)
    image[:, 0, 0] = 0
    with pytest.raises(InferenceInputError, match=r"^the model \(ScaledRefiner\) returned NaN/Inf for finite input "
                                                  r"\(2880 of 2880 refined values\)"):
        refine_arrays(ScaledRefiner(float("inf")), image)  # inf x 0 is NaN, inf x the others inf
    assert np.array_equal(refine_arrays(ScaledRefiner(2.0), image), 2 * image)


def test_metrics_of_a_non_finite_output_meet_no_target():
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 4, 24, 24, generator=generator) * 0.5
    opt_v1 = target + 0.01
    valid = torch.ones(2, 24, 24, dtype=torch.bool)
    valid[1, 5, 5] = False
    results = evaluate_pair(torch.full_like(target, float("nan")), target, opt_v1, valid)
    assert all(np.isnan(results["refined"][name]) for name in METRIC_NAMES)
    rows = [line for line in format_metrics_table(results).splitlines() if line[2:].split(" ")[0] in DESIGN_TARGETS]
    assert len(rows) == len(DESIGN_TARGETS) and all(row.endswith("| n/a |") for row in rows)  # edge_l1 said "yes"
    one_inf = target.clone()
    one_inf[0, 2, 7, 7] = float("inf")
    assert all(np.isnan(evaluate_pair(one_inf, target, opt_v1, valid)["refined"][name]) for name in METRIC_NAMES)
    on_nodata = target.clone()
    on_nodata[1, :, 5, 5] = float("nan")  # an invalid pixel's output does not count
    expected = evaluate_pair(target, target, opt_v1, valid)
    assert evaluate_pair(on_nodata, target, opt_v1, valid) == expected


def test_stage2_evaluate_of_a_nan_model_reports_no_target_met_and_exits_2(tmp_path, monkeypatch, capsys):
    import modeling_stage2
    from training.evaluate import main as evaluate_main

    monkeypatch.setattr(modeling_stage2, "load_trained_model", lambda *args, **kwargs: ScaledRefiner(float("nan")))
    tiles = make_tile_dir(tmp_path / "tiles", per_split=1, s1=False)
    out = tmp_path / "metrics.json"
    code = evaluate_main(["--model", "me/diverged", "--data", str(tiles), "--split", "test", "--bootstrap", "0",
                          "--device", "cpu", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and not out.exists()
    edge_row = next(line for line in captured.out.splitlines() if line.startswith("| edge_l1 |"))
    assert edge_row.endswith("| n/a |") and "yes" not in captured.out
    assert captured.err.splitlines()[-1].startswith(
        "stage2-evaluate: error: --model me/diverged: its refined output is NaN/Inf on valid pixels of split 'test' "
        f"({', '.join(METRIC_NAMES)} n/a above)")


# ----------------------------------------------------------------------------- 3. a sidecar Python will not read
def test_a_sidecar_with_an_integer_beyond_pythons_digits_rejects_its_tile_by_name(tmp_path):
    data = make_tile_dir(tmp_path / "tiles", per_split=1, s1=False)
    huge = data / "train" / "x.json"
    write_tile(data / "train", "x", s1=False)
    huge.write_text('{"n": 1' + "0" * 5000 + "}")
    built = build_dataset(data, tmp_path / "out")
    assert len(built["train"]) == 1  # train_0, not x
    [record] = [json.loads(line) for line in (tmp_path / "out" / REJECTED_FILE).read_text().splitlines()]
    assert record["file"] == str(huge) and record["split"] == "train"
    assert record["problem"].startswith("sidecar cannot be read (Exceeds the limit (4300 digits)")
    with pytest.raises(TileError, match="sidecar cannot be read") as caught:
        build_dataset(data, tmp_path / "strict", strict=True)
    assert caught.value.path == str(huge) and "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- from a review with mutations
@pytest.mark.parametrize("band", range(len(BAND_NAMES)))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_value_in_any_one_band_makes_every_metric_nan(band, value):
    """Blue and green are in no NDVI (green in no EVI either): one such value, at a valid pixel next to an invalid
    one (in no SSIM window that counts), still makes every metric of the output NaN."""
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(1, 4, 24, 24, generator=generator) * 0.5
    valid = torch.ones(1, 24, 24, dtype=torch.bool)
    valid[0, 0, 1] = False
    output = target.clone()
    output[0, band, 0, 0] = value
    results = evaluate_pair(output, target, target + 0.01, valid)
    assert [name for name in METRIC_NAMES if not np.isnan(results["refined"][name])] == []
    assert all(np.isfinite(results["opt_v1"][name]) for name in METRIC_NAMES)


def test_not_finite_metrics_names_only_the_metrics_the_output_made_nan():
    """8 px tiles have no SSIM window, for opt_v1 either: no output's fault, and no reason for stage2-evaluate to
    exit 2."""
    from training.metrics import not_finite_metrics

    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 4, 8, 8, generator=generator) * 0.5
    opt_v1 = target + 0.01
    assert not_finite_metrics(evaluate_pair(target * 1.01, target, opt_v1)) == []
    nan_output = torch.full_like(target, float("nan"))
    assert not_finite_metrics(evaluate_pair(nan_output, target, opt_v1)) == [n for n in METRIC_NAMES if n != "ssim"]


class NanWeightRefiner(torch.nn.Module):
    """refined = opt_v1, and an out_of_range_weight that is NaN at one pixel."""

    def forward(self, opt_v1, month, biome):
        from types import SimpleNamespace

        weight = torch.zeros_like(opt_v1[:, :1])
        weight[0, 0, 2, 3] = float("nan")
        return SimpleNamespace(refined=opt_v1.clone(), out_of_range_weight=weight)


def test_a_non_finite_out_of_range_weight_is_refused_with_a_finite_output():
    from modeling_stage2.vocabulary import OUT_OF_RANGE_WEIGHT

    image = smooth_scene(24, 30).astype(np.float32) * np.float32(1e-4)
    with pytest.raises(InferenceInputError, match=rf"returned NaN/Inf for finite input \(1 of 720 "
                                                  rf"{OUT_OF_RANGE_WEIGHT} values\)"):
        refine_arrays(NanWeightRefiner(), image)


def test_the_floor_names_the_band_file_and_the_declared_scaling(tmp_path):
    from test_inference import write_band_files

    data = smooth_scene(60, 70).astype(np.int16)
    data[3, 30, 30] = -1001  # B08 only: reflectance -0.1001
    band_paths = write_band_files(tmp_path, data, nodata=-9999)
    with pytest.raises(InferenceInputError) as refused:
        refine_scene(PixelwiseRefiner(), band_paths, tmp_path / "refined.tif", 7, 4, progress=False)
    assert str(refused.value) == f"{band_paths[3]}: band {BAND_NAMES[3]}: reflectance down to -0.1001, {FLOOR_PROBLEM}"
    scene = below_floor_scenes(tmp_path)["offset"]
    with pytest.raises(InferenceInputError, match=r"band B02 \(its declared scale 0.0001 and offset -1000 applied\): "
                                                  r"reflectance down to -999\.9"):
        refine_scene(PixelwiseRefiner(), scene, tmp_path / "refined.tif", 7, 4, progress=False)


def test_a_strip_of_nodata_only_is_no_floor_problem(tmp_path):
    data = smooth_scene(300, 130).astype(np.int16)
    data[:, :150] = -9999  # the first strip (120 rows) holds no valid pixel
    scene = write_geotiff(tmp_path / "scene.tif", data, nodata=-9999)
    refine_scene(PixelwiseRefiner(), scene, tmp_path / "refined.tif", 7, 4, progress=False)
    with rasterio.open(tmp_path / "refined.tif") as refined:
        assert (refined.read(1)[:150] == refined.nodata).all() and (refined.read(1)[150:] != refined.nodata).all()

"""Scene inputs are read by the band names they carry (`inference_stage2.scene_bands`): a 4-band GeoTIFF whose band
descriptions name its bands in another order, or four files named after their bands given in another order, are
read as B02 B03 B04 B08; a band the refiner does not take, or a named band out of place, is refused."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from inference_stage2 import InferenceInputError, main, refine_scene  # noqa: E402
from inference_stage2.scene_bands import band_order, named_band  # noqa: E402
from test_inference import (  # noqa: E402, F401 (full_model_dir and the refiner it saves are fixtures)
    PixelwiseRefiner, full_model_dir, perturbed_tiny_refiner, read_geotiff, smooth_scene, write_geotiff,
)


@pytest.mark.parametrize("text, band", [
    ("B04", "B04"), ("b4", "B04"), ("B02", "B02"), ("B8A", "B8A"), ("b8a", "B8A"), ("B11", "B11"),
    ("B4, central wavelength 665 nm", "B04"),  # GDAL's Sentinel-2 driver
    ("T33UUP_20220613T101031_B04_10m", "B04"),  # a SAFE file name
    ("red", "B04"), ("nir", "B08"), ("nir08", "B8A"), ("Blue", "B02"), ("swir16", "B11"),
    (None, None), ("", None), ("Band 1", None), ("reduced", None), ("scene_2022", None), ("B13", None),
    ("B02_B03", None),  # names two bands: says nothing of one
])
def test_named_band(text, band):
    assert named_band(text) == band


SOURCES = ["in band 1", "in band 2", "in band 3", "in band 4"]


def test_band_order():
    assert band_order(["B04", "B03", "B02", "B08"], SOURCES) == (2, 1, 0, 3)
    assert band_order(["B08", "B02", "B03", "B04"], SOURCES) == (1, 2, 3, 0)
    assert band_order([None] * 4, SOURCES) == (0, 1, 2, 3)
    assert band_order(["B02", None, "B04", None], SOURCES) == (0, 1, 2, 3)  # what is named agrees with the order


@pytest.mark.parametrize("names, message", [
    (["B02", "B03", "B04", "B8A"], "in band 4 is Sentinel-2 B8A by its name; the refiner takes B02 B03 B04 B08"),
    (["B02", "B02", "B04", "B08"], "in band 1 and in band 2 are both B02 by their names; give each band once"),
    ([None, "B04", None, None], "in band 2 is B04 by its name but would be read as B03: unless all four bands are "
                                "named, they are taken in the order B02 B03 B04 B08"),
])
def test_band_order_refusals(names, message):
    with pytest.raises(InferenceInputError) as error:
        band_order(names, SOURCES)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def described(path, data, descriptions, **kwargs):
    write_geotiff(path, data, **kwargs)
    with rasterio.open(path, "r+") as dataset:
        for index, description in enumerate(descriptions, start=1):
            dataset.set_band_description(index, description)
    return path


def test_a_4_band_scene_stacked_red_green_blue_nir_is_read_by_its_band_descriptions(tmp_path):
    data = smooth_scene(130, 140, seed=3)
    offsets = [-0.1, -0.05, 0.0, 0.05]  # declared per band: they must follow their bands (none below -0.1 then)
    reference = write_geotiff(tmp_path / "b02_b03_b04_b08.tif", data, scales=[1e-4] * 4, offsets=offsets)
    stacked = [2, 1, 0, 3]  # red, green, blue, NIR
    rgbn = described(tmp_path / "rgbn.tif", data[stacked], ["B04", "B03", "B02", "B08"], scales=[1e-4] * 4,
                     offsets=[offsets[i] for i in stacked])
    expected = refine_scene(PixelwiseRefiner(), reference, tmp_path / "expected.tif", 7, 4, progress=False)
    result = refine_scene(PixelwiseRefiner(), rgbn, tmp_path / "refined.tif", 7, 4, progress=False)
    assert expected.band_order == (0, 1, 2, 3) and result.band_order == (2, 1, 0, 3)
    np.testing.assert_array_equal(read_geotiff(tmp_path / "refined.tif")[0], read_geotiff(tmp_path / "expected.tif")[0])
    # Without the descriptions the same file is read in the documented order: other bands, another output.
    plain = write_geotiff(tmp_path / "plain.tif", data[stacked], scales=[1e-4] * 4,
                          offsets=[offsets[i] for i in stacked])
    refine_scene(PixelwiseRefiner(), plain, tmp_path / "plain_out.tif", 7, 4, progress=False)
    assert np.abs(read_geotiff(tmp_path / "plain_out.tif")[0] - read_geotiff(tmp_path / "expected.tif")[0]).max() > 0.05


def test_four_files_named_by_common_name_and_globbed_in_sorted_order_are_read_by_name(tmp_path):
    data = smooth_scene(130, 140, seed=4)
    reference = write_geotiff(tmp_path / "scene.tif", data, nodata=0)
    files = {name: write_geotiff(tmp_path / f"{name}.tif", data[i : i + 1], nodata=0)
             for i, name in enumerate(("blue", "green", "red", "nir"))}
    globbed = sorted(files.values())  # blue green nir red: NIR before red
    refine_scene(PixelwiseRefiner(), reference, tmp_path / "expected.tif", 7, 4, progress=False)
    result = refine_scene(PixelwiseRefiner(), globbed, tmp_path / "refined.tif", 7, 4, progress=False)
    assert result.band_order == (0, 1, 3, 2) and result.input_paths == tuple(globbed)
    np.testing.assert_array_equal(read_geotiff(tmp_path / "refined.tif")[0], read_geotiff(tmp_path / "expected.tif")[0])


def test_a_message_about_one_band_of_files_read_by_name_names_that_band_s_file(tmp_path):
    """Four files globbed blue green nir red, all but red declaring a scale and offset: the refusal names red.tif as
    B04's file, not nir.tif, the third file given."""
    data = smooth_scene(60, 70, seed=7)
    files = {name: write_geotiff(tmp_path / f"{name}.tif", data[i : i + 1], nodata=0,
                                 **({} if name == "red" else {"scales": [1e-4], "offsets": [-0.1]}))
             for i, name in enumerate(("blue", "green", "red", "nir"))}
    with pytest.raises(InferenceInputError) as error:
        refine_scene(PixelwiseRefiner(), sorted(files.values()), tmp_path / "out.tif", 7, 4, progress=False)
    assert str(error.value).startswith(f"{files['red']}: band B04 declares no scale or offset while the other bands")
    assert not (tmp_path / "out.tif").exists()


def test_cli_reports_the_order_and_refuses_a_band_it_does_not_take_before_the_model(tmp_path, capsys, full_model_dir):
    data = smooth_scene(60, 70, seed=5)
    narrow = described(tmp_path / "narrow.tif", data, ["B02", "B03", "B04", "B8A, central wavelength 865 nm"])
    output = tmp_path / "out.tif"
    code = main(["--model", str(tmp_path / "no_model_here"), "--input", str(narrow), "--month", "7", "--biome", "4",
                 "--output", str(output), "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{narrow} band 4 ('B8A, central wavelength 865 nm') is Sentinel-2 B8A by its name" in err
    assert "no_model_here" not in err and not output.exists()
    rgbn = described(tmp_path / "rgbn.tif", data[[2, 1, 0, 3]], ["red", "green", "blue", "nir"])
    assert main(["--model", str(full_model_dir), "--input", str(rgbn), "--month", "7", "--biome", "4",
                 "--output", str(output), "--no_progress"]) == 0
    assert ("read the bands by their names: B02 from input band 3, B03 from input band 2, B04 from input band 1, "
            "B08 from input band 4") in capsys.readouterr().out


def test_the_new_scene_refusals_exit_2_as_a_subprocess_in_one_line(tmp_path):
    """As the installed command runs: a band the refiner does not take, and an input_scale that a declared scaling
    contradicts, each exit 2 with one line on stderr and no traceback, before any model is loaded."""
    data = smooth_scene(60, 70, seed=6)
    narrow = described(tmp_path / "narrow.tif", data, ["B02", "B03", "B04", "B8A"])
    l2a = write_geotiff(tmp_path / "l2a.tif", data, nodata=0, scales=[1e-4] * 4, offsets=[-0.1] * 4)
    cases = [
        ([str(narrow)], f"{narrow} band 4 ('B8A') is Sentinel-2 B8A by its name"),
        ([str(l2a), "--input_scale", "dn"], f"{l2a}: band B02 declares scale 0.0001 and offset -0.1"),
    ]
    for arguments, message in cases:
        output = tmp_path / "out.tif"
        result = subprocess.run(
            [sys.executable, "-m", "inference_stage2", "--model", str(tmp_path / "no_model_here"), "--input",
             *arguments, "--month", "7", "--biome", "4", "--output", str(output), "--no_progress"],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr
        assert not output.exists()

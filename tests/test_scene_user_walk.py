"""What a first-time user of `refine_scene` ran into: a float output of a scene whose nodata pixels no nodata value
declares (an internal mask, NaN pixels) that readers did not mask, an output named `out.png` written as a GeoTIFF
from Python, and a nodata value the output cannot hold refused without naming the file."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from _refiner_helpers import tiny_refiner_config, wake_up  # noqa: E402
from inference_stage2 import InferenceInputError, refine_scene  # noqa: E402
from modeling_stage2 import Stage2RefinerModel  # noqa: E402
from modeling_stage2.bands import BAND_NAMES  # noqa: E402
from test_inference import dn_to_reflectance, files_in, smooth_scene, write_geotiff  # noqa: E402
from test_scene_files import write_masked  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = Stage2RefinerModel(tiny_refiner_config()).eval()
    wake_up(model)
    return model


def _masked_dn(path):
    """uint16 digital numbers without a nodata value, their rows 0..9 masked by the file's own (internal) mask."""
    data = smooth_scene(40, 50, seed=3)
    mask = np.full(data.shape[1:], 255, dtype=np.uint8)
    mask[:10] = 0
    return write_masked(path, data, mask), mask == 0


def _float_with_nan(path):
    """float32 reflectance without a nodata value, NaN in a block of every band (and one pixel of one band)."""
    reflectance = dn_to_reflectance(smooth_scene(40, 50, seed=4))
    reflectance[:, 5:15, 20:30] = np.nan
    reflectance[2, 30, 40] = np.nan
    return write_geotiff(path, reflectance), np.isnan(reflectance).any(axis=0)


def _float_all_valid(path):
    """float32 reflectance without a nodata value and without a nodata pixel."""
    reflectance = dn_to_reflectance(smooth_scene(40, 50, seed=5))
    return write_geotiff(path, reflectance), np.zeros(reflectance.shape[1:], dtype=bool)


@pytest.mark.parametrize("scene", [_masked_dn, _float_with_nan, _float_all_valid])
def test_a_float_output_of_an_input_without_a_nodata_value_declares_nan(scene, tiny_model, tmp_path):
    """Its nodata pixels are NaN; undeclared, GDAL readers masked none of them (`read_masks` all valid, a masked mean
    NaN). Declared NaN, a reader that masks nodata masks exactly the input's nodata pixels, and a scene without one
    declares it too (the output's profile is made before any pixel is read)."""
    path, nodata = scene(tmp_path / "scene.tif")
    with rasterio.open(path) as dataset:
        assert dataset.nodata is None
    result = refine_scene(tiny_model, path, tmp_path / "out.tif", 7, 4, progress=False)
    with rasterio.open(tmp_path / "out.tif") as dataset:
        masks, masked, values, declared = dataset.read_masks(), dataset.read(masked=True), dataset.read(), \
            dataset.nodata
    assert np.array_equal(masks == 0, np.broadcast_to(nodata, masks.shape))
    assert np.array_equal(np.isnan(values), masks == 0)
    assert np.isfinite(masked.mean()) and 0 < masked.mean() < 1
    assert declared is not None and math.isnan(declared)
    assert result.dtype == "float32" and math.isnan(result.nodata)


@pytest.mark.parametrize("outputs, message", [
    ({"output_path": "out.png"}, "output {tmp}/out.png: a scene is written as a GeoTIFF; name it FILE.tif or "
                                 "FILE.tiff"),
    ({"output_path": "out"}, "output {tmp}/out: a scene is written as a GeoTIFF"),
    ({"output_path": "out.TIFF", "out_of_range_output": "weight.npy"},
     "out_of_range_output {tmp}/weight.npy: a scene is written as a GeoTIFF"),
])
def test_refine_scene_refuses_an_output_not_named_as_a_geotiff(outputs, message, tiny_model, tmp_path):
    """From Python as from the command line: `out.png` was written as a GeoTIFF named `out.png`. Refused on one line
    naming the file, before the input is opened (a missing input would be the error otherwise) or anything written."""
    scene = write_geotiff(tmp_path / "scene.tif", smooth_scene(30, 40), nodata=0)
    names = {key: tmp_path / name for key, name in outputs.items()}
    for input_path in (scene, tmp_path / "missing.tif"):
        with pytest.raises(InferenceInputError) as raised:
            refine_scene(tiny_model, input_path, month=7, biome=4, progress=False, **names)
        assert str(raised.value).startswith(message.format(tmp=tmp_path)) and "\n" not in str(raised.value)
    assert files_in(tmp_path) == ["scene.tif"]


@pytest.mark.parametrize("output, weight, message", [
    ("out.tif", None, "output {tmp}/out.tif: is a folder; give a file path"),
    ("file/out.tif", None, "output {tmp}/file/out.tif: {tmp}/file is a file, so nothing can be written under it"),
    ("new.tif", "out.tif", "out_of_range_output {tmp}/out.tif: is a folder; give a file path"),
])
def test_refine_scene_refuses_an_output_it_cannot_write_before_reading_the_scene(output, weight, message, tiny_model,
                                                                                  tmp_path):
    """From Python the whole scene was refined, then the last rename failed (`IsADirectoryError` naming the partial
    file) or the folder could not be made (`FileExistsError`). Refused as the command line refuses it, before the
    input is opened, leaving what was there as it was."""
    scene = write_geotiff(tmp_path / "scene.tif", smooth_scene(30, 40), nodata=0)
    (tmp_path / "out.tif").mkdir()
    (tmp_path / "out.tif" / "kept.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    refiner = Stage2RefinerModel(tiny_refiner_config(near_black_fallback=True)).eval() if weight else tiny_model
    for input_path in (scene, tmp_path / "missing.tif"):
        with pytest.raises(InferenceInputError) as raised:
            refine_scene(refiner, input_path, tmp_path / output, 7, 4, progress=False,
                         out_of_range_output=None if weight is None else tmp_path / weight)
        assert str(raised.value) == message.format(tmp=tmp_path)
    assert files_in(tmp_path) == ["file", "out.tif", "scene.tif"] and files_in(tmp_path / "out.tif") == ["kept.txt"]


@pytest.mark.parametrize("dtype, nodata, output_scale, problem", [
    (np.float32, -9999.0, "dn", "input nodata value -9999.0 cannot be stored in the uint16 digital-number output"),
    (np.float64, float(np.finfo(np.float64).min), "reflectance",
     "input nodata value -1.79769e+308 cannot be stored in the float32 reflectance output"),
])
def test_a_nodata_value_the_output_cannot_hold_is_refused_naming_the_file(dtype, nodata, output_scale, problem,
                                                                          tiny_model, tmp_path):
    reflectance = dn_to_reflectance(smooth_scene(30, 40)).astype(dtype)
    reflectance[:, :5, :5] = nodata
    path = write_geotiff(tmp_path / "scene_refl.tif", reflectance, nodata=nodata)
    with pytest.raises(InferenceInputError) as raised:
        refine_scene(tiny_model, path, tmp_path / "out.tif", 7, 4, output_scale=output_scale, progress=False)
    assert str(raised.value).startswith(f"{path}: {problem}") and "\n" not in str(raised.value)
    assert files_in(tmp_path) == ["scene_refl.tif"]


def test_of_four_band_files_the_one_declaring_the_nodata_value_is_named(tiny_model, tmp_path):
    """The nodata value is the first band's that declares one: its file is named, not the first file."""
    reflectance = dn_to_reflectance(smooth_scene(30, 40)).astype(np.float32)
    paths = [write_geotiff(tmp_path / f"{name}.tif", reflectance[i : i + 1], nodata=None if i < 2 else -9999.0)
             for i, name in enumerate(BAND_NAMES)]
    message = f"{paths[2]}: input nodata value -9999.0 cannot be stored"
    with pytest.raises(InferenceInputError, match="^" + re.escape(message)):
        refine_scene(tiny_model, paths, tmp_path / "out.tif", 7, 4, output_scale="dn", progress=False)

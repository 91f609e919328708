"""Scene numerics at the edges of what `refine_scene` takes: the blend at the corners of large windows, the
digital-number check of a float scene that starts with nodata, and a float64 nodata value that float32 cannot hold."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from inference_stage2 import InferenceInputError, main, refine_scene  # noqa: E402
from inference_stage2.windows import StripAccumulator, blend_weights  # noqa: E402
from modeling_stage2.bands import DigitalNumbersWarning  # noqa: E402
from test_inference import (  # noqa: E402
    PixelwiseRefiner, dn_to_reflectance, files_in, pixelwise_expected, read_geotiff, smooth_scene, write_geotiff,
)


def test_the_corners_of_a_large_window_keep_their_value():
    """A window's corner weighs the ramp's first value squared, about 3e-13 for a 2048 px window with overlap 1024:
    the normalisation must divide by it, not by a floor above it (which scaled the scene's corners by 0.35)."""
    weights = blend_weights(2048, 2048, 1024)
    assert 0 < weights.min() < 1e-12
    accumulator = StripAccumulator(bands=1, rows=2048, width=2048)
    values = np.full((1, 2048, 2048), 0.25, dtype=np.float32)
    accumulator.add(0, 0, values, weights)
    blended, _ = accumulator.pop(2048)
    np.testing.assert_allclose(blended, values, rtol=1e-6)


def test_a_scene_refined_in_one_large_window_keeps_its_corners(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(1, 10000, (4, 1800, 1800)).astype(np.uint16)
    path = write_geotiff(tmp_path / "scene.tif", data, nodata=0)
    refine_scene(PixelwiseRefiner(), path, tmp_path / "out.tif", 7, 4, window=1800, overlap=900, progress=False)
    expected = pixelwise_expected(dn_to_reflectance(data), 7, 4)
    refined = read_geotiff(tmp_path / "out.tif")[0]
    for row, col in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        np.testing.assert_allclose(refined[:, row, col], expected[:, row, col], rtol=1e-5)


def _digital_number_warnings(path, output):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refine_scene(PixelwiseRefiner(), path, output, 7, 4, progress=False)
    return [str(w.message) for w in caught if issubclass(w.category, DigitalNumbersWarning)]


@pytest.mark.parametrize("nodata_rows", [130, 85], ids=["first strip all nodata", "first strip mostly nodata"])
def test_float_digital_numbers_warn_though_the_scene_starts_with_nodata(tmp_path, nodata_rows):
    """A swath edge: the first rows are nodata (0). The check judges valid pixels, on the first strip that has some."""
    data = smooth_scene(260, 100).astype(np.float32)  # digital numbers stored as floats
    data[:, :nodata_rows] = 0
    path = write_geotiff(tmp_path / "float_dn.tif", data, nodata=0)
    messages = _digital_number_warnings(path, tmp_path / "out.tif")
    assert len(messages) == 1 and messages[0].startswith(f"{path}: float values with median"), messages
    # Reflectance with the same nodata gives none.
    reflectance = dn_to_reflectance(data)
    path = write_geotiff(tmp_path / "reflectance.tif", reflectance, nodata=0)
    assert _digital_number_warnings(path, tmp_path / "out2.tif") == []


def test_a_float64_nodata_float32_cannot_hold_is_refused_before_anything_is_written(tmp_path, capsys):
    lowest = float(np.finfo(np.float64).min)  # the nodata value some tools give float64 rasters
    data = dn_to_reflectance(smooth_scene(60, 70)).astype(np.float64)
    data[:, :10, :10] = lowest
    path = write_geotiff(tmp_path / "f64.tif", data, nodata=lowest)
    with pytest.raises(InferenceInputError, match="nodata value -1.79769e\\+308 cannot be stored in the float32"):
        refine_scene(PixelwiseRefiner(), path, tmp_path / "out.tif", 7, 4, progress=False)
    code = main(["--model", str(tmp_path / "no_model"), "--input", str(path), "--output", str(tmp_path / "o.tif"),
                 "--month", "7", "--biome", "4", "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be stored in the float32 reflectance output" in err and "no_model" not in err, err
    assert files_in(tmp_path) == ["f64.tif"]
    # A float64 nodata value float32 holds keeps working, as the same value.
    data[:, :10, :10] = -9999.0
    path = write_geotiff(tmp_path / "f64_9999.tif", data, nodata=-9999.0)
    refine_scene(PixelwiseRefiner(), path, tmp_path / "out.tif", 7, 4, progress=False)
    refined, profile = read_geotiff(tmp_path / "out.tif")
    assert profile["nodata"] == -9999.0 and (refined[:, :10, :10] == -9999).all()

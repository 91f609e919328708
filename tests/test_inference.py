"""Inference: numpy helper, NPZ tiles, GeoTIFF scenes (windows, blending, nodata, memory) and the CLI.

The scene and tile machinery is tested with stand-in refiners whose exact answer is known (a per-pixel
function: tiled output must equal single-pass output exactly; a small blur: only window borders can
differ), then end to end with a tiny untrained `Stage2RefinerModel` saved to a folder.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from inference_stage2 import (
    BAND_NAMES,
    InferenceInputError,
    PixelSizeWarning,
    blend_weights,
    load_model,
    main,
    refine_arrays,
    refine_scene,
    refine_tiles,
    window_starts,
)
from inference_stage2.raster import ground_distance_m, to_output
from inference_stage2.windows import StripAccumulator, blend_ramp
from data_builders.tiles import BAND_KEYS
from modeling_stage2.bands import DigitalNumbersWarning

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402

TRANSFORM = from_origin(500000.0, 5400000.0, 10.0, 10.0)
CRS = "EPSG:32633"
GAIN = (1.1, 0.9, 1.2, 0.8)


# ------------------------------------------------------------------------------------------------
# Stand-in refiners
# ------------------------------------------------------------------------------------------------


class PixelwiseRefiner(torch.nn.Module):
    """refined = gain * opt_v1 + 0.01 * month + 0.001 * biome: per pixel, so tiling cannot change it."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(GAIN).view(1, 4, 1, 1))
        self.calls = 0

    def forward(self, opt_v1, month, biome):
        self.calls += 1
        offset = 0.01 * month.view(-1, 1, 1, 1).float() + 0.001 * biome.view(-1, 1, 1, 1).float()
        return opt_v1 * self.gain + offset


def pixelwise_expected(reflectance: np.ndarray, month: int, biome: int) -> np.ndarray:
    gain = np.asarray(GAIN, dtype=np.float32).reshape(4, 1, 1)
    return reflectance * gain + np.float32(0.01 * month + 0.001 * biome)


class BlurRefiner(torch.nn.Module):
    """refined = opt_v1 + (5x5 box blur - opt_v1), replicate padding: translation-equivariant except
    within 2 px of an image border, where each window sees padding the whole scene does not."""

    def forward(self, opt_v1, month, biome):
        padded = torch.nn.functional.pad(opt_v1, (2, 2, 2, 2), mode="replicate")
        kernel = torch.full((4, 1, 5, 5), 1.0 / 25.0, dtype=opt_v1.dtype)
        return torch.nn.functional.conv2d(padded, kernel, groups=4)


class FailingRefiner(PixelwiseRefiner):
    """Raises on its second call: a crash in the middle of a scene."""

    def forward(self, opt_v1, month, biome):
        if self.calls >= 1:
            raise RuntimeError("simulated failure in the middle of the scene")
        return super().forward(opt_v1, month, biome)


# ------------------------------------------------------------------------------------------------
# Synthetic georeferenced scenes
# ------------------------------------------------------------------------------------------------


def smooth_scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(4, H, W) uint16 digital numbers with texture at several scales, like a real scene."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    bands = []
    for band in range(4):
        base = 1200 + 600 * band + 400 * np.sin(rows / (17 + band)) * np.cos(cols / (23 - band))
        bands.append(base + rng.normal(0, 80, (height, width)))
    return np.clip(np.stack(bands), 1, 10000).astype(np.uint16)


def write_geotiff(path: Path, data: np.ndarray, *, crs=CRS, transform=TRANSFORM, nodata=None, scales=None,
                  offsets=None) -> Path:
    """A GeoTIFF of `data`; `scales` / `offsets` (one per band) are declared in GDAL's band metadata."""
    profile = {
        "driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
        "dtype": data.dtype.name, "transform": transform, "nodata": nodata,
    }
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(data)
        if scales is not None:
            dataset.scales = scales
        if offsets is not None:
            dataset.offsets = offsets
    return path


def write_band_files(folder: Path, data: np.ndarray, nodata=None) -> list[Path]:
    """One single-band GeoTIFF per band, named after the band (B02.tif ... B08.tif)."""
    return [write_geotiff(folder / f"{name}.tif", data[i : i + 1], nodata=nodata) for i, name in enumerate(BAND_NAMES)]


def read_geotiff(path: Path):
    with rasterio.open(path) as dataset:
        return dataset.read(), dataset.profile


@pytest.fixture
def dn_scene(tmp_path):
    """300 x 250 px uint16 scene, EPSG:32633, nodata 0 in a corner block and one band of a few pixels."""
    data = smooth_scene(300, 250)
    data[:, 200:260, 10:70] = 0  # a nodata block in every band
    data[2, 5, 5] = 0  # one band's nodata: the pixel is nodata in the output
    return write_geotiff(tmp_path / "scene.tif", data, nodata=0), data


@pytest.fixture
def small_dn_scene(tmp_path):
    """200 x 160 px (2 x 2 windows, for the slower real model), nodata 0 in a block."""
    data = smooth_scene(200, 160, seed=1)
    data[:, 150:180, 20:50] = 0
    return write_geotiff(tmp_path / "small_scene.tif", data, nodata=0), data


def dn_to_reflectance(data: np.ndarray) -> np.ndarray:
    """The float32 nearest to DN x 1e-4 (the product rounded once), written out independently of the package."""
    return (data.astype(np.float64) * 1e-4).astype(np.float32)


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# ------------------------------------------------------------------------------------------------
# refine_arrays
# ------------------------------------------------------------------------------------------------


def test_refine_arrays_reflectance_and_dn_give_the_same_result():
    model = PixelwiseRefiner()
    dn = smooth_scene(40, 36)
    from_dn = refine_arrays(model, dn, 7, 4)
    from_reflectance = refine_arrays(model, dn_to_reflectance(dn), 7, 4)
    explicit = refine_arrays(model, dn.astype(np.float32), 7, 4, input_scale="dn")
    assert from_dn.dtype == np.float32 and from_dn.shape == (4, 40, 36)
    np.testing.assert_allclose(from_dn, pixelwise_expected(dn_to_reflectance(dn), 7, 4), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(from_dn, from_reflectance)
    np.testing.assert_array_equal(from_dn, explicit)


def test_refine_arrays_batches_and_per_image_metadata():
    model = PixelwiseRefiner()
    images = dn_to_reflectance(np.stack([smooth_scene(24, 24, seed) for seed in range(5)]))
    months, biomes = [1, 12, -1, 6, 3], [0, 16, 5, -1, 2]
    refined = refine_arrays(model, images, months, biomes, batch_size=2)
    assert refined.shape == (5, 4, 24, 24) and model.calls == 3
    for image, out, month, biome in zip(images, refined, months, biomes):
        np.testing.assert_allclose(out, pixelwise_expected(image, month, biome), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(refined, refine_arrays(PixelwiseRefiner(), images, months, biomes, batch_size=8))
    # Without metadata, as the model itself: unknown month and biome for every image.
    np.testing.assert_array_equal(refine_arrays(PixelwiseRefiner(), images),
                                  refine_arrays(PixelwiseRefiner(), images, [-1] * 5, [-1] * 5))
    np.testing.assert_allclose(refine_arrays(PixelwiseRefiner(), images[0], month=6)[0],
                               pixelwise_expected(images[0], 6, -1)[0], rtol=1e-6, atol=1e-7)


def test_refine_arrays_accepts_model_outputs_with_refined_attribute():
    class WithOutput(PixelwiseRefiner):
        def forward(self, opt_v1, month, biome):
            return type("Output", (), {"refined": super().forward(opt_v1, month, biome)})()

    image = dn_to_reflectance(smooth_scene(16, 16))
    expected = refine_arrays(PixelwiseRefiner(), image, 3, 2)
    np.testing.assert_array_equal(refine_arrays(WithOutput(), image, 3, 2), expected)


def test_refine_arrays_masks_non_finite_pixels_without_contaminating_neighbours():
    image = dn_to_reflectance(smooth_scene(30, 30))
    image[1, 10, 12] = np.nan
    image[3, 20, 4] = np.inf
    refined = refine_arrays(BlurRefiner(), image, 5, 5)
    invalid = np.zeros((30, 30), dtype=bool)
    invalid[10, 12] = invalid[20, 4] = True
    assert np.isnan(refined[:, invalid]).all()
    assert np.isfinite(refined[:, ~invalid]).all()
    # The fill is the tile's band mean, so the blurred neighbours stay within the data's range.
    assert refined[:, ~invalid].min() >= np.nanmin(image[np.isfinite(image)]) - 1e-6
    assert refined[:, ~invalid].max() <= image[np.isfinite(image)].max() + 1e-6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"opt_v1": np.zeros((3, 8, 8), np.float32)}, "expected shape (4, H, W)"),
        ({"opt_v1": np.zeros((2, 5, 8, 8), np.float32)}, "expected shape (4, H, W)"),
        ({"opt_v1": np.zeros((4, 8, 8), bool)}, "expected numeric band values"),
        ({"month": 13}, "month 13 is out of range"),
        ({"month": 0}, "month 0 is out of range"),
        ({"biome": 17}, "biome code 17 is out of range"),
        ({"biome": -2}, "biome code -2 is out of range"),
        ({"month": True}, "expected one integer"),
        ({"month": [1, 2]}, "expected one value or 1 values"),
        ({"input_scale": "percent"}, "input_scale must be one of"),
    ],
)
def test_refine_arrays_bad_input(kwargs, message):
    arguments = {"opt_v1": np.zeros((4, 8, 8), np.float32), "month": 7, "biome": 4, **kwargs}
    with pytest.raises(InferenceInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        image, month, biome = (arguments.pop(key) for key in ("opt_v1", "month", "biome"))
        refine_arrays(PixelwiseRefiner(), image, month, biome, **arguments)


def test_float_digital_numbers_warn():
    with pytest.warns(UserWarning, match="look like digital numbers"):
        refine_arrays(PixelwiseRefiner(), smooth_scene(8, 8).astype(np.float32), 7, 4)


# ------------------------------------------------------------------------------------------------
# Windows and blending
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, window, overlap", [(300, 120, 32), (250, 120, 32), (121, 120, 32), (1000, 120, 0), (300, 32, 8)]
)
def test_window_starts_cover_the_scene_with_at_least_the_overlap(size, window, overlap):
    starts = window_starts(size, window, overlap)
    assert starts[0] == 0 and starts[-1] == size - window
    assert all(b > a and a + window - b >= overlap for a, b in zip(starts, starts[1:]))
    covered = np.zeros(size, dtype=int)
    for start in starts:
        covered[start : start + window] += 1
    assert covered.min() >= 1


def test_window_starts_examples():
    assert window_starts(300, 120, 32) == [0, 88, 176, 180]
    assert window_starts(120, 120, 32) == [0]
    assert window_starts(50, 120, 32) == [0]


def test_blend_weights_are_positive_symmetric_ramps():
    ramp = blend_ramp(120, 32)
    assert ramp.shape == (120,) and (ramp > 0).all() and ramp.max() == 1.0
    np.testing.assert_allclose(ramp, ramp[::-1])
    assert (np.diff(ramp[:32]) > 0).all() and (ramp[32:88] == 1).all()
    np.testing.assert_array_equal(blend_ramp(10, 0), np.ones(10, np.float32))
    np.testing.assert_allclose(blend_weights(120, 40, 32), np.outer(ramp, blend_ramp(40, 32)))


def test_strip_accumulator_normalises_and_hands_out_rows():
    accumulator = StripAccumulator(bands=1, rows=4, width=3)
    accumulator.add(0, 0, np.full((1, 4, 3), 2.0, np.float32), np.full((4, 3), 1.0, np.float32))
    accumulator.add(0, 0, np.full((1, 4, 3), 5.0, np.float32), np.full((4, 3), 3.0, np.float32))
    blended, weights = accumulator.pop(2)
    np.testing.assert_allclose(blended, np.full((1, 2, 3), (2 + 15) / 4))
    np.testing.assert_allclose(weights, 4.0)
    assert accumulator.top == 2
    # The two rows kept moved to the top; a window starting at row 2 now fits.
    accumulator.add(2, 1, np.full((1, 4, 2), 1.0, np.float32), np.full((4, 2), 1.0, np.float32))
    blended, _ = accumulator.pop(6)
    np.testing.assert_allclose(blended[0, :2], [[17 / 4, 18 / 5, 18 / 5]] * 2)
    np.testing.assert_allclose(blended[0, 2:], [[0, 1, 1]] * 2)
    with pytest.raises(RuntimeError, match="outside the accumulator"):
        accumulator.add(0, 0, np.ones((1, 4, 3), np.float32), np.ones((4, 3), np.float32))


# ------------------------------------------------------------------------------------------------
# Scenes
# ------------------------------------------------------------------------------------------------


def test_scene_keeps_georeferencing_and_nodata_and_matches_single_pass(dn_scene, tmp_path):
    path, data = dn_scene
    output = tmp_path / "out" / "refined.tif"
    result = refine_scene(PixelwiseRefiner(), path, output, 7, 4, progress=False)
    refined, profile = read_geotiff(output)
    with rasterio.open(path) as source:
        assert profile["crs"] == source.crs and profile["transform"] == source.transform
        assert (profile["width"], profile["height"]) == (source.width, source.height)
    assert profile["count"] == 4 and profile["dtype"] == "float32" and profile["nodata"] == 0
    with rasterio.open(output) as dataset:
        assert dataset.descriptions == BAND_NAMES
    nodata = (data == 0).any(axis=0)
    assert nodata.sum() == 60 * 60 + 1
    assert (refined[:, nodata] == 0).all()
    expected = pixelwise_expected(dn_to_reflectance(data), 7, 4)
    np.testing.assert_allclose(refined[:, ~nodata], expected[:, ~nodata], rtol=1e-6, atol=1e-7)
    assert result.input_scale == "dn" and result.windows > 1 and result.strips == 4
    assert files_in(output.parent) == ["refined.tif"]


def test_scene_blending_has_no_seams_for_a_translation_equivariant_refiner(tmp_path):
    data = smooth_scene(260, 230)
    path = write_geotiff(tmp_path / "scene.tif", data)
    single_pass = refine_arrays(BlurRefiner(), data, 7, 4)
    errors = {}
    for overlap in (0, 32):
        output = tmp_path / f"overlap{overlap}.tif"
        refine_scene(BlurRefiner(), path, output, 7, 4, overlap=overlap, progress=False)
        errors[overlap] = np.abs(read_geotiff(output)[0] - single_pass).max()
    # Hard window borders (no overlap) show the windows' own padding; the blend hides it.
    assert errors[0] > 5e-3
    assert errors[32] < 2e-4 and errors[32] < errors[0] / 50


def test_four_single_band_files_equal_one_four_band_file(dn_scene, tmp_path):
    path, data = dn_scene
    band_paths = write_band_files(tmp_path, data, nodata=0)
    refine_scene(PixelwiseRefiner(), path, tmp_path / "one.tif", 7, 4, progress=False)
    refine_scene(PixelwiseRefiner(), band_paths, tmp_path / "four.tif", 7, 4, progress=False)
    one, one_profile = read_geotiff(tmp_path / "one.tif")
    four, four_profile = read_geotiff(tmp_path / "four.tif")
    np.testing.assert_array_equal(one, four)
    assert one_profile == four_profile


def test_scene_memory_is_one_strip_of_windows(dn_scene, tmp_path):
    path, data = dn_scene
    result = refine_scene(PixelwiseRefiner(), path, tmp_path / "out.tif", 7, 4, window=32, overlap=8, progress=False)
    assert result.strips == len(window_starts(300, 32, 8)) == 13
    assert result.accumulator_shape == (4, 32, 250) and result.accumulator_bytes == 5 * 32 * 250 * 4
    assert result.max_rows_read == 32
    refined = read_geotiff(tmp_path / "out.tif")[0]
    nodata = (data == 0).any(axis=0)
    expected = pixelwise_expected(dn_to_reflectance(data), 7, 4)
    np.testing.assert_allclose(refined[:, ~nodata], expected[:, ~nodata], rtol=1e-6, atol=1e-7)


def test_scene_smaller_than_a_window_is_padded(tmp_path):
    data = smooth_scene(50, 70)
    path = write_geotiff(tmp_path / "small.tif", data)
    result = refine_scene(PixelwiseRefiner(), path, tmp_path / "out.tif", 1, 0, progress=False)
    assert result.windows == 1 and result.accumulator_shape == (4, 50, 70)
    expected = pixelwise_expected(dn_to_reflectance(data), 1, 0)
    np.testing.assert_allclose(read_geotiff(tmp_path / "out.tif")[0], expected, rtol=1e-6)
    # Mirrored, the padding continues the scene: a blur at its bottom and right edges is as on the scene alone
    # (within 0.0032 here); zeros would darken the edge by 0.18, a mirror without the edge row by 0.0074.
    refine_scene(BlurRefiner(), path, tmp_path / "blur.tif", 1, 0, progress=False)
    single_pass = refine_arrays(BlurRefiner(), data, 1, 0)
    assert np.abs(read_geotiff(tmp_path / "blur.tif")[0] - single_pass).max() < 5e-3


def test_scene_float_reflectance_with_nan_and_no_declared_nodata(tmp_path):
    reflectance = dn_to_reflectance(smooth_scene(130, 140))
    reflectance[:, 40:50, 60:75] = np.nan
    path = write_geotiff(tmp_path / "float.tif", reflectance)
    refine_scene(BlurRefiner(), path, tmp_path / "out.tif", -1, -1, progress=False)
    refined, profile = read_geotiff(tmp_path / "out.tif")
    assert np.isnan(profile["nodata"])  # declared, so that readers mask the NaN pixels
    nan = np.isnan(reflectance).any(axis=0)
    assert np.isnan(refined[:, nan]).all() and np.isfinite(refined[:, ~nan]).all()


def test_scene_digital_number_output(dn_scene, tmp_path):
    path, data = dn_scene
    refine_scene(PixelwiseRefiner(), path, tmp_path / "dn.tif", 7, 4, output_scale="dn", progress=False)
    refined, profile = read_geotiff(tmp_path / "dn.tif")
    assert profile["dtype"] == "uint16" and profile["nodata"] == 0
    nodata = (data == 0).any(axis=0)
    expected = np.rint(pixelwise_expected(dn_to_reflectance(data), 7, 4) / np.float32(1e-4))
    assert np.abs(refined[:, ~nodata].astype(np.int64) - expected[:, ~nodata]).max() <= 1
    assert (refined[:, nodata] == 0).all()
    # Rounded, not truncated: each the nearest digital number to the same run's reflectance output, but within a
    # float32 step of a tie (truncation would miss about half of them by 1).
    refine_scene(PixelwiseRefiner(), path, tmp_path / "reflectance.tif", 7, 4, progress=False)
    numbers = read_geotiff(tmp_path / "reflectance.tif")[0].astype(np.float64) / 1e-4
    tie = np.abs(numbers - np.floor(numbers) - 0.5) < 1e-3
    assert ((refined == np.rint(numbers)) | tie)[:, ~nodata].all()


@pytest.fixture
def offset_scene(tmp_path):
    """A Sentinel-2 L2A scene of processing baseline 04.00 on: DN = reflectance x 10000 + 1000 (BOA_ADD_OFFSET),
    nodata 0, with the scale 0.0001 and offset -0.1 declared on every band; and its reflectance."""
    data = smooth_scene(150, 130, seed=2)
    data[:, 100:120, 10:40] = 0
    path = write_geotiff(tmp_path / "l2a.tif", data, nodata=0, scales=[1e-4] * 4, offsets=[-0.1] * 4)
    reflectance = (data.astype(np.float64) * 1e-4 - 0.1).astype(np.float32)
    return path, data, reflectance


def test_scene_declaring_a_scale_and_offset_is_read_with_them(offset_scene, tmp_path):
    path, data, reflectance = offset_scene
    result = refine_scene(PixelwiseRefiner(), path, tmp_path / "out.tif", 7, 4, progress=False)
    refined, profile = read_geotiff(tmp_path / "out.tif")
    assert result.input_scale == "declared" and profile["dtype"] == "float32" and profile["nodata"] == 0
    nodata = (data == 0).any(axis=0)
    expected = pixelwise_expected(reflectance, 7, 4)
    np.testing.assert_allclose(refined[:, ~nodata], expected[:, ~nodata], rtol=1e-6, atol=1e-7)
    assert (refined[:, nodata] == 0).all()
    with rasterio.open(tmp_path / "out.tif") as dataset:  # reflectance: nothing left to scale
        assert dataset.scales == (1.0,) * 4 and dataset.offsets == (0.0,) * 4
    # The same numbers without the declaration are read as DN x 0.0001: 0.1 too bright in every band.
    plain = write_geotiff(tmp_path / "plain.tif", data, nodata=0)
    refine_scene(PixelwiseRefiner(), plain, tmp_path / "plain_out.tif", 7, 4, progress=False)
    brighter = read_geotiff(tmp_path / "plain_out.tif")[0][:, ~nodata] - refined[:, ~nodata]
    np.testing.assert_allclose(brighter.mean(axis=1, dtype=np.float64), 0.1 * np.asarray(GAIN), atol=1e-6)


def test_digital_number_output_keeps_the_declared_scale_and_offset(offset_scene, tmp_path):
    path, data, reflectance = offset_scene
    refine_scene(PixelwiseRefiner(), path, tmp_path / "dn.tif", 7, 4, output_scale="dn", progress=False)
    with rasterio.open(tmp_path / "dn.tif") as dataset:
        refined, scales, offsets = dataset.read(), dataset.scales, dataset.offsets
        assert dataset.dtypes[0] == "uint16" and dataset.nodata == 0
    assert scales == (1e-4,) * 4 and offsets == (-0.1,) * 4
    nodata = (data == 0).any(axis=0)
    expected = pixelwise_expected(reflectance, 7, 4)
    decoded = refined.astype(np.float64) * 1e-4 - 0.1  # as any reader of the declared scaling decodes it
    assert np.abs(decoded[:, ~nodata] - expected[:, ~nodata]).max() <= 0.5e-4 + 1e-6
    assert (refined[:, nodata] == 0).all()


def test_four_band_files_declaring_their_scaling_equal_one_file(offset_scene, tmp_path):
    path, data, _ = offset_scene
    band_paths = [write_geotiff(tmp_path / f"{name}.tif", data[i : i + 1], nodata=0, scales=[1e-4], offsets=[-0.1])
                  for i, name in enumerate(BAND_NAMES)]
    refine_scene(PixelwiseRefiner(), path, tmp_path / "one.tif", 7, 4, progress=False)
    result = refine_scene(PixelwiseRefiner(), band_paths, tmp_path / "four.tif", 7, 4, progress=False)
    assert result.input_scale == "declared"
    np.testing.assert_array_equal(read_geotiff(tmp_path / "one.tif")[0], read_geotiff(tmp_path / "four.tif")[0])


def test_an_input_scale_that_contradicts_the_declared_one_is_refused(offset_scene, tmp_path):
    path, data, _ = offset_scene
    for input_scale in ("dn", "reflectance"):
        with pytest.raises(InferenceInputError) as error:
            refine_scene(PixelwiseRefiner(), path, tmp_path / "out.tif", 7, 4, input_scale=input_scale,
                         progress=False)
        message = str(error.value)
        assert message.startswith(f"{path}: band B02 declares scale 0.0001 and offset -0.1")
        assert f"input_scale={input_scale!r} would ignore" in message and "\n" not in message
        assert not (tmp_path / "out.tif").exists()
    # A declared scale that says what input_scale="dn" says is no contradiction.
    agreeing = write_geotiff(tmp_path / "dn_declared.tif", data, nodata=0, scales=[1e-4] * 4, offsets=[0.0] * 4)
    plain = write_geotiff(tmp_path / "plain.tif", data, nodata=0)
    assert refine_scene(PixelwiseRefiner(), agreeing, tmp_path / "a.tif", 7, 4, input_scale="dn",
                        progress=False).input_scale == "dn"
    refine_scene(PixelwiseRefiner(), plain, tmp_path / "b.tif", 7, 4, progress=False)
    np.testing.assert_array_equal(read_geotiff(tmp_path / "a.tif")[0], read_geotiff(tmp_path / "b.tif")[0])


def test_band_files_of_which_only_some_declare_a_scaling_are_refused(offset_scene, tmp_path):
    _, data, _ = offset_scene
    band_paths = write_band_files(tmp_path, data, nodata=0)  # B02.tif ... B08.tif, none declaring
    band_paths[0] = write_geotiff(tmp_path / "B02.tif", data[:1], nodata=0, scales=[1e-4], offsets=[-0.1])
    with pytest.raises(InferenceInputError) as error:
        refine_scene(PixelwiseRefiner(), band_paths, tmp_path / "out.tif", 7, 4, progress=False)
    assert str(error.value).startswith(f"{band_paths[1]}: band B03 declares no scale or offset while the other "
                                       "bands do")
    assert not (tmp_path / "out.tif").exists()


def test_cli_reads_the_declared_scaling_and_refuses_a_contradicting_flag_before_the_model(
    offset_scene, full_model_dir, tmp_path, capsys
):
    path, _, _ = offset_scene
    output = tmp_path / "refined.tif"
    code = main(["--model", str(tmp_path / "no_model_here"), "--input", str(path), "--month", "7", "--biome", "4",
                 "--output", str(output), "--input_scale", "dn", "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and "band B02 declares scale 0.0001 and offset -0.1" in err and "no_model_here" not in err
    assert not output.exists()
    assert main(["--model", str(full_model_dir), "--input", str(path), "--month", "7", "--biome", "4",
                 "--output", str(output), "--no_progress"]) == 0
    assert "read with the scale and offset the input declares" in capsys.readouterr().out


def test_ground_distance_on_the_ellipsoid():
    """WGS 84: a degree of latitude at the equator is 110,574 m, of longitude 111,319 m; 10 UTM metres at the central
    meridian are 10 / 0.9996 m on the ground."""
    np.testing.assert_allclose(ground_distance_m(0, 0, 0, 1), 110_574.4, atol=1)
    np.testing.assert_allclose(ground_distance_m(0, 0, 1, 0), 111_319.5, atol=1)
    np.testing.assert_allclose(ground_distance_m(10, 60, 11, 60), 55_800, atol=1)


@pytest.mark.parametrize("crs, transform, size_m, rtol, warns", [
    (CRS, TRANSFORM, 10 / 0.9996, 1e-5, False),  # the central meridian: UTM's scale factor 0.9996
    (CRS, from_origin(300000.0, 5400000.0, 20.0, 20.0), 20.0, 1e-3, True),  # a 20 m product, off the meridian
    ("EPSG:4326", from_origin(15.0, 48.0, 10 / 74_626.0, 10 / 111_190.0), 10.0, 1e-3, False),  # degrees, 48 N
    ("EPSG:3857", from_origin(1_669_792.0, 6_106_854.0, 14.9, 14.9), 10.0, 0.01, False),  # Mercator m at 48 N
])
def test_scene_pixel_size_is_measured_on_the_ground_and_warned_about_unless_10_m(tmp_path, crs, transform, size_m,
                                                                                 rtol, warns):
    data = smooth_scene(60, 50)
    path = write_geotiff(tmp_path / "scene.tif", data, crs=crs, transform=transform)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = refine_scene(PixelwiseRefiner(), path, tmp_path / "out.tif", 7, 4, progress=False)
    np.testing.assert_allclose(result.pixel_size_m, (size_m, size_m), rtol=rtol)
    np.testing.assert_allclose(result.area_km2, 60 * 50 * size_m**2 / 1e6, rtol=2 * rtol)
    sizes = [str(w.message) for w in caught if issubclass(w.category, PixelSizeWarning)]
    assert len(sizes) == warns
    if warns:
        assert sizes[0].startswith(f"{path}: pixels are 20 x 20 m on the ground; the refiner was trained on "
                                   "Sentinel-2's 10 m bands (B02 B03 B04 B08)")
    np.testing.assert_allclose(read_geotiff(tmp_path / "out.tif")[0],  # a warning, not a refusal
                               pixelwise_expected(dn_to_reflectance(data), 7, 4), rtol=1e-6)


class ClampedRefiner(torch.nn.Module):
    """refined = max(opt_v1 - 0.15, 0): exact zeros on valid pixels, as the refiner's clamped output has over water."""

    def forward(self, opt_v1, month, biome):
        return (opt_v1 - 0.15).clamp(min=0)


@pytest.mark.parametrize("output_scale", ["reflectance", "dn"])
def test_a_valid_pixel_clamped_at_0_is_not_written_as_nodata_0(dn_scene, tmp_path, output_scale):
    path, data = dn_scene
    refine_scene(ClampedRefiner(), path, tmp_path / "out.tif", 7, 4, output_scale=output_scale, progress=False)
    refined, profile = read_geotiff(tmp_path / "out.tif")
    assert profile["nodata"] == 0
    nodata = (data == 0).any(axis=0)
    expected = np.maximum(dn_to_reflectance(data) - np.float32(0.15), 0)
    clamped = (expected == 0) & ~nodata
    assert clamped.sum() > 1000  # the case at stake
    assert (refined[:, nodata] == 0).all() and not (refined[:, ~nodata] == 0).any()
    if output_scale == "reflectance":  # the next float32 above 0 where the refiner gave 0; the rest as it gave it
        assert (refined[clamped] == np.nextafter(np.float32(0), np.float32(1))).all()
        np.testing.assert_allclose(refined[~clamped & ~nodata], expected[~clamped & ~nodata], rtol=1e-6, atol=1e-7)
    else:  # 1 digital number where it rounds to 0
        dn = np.rint(expected / np.float32(1e-4))
        assert (refined[(dn == 0) & ~nodata] == 1).all()
        assert np.abs(refined[(dn > 0) & ~nodata].astype(np.int64) - dn[(dn > 0) & ~nodata]).max() <= 1
    with rasterio.open(tmp_path / "out.tif") as dataset:  # what a reader masks: only the input's nodata pixels
        masked = dataset.read(masked=True).mask
    np.testing.assert_array_equal(masked, np.broadcast_to(nodata, masked.shape))


@pytest.mark.parametrize("declared", [None, float("nan")], ids=["none declared", "NaN declared"])
def test_digital_number_output_of_float_input_without_nodata_declares_nodata_0(tmp_path, declared):
    reflectance = dn_to_reflectance(smooth_scene(130, 140))
    reflectance[:, 40:50, 60:75] = np.nan
    path = write_geotiff(tmp_path / "float.tif", reflectance, nodata=declared)
    refine_scene(ClampedRefiner(), path, tmp_path / "dn.tif", 7, 4, output_scale="dn", progress=False)
    refined, profile = read_geotiff(tmp_path / "dn.tif")
    assert profile["dtype"] == "uint16" and profile["nodata"] == 0
    nan = np.isnan(reflectance).any(axis=0)
    assert (refined[:, nan] == 0).all() and not (refined[:, ~nan] == 0).any()


def test_scene_output_problems_are_found_before_the_model_is_loaded(dn_scene, tmp_path, capsys):
    """A nodata value the output cannot hold, a CRS that does not map to the ground, an output that is an input:
    one line and exit 2 before the (here absent) model is looked at."""
    path, data = dn_scene
    minus = write_geotiff(tmp_path / "minus.tif", dn_to_reflectance(data), nodata=-9999)  # uint16 output: no -9999
    local = write_geotiff(tmp_path / "local.tif", data, nodata=0, crs='LOCAL_CS["arbitrary",UNIT["metre",1]]')
    cases = [
        ([str(minus), "--output", str(tmp_path / "a.tif"), "--output_scale", "dn"],
         "input nodata value -9999.0 cannot be stored in the uint16 digital-number output"),
        ([str(local), "--output", str(tmp_path / "b.tif")], f"{local}: its CRS cannot be taken to longitude and "
                                                              "latitude"),
        ([str(path), "--output", str(path)], f"output {path} is an input file"),
    ]
    for inputs, message in cases:
        code = main(["--model", str(tmp_path / "no_model"), "--input", *inputs, "--month", "7", "--biome", "4",
                     "--no_progress"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "no_model" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.tif", "minus.tif", "scene.tif"]


@pytest.mark.parametrize("dtype, nodata, beside", [
    (np.uint16, 65535, 65534), (np.int16, -32768, -32767), (np.uint16, 7, 8),
    # a float by twice GDAL's tolerance of a non-zero nodata (8 epsilons, relative), and a float ulp beyond
    (np.float32, float(np.finfo(np.float32).max),
     np.nextafter(np.float32(np.finfo(np.float32).max * (1 - 8 * np.finfo(np.float32).eps)), np.float32(0))),
    (np.float32, -1.0, np.nextafter(np.float32(-1 + 8 * np.finfo(np.float32).eps), np.float32(0))),
])
def test_to_output_moves_a_valid_value_off_nodata_towards_the_inside_of_the_range(dtype, nodata, beside):
    dtype = np.dtype(dtype)
    value = nodata if dtype.kind == "f" else nodata * 1e-4
    reflectance = np.full((4, 2, 3), value, dtype=np.float32)
    reflectance[1] = 0.05
    valid = np.array([[True, True, False], [True, True, True]])
    block = to_output(reflectance, valid, dtype, nodata)
    assert block.dtype == dtype
    assert (block[0][valid] == beside).all() and (block[:, ~valid] == nodata).all()
    assert (block[1][valid] == (np.float32(0.05) if dtype.kind == "f" else 500)).all()


def test_scene_bad_inputs_leave_no_output(dn_scene, tmp_path):
    path, data = dn_scene
    output = tmp_path / "out" / "refined.tif"
    output.parent.mkdir()
    three_bands = write_geotiff(tmp_path / "three.tif", data[:3])
    no_crs = write_geotiff(tmp_path / "nocrs.tif", data, crs=None)
    shifted = write_geotiff(tmp_path / "shifted.tif", data[:1], transform=from_origin(500010.0, 5400000.0, 10.0, 10.0))
    bands = write_band_files(tmp_path, data)
    not_a_raster = tmp_path / "notes.tif"
    not_a_raster.write_text("not a raster")
    cases = [
        ((three_bands, 7, 4), {}, "three.tif: has 3 band"),
        ((no_crs, 7, 4), {}, "nocrs.tif: has no coordinate reference system"),
        ((path, 13, 4), {}, "month 13 is out of range"),
        ((path, 7, 17), {}, "biome code 17 is out of range"),
        ((tmp_path / "missing.tif", 7, 4), {}, "missing.tif: no such file"),
        ((bands[:3], 7, 4), {}, "got 3 files"),
        (([path, *bands[1:]], 7, 4), {}, r"scene.tif: has 4 band\(s\), expected 1"),
        (([bands[0], shifted, *bands[2:]], 7, 4), {}, "shifted.tif: transform"),
        ((not_a_raster, 7, 4), {}, "notes.tif: cannot be read as a raster"),
        ((path, 7, 4), {"overlap": 120}, "0 <= overlap < window"),
    ]
    for (inputs, month, biome), kwargs, message in cases:
        with pytest.raises(InferenceInputError, match=message):
            refine_scene(PixelwiseRefiner(), inputs, output, month, biome, progress=False, **kwargs)
        assert files_in(output.parent) == [], message


def test_scene_failure_midway_keeps_the_previous_output_and_leaves_no_partial(dn_scene, tmp_path):
    path, _ = dn_scene
    output = tmp_path / "refined.tif"
    output.write_bytes(b"previous result")
    with pytest.raises(RuntimeError, match="simulated failure"):
        refine_scene(FailingRefiner(), path, output, 7, 4, batch_size=1, progress=False)
    assert output.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refined.tif", "scene.tif"]


def test_scene_refuses_to_overwrite_its_input(dn_scene):
    path, _ = dn_scene
    before = path.read_bytes()
    with pytest.raises(InferenceInputError, match="is an input file"):
        refine_scene(PixelwiseRefiner(), path, path, 7, 4, progress=False)
    assert path.read_bytes() == before


# ------------------------------------------------------------------------------------------------
# Tiles
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def few_tiles(sample_tiles_dir, tmp_path) -> Path:
    """Three real tiles of the bundled sample in train/ and val/ subfolders (copied, so tests may add bad ones)."""
    tiles = tmp_path / "tiles"
    for split, count in (("train", 2), ("val", 1)):
        (tiles / split).mkdir(parents=True)
        for path in sorted((sample_tiles_dir / split).glob("*.npz"))[:count]:
            shutil.copy(path, tiles / split / path.name)
    return tiles


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def tile_reflectance(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return dn_to_reflectance(np.stack([arrays[key] for key in ("s2_b2", "s2_b3", "s2_b4", "s2_b8")]))


def test_tiles_mirror_the_input_layout_with_identity_input_mode(few_tiles, tmp_path):
    output = tmp_path / "refined"
    summary = refine_tiles(PixelwiseRefiner(), few_tiles, output, batch_size=2, progress=False)
    inputs = sorted(path.relative_to(few_tiles) for path in few_tiles.rglob("*.npz"))
    assert sorted(Path(p) for p in summary.written) == inputs and summary.rejected == []
    assert summary.input_mode == "identity" and summary.metrics is None
    for relative in inputs:
        tile = load_npz(few_tiles / relative)
        out = load_npz(output / relative)
        assert out["refined"].dtype == np.float32 and out["refined"].shape == (4, 120, 120)
        expected = pixelwise_expected(tile_reflectance(tile), int(tile["month"]), int(tile["biome_code"]))
        np.testing.assert_allclose(out["refined"], expected, rtol=1e-6, atol=1e-7)
        assert int(out["month"]) == int(tile["month"]) and str(out["input_mode"]) == "identity"
        assert int(out["biome_code"]) == int(tile["biome_code"]) and out["band_names"].tolist() == list(BAND_NAMES)
        assert not any(key.startswith("metrics_") for key in out)
    assert sorted(p.name for p in output.rglob("*") if p.name.startswith(".")) == []


def _write_bad_tiles(folder: Path, good: Path) -> dict[str, str]:
    arrays = load_npz(good)
    (folder / "truncated.npz").write_bytes(good.read_bytes()[:500])
    np.savez(folder / "missing_band.npz", **{k: v for k, v in arrays.items() if k != "s2_b8"})
    np.savez(folder / "month13.npz", **{**arrays, "month": np.int64(13)})
    np.savez(folder / "objects.npz", **{**arrays, "s2_b2": np.array([object()] * 3, dtype=object)})
    np.savez(folder / "small.npz", **{**arrays, "s2_b3": arrays["s2_b3"][:60]})
    np.savez(folder / "month_band.npz", **{**arrays, "month": np.full((120, 120), 7)})  # its repr spans 7 lines
    return {
        "truncated.npz": "cannot be read as an NPZ file",
        "missing_band.npz": "'s2_b8': missing key",
        "month13.npz": "month 13 is out of range",
        "objects.npz": "refusing",
        "small.npz": "'s2_b3': shape (60, 120)",
        "month_band.npz": "key 'month': expected one integer, got an array of shape (120, 120)",
    }


def test_tiles_bad_files_are_rejected_with_reasons_or_stop_in_strict_mode(few_tiles, tmp_path):
    good = next(few_tiles.rglob("*.npz"))
    reasons = _write_bad_tiles(few_tiles / "val", good)
    output = tmp_path / "refined"
    summary = refine_tiles(PixelwiseRefiner(), few_tiles, output, progress=False)
    assert len(summary.written) == 3
    rejected = {Path(path).name: reason for path, reason in summary.rejected}
    assert sorted(rejected) == sorted(reasons)
    for name, fragment in reasons.items():
        assert fragment in rejected[name] and name in rejected[name]
        assert len(rejected[name].splitlines()) == 1, rejected[name]  # one line each
        assert not (output / "val" / name).exists()
    with pytest.raises(InferenceInputError, match="truncated.npz|missing_band.npz|month13.npz"):
        refine_tiles(PixelwiseRefiner(), few_tiles, tmp_path / "strict", strict=True, progress=False)


@pytest.mark.parametrize("input_scale", ["auto", "dn", "reflectance"])
def test_an_explicit_input_scale_keeps_the_data_builders_checks(few_tiles, tmp_path, input_scale):
    """`--input_scale` chooses the scale; a tile the data builders would refuse is refused under every scale."""
    good = next(few_tiles.rglob("*.npz"))
    arrays = load_npz(good)
    bad = tmp_path / "bad"
    bad.mkdir()
    floats = {key: arrays[key].astype(np.float32) * (1e-4 if input_scale != "dn" else 1.0) for key in BAND_KEYS}
    negative = dict(floats, s2_b4=floats["s2_b4"] - (0.5 if input_scale != "dn" else 5000.0))
    nan_band = dict(floats, s2_b3=np.full_like(floats["s2_b3"], np.nan))
    mixed = dict(floats, s2_b2=arrays["s2_b2"])  # one uint16 band among floats
    for name, bands in (("negative", negative), ("nan_band", nan_band), ("mixed", mixed)):
        np.savez(bad / f"{name}.npz", **{**arrays, **bands})
    one_element = tmp_path / "one_element"
    one_element.mkdir()
    np.savez(one_element / "m.npz", **{**arrays, "month": np.array([7]), "biome_code": np.array([[4]])})
    summary = refine_tiles(PixelwiseRefiner(), bad, tmp_path / "out", input_scale=input_scale, progress=False)
    rejected = {Path(path).stem: reason for path, reason in summary.rejected}
    assert summary.written == [] and sorted(rejected) == ["mixed", "nan_band", "negative"]
    assert "reflectance down to" in rejected["negative"] and "below the tolerance of -0.1" in rejected["negative"]
    assert "'s2_b3': band is entirely NaN/Inf" in rejected["nan_band"]
    assert "bands mix integer and float dtypes" in rejected["mixed"]
    if input_scale == "auto":  # a month or biome stored as a one-element array, as training reads it
        written = refine_tiles(PixelwiseRefiner(), one_element, tmp_path / "m", progress=False)
        assert written.rejected == [] and int(load_npz(tmp_path / "m" / "m.npz")["month"]) == 7


def test_tiles_with_stage1_input_use_opt_v1_and_report_metrics(few_tiles, tmp_path):
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    rng = np.random.default_rng(0)
    opt_v1 = {}
    for path in few_tiles.rglob("*.npz"):
        target = tile_reflectance(load_npz(path))
        opt_v1[path.name] = (target * 0.9 + rng.normal(0, 0.01, target.shape)).astype(np.float32)
        np.savez(stage1 / path.name, opt_v1=opt_v1[path.name])
    output = tmp_path / "refined"
    summary = refine_tiles(PixelwiseRefiner(), few_tiles, output, stage1_dir=stage1, batch_size=2, progress=False)
    assert summary.input_mode == "stage1" and len(summary.written) == 3
    from training.metrics import METRIC_NAMES, evaluate_pair, per_tile_metrics

    paths = sorted(few_tiles.rglob("*.npz"))
    outputs = [load_npz(output / path.relative_to(few_tiles)) for path in paths]
    for path, out in zip(paths, outputs):
        tile = load_npz(path)
        expected = pixelwise_expected(opt_v1[path.name], int(tile["month"]), int(tile["biome_code"]))
        np.testing.assert_allclose(out["refined"], expected, rtol=1e-6, atol=1e-7)
        assert str(out["input_mode"]) == "stage1"
    refined = torch.from_numpy(np.stack([out["refined"] for out in outputs]))
    targets = torch.from_numpy(np.stack([tile_reflectance(load_npz(path)) for path in paths]))
    inputs = torch.from_numpy(np.stack([opt_v1[path.name] for path in paths]))
    own, baseline = per_tile_metrics(refined, targets, inputs), per_tile_metrics(inputs, targets, inputs)
    for index, out in enumerate(outputs):
        for name in METRIC_NAMES:
            assert float(out[f"metrics_refined_{name}"]) == pytest.approx(float(own[name][index]), rel=1e-6)
            assert float(out[f"metrics_opt_v1_{name}"]) == pytest.approx(float(baseline[name][index]), rel=1e-6)
    # The summary pools pixels over all tiles, as stage2-evaluate does, and is saved as metrics.json.
    pooled = evaluate_pair(refined, targets, inputs)
    assert summary.metrics["n_tiles"] == 3
    for role in ("refined", "opt_v1"):
        for name in METRIC_NAMES:
            assert summary.metrics[role][name] == pytest.approx(pooled[role][name], rel=1e-6)
    assert json.loads((output / "metrics.json").read_text()) == summary.metrics
    assert summary.metrics["opt_v1"]["identity_l1"] == 0 and summary.metrics["refined"]["identity_l1"] > 0.01
    # A missing Stage 1 file names the file and the problem.
    (stage1 / next(iter(opt_v1))).unlink()
    summary = refine_tiles(PixelwiseRefiner(), few_tiles, tmp_path / "again", stage1_dir=stage1, progress=False)
    assert len(summary.rejected) == 1 and "Stage 1 file missing" in summary.rejected[0][1]
    # stage2-refine names the tile, then the Stage 1 file (whose path ends with the tile's: it was printed alone).
    from inference_stage2.cli import rejection_line

    tile, reason = summary.rejected[0]
    assert reason.startswith(f"{stage1 / next(iter(opt_v1))}: ")
    for spelling in (tile, Path(tile).name):  # as found in a folder, as given from within it
        assert rejection_line(spelling, reason) == f"rejected: {spelling}: {reason}"  # one form: `rejected: TILE`
    assert rejection_line(tile, f"{tile}: truncated") == f"rejected: {tile}: truncated"  # the tile's own problem


def test_tiles_into_an_earlier_runs_folder_replace_and_remove_what_would_look_current(few_tiles, tmp_path, capsys):
    from inference_stage2.cli import _report_tiles

    output = tmp_path / "refined"
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    paths = sorted(few_tiles.rglob("*.npz"))
    for path in paths:
        np.savez(stage1 / path.name, opt_v1=tile_reflectance(load_npz(path)) * 0.9)
    first = refine_tiles(PixelwiseRefiner(), few_tiles, output, stage1_dir=stage1, progress=False)
    assert len(first.written) == 3 and not first.replaced and (output / "metrics.json").is_file()
    # Second run without Stage 1 input, one tile now damaged: its old output and the old metrics must go.
    broken = paths[0]
    broken.write_bytes(broken.read_bytes()[:100])
    second = refine_tiles(PixelwiseRefiner(), few_tiles, output, progress=False)
    stale = str(broken.relative_to(few_tiles))
    assert sorted(second.replaced) == sorted(str(p.relative_to(few_tiles)) for p in paths[1:])
    assert second.removed_stale == [stale, "metrics.json"]
    assert not (output / stale).exists() and not (output / "metrics.json").exists()
    _report_tiles(second)
    err = capsys.readouterr().err
    assert "replaced 2 output(s) of an earlier run" in err and f"removed {output / stale}" in err


def test_a_run_that_fails_half_way_leaves_no_earlier_metrics_beside_its_new_tiles(few_tiles, tmp_path):
    """`--strict` stopping at the second tile left the first run's metrics.json beside a tile this run had replaced,
    describing outputs that were no longer there. It is removed before the first tile is written."""
    output, stage1 = tmp_path / "refined", tmp_path / "stage1"
    stage1.mkdir()
    paths = sorted(few_tiles.rglob("*.npz"))
    for path in paths:
        np.savez(stage1 / path.name, opt_v1=tile_reflectance(load_npz(path)) * 0.9)
    refine_tiles(PixelwiseRefiner(), few_tiles, output, stage1_dir=stage1, progress=False)
    first_tile = output / paths[0].relative_to(few_tiles)
    before = load_npz(first_tile)["refined"]
    assert (output / "metrics.json").is_file()
    np.savez(stage1 / paths[0].name, opt_v1=tile_reflectance(load_npz(paths[0])) * 0.5)
    (stage1 / paths[1].name).unlink()
    with pytest.raises(InferenceInputError, match="Stage 1 file missing"):
        refine_tiles(PixelwiseRefiner(), few_tiles, output, stage1_dir=stage1, batch_size=1, strict=True,
                     progress=False)
    assert not np.allclose(load_npz(first_tile)["refined"], before)  # the first tile was replaced
    assert not (output / "metrics.json").exists()


def test_scene_without_a_valid_pixel_warns_and_exits_1(full_model_dir, tmp_path, capsys):
    path = write_geotiff(tmp_path / "empty.tif", np.zeros((4, 64, 64), dtype=np.uint16), nodata=0)
    output = tmp_path / "refined.tif"
    assert main(["--model", str(full_model_dir), "--input", str(path), "--month", "7", "--biome", "4",
                 "--output", str(output), "--no_progress"]) == 1
    assert "has no valid pixel (all nodata)" in capsys.readouterr().err
    refined, _ = read_geotiff(output)
    assert (refined == 0).all()


class RecordingRefiner(torch.nn.Module):
    """Returns its input and keeps every `opt_v1` batch it was given; `config` may set the metadata ranges."""

    def __init__(self, num_months=12, num_biomes=17):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.config = type("Config", (), {"num_months": num_months, "num_biomes": num_biomes})()
        self.inputs = []

    def forward(self, opt_v1, month, biome):
        self.inputs.append(opt_v1.detach().clone())
        return opt_v1


def test_a_tile_reaches_the_model_bitwise_as_in_training(few_tiles, tmp_path):
    from data_builders import build_dataset, make_eval_transform
    from training.data import TileDataset

    # Digital numbers 0..20000 in every band: every value a real tile can hold, in one tile.
    tile = dict(load_npz(sorted(few_tiles.rglob("*.npz"))[0]))
    values = np.arange(4 * 120 * 120, dtype=np.uint16) % 20001
    for index, key in enumerate(("s2_b2", "s2_b3", "s2_b4", "s2_b8")):
        tile[key] = values[index * 14400:(index + 1) * 14400].reshape(120, 120)
    tiles = tmp_path / "one" / "train"
    tiles.mkdir(parents=True)
    np.savez(tiles / "all_values.npz", **tile)
    # Training: stage2-build-dataset (opt_v1 = the S2 bands) -> Arrow -> the Trainer's dataset and collate.
    built = build_dataset(tmp_path / "one", tmp_path / "arrow", input_mode="identity")
    rows = TileDataset(built["train"], make_eval_transform())
    trained_on = make_eval_transform().collate(rows.__getitems__([0]))["opt_v1"]
    # Inference: stage2-refine on the same NPZ (no Stage 1 folder: the S2 bands are the model input).
    model = RecordingRefiner()
    refine_tiles(model, tmp_path / "one", tmp_path / "refined", progress=False)
    (refined_from,) = model.inputs
    assert refined_from.dtype == trained_on.dtype == torch.float32
    assert torch.equal(refined_from[:, :, :120, :120], trained_on)


def test_tiles_are_checked_by_the_builders_reader(few_tiles, tmp_path):
    good = sorted(few_tiles.rglob("*.npz"))[0]
    arrays = dict(load_npz(good))
    reflectance = tile_reflectance(arrays)
    reflectance[2, 5, 5] = -0.49  # below the -0.1 tolerance of L2A products (data_builders.tiles.REFLECTANCE_MIN)
    bad = tmp_path / "bad" / "train"
    bad.mkdir(parents=True)
    np.savez(bad / "negative.npz", **{**arrays, **dict(zip(("s2_b2", "s2_b3", "s2_b4", "s2_b8"), reflectance))})
    summary = refine_tiles(PixelwiseRefiner(), tmp_path / "bad", tmp_path / "out", progress=False)
    [(path, reason)] = summary.rejected
    assert "negative.npz" in reason and "'s2_b4'" in reason and "-0.49" in reason and not summary.written


def test_metadata_ranges_come_from_the_models_config(few_tiles, tmp_path):
    image = smooth_scene(120, 120)
    with pytest.raises(InferenceInputError, match="month 13 is out of range; use 1..12"):
        refine_arrays(RecordingRefiner(), image, 13, 4)
    refine_arrays(RecordingRefiner(num_months=13), image, 13, 4)  # a model built for 13 months takes month 13
    with pytest.raises(InferenceInputError, match="biome code 4 is out of range; use 0..3"):
        refine_arrays(RecordingRefiner(num_biomes=4), image, 7, 4)
    # Tiles are checked against the model's ranges too: with 4 biomes, the sample's higher codes are rejected.
    codes = {int(load_npz(p)["biome_code"]) for p in few_tiles.rglob("*.npz")}
    summary = refine_tiles(RecordingRefiner(num_biomes=min(codes) + 1), few_tiles, tmp_path / "out", progress=False)
    higher = [p for p in few_tiles.rglob("*.npz") if int(load_npz(p)["biome_code"]) > min(codes)]
    assert len(summary.rejected) == len(higher)
    assert all("key 'biome_code'" in reason for _, reason in summary.rejected)


def test_tiles_bad_arguments(few_tiles, tmp_path):
    with pytest.raises(InferenceInputError, match="no such folder of NPZ tiles"):
        refine_tiles(PixelwiseRefiner(), tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(InferenceInputError, match="is the input folder"):
        refine_tiles(PixelwiseRefiner(), few_tiles, few_tiles)
    with pytest.raises(InferenceInputError, match="stage1_dir .* no such folder"):
        refine_tiles(PixelwiseRefiner(), few_tiles, tmp_path / "out", stage1_dir=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InferenceInputError, match="no .npz tiles found"):
        refine_tiles(PixelwiseRefiner(), tmp_path / "empty", tmp_path / "out")


def test_tiles_given_as_files_equal_the_folders_outputs(few_tiles, tmp_path):
    paths = sorted(few_tiles.rglob("*.npz"))  # train/ and val/: files from two folders
    folder = refine_tiles(PixelwiseRefiner(), few_tiles, tmp_path / "from_folder", batch_size=2, progress=False)
    files = refine_tiles(PixelwiseRefiner(), paths, tmp_path / "from_files", batch_size=2, progress=False)
    one = refine_tiles(PixelwiseRefiner(), str(paths[-1]), tmp_path / "from_one", progress=False)
    assert files.written == [path.name for path in paths] and not files.rejected and files.input_mode == "identity"
    assert one.written == [paths[-1].name] and len(folder.written) == 3
    assert sorted(p.name for p in (tmp_path / "from_files").iterdir()) == sorted(path.name for path in paths)
    assert [p.name for p in (tmp_path / "from_one").iterdir()] == [paths[-1].name]
    for path in paths:
        expected = load_npz(tmp_path / "from_folder" / path.relative_to(few_tiles))
        for out in [load_npz(tmp_path / "from_files" / path.name)] + (
            [load_npz(tmp_path / "from_one" / path.name)] if path == paths[-1] else []
        ):
            assert sorted(out) == sorted(expected)
            for key in expected:
                assert np.array_equal(out[key], expected[key]), key
    # The old keyword spelling still works, with a deprecation warning.
    with pytest.warns(FutureWarning, match=r"refine_tiles\(input_dir=...\) is deprecated"):
        old = refine_tiles(PixelwiseRefiner(), input_dir=few_tiles, output_dir=tmp_path / "old", progress=False)
    assert sorted(old.written) == sorted(folder.written)


def test_tiles_given_as_files_refuse_clashing_names_and_outputs_on_inputs(few_tiles, dn_scene, tmp_path):
    paths = sorted(few_tiles.rglob("*.npz"))
    twin = tmp_path / "elsewhere" / paths[0].name
    twin.parent.mkdir()
    shutil.copy(paths[0], twin)
    output = tmp_path / "out"
    with pytest.raises(InferenceInputError, match="have the same file name") as error:
        refine_tiles(PixelwiseRefiner(), [paths[0], paths[1], twin], output, progress=False)
    assert str(paths[0]) in str(error.value) and str(twin) in str(error.value)
    assert not output.exists()  # refused before anything was written
    # The same file twice (any spelling) is not two tiles with one name: "separate folders" would not help
    again = paths[0].parent / ".." / paths[0].parent.name / paths[0].name
    with pytest.raises(InferenceInputError) as error:
        refine_tiles(PixelwiseRefiner(), [paths[0], paths[1], again], output, progress=False)
    assert str(error.value) == f"input {again}: given twice (also as {paths[0]}); give each tile once"
    assert not output.exists()
    # OUTPUT_DIR/<file name> would be the input itself: refused, the tiles untouched (also through another spelling).
    train = paths[0].parent
    before = {path: path.read_bytes() for path in paths}
    for output_dir in (train, few_tiles / "val" / ".." / "train"):
        with pytest.raises(InferenceInputError, match="would overwrite the input") as error:
            refine_tiles(PixelwiseRefiner(), [paths[0], paths[2]], output_dir, progress=False)
        assert f"the input {paths[0]}" in str(error.value)
    assert {path: path.read_bytes() for path in paths} == before
    assert sorted(p.name for p in train.iterdir()) == sorted(p.name for p in paths if p.parent == train)
    # A folder among files, a GeoTIFF among tiles, something else: each named.
    scene, _ = dn_scene
    for inputs, message in (
        ([few_tiles, paths[0]], "is a folder among 2 inputs"),
        ([paths[0], scene], "scene.tif: a GeoTIFF is a scene"),
        ([paths[0], tmp_path / "absent.npz"], "absent.npz: no such NPZ file"),
        ([tmp_path / "absent.npz"], "absent.npz: no such folder of NPZ tiles or NPZ file"),
        ([], "no input"),
    ):
        with pytest.raises(InferenceInputError, match=message):
            refine_tiles(PixelwiseRefiner(), inputs, output, progress=False)
    assert not output.exists()
    # A rejected file's stale output is removed, and strict mode stops at it, as for a folder.
    refine_tiles(PixelwiseRefiner(), paths[:2], output, progress=False)
    broken = tmp_path / "broken" / paths[1].name
    broken.parent.mkdir()
    broken.write_bytes(paths[1].read_bytes()[:100])
    summary = refine_tiles(PixelwiseRefiner(), [paths[0], broken], output, progress=False)
    assert summary.written == [paths[0].name] and summary.removed_stale == [paths[1].name]
    assert [path for path, _ in summary.rejected] == [str(broken)] and not (output / paths[1].name).exists()
    with pytest.raises(InferenceInputError, match="cannot be read as an NPZ file"):
        refine_tiles(PixelwiseRefiner(), [broken, paths[0]], tmp_path / "strict", strict=True, progress=False)
    assert not (tmp_path / "strict").exists()


def test_tiles_given_as_files_find_their_stage1_file_by_name(few_tiles, tmp_path):
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    paths = sorted(few_tiles.rglob("*.npz"))
    rng = np.random.default_rng(1)
    for path in paths:
        target = tile_reflectance(load_npz(path))
        np.savez(stage1 / path.name, opt_v1=(target * 0.9 + rng.normal(0, 0.01, target.shape)).astype(np.float32))
    folder = refine_tiles(PixelwiseRefiner(), few_tiles, tmp_path / "from_folder", stage1_dir=stage1, batch_size=2,
                          progress=False)
    files = refine_tiles(PixelwiseRefiner(), paths, tmp_path / "from_files", stage1_dir=stage1, batch_size=2,
                         progress=False)
    assert files.input_mode == "stage1" and files.metrics["n_tiles"] == 3
    assert files.metrics == folder.metrics
    assert json.loads((tmp_path / "from_files" / "metrics.json").read_text()) == folder.metrics
    for path in paths:
        expected = load_npz(tmp_path / "from_folder" / path.relative_to(few_tiles))
        out = load_npz(tmp_path / "from_files" / path.name)
        assert sorted(out) == sorted(expected) and any(key.startswith("metrics_refined_") for key in out)
        for key in expected:
            assert np.array_equal(out[key], expected[key]), key


# ------------------------------------------------------------------------------------------------
# Command line: errors found before any model is loaded
# ------------------------------------------------------------------------------------------------


def test_cli_bad_scene_input_exits_2_with_the_file_named_and_no_output(dn_scene, tmp_path, capsys):
    path, data = dn_scene
    no_crs = write_geotiff(tmp_path / "nocrs.tif", data, crs=None)
    output = tmp_path / "out" / "refined.tif"
    model_dir = tmp_path / "no_model_here"
    cases = [
        (["--input", str(no_crs), "--month", "7", "--biome", "4"], "nocrs.tif: has no coordinate reference system"),
        (["--input", str(path), "--month", "0", "--biome", "4"], "month 0 is out of range"),
        (["--input", str(path), "--month", "7", "--biome", "99"], "biome code 99 is out of range"),
        (["--input", str(tmp_path / "absent.tif"), "--month", "7", "--biome", "4"], "absent.tif: no such file"),
        (["--input", str(path), "--month", "7", "--biome", "4"], "no_model_here: no such folder"),
    ]
    for arguments, message in cases:
        code = main(["--model", str(model_dir), "--output", str(output), "--no_progress", *arguments])
        assert code == 2
        assert message in capsys.readouterr().err
        assert not output.exists() and not output.parent.exists()


def test_cli_argument_errors(dn_scene, tmp_path, capsys):
    path, _ = dn_scene
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "m", "--input", str(path), "--output", str(tmp_path / "o.tif")])
    assert exit_info.value.code == 2 and "needs --month" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "m", "--input", str(tmp_path), "--output", str(tmp_path / "o.tif")])
    assert "as --input need --output_dir FOLDER" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "m", "--input", str(path), "--output", str(tmp_path / "o.tif"), "--num_threads", "0"])
    assert "--num_threads must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "o.tif").exists()
    for flag in ("--month", "--biome"):  # tiles carry their own: a scene flag with a tiles folder is a mistake
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", "m", "--input", str(tmp_path), "--output_dir", str(tmp_path / "out"), flag, "13"])
        assert exit_info.value.code == 2
        assert "--month and --biome are for a scene" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_revision_of_a_local_model(full_model_dir, few_tiles, tmp_path, capsys):
    """--revision with a local folder was ignored: the folder was read as it is, exit 0, as if the revision had been
    honoured. Refused before anything is read or written; the Python API refuses it too."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(full_model_dir), "--revision", "v1", "--input", str(few_tiles), "--output_dir",
              str(tmp_path / "out"), "--no_progress"])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"stage2-refine: error: --revision v1: {full_model_dir} is a local path, read as it is; a revision applies "
        "to a Hub repo id: leave it out")
    with pytest.raises(InferenceInputError, match="revision='v1': .* is a local path, read as it is"):
        load_model(full_model_dir, revision="v1")
    from modeling_stage2 import load_trained_model

    with pytest.raises(ValueError, match="revision='v1': .* is a local path, read as it is"):
        load_trained_model(full_model_dir, revision="v1")


def test_cli_argument_errors_with_npz_files(few_tiles, dn_scene, tmp_path, capsys):
    scene, _ = dn_scene
    tile = sorted(few_tiles.rglob("*.npz"))[0]
    upper = tmp_path / "TILE.NPZ"  # the suffix in any case
    shutil.copy(tile, upper)
    need_output_dir = "NPZ tiles (a folder or .npz files) as --input need --output_dir FOLDER"
    for inputs, outputs, message in (
        ([tile], ["--output", str(tmp_path / "x.tif")], need_output_dir),
        ([upper], [], need_output_dir),
        ([tile, upper], ["--output_dir", str(tmp_path / "out"), "--output", str(tmp_path / "x.tif")], need_output_dir),
        ([tile, scene], ["--output", str(tmp_path / "x.tif")], need_output_dir),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", "m", "--input", *map(str, inputs), *outputs, "--no_progress"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "GeoTIFF scene as --input" not in err
    with pytest.raises(SystemExit):
        main(["--model", "m", "--input", str(tile), "--output_dir", str(tmp_path / "out"), "--month", "7"])
    assert "--month and --biome are for a scene" in capsys.readouterr().err
    # Input problems of files are found before the model (absent here) is loaded.
    twin = tmp_path / "twin" / tile.name
    twin.parent.mkdir()
    shutil.copy(tile, twin)
    for arguments, message in (
        ([str(tile), str(twin), "--output_dir", str(tmp_path / "out")], "have the same file name"),
        ([str(tile), "--output_dir", str(tile.parent)], "would overwrite the input"),
        ([str(tile), "--output_dir", str(tmp_path / "out"), "--stage1_dir", str(tmp_path / "nope")],
         f"stage1_dir {tmp_path / 'nope'}: no such folder"),
        ([str(tile), str(scene), "--output_dir", str(tmp_path / "out")], f"input {scene}: a GeoTIFF is a scene"),
        ([str(few_tiles), str(tile), "--output_dir", str(tmp_path / "out")], f"input {few_tiles} is a folder among"),
    ):
        assert main(["--model", str(tmp_path / "no_model_here"), "--input", *arguments, "--no_progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and "no_model_here" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.tif").exists()


def test_cli_scene_outputs_must_be_named_as_geotiffs(dn_scene, tmp_path, capsys):
    scene, _ = dn_scene
    scene_flags = ["--month", "6", "--biome", "4", "--no_progress"]
    for outputs, flag, name in (
        (["--output", str(tmp_path / "x.png")], "--output", "x.png"),
        (["--output", str(tmp_path / "x")], "--output", "x"),
        (["--output", str(tmp_path / "x.TIFF"), "--out_of_range_output", str(tmp_path / "w.npy")],
         "--out_of_range_output", "w.npy"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", "m", "--input", str(scene), *outputs, *scene_flags])
        assert exit_info.value.code == 2
        assert f"{flag} {tmp_path / name}: a scene is written as a GeoTIFF" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scene.tif"]  # nothing written


# ------------------------------------------------------------------------------------------------
# The real tiny refiner
# ------------------------------------------------------------------------------------------------


def tiny_refiner(perturb: bool):
    """A tiny untrained `Stage2RefinerModel`; `perturb` gives its zero-initialised output layer seeded random
    weights, so the refinement is not the identity and depends on each window's context."""
    from modeling_stage2 import Stage2RefinerConfig, Stage2RefinerModel

    torch.manual_seed(0)
    model = Stage2RefinerModel(Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny")).eval()
    if perturb:
        torch.nn.init.normal_(model.head.output_projection.weight, std=0.005)
    return model


@pytest.fixture(scope="module")
def perturbed_tiny_refiner():
    return tiny_refiner(perturb=True)


def test_real_model_reflectance_and_dn_agree_and_batching_does_not_matter(perturbed_tiny_refiner):
    dn = np.stack([smooth_scene(120, 120, seed) for seed in range(2)])
    from_dn = refine_arrays(perturbed_tiny_refiner, dn, [7, -1], [16, -1], batch_size=2)
    from_reflectance = refine_arrays(perturbed_tiny_refiner, dn_to_reflectance(dn), [7, -1], [16, -1], batch_size=1)
    assert from_dn.shape == (2, 4, 120, 120) and from_dn.dtype == np.float32
    np.testing.assert_allclose(from_dn, from_reflectance, atol=1e-5)
    # The perturbed head refines for real, and month/biome reach the model.
    assert np.abs(from_dn - dn_to_reflectance(dn)).mean() > 5e-3
    other_metadata = refine_arrays(perturbed_tiny_refiner, dn[0], 2, 9)
    assert np.abs(other_metadata - from_dn[0]).mean() > 1e-6


def test_real_untrained_model_returns_the_scene_unchanged(small_dn_scene, tmp_path):
    path, data = small_dn_scene
    refine_scene(tiny_refiner(perturb=False), path, tmp_path / "out.tif", 7, 4, progress=False)
    refined, profile = read_geotiff(tmp_path / "out.tif")
    nodata = (data == 0).any(axis=0)
    np.testing.assert_allclose(refined[:, ~nodata], dn_to_reflectance(data)[:, ~nodata], atol=1e-7)
    assert (refined[:, nodata] == 0).all() and profile["crs"] == rasterio.crs.CRS.from_string(CRS)


def _delta_jumps(refined: np.ndarray, reflectance: np.ndarray, axis: int) -> np.ndarray:
    """Mean |step| of the refinement (refined - input) between neighbouring rows (axis 1) or columns (2)."""
    return np.abs(np.diff(refined - reflectance, axis=axis)).mean(axis=(0, 3 - axis))


def test_real_model_float_digital_numbers_warn_once_naming_the_input(perturbed_tiny_refiner):
    # The model warns too when called directly; inference checked the values where it read them, so one warning.
    dn = smooth_scene(120, 120).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refine_arrays(perturbed_tiny_refiner, dn, 7, 4)
    messages = [str(w.message) for w in caught if issubclass(w.category, DigitalNumbersWarning)]
    assert len(messages) == 1 and messages[0].startswith("opt_v1: float values with median"), messages


def test_real_model_blended_scene_is_smooth_across_window_borders(perturbed_tiny_refiner, tmp_path):
    data = smooth_scene(200, 200)
    path = write_geotiff(tmp_path / "scene.tif", data)
    reflectance = dn_to_reflectance(data)
    single_pass = refine_arrays(perturbed_tiny_refiner, data, 7, 4)
    outputs = {}
    for overlap in (0, 32):
        refine_scene(perturbed_tiny_refiner, path, tmp_path / f"{overlap}.tif", 7, 4, overlap=overlap, progress=False)
        outputs[overlap] = read_geotiff(tmp_path / f"{overlap}.tif")[0]
    # Windows at 0 and 80 (a 200 px scene): without blending the two windows are averaged with equal weights
    # over rows/columns 80..119, and the steps where that starts or ends (indices 79, 119) stand out from every
    # other step; with the blend no step does.
    for axis in (1, 2):
        hard = _delta_jumps(outputs[0], reflectance, axis)
        blended = _delta_jumps(outputs[32], reflectance, axis)
        assert max(hard[79], hard[119]) > 4 * np.median(hard)  # 4.6-11.6x over random inits (seeds 0-3)
        assert blended.max() < 2.5 * np.median(blended)
    # A ViT sees a window's context, so tiles differ from one pass over the scene, but only a little.
    change = np.abs(single_pass - reflectance).mean()
    assert np.abs(outputs[32] - single_pass).mean() < 0.35 * change


# ------------------------------------------------------------------------------------------------
# Command line with a saved tiny model (a full model folder and a trained adapter folder)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_model_dir(tmp_path_factory, perturbed_tiny_refiner) -> Path:
    folder = tmp_path_factory.mktemp("models") / "full"
    perturbed_tiny_refiner.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_model_dir(tmp_path_factory) -> Path:
    from modeling_stage2 import Stage2RefinerConfig, build_trainable_model, save_trained_model

    torch.manual_seed(1)
    model = build_trainable_model(
        Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny"), quantization="none", print_summary=False
    )
    with torch.no_grad():  # as if trained: the head's zero-initialised output layer is no longer zero
        head = model.base_model.model.head.modules_to_save["default"]
        torch.nn.init.normal_(head.output_projection.weight, std=0.005)
    folder = tmp_path_factory.mktemp("models") / "adapter"
    save_trained_model(model, folder)
    return folder


def test_cli_tiles_end_to_end_with_a_full_model_folder(
    full_model_dir, perturbed_tiny_refiner, few_tiles, tmp_path, capsys
):
    output = tmp_path / "refined"
    assert main(["--model", str(full_model_dir), "--input", str(few_tiles), "--output_dir", str(output),
                 "--batch_size", "3", "--device", "cpu", "--no_progress"]) == 0
    assert "refined 3 tiles" in capsys.readouterr().out
    paths = sorted(few_tiles.rglob("*.npz"))
    tiles = [load_npz(path) for path in paths]
    bands = np.stack([np.stack([tile[key] for key in ("s2_b2", "s2_b3", "s2_b4", "s2_b8")]) for tile in tiles])
    # The saved folder holds the weights of the in-memory model.
    expected = refine_arrays(
        perturbed_tiny_refiner, bands, [int(t["month"]) for t in tiles], [int(t["biome_code"]) for t in tiles]
    )
    for path, tile, image in zip(paths, tiles, expected):
        out = load_npz(output / path.relative_to(few_tiles))
        np.testing.assert_allclose(out["refined"], image, atol=1e-5)
        assert np.abs(out["refined"] - tile_reflectance(tile)).mean() > 1e-3  # it did refine
        assert "out_of_range_weight" not in out  # built without out_of_range_fallback


def test_cli_sigterm_while_a_scene_is_written_leaves_no_partial_file(full_model_dir, tmp_path):
    """The real script, stopped by SIGTERM mid-scene: the partial GeoTIFF is removed, an earlier output is kept, and
    the exit status is 128 + 15 (`modeling_stage2._signals`)."""
    import signal

    scene = write_geotiff(tmp_path / "scene.tif", smooth_scene(720, 720))  # 64 windows: seconds on the CPU
    output = tmp_path / "refined.tif"
    output.write_bytes(b"an earlier run's output")
    process = subprocess.Popen(
        [sys.executable, "-m", "inference_stage2", "--model", str(full_model_dir), "--input", str(scene),
         "--output", str(output), "--month", "6", "--biome", "4", "--device", "cpu", "--batch_size", "1",
         "--num_threads", "1", "--no_progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".refined.tif.partial-*")):  # the windows are being refined and written
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert "Traceback" not in process.stderr.read()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["refined.tif", "scene.tif"]
    assert output.read_bytes() == b"an earlier run's output"


def test_cli_npz_files_as_a_subprocess(full_model_dir, perturbed_tiny_refiner, few_tiles, tmp_path):
    paths = sorted(few_tiles.rglob("*.npz"))
    output = tmp_path / "refined"

    def refine(*inputs: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "inference_stage2", "--model", str(full_model_dir),
                               "--input", *map(str, inputs), "--output_dir", str(output), "--device", "cpu",
                               "--no_progress"], capture_output=True, text=True, timeout=300)

    result = refine(paths[0])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"refined 1 tiles into {output}" in result.stdout
    assert [p.name for p in output.iterdir()] == [paths[0].name]
    tile = load_npz(paths[0])
    expected = refine_arrays(perturbed_tiny_refiner, tile_reflectance(tile), int(tile["month"]),
                             int(tile["biome_code"]))
    np.testing.assert_allclose(load_npz(output / paths[0].name)["refined"], expected, atol=1e-5)
    # A bad tile among files (as a shell glob gives them): exit 1, the others written, the bad one named once.
    bad = tmp_path / "bad" / "truncated.npz"
    bad.parent.mkdir()
    bad.write_bytes(paths[0].read_bytes()[:500])
    result = refine(paths[1], bad, paths[2])
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    rejected = [line for line in result.stderr.splitlines() if line.startswith("rejected")]
    assert len(rejected) == 1 and rejected[0].startswith(f"rejected: {bad}: cannot be read as an NPZ file"), rejected
    assert rejected[0].count(str(bad)) == 1 and "1 tile(s) rejected" in result.stderr
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in paths)
    assert not (output / bad.name).exists()
    # Every tile bad: nothing refined is no partial success (1 said "the others were written").
    result = refine(bad)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines()[-2:] == ["1 tile(s) rejected", "stage2-refine: error: every tile was rejected "
                                               "(above); nothing was refined"]
    assert "refined 0 tiles" not in result.stdout  # only the error says what happened


def test_cli_scene_from_four_band_files_with_an_adapter_folder(adapter_model_dir, small_dn_scene, tmp_path):
    path, data = small_dn_scene
    band_paths = write_band_files(tmp_path, data, nodata=0)
    output = tmp_path / "refined.tif"
    assert main(["--model", str(adapter_model_dir), "--input", *map(str, band_paths), "--month", "7", "--biome", "4",
                 "--output", str(output), "--overlap", "32", "--batch_size", "4", "--no_progress"]) == 0
    from inference_stage2 import load_model

    refine_scene(load_model(adapter_model_dir), path, tmp_path / "in_process.tif", 7, 4, batch_size=4, progress=False)
    refined, profile = read_geotiff(output)
    expected, expected_profile = read_geotiff(tmp_path / "in_process.tif")
    np.testing.assert_allclose(refined, expected, atol=1e-5)
    assert profile == expected_profile and profile["crs"] == rasterio.crs.CRS.from_string(CRS)
    nodata = (data == 0).any(axis=0)
    assert (refined[:, nodata] == 0).all()
    assert np.abs(refined[:, ~nodata] - dn_to_reflectance(data)[:, ~nodata]).mean() > 1e-3


def test_cli_truncated_scene_is_one_line_and_leaves_no_output(full_model_dir, dn_scene, tmp_path, capsys):
    path, _ = dn_scene
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the header opens, the pixels stop
    output = tmp_path / "out" / "refined.tif"
    code = main(["--model", str(full_model_dir), "--input", str(truncated), "--month", "7", "--biome", "4",
                 "--output", str(output), "--no_progress"])
    assert code == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after transformers' weight-loading bar
    assert "Traceback" not in err and line.startswith(f"stage2-refine: error: {truncated}: rows ")
    assert "damaged or truncated" in line
    assert not output.exists() and not list((tmp_path / "out").glob(".*partial*"))


def test_cli_missing_model_files_exit_2_and_leave_no_output(
    full_model_dir, adapter_model_dir, dn_scene, tmp_path, capsys
):
    path, _ = dn_scene
    broken_full = tmp_path / "broken_full"
    shutil.copytree(full_model_dir, broken_full)
    (broken_full / "model.safetensors").unlink()
    broken_adapter = tmp_path / "broken_adapter"
    shutil.copytree(adapter_model_dir, broken_adapter)
    (broken_adapter / "base_model.safetensors").unlink()
    not_a_model = tmp_path / "empty_model"
    not_a_model.mkdir()
    damaged = {}
    for name in ("no_weights", "truncated_weights", "bad_adapter_config", "truncated_base"):
        damaged[name] = tmp_path / name
        shutil.copytree(adapter_model_dir, damaged[name])
    for name in ("truncated_full", "list_config"):
        damaged[name] = tmp_path / name
        shutil.copytree(full_model_dir, damaged[name])
    for weights in (damaged["truncated_full"] / "model.safetensors",
                    damaged["truncated_base"] / "base_model.safetensors"):
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # the header intact, the data cut
    (damaged["list_config"] / "config.json").write_text("[]")
    (damaged["no_weights"] / "adapter_model.safetensors").unlink()  # peft would take the path for a Hub repo id
    weights = damaged["truncated_weights"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    (damaged["bad_adapter_config"] / "adapter_config.json").write_text('{"r": 8,')
    output = tmp_path / "out" / "refined.tif"
    for model, message in (
        (broken_full, "broken_full: could not be loaded"),
        (broken_adapter, "base_model.safetensors is missing"),
        (damaged["no_weights"], "no_weights/adapter_model.safetensors: missing"),
        (damaged["truncated_weights"], "truncated_weights/adapter_model.safetensors: not a readable safetensors"),
        (damaged["bad_adapter_config"], "bad_adapter_config/adapter_config.json: not valid JSON"),
        (damaged["truncated_full"], "truncated_full/model.safetensors: not a readable safetensors file"),
        (damaged["truncated_base"], "truncated_base/base_model.safetensors: not a readable safetensors file"),
        (damaged["list_config"], "list_config/config.json: holds a JSON list, expected an object"),
        (not_a_model, "has neither config.json"),
        (full_model_dir / "config.json", "config.json: is a file"),
    ):
        code = main(["--model", str(model), "--input", str(path), "--month", "7", "--biome", "4",
                     "--output", str(output), "--no_progress"])
        assert code == 2
        assert message in capsys.readouterr().err
        assert not output.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where torch has no CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(full_model_dir, adapter_model_dir, few_tiles, tmp_path):
    from inference_stage2 import InferenceInputError, load_model

    for folder in (full_model_dir, adapter_model_dir):
        with pytest.raises(InferenceInputError, match="device 'cuda' was asked for, but torch sees no CUDA GPU"):
            load_model(folder, device="cuda")
    # As a command: one line on stderr, exit status 2 (a user error), nothing written.
    result = subprocess.run([sys.executable, "-m", "inference_stage2", "--model", str(adapter_model_dir),
                             "--input", str(few_tiles), "--output_dir", str(tmp_path / "out"), "--device", "cuda",
                             "--no_progress"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "no CUDA GPU" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_device_torch_does_not_know_is_a_clear_error(full_model_dir, few_tiles, tmp_path, capsys):
    from inference_stage2 import InferenceInputError, load_model

    with pytest.raises(InferenceInputError, match="device 'gpu' is not a torch device .*e.g. 'cpu', 'cuda'"):
        load_model(full_model_dir, device="gpu")
    assert main(["--model", str(full_model_dir), "--input", str(few_tiles), "--output_dir", str(tmp_path / "out"),
                 "--device", "gpu", "--no_progress"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "device 'gpu' is not a torch device" in line and not (tmp_path / "out").exists()


def test_load_model_takes_a_hub_repo_id(full_model_dir, monkeypatch):
    import huggingface_hub

    from inference_stage2 import load_model
    from modeling_stage2.hub import HubUnavailableError

    requested = []

    def fake_download(repo_id, **kwargs):
        requested.append(repo_id)
        return str(full_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = load_model("my-org/stage2-refiner")
    assert requested == ["my-org/stage2-refiner"] and not model.training
    image = smooth_scene(120, 120)
    from_folder = refine_arrays(load_model(full_model_dir), image, 7, 4)
    np.testing.assert_array_equal(refine_arrays(model, image, 7, 4), from_folder)

    def missing(repo_id, **kwargs):  # the Hub's answer for a repo that does not exist (or cannot be read)
        import httpx2
        from huggingface_hub.errors import RepositoryNotFoundError

        request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        raise RepositoryNotFoundError("404 Client Error.\nRepository Not Found",
                                      response=httpx2.Response(404, request=request))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(InferenceInputError, match=r"my-org/stage2-refiner: not a local folder, and downloading it "
                                                  r"from the Hub failed \(RepositoryNotFoundError: 404 Client Error\. "
                                                  r"Repository Not Found\)$"):
        load_model("my-org/stage2-refiner")

    def offline(repo_id, **kwargs):  # not the name's fault: a command exits 1, not 2
        raise OSError("cannot reach the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(HubUnavailableError, match="my-org/stage2-refiner: not a local folder, and downloading it"):
        load_model("my-org/stage2-refiner")


# ------------------------------------------------------------------------------------------------
# A refiner built with out_of_range_fallback: where it kept opt_v1, in every output
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fallback_refiner():
    """The perturbed tiny refiner with a range fitted on a smooth scene's spectra (90th percentile): pixels of
    other scenes beyond it keep (some of) `opt_v1`."""
    from modeling_stage2 import Stage2RefinerConfig, Stage2RefinerModel
    from training.spectral_range import fit_spectral_range, set_spectral_range

    torch.manual_seed(0)
    model = Stage2RefinerModel(Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny", out_of_range_fallback=True))
    torch.nn.init.normal_(model.head.output_projection.weight, std=0.005)
    training = torch.from_numpy(dn_to_reflectance(smooth_scene(120, 120, seed=5)))[None]
    set_spectral_range(model, fit_spectral_range(lambda: [(training, None)], model.config.spectral_mlp_log_offset,
                                                 quantile=0.9))
    return model.eval()


def expected_weight(model, reflectance: np.ndarray) -> np.ndarray:
    """The model's own per-pixel weight of `opt_v1` ((4, H, W) reflectance -> (H, W))."""
    with torch.no_grad():
        return model.spectral_range(torch.from_numpy(reflectance)[None])[0, 0].numpy()


def test_refine_arrays_returns_the_models_out_of_range_weight(fallback_refiner, perturbed_tiny_refiner):
    image = dn_to_reflectance(smooth_scene(120, 120, seed=2))
    image[:, 10:20, 30:60] = 0.6  # brighter than anything the range was fitted on
    image[:, 0, 0] = np.nan
    refined, weight = refine_arrays(fallback_refiner, image, 7, 4, return_out_of_range_weight=True)
    np.testing.assert_array_equal(refined, refine_arrays(fallback_refiner, image, 7, 4))
    with torch.no_grad():
        filled = torch.from_numpy(np.nan_to_num(image))[None]
        output = fallback_refiner(filled, torch.tensor([7]), torch.tensor([4]))
    assert weight.shape == (120, 120) and np.isnan(weight[0, 0])
    finite = np.isfinite(weight)
    np.testing.assert_array_equal(weight[finite], output.out_of_range_weight[0, 0].numpy()[finite])
    assert (weight[10:20, 30:60] == 1).all()
    assert 0.02 < float((weight[finite] > 0).mean()) < 0.5  # the 90th percentile: some pixels, not most
    np.testing.assert_allclose(refined[:, 10:20, 30:60], image[:, 10:20, 30:60], atol=1e-6)
    # A model built without the option reports no weight.
    assert refine_arrays(perturbed_tiny_refiner, image, 7, 4, return_out_of_range_weight=True)[1] is None


def test_refined_tiles_carry_the_weight_and_the_cli_reports_its_share(fallback_refiner, few_tiles, tmp_path, capsys):
    model_dir = tmp_path / "fallback"
    fallback_refiner.save_pretrained(model_dir)
    output = tmp_path / "refined"
    # The real tiles lie almost wholly outside the range (99.998 %): tiles of the spectra it was fitted on bring
    # the share down to where a miscount of the kept pixels shows in the one decimal reported.
    arrays = load_npz(next(few_tiles.rglob("*.npz")))
    for seed in (5, 6, 7):
        bands = dict(zip(BAND_KEYS, smooth_scene(120, 120, seed=seed)))
        np.savez(few_tiles / "val" / f"smooth{seed}.npz", **{**arrays, **bands})
    assert main(["--model", str(model_dir), "--input", str(few_tiles), "--output_dir", str(output),
                 "--device", "cpu", "--no_progress"]) == 0
    kept = valid = 0
    for path in sorted(few_tiles.rglob("*.npz")):
        out = load_npz(output / path.relative_to(few_tiles))
        weight = out["out_of_range_weight"]
        assert weight.shape == (120, 120) and weight.dtype == np.float32
        np.testing.assert_allclose(weight, expected_weight(fallback_refiner, tile_reflectance(load_npz(path))),
                                   atol=1e-6)
        kept, valid = kept + int((weight > 0).sum()), valid + weight.size
    assert 0.2 < kept / valid < 0.9  # real tiles, a range fitted on a synthetic scene: some pixels in, some out
    assert (f"opt_v1 kept, in part or entirely (outside the training spectra, or near-black): "
            f"{100 * kept / valid:.1f} % of valid pixels") in capsys.readouterr().out


def test_a_scene_writes_the_weight_map_beside_it(fallback_refiner, perturbed_tiny_refiner, small_dn_scene, tmp_path,
                                                 capsys):
    _, data = small_dn_scene
    data = data.copy()
    data[:, 20:40, 100:140] = 6000  # a snow-bright block across two windows
    path = write_geotiff(tmp_path / "bright.tif", data, nodata=0)
    model_dir = tmp_path / "fallback"
    fallback_refiner.save_pretrained(model_dir)
    refined_path, weight_path = tmp_path / "refined.tif", tmp_path / "maps" / "kept.tif"
    assert main(["--model", str(model_dir), "--input", str(path), "--month", "7", "--biome", "4", "--output",
                 str(refined_path), "--out_of_range_output", str(weight_path), "--no_progress"]) == 0
    refined, profile = read_geotiff(refined_path)
    weight, weight_profile = read_geotiff(weight_path)
    assert weight.shape == (1, 200, 160) and weight_profile["dtype"] == "float32"
    assert all(weight_profile[key] == profile[key] for key in ("crs", "transform", "width", "height"))
    with rasterio.open(weight_path) as dataset:
        assert dataset.descriptions == ("out_of_range_weight",)
    nodata = (data == 0).any(axis=0)
    assert np.isnan(weight[0, nodata]).all() and (refined[:, nodata] == 0).all()
    reflectance = dn_to_reflectance(data)
    # The weight is a function of the pixel's spectrum: blending the windows leaves it as the model computes it.
    np.testing.assert_allclose(weight[0, ~nodata], expected_weight(fallback_refiner, reflectance)[~nodata], atol=1e-6)
    assert (weight[0, 20:40, 100:140] == 1).all()
    np.testing.assert_allclose(refined[:, 20:40, 100:140], reflectance[:, 20:40, 100:140], atol=1e-6)
    share = float((weight[0, ~nodata] > 0).mean())
    assert 0.02 < share < 0.5
    assert (f"(outside the training spectra, or near-black): {100 * share:.1f} % of valid pixels; weight map "
            f"{weight_path}") in capsys.readouterr().out
    # Asking for the map changes nothing in the refined bands, nor the share reported (API and stage2-refine).
    alone = refine_scene(fallback_refiner, path, tmp_path / "alone.tif", 7, 4, progress=False)
    np.testing.assert_array_equal(read_geotiff(tmp_path / "alone.tif")[0], refined)
    assert alone.out_of_range_path is None and alone.out_of_range_fraction == pytest.approx(share, abs=1e-12)
    assert main(["--model", str(model_dir), "--input", str(path), "--month", "7", "--biome", "4", "--output",
                 str(tmp_path / "cli.tif"), "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert f"(outside the training spectra, or near-black): {100 * share:.1f} % of valid pixels\n" in printed
    assert "weight map" not in printed and files_in(tmp_path / "maps") == ["kept.tif"]
    # A model that keeps opt_v1 nowhere reports no share.
    assert refine_scene(perturbed_tiny_refiner, path, tmp_path / "plain.tif", 7, 4,
                        progress=False).out_of_range_fraction is None


def test_a_weight_map_needs_a_model_that_reports_one(perturbed_tiny_refiner, fallback_refiner, small_dn_scene,
                                                      few_tiles, tmp_path, capsys):
    path, _ = small_dn_scene
    with pytest.raises(InferenceInputError, match="reports no out_of_range_weight.*out_of_range_fallback"):
        refine_scene(perturbed_tiny_refiner, path, tmp_path / "out.tif", 7, 4, out_of_range_output=tmp_path / "w.tif")
    with pytest.raises(InferenceInputError, match="is the output file"):
        refine_scene(fallback_refiner, path, tmp_path / "out.tif", 7, 4, out_of_range_output=tmp_path / "out.tif")
    with pytest.raises(InferenceInputError, match="is an input file"):
        refine_scene(fallback_refiner, path, tmp_path / "out.tif", 7, 4, out_of_range_output=path)
    assert files_in(tmp_path) == [path.name, "tiles"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "unused", "--input", str(few_tiles), "--output_dir", str(tmp_path / "o"),
              "--out_of_range_output", str(tmp_path / "w.tif")])
    assert exit_info.value.code == 2 and "--out_of_range_output is for a scene" in capsys.readouterr().err


def test_a_failing_scene_leaves_neither_file(fallback_refiner, small_dn_scene, tmp_path, monkeypatch):
    path, _ = small_dn_scene
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed midway")
        return original(*args, **kwargs)

    import inference_stage2.scenes as scenes

    original = scenes.predict
    monkeypatch.setattr(scenes, "predict", failing)
    with pytest.raises(RuntimeError, match="killed midway"):
        refine_scene(fallback_refiner, path, tmp_path / "out.tif", 7, 4, out_of_range_output=tmp_path / "w.tif",
                     progress=False)
    assert files_in(tmp_path) == [path.name]


def test_a_device_without_an_index_sends_inputs_to_the_model_s_own_device():
    """`device="cuda"` for a model on cuda:1 (a second GPU, or one that refuses `.to()`: quantized) left the model
    there and sent the inputs to "cuda", the current device, cuda:0. A parameter is faked: no GPU is needed."""
    from types import SimpleNamespace

    from inference_stage2.predict import _prepare_model

    moves = []
    on_second_gpu = SimpleNamespace(device=torch.device("cuda", 1), is_floating_point=lambda: True)
    model = SimpleNamespace(parameters=lambda: iter([on_second_gpu]), eval=lambda: None, to=moves.append)
    assert _prepare_model(model, "cuda") == torch.device("cuda", 1) and moves == []
    assert _prepare_model(model, "cuda:1") == torch.device("cuda", 1) and moves == []
    assert _prepare_model(model, "cpu") == torch.device("cpu") and moves == [torch.device("cpu")]

"""Gaps a mutation audit of `inference_stage2` found: behaviour no other test pinned down (each test names the
plausible bug it catches)."""
from __future__ import annotations

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402

from inference_stage2 import InferenceInputError, PixelSizeWarning, refine_arrays, refine_scene  # noqa: E402
from inference_stage2.raster import SceneSource, output_nodata, to_output  # noqa: E402
from modeling_stage2.bands import BAND_NAMES, DigitalNumbersWarning  # noqa: E402
from test_inference import (  # noqa: E402
    PixelwiseRefiner, dn_to_reflectance, pixelwise_expected, read_geotiff, smooth_scene, write_geotiff,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _described(path, data, description, **kwargs):
    """A single-band GeoTIFF whose band description is `description`."""
    write_geotiff(path, data, **kwargs)
    with rasterio.open(path, "r+") as dataset:
        dataset.set_band_description(1, description)
    return path


# ------------------------------------------------------------------------------------------ values


def test_float_digital_numbers_with_nan_pixels_still_warn():
    """Non-finite pixels are left out of the digital-number check: a NaN in the sample makes the median NaN, which
    compares False with the threshold, and would silence the warning (values kept `np.isfinite`)."""
    numbers = smooth_scene(40, 40).astype(np.float32)
    numbers[:, :8] = np.nan  # a nodata band across the top, as a float scene's edge has
    with pytest.warns(DigitalNumbersWarning, match="look like digital numbers"):
        refine_arrays(PixelwiseRefiner(), numbers, 7, 4)


# ------------------------------------------------------------------------------------------ raster: reading


def test_a_pixel_10_m_wide_but_20_m_tall_is_warned_about(tmp_path):
    """Either side off 10 m warns (`any`, not `all`): a scene resampled in one direction only."""
    path = write_geotiff(tmp_path / "tall.tif", smooth_scene(30, 30), transform=from_origin(500000.0, 5400000.0,
                                                                                           10.0, 20.0))
    with SceneSource(path) as source:
        np.testing.assert_allclose(source.pixel_size_m, (10 / 0.9996, 20 / 0.9996), rtol=1e-4)
        with pytest.warns(PixelSizeWarning, match="pixels are 10 x 20 m on the ground"):
            source.warn_unless_10_m()


def test_a_band_file_s_description_decides_over_its_file_name(tmp_path):
    """Files cut band by band from a stack are often named after the band's position (`scene_b1.tif`: B01 by its
    name); their descriptions name the Sentinel-2 band, and decide (description first, the file name only where it
    names none)."""
    data = smooth_scene(30, 40, seed=5)
    order = ["B04", "B03", "B02", "B08"]  # red, green, blue, NIR
    paths = [_described(tmp_path / f"scene_b{position}.tif", data[[BAND_NAMES.index(name)]], name)
             for position, name in enumerate(order, start=1)]
    with SceneSource(paths) as source:
        assert source.band_order == (2, 1, 0, 3)
        np.testing.assert_array_equal(source.read_rows(0, 30), data)


def test_the_nodata_value_is_the_first_band_s_that_declares_one(tmp_path):
    """B02's file declares no nodata value, the other three declare 0: the scene's nodata is 0 (not the first
    file's None), so that the reflectance output declares it and writes it at nodata pixels, not NaN."""
    data = smooth_scene(30, 40, seed=6)
    data[:, :5] = 0
    paths = [write_geotiff(tmp_path / f"{name}.tif", data[i : i + 1], nodata=None if i == 0 else 0)
             for i, name in enumerate(BAND_NAMES)]
    with SceneSource(paths) as source:
        assert source.nodata_values == [None, 0.0, 0.0, 0.0] and source.nodata == 0
    refine_scene(PixelwiseRefiner(), paths, tmp_path / "out.tif", 7, 4, progress=False)
    refined, profile = read_geotiff(tmp_path / "out.tif")
    assert profile["nodata"] == 0 and (refined[:, :5] == 0).all()


# ------------------------------------------------------------------------------------------ raster: writing


def test_a_digital_number_output_keeps_a_signed_input_s_dtype_and_nodata(tmp_path):
    """An int16 scene with nodata -9999 is written in int16 with nodata -9999 (uint16 cannot hold it)."""
    data = smooth_scene(40, 50, seed=2).astype(np.int16)
    data[:, 30:, :10] = -9999
    path = write_geotiff(tmp_path / "signed.tif", data, nodata=-9999)
    refine_scene(PixelwiseRefiner(), path, tmp_path / "dn.tif", 7, 4, output_scale="dn", progress=False)
    refined, profile = read_geotiff(tmp_path / "dn.tif")
    assert profile["dtype"] == "int16" and profile["nodata"] == -9999
    nodata = (data == -9999).any(axis=0)
    assert (refined[:, nodata] == -9999).all()
    expected = np.rint(pixelwise_expected(dn_to_reflectance(data), 7, 4) / np.float32(1e-4))
    assert np.abs(refined[:, ~nodata].astype(np.int64) - expected[:, ~nodata]).max() <= 1


@pytest.mark.parametrize("nodata", [0.5, 100.25])
def test_a_fractional_nodata_value_is_refused_for_a_digital_number_output(nodata):
    """An integer output cannot hold 0.5: written anyway, no pixel would read as nodata."""
    with pytest.raises(InferenceInputError, match=f"input nodata value {nodata} cannot be stored in the uint16"):
        output_nodata(nodata, np.dtype(np.uint16))
    assert output_nodata(7.0, np.dtype(np.uint16)) == 7.0


@pytest.mark.parametrize("dtype, low, high", [(np.uint16, 1, 65535), (np.int16, -100, 32767)])
def test_digital_numbers_beyond_the_dtype_are_clipped_not_wrapped(dtype, low, high):
    """A refined -0.01 or 7.0 reflectance is the dtype's nearest value (uint16: 0, then 1 off nodata 0), never a
    wrapped-around one (-100 as uint16 is 65436)."""
    dtype = np.dtype(dtype)
    reflectance = np.zeros((4, 1, 2), dtype=np.float32)
    reflectance[:, 0, 0], reflectance[:, 0, 1] = -0.01, 7.0
    block = to_output(reflectance, np.ones((1, 2), dtype=bool), dtype, 0)
    assert block.dtype == dtype
    assert (block[:, 0, 0] == low).all() and (block[:, 0, 1] == high).all()


# ------------------------------------------------------------------------------------------ predict


def test_a_tensor_of_digital_numbers_is_read_as_digital_numbers():
    """An integer tensor keeps its dtype on its way to numpy (only bfloat16, which numpy lacks, becomes float32): cast
    to float, its digital numbers would be taken for reflectance, 10000 times too bright."""
    import torch

    numbers = smooth_scene(20, 30, seed=3).astype(np.int16)
    expected = pixelwise_expected(dn_to_reflectance(numbers), 7, 4)
    np.testing.assert_allclose(refine_arrays(PixelwiseRefiner(), torch.from_numpy(numbers), 7, 4), expected,
                               rtol=1e-6)


class _OneBandRefiner(PixelwiseRefiner):
    """Returns one band where four are due: numpy would broadcast it into every band without a word."""

    def forward(self, opt_v1, month, biome):
        return super().forward(opt_v1, month, biome)[:, :1]


def test_a_model_output_of_another_shape_is_an_error_not_broadcast():
    images = (np.random.default_rng(0).random((2, 4, 8, 8)) * 0.4).astype(np.float32)
    with pytest.raises(RuntimeError, match=r"expected refined images of the input's shape \(2, 4, 8, 8\)"):
        refine_arrays(_OneBandRefiner(), images)


class _WeightInTheFirstBatchOnly(PixelwiseRefiner):
    def forward(self, opt_v1, month, biome):
        from types import SimpleNamespace

        refined = super().forward(opt_v1, month, biome)
        weight = opt_v1[:, :1] * 0 if self.calls == 1 else None
        return SimpleNamespace(refined=refined, out_of_range_weight=weight)


def test_a_weight_for_some_batches_only_is_named_as_such():
    images = (np.random.default_rng(0).random((3, 4, 8, 8)) * 0.4).astype(np.float32)
    with pytest.raises(RuntimeError, match="out_of_range_weight for some batches only"):
        refine_arrays(_WeightInTheFirstBatchOnly(), images, batch_size=2, return_out_of_range_weight=True)


# ------------------------------------------------------------------------------------------ scenes and tiles


class _QuarterWeightRefiner(PixelwiseRefiner):
    """Keeps opt_v1 by a weight of 0.25 where B02 is above 0.15, 0 elsewhere: a share of pixels known exactly."""

    from types import SimpleNamespace as _Namespace

    config = _Namespace(keeps_opt_v1=True, num_months=12, num_biomes=17)

    def forward(self, opt_v1, month, biome):
        weight = (opt_v1[:, :1] > 0.15).float() * 0.25
        return self._Namespace(refined=super().forward(opt_v1, month, biome), out_of_range_weight=weight)


def test_a_scene_records_its_month_and_biome_and_counts_every_pixel_with_a_weight_above_0(tmp_path):
    """The output's tags say what it was refined with (MONTH, BIOME, not swapped), and the kept share counts a pixel
    kept in part (weight 0.25) as kept."""
    data = smooth_scene(60, 70, seed=8)
    data[:, :6] = 0
    path = write_geotiff(tmp_path / "scene.tif", data, nodata=0)
    result = refine_scene(_QuarterWeightRefiner(), path, tmp_path / "out.tif", 7, 4, progress=False,
                          out_of_range_output=tmp_path / "weight.tif")
    with rasterio.open(tmp_path / "out.tif") as dataset:
        tags = dataset.tags()
    assert (tags["MONTH"], tags["BIOME"], tags["OUTPUT_SCALE"], tags["STAGE2_REFINED"]) == ("7", "4", "reflectance",
                                                                                          "true")
    valid = (data != 0).all(axis=0)
    kept = dn_to_reflectance(data)[0] > 0.15
    assert 0.05 < (kept & valid).sum() / valid.sum() < 0.95  # the case at stake
    assert result.out_of_range_fraction == pytest.approx((kept & valid).sum() / valid.sum(), abs=1e-9)


# ------------------------------------------------------------------------------------------ stage2-refine's checks


def _scene_arguments(tmp_path, *flags):
    """stage2-refine on a small scene with a model that does not exist: any check the arguments fail must come
    before the model is looked for, and name the flag (not the model)."""
    scene = write_geotiff(tmp_path / "scene.tif", smooth_scene(30, 30))
    return ["--model", str(tmp_path / "no_model_here"), "--input", str(scene), "--output", str(tmp_path / "o.tif"),
            "--month", "7", "--biome", "4", "--no_progress", *flags]


def test_cli_refuses_batch_size_0_before_looking_for_the_model(tmp_path, capsys):
    """Without the check at the top of `main`, --batch_size 0 was found only by the refiner, after the model had been
    loaded (minutes for a Hub download), or blamed on a missing model."""
    from inference_stage2.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(_scene_arguments(tmp_path, "--batch_size", "0"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--batch_size must be at least 1" in err and "no_model_here" not in err
    assert not (tmp_path / "o.tif").exists()


def test_cli_num_threads_sets_torch_s_threads(tmp_path, capsys):
    """--num_threads is handed to torch (set before anything else, so that it holds even where the run then stops)."""
    import torch

    from inference_stage2.cli import main

    assert torch.get_num_threads() == 1  # the one_torch_thread fixture; it restores torch's own number after
    assert main(_scene_arguments(tmp_path, "--num_threads", "2")) == 2  # no such model
    assert "no_model_here" in capsys.readouterr().err
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("window, overlap", [(64, 64), (64, 65)])
def test_cli_refuses_an_overlap_of_a_whole_window_before_looking_for_the_model(tmp_path, capsys, window, overlap):
    """Windows overlapping by their whole width never advance: refused with the flags' names (`<`, not `<=`) before
    the model is loaded."""
    from inference_stage2.cli import main

    assert main(_scene_arguments(tmp_path, "--window", str(window), "--overlap", str(overlap))) == 2
    err = capsys.readouterr().err
    assert f"need --window >= 1 and 0 <= --overlap < --window, got {window}, {overlap}" in err
    assert "no_model_here" not in err

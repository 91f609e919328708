"""Scenes as real files come: a mask of their own in place of a nodata value, and outputs that are links."""
from __future__ import annotations

import os

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from inference_stage2 import refine_scene  # noqa: E402
from modeling_stage2.bands import BAND_NAMES  # noqa: E402
from test_inference import (  # noqa: E402
    CRS, TRANSFORM, PixelwiseRefiner, dn_to_reflectance, files_in, pixelwise_expected, read_geotiff, smooth_scene,
    write_geotiff,
)


def write_masked(path, data, mask, *, internal=True):
    """A GeoTIFF of `data` without a nodata value, masked (0) by GDAL's per-dataset mask: internal, or a `.msk` file."""
    profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
               "dtype": data.dtype.name, "crs": CRS, "transform": TRANSFORM}
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=internal):
        with rasterio.open(path, "w", **profile) as dataset:
            dataset.write(data)
            dataset.write_mask(mask)
    return path


@pytest.fixture
def masked_scene():
    """150 x 130 px digital numbers, garbage (1) under a mask over rows 0..39 and a block further down."""
    data = smooth_scene(150, 130)
    mask = np.full(data.shape[1:], 255, dtype=np.uint8)
    mask[:40] = 0
    mask[90:100, 60:70] = 0
    data[:, mask == 0] = 1
    return data, mask


def test_a_scene_s_own_mask_marks_its_nodata(masked_scene, tmp_path):
    data, mask = masked_scene
    path = write_masked(tmp_path / "masked.tif", data, mask)
    refine_scene(PixelwiseRefiner(), path, tmp_path / "out.tif", 7, 4, progress=False)
    refined, profile = read_geotiff(tmp_path / "out.tif")
    expected = pixelwise_expected(dn_to_reflectance(data), 7, 4)
    assert np.isnan(profile["nodata"]) and np.isnan(refined[:, mask == 0]).all()  # declared NaN: readers mask them
    np.testing.assert_allclose(refined[:, mask > 0], expected[:, mask > 0], rtol=1e-6)
    # Digital numbers: the masked pixels are the output's nodata value, 0.
    refine_scene(PixelwiseRefiner(), path, tmp_path / "dn.tif", 7, 4, output_scale="dn", progress=False)
    numbers, profile = read_geotiff(tmp_path / "dn.tif")
    assert profile["nodata"] == 0 and (numbers[:, mask == 0] == 0).all() and (numbers[:, mask > 0] > 0).all()


def test_a_band_file_s_mask_beside_it_marks_nodata_in_every_band(masked_scene, tmp_path):
    data, mask = masked_scene
    paths = [write_geotiff(tmp_path / f"{name}.tif", data[i : i + 1]) for i, name in enumerate(BAND_NAMES)]
    paths[2] = write_masked(paths[2], data[2:3], mask, internal=False)  # B04.tif.msk
    assert (tmp_path / "B04.tif.msk").exists()
    refine_scene(PixelwiseRefiner(), paths, tmp_path / "out.tif", 7, 4, progress=False)
    refined = read_geotiff(tmp_path / "out.tif")[0]
    expected = pixelwise_expected(dn_to_reflectance(data), 7, 4)
    assert np.isnan(refined[:, mask == 0]).all()
    np.testing.assert_allclose(refined[:, mask > 0], expected[:, mask > 0], rtol=1e-6)


def test_an_output_that_is_a_link_replaces_the_file_it_names(tmp_path):
    data = smooth_scene(60, 70)
    path = write_geotiff(tmp_path / "scene.tif", data, nodata=0)
    store = tmp_path / "store"
    store.mkdir()
    (store / "refined.tif").write_bytes(b"an earlier run's output")
    (tmp_path / "refined.tif").symlink_to(store / "refined.tif")
    refine_scene(PixelwiseRefiner(), path, tmp_path / "refined.tif", 7, 4, progress=False)
    assert (tmp_path / "refined.tif").is_symlink() and files_in(store) == ["refined.tif"]
    refined = read_geotiff(store / "refined.tif")[0]
    np.testing.assert_allclose(refined, pixelwise_expected(dn_to_reflectance(data), 7, 4), rtol=1e-6)


def test_a_failed_scene_leaves_no_folder_it_made(tmp_path):
    """A scene that failed mid-way into new/deeper/refined.tif removed its partial file but left new/deeper/."""
    path = write_geotiff(tmp_path / "scene.tif", smooth_scene(60, 70), nodata=0)

    class FailingRefiner(PixelwiseRefiner):
        def forward(self, *args, **kwargs):
            raise RuntimeError("the model failed")

    with pytest.raises(RuntimeError, match="the model failed"):
        refine_scene(FailingRefiner(), path, tmp_path / "new" / "deeper" / "refined.tif", 7, 4, progress=False)
    assert files_in(tmp_path) == ["scene.tif"]


def test_what_a_killed_run_left_is_removed_by_the_next_run_of_that_output(tmp_path):
    """A run killed by SIGKILL leaves its hidden partial scene (it can be gigabytes); nothing removed it, ever. The next
    run writing the same output removes those whose process is gone, and keeps a live process's and other outputs'."""
    import subprocess

    path = write_geotiff(tmp_path / "scene.tif", smooth_scene(60, 70), nodata=0)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no process has now
    live = os.getppid()
    left = tmp_path / f".refined.tif.partial-{gone.pid}-0123abcd.tif"
    kept = [tmp_path / f".refined.tif.partial-{live}-0123abcd.tif", tmp_path / f".other.tif.partial-{gone.pid}-0a.tif"]
    for partial in (left, *kept):
        partial.write_bytes(b"half a scene")
    refine_scene(PixelwiseRefiner(), path, tmp_path / "refined.tif", 7, 4, progress=False)
    assert files_in(tmp_path) == sorted(["scene.tif", "refined.tif", *(p.name for p in kept)])


@pytest.mark.parametrize("nodata", [0.5, -9999.0, 1e-3, 0.0])
def test_no_valid_pixel_reads_as_nodata_through_gdal(tmp_path, nodata):
    """GDAL masks a float32 within about 4 epsilons of a non-zero nodata (up to 7 float steps from 0.5); `to_output`
    moved a valid pixel equal to the nodata one step, and left those a few steps away: masked on reading."""
    from inference_stage2.raster import to_output

    steps = []
    for direction in (np.inf, -np.inf):
        near = np.float32(nodata)
        for _ in range(12):
            steps.append(near)
            near = np.nextafter(near, np.float32(direction))
    reflectance = np.repeat(np.array(steps, np.float32)[None, None, :], 4, axis=0)
    valid = np.ones(reflectance.shape[1:], bool)
    valid[0, 0] = False  # one nodata pixel: it stays nodata
    block = to_output(reflectance, valid, np.dtype(np.float32), nodata)
    profile = {"driver": "GTiff", "width": block.shape[2], "height": 1, "count": 4, "dtype": "float32",
               "nodata": nodata, "crs": CRS, "transform": TRANSFORM}
    with rasterio.open(tmp_path / "out.tif", "w", **profile) as dataset:
        dataset.write(block)
    with rasterio.open(tmp_path / "out.tif") as dataset:
        masks = dataset.read_masks()
    assert (masks[:, valid] == 255).all() and (masks[:, ~valid] == 0).all()
    moved = np.abs(block[:, valid].astype(np.float64) - reflectance[:, valid])
    assert moved.max() <= max(10 * np.finfo(np.float32).eps * abs(nodata), 2e-45)  # the margin, a step or two

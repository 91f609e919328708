"""Gaps a second mutation audit of `inference_stage2` found: behaviour no other test pinned down (each test names the
plausible bug it catches). Tiles of different months in one batch keep their own month, a weight map declares its
NaN nodata, an output that is an input through a link or another spelling is refused, hidden files in a tiles folder
are no tiles, a pixel missing in one band stays unrefined under an explicit input scale, `batch_size` below 1 is
refused by name, a share of 0 kept pixels is reported as 0 (not as no share), and `device="cuda:0"` moves a model that
is on another GPU. A third audit: a scene without a geotransform and an `output_scale` `refine_scene` does not know are
refused, under an explicit input scale a tile or a Stage 1 `opt_v1` of another size is rejected by name, and a scene
in which no pixel was kept reports a share of 0."""
from __future__ import annotations

import numpy as np
import pytest
import torch

rasterio = pytest.importorskip("rasterio")

from _data_helpers import tile_arrays, write_tile  # noqa: E402
from data_builders.tiles import BAND_KEYS  # noqa: E402
from inference_stage2 import InferenceInputError, refine_scene, refine_tiles  # noqa: E402
from test_inference import (  # noqa: E402
    PixelwiseRefiner, dn_to_reflectance, load_npz, pixelwise_expected, read_geotiff, smooth_scene, tile_reflectance,
    write_geotiff,
)
from test_inference_mutation_gaps import _QuarterWeightRefiner  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------ tiles


def test_tiles_of_different_months_in_one_batch_are_each_refined_with_their_own(tmp_path):
    """Every tile of the bundled sample is of June: a batch handed the first tile's month for all (or a month list
    out of step with the tiles) went unseen. Three months and biomes in one batch, each tile refined with its own."""
    folder = tmp_path / "tiles"
    metadata = {"a": (1, 3), "b": (7, 0), "c": (12, 16)}
    for seed, (name, (month, biome)) in enumerate(metadata.items()):
        write_tile(folder, name, seed=seed, s1=False, month=month, biome=biome)
    summary = refine_tiles(PixelwiseRefiner(), folder, tmp_path / "out", batch_size=3, progress=False)
    assert sorted(summary.written) == ["a.npz", "b.npz", "c.npz"]
    for name, (month, biome) in metadata.items():
        out = load_npz(tmp_path / "out" / f"{name}.npz")
        assert (int(out["month"]), int(out["biome_code"])) == (month, biome)
        expected = pixelwise_expected(tile_reflectance(load_npz(folder / f"{name}.npz")), month, biome)
        np.testing.assert_allclose(out["refined"], expected, rtol=1e-6, atol=1e-7)


def test_hidden_npz_files_in_a_tiles_folder_are_not_tiles(tmp_path):
    """macOS leaves `._<name>.npz` (AppleDouble) beside each tile copied to a foreign disk: read as tiles they were
    rejected, making the run a partial failure (exit 1), or refined as junk. Hidden files are skipped like hidden
    folders."""
    folder = tmp_path / "tiles"
    write_tile(folder, "tile", seed=1, s1=False)
    (folder / "._tile.npz").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    summary = refine_tiles(PixelwiseRefiner(), folder, tmp_path / "out", progress=False)
    assert summary.written == ["tile.npz"] and summary.rejected == []


@pytest.mark.parametrize("batch_size", [0, -1])
def test_tiles_refuse_a_batch_size_below_1_by_name(tmp_path, batch_size):
    """-1 made `range` empty: nothing refined, nothing rejected, a success with no output; 0 a bare `range()` error."""
    folder = tmp_path / "tiles"
    write_tile(folder, "tile", s1=False)
    with pytest.raises(InferenceInputError, match=f"batch_size must be at least 1, got {batch_size}"):
        refine_tiles(PixelwiseRefiner(), folder, tmp_path / "out", batch_size=batch_size, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_pixel_missing_in_one_band_stays_unrefined_under_an_explicit_input_scale(tmp_path):
    """Floats holding digital numbers, read with `input_scale="dn"` (not the scale `"auto"` reads floats with): the
    builders' check sets a pixel with a NaN band to 0 in every band; without marking it NaN again it was refined as a
    black pixel and written as a refined value."""
    folder = tmp_path / "tiles"
    arrays = tile_arrays(seed=4, s1=False)
    bands = {key: arrays[key].astype(np.float32) for key in BAND_KEYS}
    bands["s2_b3"][5, 7] = np.nan
    write_tile(folder, "tile", {**arrays, **bands})
    summary = refine_tiles(PixelwiseRefiner(), folder, tmp_path / "out", input_scale="dn", progress=False)
    assert summary.written == ["tile.npz"]
    refined = load_npz(tmp_path / "out" / "tile.npz")["refined"]
    assert np.isnan(refined[:, 5, 7]).all() and np.isfinite(refined).sum() == 4 * (120 * 120 - 1)
    expected = pixelwise_expected(dn_to_reflectance(np.stack([arrays[key] for key in BAND_KEYS])), 6, 12)
    np.testing.assert_allclose(refined[:, 6:], expected[:, 6:], rtol=1e-6, atol=1e-7)


class _NothingKeptRefiner(_QuarterWeightRefiner):
    """Reports a weight of 0 everywhere: the refiner worked on every pixel."""

    def forward(self, opt_v1, month, biome):
        output = super().forward(opt_v1, month, biome)
        return self._Namespace(refined=output.refined, out_of_range_weight=output.out_of_range_weight * 0)


def test_tiles_in_which_no_pixel_was_kept_report_a_share_of_0(tmp_path):
    """None means the model reports no weight (and `stage2-refine` prints no line); a share of 0 is a result."""
    folder = tmp_path / "tiles"
    write_tile(folder, "tile", s1=False)
    summary = refine_tiles(_NothingKeptRefiner(), folder, tmp_path / "out", progress=False)
    assert summary.out_of_range_fraction == 0.0
    assert (load_npz(tmp_path / "out" / "tile.npz")["out_of_range_weight"] == 0).all()


# ------------------------------------------------------------------------------------------ scenes


def test_the_weight_map_declares_its_nan_nodata(tmp_path):
    """The weight map is NaN at nodata pixels and says so (nodata NaN in its profile): undeclared, a GIS reads the
    NaN as a value and its statistics and colour ramps come out NaN."""
    data = smooth_scene(40, 50, seed=9)
    data[:, :5] = 0
    path = write_geotiff(tmp_path / "scene.tif", data, nodata=0)
    refine_scene(_QuarterWeightRefiner(), path, tmp_path / "out.tif", 7, 4, progress=False,
                 out_of_range_output=tmp_path / "weight.tif")
    weight, profile = read_geotiff(tmp_path / "weight.tif")
    assert profile["nodata"] is not None and np.isnan(profile["nodata"])
    assert np.isnan(weight[0, :5]).all() and np.isfinite(weight[0, 5:]).all()


def test_an_input_named_through_a_link_or_another_spelling_is_not_overwritten(tmp_path):
    """Outputs are compared with the inputs as the files they are (`resolve`), not as spelled: a link to the scene, or
    `sub/../scene.tif`, written to would replace the scene it names."""
    data = smooth_scene(30, 40, seed=2)
    path = write_geotiff(tmp_path / "scene.tif", data)
    before = path.read_bytes()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.tif").symlink_to(path)
    for output in (tmp_path / "link.tif", tmp_path / "sub" / ".." / "scene.tif"):
        with pytest.raises(InferenceInputError, match=f"output {output} is an input file"):
            refine_scene(PixelwiseRefiner(), path, output, 7, 4, progress=False)
    assert path.read_bytes() == before


# ------------------------------------------------------------------------------------------ predict


def test_a_model_on_another_gpu_is_moved_to_the_device_named_with_its_index():
    """`device="cuda:0"` for a model on cuda:1: "the same device" ignoring the index left the model on cuda:1 and ran
    there, on the GPU the caller had steered away from. A parameter is faked: no GPU is needed."""
    from types import SimpleNamespace

    from inference_stage2.predict import _prepare_model

    moves = []
    on_second_gpu = SimpleNamespace(device=torch.device("cuda", 1), is_floating_point=lambda: True)
    model = SimpleNamespace(parameters=lambda: iter([on_second_gpu]), eval=lambda: None, to=moves.append)
    assert _prepare_model(model, "cuda:0") == torch.device("cuda", 0) and moves == [torch.device("cuda", 0)]


# ------------------------------------------------------------------------------------------ third audit


def test_a_scene_without_a_geotransform_is_refused_by_name(tmp_path):
    """A GeoTIFF with a CRS but no geotransform (GDAL's identity: 1 unit per pixel from 0, 0) was refined and written
    on that placeholder grid: an output that lies nowhere, read as 1 m pixels."""
    from rasterio.transform import Affine

    path = write_geotiff(tmp_path / "scene.tif", smooth_scene(20, 30, seed=1), transform=Affine.identity())
    with pytest.raises(InferenceInputError, match=f"{path}: has no geotransform"):
        refine_scene(PixelwiseRefiner(), path, tmp_path / "out.tif", 7, 4, progress=False)
    assert not (tmp_path / "out.tif").exists()


def test_refine_scene_refuses_an_output_scale_it_does_not_know(tmp_path):
    """`stage2-refine` offers only the choices; the API took any other spelling ("DN", "digital") for digital numbers
    and wrote an integer scene the caller had not asked for."""
    path = write_geotiff(tmp_path / "scene.tif", smooth_scene(20, 30, seed=1))
    with pytest.raises(InferenceInputError, match="output_scale must be one of .*got 'DN'"):
        refine_scene(PixelwiseRefiner(), path, tmp_path / "out.tif", 7, 4, output_scale="DN", progress=False)
    assert not (tmp_path / "out.tif").exists()


def test_a_tile_of_another_size_is_rejected_under_an_explicit_input_scale(tmp_path):
    """Floats holding digital numbers, read with `input_scale="dn"`, skip the data builders' checks: a 60 x 60 tile was
    refined at 60 x 60 and written as a tile (or, batched with 120 x 120 ones, crashed the run) instead of being
    rejected by name."""
    folder = tmp_path / "tiles"
    small = tile_arrays(seed=2, size=60, s1=False)
    write_tile(folder, "small", {**small, **{key: small[key].astype(np.float32) for key in BAND_KEYS}})
    write_tile(folder, "tile", seed=3, s1=False)
    summary = refine_tiles(PixelwiseRefiner(), folder, tmp_path / "out", input_scale="dn", progress=False)
    assert summary.written == ["tile.npz"] and not (tmp_path / "out" / "small.npz").exists()
    [(path, reason)] = summary.rejected
    assert path == str(folder / "small.npz")
    assert f"key {BAND_KEYS[0]!r} has shape (60, 60), expected (120, 120)" in reason


def test_a_stage1_opt_v1_of_another_size_is_rejected_under_an_explicit_input_scale(tmp_path):
    """Float digital numbers as opt_v1, read with `input_scale="dn"` (not the scale `"auto"` reads floats with): the
    shape went unchecked, and a (4, 60, 60) opt_v1 crashed the run at the metrics instead of rejecting its tile."""
    folder, stage1 = tmp_path / "tiles", tmp_path / "stage1"
    write_tile(folder, "tile", seed=3, s1=False)
    stage1.mkdir()
    np.savez(stage1 / "tile.npz", opt_v1=np.full((4, 60, 60), 1000.0, np.float32))
    summary = refine_tiles(PixelwiseRefiner(), folder, tmp_path / "out", stage1, input_scale="dn", progress=False)
    assert summary.written == []
    [(path, reason)] = summary.rejected
    assert path == str(folder / "tile.npz") and "key 'opt_v1' has shape (4, 60, 60), expected (4, 120, 120)" in reason


def test_a_scene_in_which_no_pixel_was_kept_reports_a_share_of_0(tmp_path):
    """The scene's counterpart of the tiles' test above: a share counted only where some pixel was kept gave None for
    0, and `stage2-refine` printed "no valid pixel" (or nothing) for a scene refined everywhere."""
    path = write_geotiff(tmp_path / "scene.tif", smooth_scene(20, 30, seed=1))
    result = refine_scene(_NothingKeptRefiner(), path, tmp_path / "out.tif", 7, 4, progress=False)
    assert result.out_of_range_fraction == 0.0

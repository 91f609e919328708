"""Tests closing gaps a mutation audit of data_builders.tiles (the NPZ tile reader) and data_builders.inspect
(stage2-inspect, plot_sample) found: behaviour each mutation changed while every other test still passed. Each names,
in its docstring or name, the behaviour it pins."""
from __future__ import annotations

import json

import numpy as np
import pytest
from _data_helpers import tile_arrays, write_tile
from test_npz_safety import npy_bytes, write_npz

from data_builders.inspect import describe_dataset, main as inspect_main
from data_builders.tiles import BAND_NAMES, NPZ_MAX_BYTES, TileError, read_sidecar, read_tile


# ----------------------------------------------------------------------------- tiles: errors
def test_a_tile_error_reads_path_key_and_problem_on_one_line(tmp_path):
    """`str(error)` is "<path>: '<key>': <problem>": the key is what tells a user which band to fix."""
    arrays = tile_arrays()
    arrays["s2_b3"] = arrays["s2_b3"][:100]
    path = write_tile(tmp_path, "short", arrays)
    with pytest.raises(TileError) as caught:
        read_tile(path)
    assert str(caught.value) == f"{path}: 's2_b3': shape (100, 120) does not match s2_b2 (120, 120)"


# ----------------------------------------------------------------------------- tiles: NPZ members
def test_a_band_saved_as_npy_format_version_3_is_read(tmp_path):
    """numpy reads .npy version 3.0 (a UTF-8 header): such a tile is valid, not 'corrupt'."""
    arrays = tile_arrays()
    path = tmp_path / "v3.npz"
    write_npz(path, {f"{key}.npy": npy_bytes(np.asarray(value), (3, 0) if key == "s2_b4" else None)
                        for key, value in arrays.items()})
    tile = read_tile(path)
    np.testing.assert_array_equal(tile.target[2], (arrays["s2_b4"] * 1e-4).astype(np.float32))


@pytest.mark.parametrize("order", ["C", "F"])  # C: the plain reader; F: the np.load path
def test_the_decompression_limit_counts_all_members_together(tmp_path, order):
    """Two members of ~40 MB each are within NPZ_MAX_BYTES one by one, not together: the second is refused before
    it is inflated (a small zip can hold gigabytes of zeros)."""
    rows = NPZ_MAX_BYTES * 5 // 8 // 4096
    big = np.zeros((rows, 4096), np.uint8, order=order)
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, **{**tile_arrays(s1=False), "extra_a": big, "extra_b": big})
    with pytest.raises(TileError) as caught:
        read_tile(path)
    assert caught.value.key == "extra_b"
    assert f"exceed the limit of {NPZ_MAX_BYTES} bytes uncompressed per NPZ" in caught.value.problem


def test_a_member_shorter_than_its_header_says_so(tmp_path):
    members = {f"{key}.npy": npy_bytes(np.asarray(value)) for key, value in tile_arrays(s1=False).items()}
    members["s2_b2.npy"] = members["s2_b2.npy"][:-100]
    path = tmp_path / "short.npz"
    write_npz(path, members)
    with pytest.raises(TileError) as caught:
        read_tile(path)
    assert caught.value.key == "s2_b2" and caught.value.problem.endswith(": member shorter than its header")
    assert "\n" not in str(caught.value)


def test_a_missing_file_says_file_not_found_and_given_metadata_is_kept(tmp_path):
    """A tile gone between discovery and reading is "file not found", not "corrupt"; metadata the caller read
    already (the builder's, without `split`) is what the tile carries, the sidecar is not read again."""
    with pytest.raises(TileError) as caught:
        read_tile(tmp_path / "gone.npz")
    assert str(caught.value) == f"{tmp_path / 'gone.npz'}: file not found"
    path = write_tile(tmp_path, "t", sidecar={"source": "on disk", "split": "val"})
    assert read_tile(path, metadata={"source": "given"}).metadata == {"source": "given"}


def test_a_missing_key_lists_what_the_archive_holds(tmp_path):
    arrays = tile_arrays()
    del arrays["s2_b8"]
    with pytest.raises(TileError) as caught:
        read_tile(write_tile(tmp_path, "t", arrays))
    assert caught.value.key == "s2_b8"
    assert caught.value.problem == ("missing key (the archive holds: biome_code, month, s1_vh, s1_vv, s2_b2, s2_b3, "
                                    "s2_b4)")


def test_complex_bands_are_refused_not_cut_to_their_real_part(tmp_path):
    arrays = tile_arrays()
    for key in ("s2_b2", "s2_b3", "s2_b4", "s2_b8"):
        arrays[key] = (arrays[key] * 1e-4 + 0.5j).astype(np.complex64)
    with pytest.raises(TileError) as caught:
        read_tile(write_tile(tmp_path, "t", arrays))
    assert caught.value.key == "s2_b2" and caught.value.problem.startswith("non-numeric array of dtype complex64")


def test_a_signed_band_among_unsigned_ones_is_checked_against_the_floor(tmp_path):
    """One int16 band beside uint16 ones: its negative digital numbers are still refused below -0.1."""
    arrays = tile_arrays()
    arrays["s2_b4"] = arrays["s2_b4"].astype(np.int16)
    arrays["s2_b4"][5, 7] = -2000
    with pytest.raises(TileError) as caught:
        read_tile(write_tile(tmp_path, "t", arrays))
    assert caught.value.key == "s2_b4" and caught.value.problem.startswith("reflectance down to -0.2, below")


def test_a_tile_whose_bands_are_never_finite_at_the_same_pixel_is_refused(tmp_path):
    """Every band finite somewhere, but no pixel with all four: no pixel to train on, the tile is refused."""
    arrays = {**tile_arrays(), **{key: np.full((120, 120), 0.2, np.float32) for key in ("s2_b2", "s2_b3", "s2_b4",
                                                                                       "s2_b8")}}
    arrays["s2_b2"][:, :60] = np.nan
    arrays["s2_b3"][:, 60:] = np.nan
    with pytest.raises(TileError) as caught:
        read_tile(write_tile(tmp_path, "t", arrays))
    assert caught.value.key is None and caught.value.problem == "no pixel has all four bands finite"


def test_december_and_the_last_biome_code_are_valid(tmp_path):
    tile = read_tile(write_tile(tmp_path, "t", month=12, biome=16))
    assert (tile.month, tile.biome) == (12, 16)
    with pytest.raises(TileError) as caught:
        read_tile(write_tile(tmp_path, "u", month=13))
    assert caught.value.key == "month" and caught.value.problem.startswith("value 13 outside 1..12")


def test_a_sentinel1_band_that_is_not_numbers_is_refused_by_key(tmp_path):
    arrays = tile_arrays()
    arrays["s1_vh"] = arrays["s1_vh"] > -17  # a mask saved by mistake: 0/1 would pass for backscatter in dB
    with pytest.raises(TileError) as caught:
        read_tile(write_tile(tmp_path, "t", arrays))
    assert caught.value.key == "s1_vh" and caught.value.problem.startswith("non-numeric array of dtype bool")


def test_a_sidecar_nested_too_deeply_is_a_tile_error(tmp_path):
    """json raises RecursionError on deep nesting: a one-line TileError naming the sidecar, not a traceback."""
    sidecar = tmp_path / "t.json"
    sidecar.write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(TileError) as caught:
        read_sidecar(sidecar)
    assert str(caught.value) == f"{sidecar}: sidecar nests too deeply to read; flatten it or delete the file"


def test_a_sidecar_split_of_null_means_no_split(tmp_path):
    from data_builders.tiles import sidecar_split

    assert sidecar_split(tmp_path / "t.json", {"split": None, "source": "x"}) is None
    assert sidecar_split(tmp_path / "t.json", {"split": "Validation"}) == "val"


# ----------------------------------------------------------------------------- stage2-inspect: the build record
def _saved_dataset(path, description: str = "", month=(3, 4), biome=(1, -1), valid=None, levels=(0.25, 0.25)):
    """A `train` split of one tile per `levels` entry, each of that constant reflectance (`valid`: their
    (tiles, 120, 120) mask, all valid by default), with the given `info.description`."""
    import datasets

    image = np.stack([np.full((4, 120, 120), level, np.float32) for level in levels])
    split = datasets.Dataset.from_dict(
        {"tile_id": [f"t{i}" for i in range(len(levels))], "target": image, "opt_v1": image,
         "valid_mask": np.ones((len(levels), 120, 120), bool) if valid is None else valid, "month": list(month),
         "biome": list(biome)},
        features=datasets.Features({
            "tile_id": datasets.Value("string"), "target": datasets.Array3D((4, 120, 120), "float32"),
            "opt_v1": datasets.Array3D((4, 120, 120), "float32"), "valid_mask": datasets.Array2D((120, 120), "bool"),
            "month": datasets.Value("int64"), "biome": datasets.Value("int64")}))
    split.info.description = description
    datasets.DatasetDict({"train": split}).save_to_disk(str(path))
    return path


_BLOCKS = {"source": {}, "input_scale": {}, "opt_v1": {"mode": "identity"}}
_FULL = {band: {"mean": 0.5, "std": 0.1, "min": 0.0, "max": 1.0} for band in BAND_NAMES}


@pytest.mark.parametrize("record", [
    {**_BLOCKS, "input_scale": "dn"},  # one block of three not an object
    {**_BLOCKS, "statistics": {"target": {band: {"mean": 0.5, "std": 0.1} for band in BAND_NAMES}}},  # no min/max
    {**_BLOCKS, "statistics": {"target": _FULL, "opt_v1": {band: {"mean": 0.5} for band in BAND_NAMES}}},  # no std
], ids=["one-block-not-an-object", "target-without-min-max", "opt_v1-without-std"])
def test_inspect_reads_a_partly_hand_written_build_record_without_a_traceback(tmp_path, capsys, record):
    """Each half-complete part of a record is left out, not read until a KeyError/AttributeError (exit 1)."""
    path = _saved_dataset(tmp_path / "ds", json.dumps({"format": "stage2-tiles-dataset", **record}))
    capsys.readouterr()
    assert inspect_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert ("Source:" in out) == ("input_scale" in record and isinstance(record["input_scale"], dict))
    assert "opt_v1 mean" not in out
    if record.get("statistics", {}).get("target") is _FULL:
        assert "  B02        0.5000   0.1000   0.0000   1.0000" in out
    else:
        assert "  B02        0.2500   0.0000   0.2500   0.2500" in out


# ----------------------------------------------------------------------------- stage2-inspect: statistics
def test_computed_statistics_read_no_tile_past_their_limit(tmp_path):
    """"first N tiles" means N: the batch of 64 that reaches past the limit is cut at it."""
    import datasets

    from data_builders.inspect import _computed_statistics

    path = _saved_dataset(tmp_path / "ds", month=(1, 2, 3), biome=(0, 0, 0), levels=(0.1, 0.3, 0.9))
    stats = _computed_statistics(datasets.load_from_disk(str(path))["train"], max_tiles=2)
    assert stats["B02"]["mean"] == pytest.approx(0.2) and stats["B08"]["max"] == pytest.approx(0.3)


def _val_then_train(tmp_path):
    """A dataset whose first split is `val` (one tile of 0.1), then `train` (two of 0.3)."""
    import datasets

    val = datasets.load_from_disk(str(_saved_dataset(tmp_path / "a", levels=(0.1,), month=(1,), biome=(0,))))
    train = datasets.load_from_disk(str(_saved_dataset(tmp_path / "b", levels=(0.3, 0.3))))
    datasets.DatasetDict({"val": val["train"], "train": train["train"]}).save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


def test_computed_statistics_come_from_train_even_when_it_is_not_the_first_split(tmp_path):
    report = describe_dataset(_val_then_train(tmp_path))
    assert "Splits: val 1 | train 2 (total 3)" in report
    assert "(train split, first 2 tiles; reflectance)" in report
    assert "  B02        0.3000   0.0000   0.3000   0.3000" in report


def test_the_preview_draws_train_by_default_even_when_it_is_not_the_first_split(tmp_path, monkeypatch):
    from data_builders import inspect

    drawn = []
    panels = inspect._panels
    monkeypatch.setattr(inspect, "_panels", lambda images, mask: drawn.append(float(images["target"].mean()))
                        or panels(images, mask))
    inspect.plot_tiles(_val_then_train(tmp_path), tmp_path / "p.png", num_tiles=1)
    assert drawn == pytest.approx([0.3])


def test_the_statistics_line_names_how_many_tiles_they_cover(tmp_path, monkeypatch):
    """Past STATS_MAX_TILES the report says "first STATS_MAX_TILES tiles", not the split's size."""
    from data_builders import inspect

    path = _saved_dataset(tmp_path / "ds", levels=(0.1, 0.3, 0.9), month=(1, 2, 3), biome=(0, 0, 0))
    monkeypatch.setattr(inspect, "STATS_MAX_TILES", 2)
    assert "(train split, first 2 tiles; reflectance)" in describe_dataset(path)


def test_the_report_prints_the_recorded_source_and_rejected_count(tmp_path):
    record = {"format": "stage2-tiles-dataset", **_BLOCKS, "source": {"data_dir": "tiles", "sources": {"npz": 2},
                                                                      "rejected": 3}}
    report = describe_dataset(_saved_dataset(tmp_path / "ds", json.dumps(record)))
    assert 'Source: tiles {"npz": 2}; rejected 3' in report.splitlines()


def test_recorded_opt_v1_statistics_show_their_mean_and_std(tmp_path):
    opt_v1 = {band: {"mean": 0.4 + i / 100, "std": 0.05} for i, band in enumerate(BAND_NAMES)}
    record = {"format": "stage2-tiles-dataset", **_BLOCKS, "statistics": {"target": _FULL, "opt_v1": opt_v1}}
    report = describe_dataset(_saved_dataset(tmp_path / "ds", json.dumps(record)))
    assert "(train split, recorded at build time; reflectance)" in report
    assert "  B04        0.5000   0.1000   0.0000   1.0000 |      0.4200   0.0500" in report


# ----------------------------------------------------------------------------- plots
def test_the_stretch_ignores_invalid_pixels_and_survives_a_flat_image():
    """Invalid pixels are 0 in the target: counted, they would set the stretch's low end. A tile without a valid
    pixel gets 0..1; a flat image (one value everywhere) a stretch wider than nothing, so its panel is a colour,
    not NaN."""
    from data_builders.inspect import stretch_limits, true_colour

    image = np.full((4, 10, 10), 0.3, np.float32)
    image[:, :, 5:] = np.linspace(0.2, 0.4, 50, dtype=np.float32).reshape(10, 5)
    image[:, :4] = 0.0
    mask = np.ones((10, 10), bool)
    mask[:4] = False
    low, high = stretch_limits(image, mask)
    assert low == pytest.approx(np.percentile(image[:3, 4:], 2)) and low > 0.19
    assert stretch_limits(image, np.zeros((10, 10), bool)) == (0.0, 1.0)  # no valid pixel: no percentile to take
    flat = np.full((4, 6, 6), 0.25, np.float32)
    limits = stretch_limits(flat, np.ones((6, 6), bool))
    assert limits[0] == pytest.approx(0.25) and limits[1] > limits[0]
    assert np.isfinite(true_colour(flat, limits)).all()


def test_ndvi_panels_share_one_fixed_colour_scale():
    """NDVI is drawn on -1..1 in every panel: scaled to each panel's own range, equal colours would mean different
    NDVI."""
    from data_builders import plot_sample

    image = np.full((4, 8, 8), 0.2, np.float32)
    image[3] = np.linspace(0.2, 0.3, 64).reshape(8, 8)
    figure = plot_sample({"opt_v1": image, "target": image})
    ndvi_images = [axis.images[0] for axis in figure.axes if axis.get_title().endswith("NDVI")]
    assert len(ndvi_images) == 2 and all(shown.get_clim() == (-1, 1) for shown in ndvi_images)


def test_the_preview_spreads_its_tiles_over_the_split(tmp_path, monkeypatch):
    """--num_tiles 2 of 5 tiles draws the first and the last, not the first two, each row labelled with its tile,
    month and biome, the title saying how many of how many; 0 tiles is refused by name."""
    from matplotlib.figure import Figure

    from data_builders import inspect

    path = _saved_dataset(tmp_path / "ds", levels=(0.1, 0.2, 0.3, 0.4, 0.5), month=(1, 2, 3, 4, 5),
                          biome=(10, 11, 12, 13, 14))
    drawn, figures = [], []
    panels, savefig = inspect._panels, Figure.savefig
    monkeypatch.setattr(inspect, "_panels", lambda images, mask: drawn.append(float(images["target"].mean()))
                        or panels(images, mask))
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: figures.append(figure)
                        or savefig(figure, *args, **kwargs))
    inspect.plot_tiles(path, tmp_path / "p.png", num_tiles=2)
    assert drawn == pytest.approx([0.1, 0.5])
    (figure,) = figures
    labels = [axis.get_ylabel() for axis in figure.axes if axis.get_ylabel() and axis.get_ylabel() != "NDVI"]
    assert labels == ["t0\n\nmonth 1, biome 10", "t4\n\nmonth 5, biome 14"]
    assert figure.get_suptitle() == "ds / train: 2 of 5 tiles"
    with pytest.raises(ValueError, match="^num_tiles must be >= 1, got 0$"):
        inspect.plot_tiles(path, tmp_path / "q.png", num_tiles=0)


def test_plot_sample_draws_the_refined_image_a_sample_holds():
    from data_builders import plot_sample

    image = np.full((4, 8, 8), 0.2, np.float32)
    figure = plot_sample({"opt_v1": image, "refined": image * 1.5, "target": image})
    titles = [axis.get_title() for axis in figure.axes if axis.get_title()]
    assert titles == ["opt_v1 (true colour)", "refined (true colour)", "target (true colour)", "opt_v1 NDVI",
                      "refined NDVI", "target NDVI"]


def test_plot_sample_of_a_row_whose_target_is_none_draws_what_it_has():
    from data_builders import plot_sample

    image = np.full((4, 8, 8), 0.2, np.float32)
    figure = plot_sample({"opt_v1": image, "target": None, "valid_mask": None})
    assert [axis.get_title() for axis in figure.axes if axis.get_title()] == ["opt_v1 (true colour)", "opt_v1 NDVI"]


def test_the_preview_of_an_unknown_split_is_one_line_naming_the_splits(tmp_path):
    from data_builders.inspect import plot_tiles

    path = _saved_dataset(tmp_path / "ds")
    with pytest.raises(ValueError) as caught:
        plot_tiles(path, tmp_path / "p.png", split="nope")
    assert str(caught.value) == f"no split 'nope' in {path}; splits: train"

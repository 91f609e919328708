"""Edge cases of the data builders' internals: discovery, the degradation's blur and config, float64 tiles."""
from __future__ import annotations

import json

import numpy as np
import pytest
from _data_helpers import tile_arrays, write_tile

import datasets
from data_builders import build_dataset
from data_builders.degrade import DegradationConfig, resolve_degradation, shift_blur_axis, synthesize_opt_v1
from data_builders.discovery import discover_tiles
from data_builders.tiles import BAND_KEYS, TileError, read_stage1, read_tile
from modeling_stage2._files import partial_path

datasets.disable_progress_bars()


def test_hidden_partial_files_of_an_interrupted_ingest_are_not_tiles(tmp_path):
    # A SIGKILLed stage2-ingest-bigearthnet leaves `.<id>.npz.partial-<pid>-<hex>.npz` beside the tiles: cut short
    # (it was rejected as a corrupt tile, exit status 1) or whole (the tile a second time under another id).
    tile = write_tile(tmp_path / "train", "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_38_58")
    cut = partial_path(tmp_path / "train" / "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_38_59.npz")
    cut.write_bytes(tile.read_bytes()[:3000])
    whole = partial_path(tile)
    whole.write_bytes(tile.read_bytes())
    assert cut.name.startswith(".") and cut.suffix == ".npz"
    splits, rejected = discover_tiles(tmp_path)
    assert [spec.tile_id for spec in splits["train"]] == [tile.stem] and rejected == []


def test_a_blur_far_narrower_than_a_pixel_gives_finite_weights():
    # blur_sigma (0, 0.01) is a valid config; below ~0.016 px every Gaussian tap underflowed and opt_v1 was all NaN
    x = np.random.default_rng(0).uniform(0.0, 0.5, (2, 6, 6)).astype(np.float32)
    half = shift_blur_axis(x, 0.005, 0.5, axis=1)  # centre between two pixels: their mean
    expected = 0.5 * (x + np.concatenate([x[:, 1:], x[:, -1:]], axis=1))
    np.testing.assert_allclose(half, expected, rtol=1e-6)
    np.testing.assert_array_equal(shift_blur_axis(x, 0.005, 0.3, axis=2), x)  # nearest pixel
    target = np.random.default_rng(1).uniform(0.0, 0.5, (4, 120, 120)).astype(np.float32)
    config = DegradationConfig(blur_sigma=(0.0, 0.01))
    for i in range(6):
        opt_v1 = synthesize_opt_v1(target, f"tile_{i}", 0, config)
        assert np.isfinite(opt_v1).all() and 0.0 <= opt_v1.min() and opt_v1.max() <= 1.0


def test_numpy_numbers_in_a_degradation_config_reach_the_build_record(tmp_path):
    config = DegradationConfig(low_freq_grid=np.int64(5), noise_std=np.float32(0.05), max_shift=np.float64(1.0))
    assert type(config.low_freq_grid) is int and type(config.noise_std) is float
    assert json.loads(json.dumps(config.to_dict()))["low_freq_grid"] == 5
    assert resolve_degradation(DegradationConfig(low_freq_grid=np.int64(4)))[0] == "mild"
    write_tile(tmp_path / "tiles" / "train", "a")
    ds = build_dataset(tmp_path / "tiles", tmp_path / "ds", degradation=config)  # was a TypeError at the record
    record = json.loads(ds["train"].info.description)["opt_v1"]
    assert record["degradation"]["low_freq_grid"] == 5 and record["degradation"]["noise_std"] == float(np.float32(0.05))


def test_float64_values_past_float32_range_are_digital_numbers_not_nodata(tmp_path):
    arrays = tile_arrays(s1=False)
    for key in BAND_KEYS:
        arrays[key] = arrays[key] * 1e-4  # float64 reflectance
    arrays["s2_b3"][4, 4] = 1e39  # finite, but Inf in float32: it was masked as a NaN pixel without a word
    with pytest.raises(TileError, match=r"float band values reach 1e\+39: these look like digital numbers"):
        read_tile(write_tile(tmp_path, "huge", arrays))
    opt_v1 = np.full((4, 120, 120), 0.2)
    opt_v1[1, 2, 3] = 1e39
    np.savez(tmp_path / "stage1.npz", opt_v1=opt_v1)
    with pytest.raises(TileError, match=r"float band values reach 1e\+39") as caught:  # not "1 NaN/Inf values"
        read_stage1(tmp_path / "stage1.npz")
    assert caught.value.key == "opt_v1"

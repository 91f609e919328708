"""Reading and validating one tile: the bundled sample, and every kind of bad input."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from _data_helpers import tile_arrays, write_tile

from data_builders.tiles import (
    BAND_KEYS,
    BAND_NAMES,
    UNKNOWN_METADATA,
    TileError,
    read_sidecar,
    read_stage1,
    read_tile,
    sidecar_split,
)


def test_band_names_are_the_contract():
    assert BAND_NAMES == ("B02", "B03", "B04", "B08")
    assert BAND_KEYS == ("s2_b2", "s2_b3", "s2_b4", "s2_b8")


def test_reads_a_real_sample_tile(sample_tiles_dir):
    path = sorted((sample_tiles_dir / "train").glob("*.npz"))[0]
    raw = np.load(path, allow_pickle=False)
    tile = read_tile(path)
    assert tile.tile_id == path.stem
    assert tile.input_scale == "dn"
    assert tile.target.dtype == np.float32 and tile.target.shape == (4, 120, 120)
    expected = (np.stack([raw[k] for k in BAND_KEYS]).astype(np.float64) * 1e-4).astype(np.float32)
    np.testing.assert_array_equal(tile.target, expected)
    assert tile.valid_mask.dtype == bool and tile.valid_mask.all()
    assert tile.month == int(raw["month"]) and tile.biome == int(raw["biome_code"])
    np.testing.assert_array_equal(tile.s1, np.stack([raw["s1_vv"], raw["s1_vh"]]))
    assert tile.metadata["patch_id"] == path.stem and "split" not in tile.metadata


def test_float_reflectance_is_kept_and_nan_pixels_are_masked(tmp_path):
    arrays = tile_arrays(s1=False)
    for key in BAND_KEYS:
        arrays[key] = (arrays[key] * 1e-4).astype(np.float32)
    arrays["s2_b3"][5, 7] = np.nan
    arrays["s2_b8"][0, 0] = np.inf
    tile = read_tile(write_tile(tmp_path, "t", arrays))
    assert tile.input_scale == "reflectance" and tile.s1 is None
    assert tile.valid_mask.sum() == 120 * 120 - 2
    assert not tile.valid_mask[5, 7] and not tile.valid_mask[0, 0]
    assert (tile.target[:, 5, 7] == 0).all() and (tile.target[:, 0, 0] == 0).all()
    expected = np.stack([arrays[key] for key in BAND_KEYS])
    expected[:, ~tile.valid_mask] = 0
    np.testing.assert_array_equal(tile.target, expected)


def _dark_tile(dtype, value) -> dict:
    """A tile whose s2_b4 holds `value` at one pixel (reflectance for floats, digital numbers for ints)."""
    arrays = tile_arrays(s1=False)
    for key in BAND_KEYS:
        arrays[key] = (arrays[key] * 1e-4).astype(dtype) if np.dtype(dtype).kind == "f" else arrays[key].astype(dtype)
    arrays["s2_b4"][7, 7] = value
    return arrays


def test_small_negative_reflectance_is_kept_as_it_is(tmp_path):
    # atmospheric correction over dark water, down to the floor of L2A's BOA offset (-0.1)
    from data_builders.tiles import REFLECTANCE_MIN

    assert REFLECTANCE_MIN == -0.1
    arrays = _dark_tile(np.float32, -0.1)
    arrays["s2_b2"][0, :2] = [-0.02, -0.0999]
    tile = read_tile(write_tile(tmp_path, "dark", arrays))
    assert tile.input_scale == "reflectance" and tile.valid_mask.all()
    np.testing.assert_array_equal(tile.target, np.stack([arrays[key] for key in BAND_KEYS]))  # not clipped
    dn = read_tile(write_tile(tmp_path, "dark_dn", _dark_tile(np.int16, -1000)))  # L2A DN minus the offset
    assert dn.target[2, 7, 7] == np.float32(-0.1)


@pytest.mark.parametrize("dtype,value,shown", [(np.float32, -0.49, "-0.49"), (np.float32, -0.1001, "-0.1001"),
                                               (np.float64, -0.49, "-0.49"), (np.int16, -4900, "-0.49")])
def test_reflectance_below_the_tolerance_names_file_band_and_minimum(tmp_path, dtype, value, shown):
    path = write_tile(tmp_path, "negative", _dark_tile(dtype, value))
    with pytest.raises(TileError) as caught:
        read_tile(path)
    assert caught.value.key == "s2_b4" and f"reflectance down to {shown}," in caught.value.problem
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("value,kept", [(2.5, True), (10.0, True), (10.5, False)])
def test_float_bands_are_reflectance_up_to_the_limit(tmp_path, value, kept):
    """Cloud and snow reach 1.5-2 (and glint more): float bands are reflectance up to 10, digital numbers above."""
    path = write_tile(tmp_path, "bright", _dark_tile(np.float32, value))
    if kept:
        assert read_tile(path).target[2, 7, 7] == np.float32(value)
    else:
        with pytest.raises(TileError, match="float band values reach 10.5: these look like digital numbers"):
            read_tile(path)


def test_the_digital_numbers_of_a_dark_tile_stored_as_floats_are_refused(tmp_path):
    """Water and shadow: digital numbers below 1000 (reflectance 0.1), stored as floats, are not reflectance."""
    arrays = tile_arrays(s1=False)
    for key in BAND_KEYS:
        arrays[key] = (arrays[key] // 5).astype(np.float32)  # 20..799
    with pytest.raises(TileError, match=r"float band values reach 79\d: these look like digital numbers"):
        read_tile(write_tile(tmp_path, "water", arrays))


def test_unknown_month_and_biome_are_accepted(tmp_path):
    tile = read_tile(write_tile(tmp_path, "t", month=UNKNOWN_METADATA, biome=UNKNOWN_METADATA))
    assert (tile.month, tile.biome) == (-1, -1)


def _bad(arrays_change):
    arrays = tile_arrays()
    arrays_change(arrays)
    return arrays


def _pop(key):
    return lambda a: a.pop(key)


def _set(key, value):
    return lambda a: a.__setitem__(key, value)


def _all_nan_b4(a):
    a["s2_b4"] = np.full((120, 120), np.nan, np.float32)
    for key in ("s2_b2", "s2_b3", "s2_b8"):
        a[key] = a[key].astype(np.float32) * 1e-4


BAD_TILES = [
    ("missing band", _pop("s2_b4"), "s2_b4", "missing key"),
    ("missing month", _pop("month"), "month", "missing key"),
    ("missing biome", _pop("biome_code"), "biome_code", "missing key"),
    ("wrong shape", _set("s2_b2", np.zeros((64, 64), np.uint16)), "s2_b2", "expected (120, 120)"),
    ("mismatched shapes", _set("s2_b3", np.zeros((120, 121), np.uint16)), "s2_b3", "does not match"),
    ("3-D band", _set("s2_b8", np.zeros((1, 120, 120), np.uint16)), "s2_b8", "expected a 2-D"),
    ("string band", _set("s2_b2", np.full((120, 120), "x")), "s2_b2", "non-numeric"),
    ("bool band", _set("s2_b2", np.ones((120, 120), bool)), "s2_b2", "non-numeric"),
    ("all-NaN band", _all_nan_b4, "s2_b4", "entirely NaN"),
    ("mixed dtypes", _set("s2_b2", np.ones((120, 120), np.float32)), None, "mix integer and float"),
    ("DN stored as float", lambda a: [a.__setitem__(k, a[k].astype(np.float32)) for k in BAND_KEYS], None,
     "look like digital numbers"),
    ("month 0", _set("month", np.int64(0)), "month", "outside 1..12"),
    ("month 13", _set("month", np.int64(13)), "month", "outside 1..12"),
    ("month not integral", _set("month", np.float64(6.5)), "month", "expected an integer"),
    ("month array", _set("month", np.array([6, 7])), "month", "single number"),
    ("biome 17", _set("biome_code", np.int64(17)), "biome_code", "outside 0..16"),
    ("biome -2", _set("biome_code", np.int64(-2)), "biome_code", "outside 0..16"),
    ("one s1 band", _pop("s1_vh"), "s1_vh", "missing key while 's1_vv' is present"),
    ("s1 wrong shape", _set("s1_vv", np.zeros((60, 60), np.float32)), "s1_vv", "expected (120, 120)"),
]


@pytest.mark.parametrize("name,change,key,problem", BAD_TILES, ids=[case[0] for case in BAD_TILES])
def test_bad_tiles_name_file_key_and_problem(tmp_path, name, change, key, problem):
    path = write_tile(tmp_path, "bad", _bad(change))
    with pytest.raises(TileError) as caught:
        read_tile(path)
    error = caught.value
    assert error.path == str(path) and error.key == key
    assert problem in error.problem
    assert str(path) in str(error) and problem in str(error)


def test_object_arrays_are_never_unpickled(tmp_path):
    arrays = tile_arrays()
    arrays["s2_b2"] = np.array([{"a": 1}] * 4, dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)  # savez pickles object arrays
    with pytest.raises(TileError, match="object array") as caught:
        read_tile(path)
    assert caught.value.key == "s2_b2"


def test_not_a_zip_and_truncated_files(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not an npz file" * 100)
    with pytest.raises(TileError) as caught:
        read_tile(garbage)
    # np.load would take it for a pickle and suggest allow_pickle: the message names the real problem instead
    assert caught.value.problem == (
        "not an NPZ archive (no zip signature at the start); save tiles with np.savez or np.savez_compressed"
    )
    empty = tmp_path / "empty.npz"
    empty.touch()
    with pytest.raises(TileError, match=r"not an NPZ archive \(an empty file\)"):
        read_tile(empty)
    broken_zip = tmp_path / "broken_zip.npz"
    broken_zip.write_bytes(b"PK\x03\x04 then nothing a zip needs")
    with pytest.raises(TileError, match="corrupt or truncated file"):
        read_tile(broken_zip)
    good = write_tile(tmp_path, "good")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(TileError, match="corrupt or truncated") as caught:
        read_tile(truncated)
    assert caught.value.path == str(truncated)


def test_corrupt_member_names_the_key(tmp_path):
    path = write_tile(tmp_path, "t")
    data = bytearray(path.read_bytes())
    start = data.find(b"s2_b3.npy") + 200  # inside the compressed data of s2_b3
    data[start : start + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(TileError, match="corrupt or truncated") as caught:
        read_tile(path)
    assert caught.value.key == "s2_b3"


@pytest.mark.parametrize("key", ["month", "s2_b4"])
def test_a_needed_member_not_saved_as_npy_is_rejected_by_key(tmp_path, key):
    import zipfile

    good = write_tile(tmp_path, "t")
    path = tmp_path / "raw.npz"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(path, "w") as archive:
        for name in source.namelist():
            if name == f"{key}.npy":  # a member np.load hands back as bytes: no .npy name, no .npy header
                archive.writestr(key, b"6")
            else:
                archive.writestr(name, source.read(name))
    with pytest.raises(TileError) as caught:
        read_tile(path)
    assert caught.value.key == key and "not a .npy array" in caught.value.problem
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_single_npy_saved_as_npz_is_rejected(tmp_path):
    path = tmp_path / "single.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.zeros((4, 120, 120), np.uint16))
    with pytest.raises(TileError, match="not an NPZ archive"):
        read_tile(path)


def test_sidecars(tmp_path):
    assert read_sidecar(tmp_path / "absent.json") == {}
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(TileError, match="not valid JSON"):
        read_sidecar(bad_json)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(TileError, match="JSON object"):
        read_sidecar(listed)
    assert sidecar_split("x.json", {"split": "validation"}) == "val"
    assert sidecar_split("x.json", {"split": "TEST"}) == "test"
    assert sidecar_split("x.json", {"country": "Austria"}) is None
    with pytest.raises(TileError, match="unknown split 'holdout'") as caught:
        sidecar_split("x.json", {"split": "holdout"})
    assert caught.value.key == "split"


def test_stage1_files(tmp_path):
    good = tmp_path / "good.npz"
    opt = np.random.default_rng(0).random((4, 120, 120), dtype=np.float32)
    np.savez(good, opt_v1=opt)
    np.testing.assert_array_equal(read_stage1(good), opt)
    dn = tmp_path / "dn.npz"
    np.savez(dn, opt_v1=np.full((4, 120, 120), 1234, np.uint16))
    assert read_stage1(dn)[0, 0, 0] == np.float32(0.1234)
    with pytest.raises(TileError, match="Stage 1 file missing") as caught:
        read_stage1(tmp_path / "absent.npz")
    assert caught.value.key == "opt_v1"
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, opt_v1=np.zeros((3, 120, 120), np.float32))
    with pytest.raises(TileError, match=r"shape \(3, 120, 120\), expected \(4, 120, 120\)"):
        read_stage1(wrong)
    nan = tmp_path / "nan.npz"
    np.savez(nan, opt_v1=np.where(opt > 0.5, np.nan, opt))
    with pytest.raises(TileError, match="NaN/Inf values"):
        read_stage1(nan)
    other_key = tmp_path / "other.npz"
    np.savez(other_key, refined=opt)
    with pytest.raises(TileError, match="missing key"):
        read_stage1(other_key)
    # Digital numbers saved as floats: refused like the target's, naming the file and the key.
    float_dn = tmp_path / "float_dn.npz"
    np.savez(float_dn, opt_v1=opt * 10000)
    with pytest.raises(TileError, match=r"float band values reach 99\d\d\.\d+: these look like digital numbers") \
            as caught:
        read_stage1(float_dn)
    assert caught.value.key == "opt_v1" and str(float_dn) in str(caught.value)
    bright = tmp_path / "bright.npz"  # cloud and snow reach reflectance 1.5-2: still reflectance
    np.savez(bright, opt_v1=opt * 2)
    np.testing.assert_array_equal(read_stage1(bright), opt * 2)


def test_tile_error_survives_pickling():
    error = TileError("/a/b.npz", "month", "value 13 outside 1..12")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.key, copy.problem, str(copy)) == (error.path, error.key, error.problem, str(error))


def test_plain_npz_reader_gives_what_np_load_gives(sample_tiles_dir, tmp_path):
    from data_builders.tiles import _read_plain_npz, load_npz

    for path in sorted(sample_tiles_dir.glob("*/*.npz"))[::5]:
        fast, raw = _read_plain_npz(path), np.load(path, allow_pickle=False)
        assert list(fast) == raw.files
        for key in raw.files:
            assert fast[key].dtype == raw[key].dtype and fast[key].shape == raw[key].shape
            np.testing.assert_array_equal(fast[key], raw[key])
    # layouts the plain reader leaves to np.load: same arrays through load_npz either way
    arrays = tile_arrays() | {"extra_f": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
                              "extra_be": np.arange(5, dtype=">i4"), "extra_c": np.ones(3, np.complex64)}
    path = write_tile(tmp_path, "unusual", arrays)
    assert _read_plain_npz(path) is None
    loaded = load_npz(path)
    for key, value in arrays.items():
        assert loaded[key].dtype == np.asarray(value).dtype
        np.testing.assert_array_equal(loaded[key], value)
    plain = write_tile(tmp_path, "plain", tile_arrays() | {"extra_be": np.arange(5, dtype=">i4")})
    assert _read_plain_npz(plain)["extra_be"].dtype == np.dtype(">i4")

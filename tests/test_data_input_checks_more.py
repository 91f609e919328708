"""Bad input that used to pass silently or end in a bare message: month/biome values that are no integers and a split
without a valid pixel in stage2-inspect, NaN/Inf Sentinel-1 in tiles and in the BigEarthNet LMDB, a patch listed
twice with different rows, and --include_cloudy_snowy without the snow/cloud metadata."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import datasets
from _data_helpers import tile_arrays, write_tile
from data_builders.bigearthnet import CLOUD_SNOW_METADATA, SKIPPED_FILE, ingest_bigearthnet, read_metadata
from data_builders.build import REJECTED_FILE, build_dataset
from data_builders.inspect import describe_dataset, main as inspect_main
from data_builders.tiles import TileError, read_tile

datasets.disable_progress_bars()


def _cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


# ----------------------------------------------------------------------------- stage2-inspect
def _plain_dataset(path: Path, month: list, biome: list, valid: bool = True) -> Path:
    """A saved DatasetDict with the Stage 2 columns and no build record (so the statistics are computed)."""
    target = np.full((len(month), 4, 120, 120), 0.1, np.float32)
    ds = datasets.Dataset.from_dict({"tile_id": [f"t{i}" for i in range(len(month))], "target": target,
                                     "opt_v1": target, "valid_mask": np.full((len(month), 120, 120), valid),
                                     "month": month, "biome": biome})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("column, values, row, shown", [
    ("month", ["6", "june"], 0, "'6'"),  # text: it was int('june')'s message, naming neither column nor row
    ("biome", [3, 2.5], 1, "2.5"),  # a fraction was counted as biome 2 without a word
    ("month", [6, None], 1, "None"),  # a missing value was cast to a huge negative number, counted as "other"
])
def test_a_month_or_biome_that_is_no_integer_is_one_line_naming_split_column_and_row(tmp_path, capsys, column,
                                                                                   values, row, shown):
    other = "biome" if column == "month" else "month"
    path = _plain_dataset(tmp_path / "ds", **{column: values, other: [3, 3]})
    capsys.readouterr()
    assert inspect_main([str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        f"stage2-inspect: error: {path}: split 'train', column {column!r}, row {row}: {shown} is not an integer "
        "(month and biome are integer codes, -1 for unknown); pass a dataset written by stage2-build-dataset"]


def test_integral_floats_still_count_and_the_cli_exits_2_on_text(tmp_path):
    path = _plain_dataset(tmp_path / "ok", month=[6.0, -1.0], biome=[3, 16])
    assert "train      0     0     0     0     0     1" + "     0" * 6 + "     1" in describe_dataset(path)
    bad = _plain_dataset(tmp_path / "bad", month=[6, 7], biome=["water", "urban"])
    done = _cli("data_builders.inspect", bad)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"stage2-inspect: error: {bad}: split 'train', column 'biome', row 0: 'water' is not an integer (month and "
        "biome are integer codes, -1 for unknown); pass a dataset written by stage2-build-dataset"]


def test_a_split_without_a_valid_pixel_prints_no_statistics(tmp_path, capsys):
    """It printed mean 0, std 0, min inf, max -inf: numbers that read as a measurement."""
    path = _plain_dataset(tmp_path / "ds", month=[6, 6], biome=[3, 3], valid=False)
    capsys.readouterr()
    assert inspect_main([str(path)]) == 0  # the report is complete: there is nothing to measure
    out = capsys.readouterr().out
    assert "Per-band statistics over valid pixels (train split, first 2 tiles): none, no valid pixel\n" in out
    assert "inf" not in out and "B02" not in out
    assert "train      0     0     0     0     0     2" in out  # the histograms still follow


# ----------------------------------------------------------------------------- Sentinel-1 of NPZ tiles
@pytest.mark.parametrize("key, dtype, value, count", [
    ("s1_vv", np.float32, np.nan, 2),
    ("s1_vh", np.float32, -np.inf, 1),
    ("s1_vh", np.float64, 1e39, 1),  # finite in float64, Inf in the float32 the s1 column stores
])
def test_a_non_finite_s1_value_rejects_the_tile_naming_the_key(tmp_path, key, dtype, value, count):
    arrays = tile_arrays(seed=1)
    arrays[key] = arrays[key].astype(dtype)
    arrays[key].flat[[5, 700][:count]] = value
    path = write_tile(tmp_path, "bad", arrays)
    with pytest.raises(TileError) as caught:
        read_tile(path)
    assert (caught.value.key, caught.value.problem) == (
        key, f"{count} NaN/Inf values (as float32); Sentinel-1 backscatter must be finite dB: fill its nodata pixels")


def test_the_build_leaves_a_tile_with_nan_s1_out_with_a_record(tmp_path):
    """Its NaN reached the dataset's s1 column."""
    arrays = tile_arrays(seed=1)
    arrays["s1_vv"][3, 4] = np.nan
    write_tile(tmp_path / "tiles" / "train", "bad", arrays)
    write_tile(tmp_path / "tiles" / "train", "good", seed=2)
    ds = build_dataset(tmp_path / "tiles", tmp_path / "ds")
    assert ds["train"]["tile_id"] == ["good"]
    assert np.isfinite(np.asarray(ds["train"].with_format("numpy")["s1"])).all()
    records = [json.loads(line) for line in (tmp_path / "ds" / REJECTED_FILE).read_text().splitlines()]
    assert [(Path(r["file"]).name, r["key"], r["split"]) for r in records] == [("bad.npz", "s1_vv", "train")]


# ----------------------------------------------------------------------------- BigEarthNet ingest
_S2 = {band: np.full((120, 120), 500, np.uint16) for band in ("B02", "B03", "B04", "B08")}


def _row(i: int, **changes) -> dict:
    return {"patch_id": f"S2A_MSIL2A_20180101T100000_0_{i}", "labels": ["Arable land"], "split": "train",
            "s1_name": f"S1_{i}", "country": "Nowhere", "contains_seasonal_snow": False,
            "contains_cloud_or_shadow": False, **changes}


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _lmdb(path: Path, entries: dict) -> Path:
    import lmdb
    from safetensors.numpy import save

    with lmdb.open(str(path), map_size=64 << 20) as env, env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key.encode(), save(value))
    return path


def test_a_non_finite_s1_band_in_the_lmdb_skips_its_patch(tmp_path):
    """The NaN was written into the tile's s1_vv."""
    vv = np.zeros((120, 120), np.float32)
    vv[1, 1] = np.nan
    vh = np.zeros((120, 120), np.float64)
    vh[:2, 0] = 1e39  # Inf once stored as float32
    good = {"VV": np.zeros((120, 120), np.float32), "VH": np.zeros((120, 120), np.float32)}
    lmdb_dir = _lmdb(tmp_path / "lmdb", {_row(0)["patch_id"]: _S2, "S1_0": {"VV": vv, "VH": good["VH"]},
                                         _row(1)["patch_id"]: _S2, "S1_1": {"VV": good["VV"], "VH": vh},
                                         _row(2)["patch_id"]: _S2, "S1_2": good})
    metadata = _parquet(tmp_path / "meta.parquet", [_row(0), _row(1), _row(2)])
    summary = ingest_bigearthnet(lmdb_dir, metadata, tmp_path / "tiles")
    assert summary["written"] == {"train": 1}
    assert summary["skipped"] == {"LMDB value of 'S1_0': band VV has 1 NaN/Inf values (as float32)": 1,
                                  "LMDB value of 'S1_1': band VH has 2 NaN/Inf values (as float32)": 1}
    assert [p.name for p in (tmp_path / "tiles" / "train").glob("*.npz")] == [f"{_row(2)['patch_id']}.npz"]
    skipped = [json.loads(line)["patch_id"] for line in (tmp_path / "tiles" / SKIPPED_FILE).read_text().splitlines()]
    assert skipped == [_row(0)["patch_id"], _row(1)["patch_id"]]


def test_a_patch_listed_twice_the_same_way_is_read_once(tmp_path):
    metadata = _parquet(tmp_path / "meta.parquet", [_row(0), _row(1)])
    rows = read_metadata([metadata, tmp_path / "." / "meta.parquet"])  # the same file given twice
    assert [row["patch_id"] for row in rows] == [_row(0)["patch_id"], _row(1)["patch_id"]]


@pytest.mark.parametrize("column, first, second", [
    ("split", "train", "test"), ("labels", ["Arable land"], ["Pastures"]), ("s1_name", "S1_0", "S1_9")])
def test_a_patch_listed_twice_differently_is_one_line_naming_files_patch_and_column(tmp_path, column, first,
                                                                                     second):
    """The first row was kept without a word, whichever split or labels the second one gave."""
    one = _parquet(tmp_path / "one.parquet", [_row(0, **{column: first})])
    two = _parquet(tmp_path / "two.parquet", [_row(1), _row(0, **{column: second})])
    with pytest.raises(ValueError) as caught:
        read_metadata([one, two])
    assert str(caught.value) == (
        f"--metadata {one} and {two}: patch {_row(0)['patch_id']!r} is listed twice with different {column!r} "
        f"({first!r}, then {second!r}); keep one row per patch_id")
    within = _parquet(tmp_path / "within.parquet", [_row(0, **{column: first}), _row(0, **{column: second})])
    with pytest.raises(ValueError, match=f"^--metadata {within}: patch "):  # one file: named once
        read_metadata([within])


def test_the_cli_refuses_disagreeing_duplicates_before_writing(tmp_path):
    one = _parquet(tmp_path / "one.parquet", [_row(0)])
    two = _parquet(tmp_path / "two.parquet", [_row(0, split="validation")])
    output = tmp_path / "tiles"
    done = _cli("data_builders.bigearthnet", "--lmdb", tmp_path / "absent", "--metadata", one, "--metadata", two,
                "--output_dir", output)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"stage2-ingest-bigearthnet: error: --metadata {one} and {two}: patch {_row(0)['patch_id']!r} is listed "
        "twice with different 'split' ('train', then 'validation'); keep one row per patch_id"]
    assert not output.exists()


@pytest.fixture(scope="module")
def benv2(shared_dir) -> Path:
    path = shared_dir / "data" / "bigearthnet_sample" / "benv2_lmdb"
    if not (path / CLOUD_SNOW_METADATA).is_file():
        pytest.skip(f"{path} has no BigEarthNet v2 sample")
    return path


def test_include_cloudy_snowy_without_their_metadata_is_a_user_error(benv2, tmp_path):
    """The flag added nothing, silently: BigEarthNet's metadata.parquet flags no patch (18 tiles, not 24)."""
    alone = tmp_path / "meta"
    alone.mkdir()
    shutil.copy(benv2 / "metadata.parquet", alone / "metadata.parquet")
    output = tmp_path / "tiles"
    done = _cli("data_builders.bigearthnet", "--lmdb", benv2, "--metadata", alone / "metadata.parquet",
                "--output_dir", output, "--include_cloudy_snowy")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"stage2-ingest-bigearthnet: error: --include_cloudy_snowy: {alone / CLOUD_SNOW_METADATA} does not exist and "
        f"--metadata flags no patch as cloudy or snowy; put {CLOUD_SNOW_METADATA} beside {alone / 'metadata.parquet'} "
        "or pass it as another --metadata"]
    assert not output.exists()
    # given elsewhere with another --metadata, it is read: the 6 flagged patches come in
    summary = ingest_bigearthnet(benv2, [alone / "metadata.parquet", benv2 / CLOUD_SNOW_METADATA], output,
                                 include_cloudy_snowy=True)
    assert summary["written"] == {"train": 8, "val": 8, "test": 8} and summary["skipped"] == {}

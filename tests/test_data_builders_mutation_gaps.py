"""Tests closing gaps a mutation audit of data_builders found: behaviour each mutation changed while every other
test still passed. Each names, in its docstring or name, the behaviour it pins."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _data_helpers import make_tile_dir, tile_arrays, write_tile

from data_builders.cache import dataset_cache_key


# ----------------------------------------------------------------------------- cache key
def test_cache_key_changes_with_a_sidecar(tmp_path):
    """A sidecar edit (its split, its metadata) changes the built dataset: a key blind to it reuses a stale one."""
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    key = dataset_cache_key(data)
    sidecar = data / "train" / "train_0.json"
    sidecar.write_text(json.dumps({"source": "synthetic", "index": 0, "split": "test"}))
    assert dataset_cache_key(data) != key


def test_cache_key_changes_with_a_tile_rewritten_to_the_same_size(tmp_path):
    """Same name, same size, new pixels: only the modification time tells the tile changed."""
    folder = tmp_path / "tiles" / "train"
    folder.mkdir(parents=True)
    np.savez(folder / "t0.npz", **tile_arrays(seed=0))  # uncompressed: the size does not depend on the values
    os.utime(folder / "t0.npz", ns=(10**18, 10**18))
    key = dataset_cache_key(tmp_path / "tiles")
    size = (folder / "t0.npz").stat().st_size
    np.savez(folder / "t0.npz", **tile_arrays(seed=1))
    os.utime(folder / "t0.npz", ns=(2 * 10**18, 2 * 10**18))
    assert (folder / "t0.npz").stat().st_size == size
    assert dataset_cache_key(tmp_path / "tiles") != key


def test_cache_key_of_sidecars_without_tiles_is_an_error(tmp_path):
    (tmp_path / "tiles" / "train").mkdir(parents=True)
    (tmp_path / "tiles" / "train" / "t0.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"--data .*: no NPZ tiles"):
        dataset_cache_key(tmp_path / "tiles", flag="--data")


def test_cache_key_changes_with_each_build_option(tmp_path):
    """The seed and input mode make another opt_v1: each needs its own conversion."""
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    keys = [dataset_cache_key(data, None, "synthetic", 0), dataset_cache_key(data, None, "synthetic", 1),
            dataset_cache_key(data, None, "identity", 0), dataset_cache_key(data, None, "synthetic", 0, "strong")]
    assert len(set(keys)) == len(keys)
    assert dataset_cache_key(data, None, "synthetic", 1) == keys[1]  # and is stable


def test_cache_key_changes_with_a_stage1_file(tmp_path):
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    np.savez(stage1 / "train_0.npz", opt_v1=np.zeros((4, 120, 120), np.float32))
    key = dataset_cache_key(data, stage1, "stage1")
    np.savez(stage1 / "val_0.npz", opt_v1=np.zeros((4, 120, 120), np.float32))  # a Stage 1 output added
    added = dataset_cache_key(data, stage1, "stage1")
    assert added != key
    np.savez(stage1 / "train_0.npz", opt_v1=np.ones((4, 120, 120), np.float32))  # one rewritten
    os.utime(stage1 / "train_0.npz", ns=(10**18, 10**18))
    assert dataset_cache_key(data, stage1, "stage1") not in (key, added)


# ----------------------------------------------------------------------------- sidecar columns
def _columns(*sidecars: dict) -> dict:
    from data_builders.discovery import TileSpec
    from data_builders.schema import metadata_columns

    return metadata_columns([TileSpec(f"t{i}.npz", f"t{i}", "train", sidecar) for i, sidecar in enumerate(sidecars)])


def test_int64_bounds_are_integers_and_one_past_them_json_text():
    columns = _columns({"top": 2**63 - 1, "bottom": -(2**63), "past": 2**63, "below": -(2**63) - 1})
    assert columns == {"top": ("top", "int"), "bottom": ("bottom", "int"), "past": ("past", "json"),
                       "below": ("below", "json")}


def test_an_empty_list_beside_lists_takes_their_type():
    from data_builders.schema import _metadata_row

    columns = _columns({"ids": []}, {"ids": [1, 2]}, {"tags": ["a"]}, {"tags": []}, {"xs": [], "ys": []},
                       {"xs": [0.5]})
    assert columns["ids"] == ("ids", "list[int]") and columns["tags"] == ("tags", "list[str]")
    assert columns["xs"] == ("xs", "list[float]") and columns["ys"] == ("ys", "list[]")
    assert _metadata_row({"ids": [], "xs": [1]}, columns) == {"ids": [], "tags": None, "xs": [1.0], "ys": None}


def test_nested_sidecar_values_are_json_text_with_sorted_keys(tmp_path):
    """The same sidecar gives the same text whatever order its keys were written in."""
    from data_builders.schema import _metadata_row

    columns = _columns({"extra": {"b": 1, "a": [2, 1]}})
    assert _metadata_row({"extra": {"b": 1, "a": [2, 1]}}, columns) == {"extra": '{"a": [2, 1], "b": 1}'}


def test_a_float_column_takes_integers_arrow_cannot_cast_exactly(tmp_path):
    """An int and a float make a float64 column; Arrow refuses to cast an int past 2**53 to it by itself."""
    from data_builders.build import build_dataset

    data = tmp_path / "tiles"
    write_tile(data / "train", "a", sidecar={"x": 0.5})
    write_tile(data / "train", "b", sidecar={"x": 2**53 + 1})
    ds = build_dataset(data, tmp_path / "out")["train"]
    assert ds["x"] == [0.5, float(2**53)]


# ----------------------------------------------------------------------------- Arrow encoding
def test_arrays_of_another_shape_than_their_column_are_refused():
    """5 bands in a 4-band column would otherwise be cut silently into rows of the wrong pixels."""
    from datasets import Array3D
    from datasets.features.features import get_nested_type

    from data_builders.encoding import arrow_tensor_column

    column = get_nested_type(Array3D((4, 120, 120), "float32"))
    with pytest.raises(ValueError, match=r"arrays of shape \(5, 120, 120\) in a column of shape \(4, 120, 120\)"):
        arrow_tensor_column([np.zeros((5, 120, 120), np.float32)] * 2, column)
    stacked = np.arange(2 * 4 * 120 * 120, dtype=np.float32).reshape(2, 4, 120, 120)
    assert np.array_equal(np.asarray(arrow_tensor_column(list(stacked), column).to_pylist(), np.float32), stacked)


# ----------------------------------------------------------------------------- discovery
def test_split_folders_are_named_in_any_case(tmp_path):
    from data_builders.discovery import discover_tiles

    write_tile(tmp_path / "Train", "a")
    write_tile(tmp_path / "Validation", "b")
    write_tile(tmp_path / "TEST", "c")
    write_tile(tmp_path / "valid", "d")
    splits, rejected = discover_tiles(tmp_path)
    assert rejected == []
    assert {split: [spec.tile_id for spec in specs] for split, specs in splits.items()} == {
        "train": ["a"], "val": ["b", "d"], "test": ["c"]}


def test_the_sidecar_split_places_the_tile_and_is_no_column(tmp_path):
    """`split` in a sidecar says where the tile goes; as a column it would repeat the split name in every row."""
    from data_builders.build import build_dataset
    from data_builders.discovery import discover_tiles

    write_tile(tmp_path / "tiles" / "train", "a", sidecar={"split": "val", "source": "synthetic"})
    write_tile(tmp_path / "tiles" / "train", "b", sidecar={"source": "synthetic"})
    splits, _ = discover_tiles(tmp_path / "tiles")
    assert [(spec.tile_id, spec.split, spec.sidecar) for specs in splits.values() for spec in specs] == [
        ("b", "train", {"source": "synthetic"}), ("a", "val", {"source": "synthetic"})]
    ds = build_dataset(tmp_path / "tiles", tmp_path / "out")
    assert "split" not in ds["val"].features and "sidecar_split" not in ds["val"].features


# ----------------------------------------------------------------------------- workers
@pytest.mark.parametrize(("exitcode", "how"), [
    (-9, "killed by SIGKILL; out of memory? try a smaller --num_proc"),  # the OOM killer's signal only
    (-15, "killed by SIGTERM"),
    (3, "exit status 3"),
])
def test_a_dead_worker_is_named_with_how_it_died(exitcode, how):
    from types import SimpleNamespace

    from data_builders.workers import _check_workers

    _check_workers([SimpleNamespace(pid=11, exitcode=None)])  # alive: nothing to say
    with pytest.raises(ChildProcessError) as caught:
        _check_workers([SimpleNamespace(pid=11, exitcode=None), SimpleNamespace(pid=12, exitcode=exitcode)])
    assert str(caught.value) == f"a build worker process (pid 12) died ({how}); nothing was written"


# ----------------------------------------------------------------------------- BigEarthNet ingest
def test_an_ingest_that_leaves_out_only_cloudy_or_snowy_patches_exits_0(tmp_path, capsys):
    """Patches left out by choice are no failure (exit 0); one that cannot be read is (exit 1)."""
    import pyarrow.parquet as pq
    from test_data_bigearthnet import _metadata, _patches_lmdb

    from data_builders.bigearthnet import main

    lmdb_dir, metadata = _patches_lmdb(tmp_path, count=2)
    rows = pq.read_table(metadata).to_pylist()
    rows[1]["contains_seasonal_snow"] = True
    _metadata(metadata, rows)
    assert main(["--lmdb", str(lmdb_dir), "--metadata", str(metadata), "--output_dir", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out.endswith(
        "skipped 1 (cloudy or snowy: 1; see skipped.jsonl); --include_cloudy_snowy keeps cloudy and snowy patches\n")
    _metadata(metadata, rows + [dict(rows[0], patch_id="S2A_MSIL2A_20180101T100000_0_9")])  # not in the LMDB
    assert main(["--lmdb", str(lmdb_dir), "--metadata", str(metadata), "--output_dir", str(tmp_path / "b")]) == 1


def test_labels_that_are_not_names_stop_the_ingest(tmp_path):
    """Class numbers instead of CORINE names would give every patch the unknown biome, without a word."""
    from test_data_bigearthnet import _metadata

    from data_builders.bigearthnet import read_metadata

    metadata = _metadata(tmp_path / "meta.parquet", [{"patch_id": "S2A_MSIL2A_20180101T100000_0_0", "labels": [2, 7],
                                                      "split": "train", "s1_name": "S1_0"}])
    with pytest.raises(ValueError, match=r"'labels' of patch 'S2A_MSIL2A_20180101T100000_0_0' is \[2, 7\], not a "
                                         "list of CORINE label names"):
        read_metadata([metadata])


# ----------------------------------------------------------------------------- build
def test_train_statistics_merged_over_chunks_are_those_of_all_pixels():
    """The build sums statistics per chunk of 64 tiles: the merge must give the min/max/mean/std of every pixel."""
    from data_builders.build import _BandStats

    rng = np.random.default_rng(0)
    images = [rng.normal(loc, 1.0, size=(4, 8, 8)) for loc in (5.0, -3.0, 1.0)]
    masks = [np.ones((8, 8), bool), np.ones((8, 8), bool), np.arange(64).reshape(8, 8) % 3 > 0]
    images[2][:, ~masks[2]] = 0  # invalid pixels hold 0
    parts = []
    for image, mask in zip(images, masks):
        stats = _BandStats()
        stats.update(image, mask)
        parts.append(stats.to_dict())
    merged = _BandStats.merge(parts).summary()
    valid = np.concatenate([image[:, mask] for image, mask in zip(images, masks)], axis=1)
    for i, band in enumerate(merged):
        assert merged[band]["min"] == valid[i].min() and merged[band]["max"] == valid[i].max()
        assert merged[band]["mean"] == pytest.approx(valid[i].mean(), rel=1e-12)
        assert merged[band]["std"] == pytest.approx(valid[i].std(), rel=1e-9)


def test_the_scratch_folder_of_a_running_build_is_left_alone(tmp_path):
    """Only a killed build's scratch folder is removed: another build writing to the same output is still using its."""
    import subprocess
    import sys

    from data_builders.build import SCRATCH_MARKER, _remove_stale_scratch

    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    running = tmp_path / f".ds{SCRATCH_MARKER}{os.getppid()}-cafecafe"
    killed = tmp_path / f".ds{SCRATCH_MARKER}{gone.pid}-deadbeef"
    for scratch in (running, killed):
        (scratch / "cache").mkdir(parents=True)
    _remove_stale_scratch(tmp_path / "ds")
    assert running.is_dir() and not killed.exists()


def test_an_input_mode_other_than_the_saved_datasets_is_refused(tmp_path):
    from data_builders.build import build_dataset, saved_opt_v1_problem

    built = tmp_path / "identity"
    build_dataset(make_tile_dir(tmp_path / "tiles", per_split=1), built, input_mode="identity")
    assert saved_opt_v1_problem(built, input_mode="identity") is None
    assert saved_opt_v1_problem(built, input_mode="synthetic", flag="--data") == (
        f"--input_mode synthetic: --data {built} is an Arrow dataset, which holds its own opt_v1 (input_mode "
        "'identity'); drop the flag, or build the dataset again with stage2-build-dataset --input_mode synthetic.")


def test_a_tile_read_without_s1_in_a_dataset_carrying_it_is_rejected_by_name(tmp_path, monkeypatch):
    """Discovery could not list one tile's keys (it counts as carrying Sentinel-1); read, it has none: it is left out
    with a record, where its missing column would stop the Arrow writer."""
    from data_builders import discovery
    from data_builders.build import REJECTED_FILE, build_dataset

    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    odd = write_tile(data / "train", "train_9", s1=False)
    listed = discovery.npz_keys
    monkeypatch.setattr(discovery, "npz_keys", lambda path: None if str(path) == str(odd) else listed(path))
    ds = build_dataset(data, tmp_path / "out")
    assert "s1" in ds["train"].features and ds["train"]["tile_id"] == ["train_0"]
    [record] = [json.loads(line) for line in (tmp_path / "out" / REJECTED_FILE).read_text().splitlines()]
    assert record == {"file": str(odd), "key": "s1_vv", "split": "train",
                      "problem": "missing key (other tiles of this dataset carry Sentinel-1)"}


def test_the_build_record_counts_digital_number_and_reflectance_tiles(tmp_path):
    from data_builders.build import build_dataset, read_build_info
    from data_builders.tiles import BAND_KEYS

    arrays = tile_arrays(seed=1)
    reflectance = arrays | {key: arrays[key].astype(np.float32) * np.float32(1e-4) for key in BAND_KEYS}
    write_tile(tmp_path / "tiles" / "train", "dn_0")
    write_tile(tmp_path / "tiles" / "train", "dn_1", seed=2)
    write_tile(tmp_path / "tiles" / "val", "refl", arrays=reflectance)
    info = read_build_info(build_dataset(tmp_path / "tiles", tmp_path / "out"))
    assert info["input_scale"]["tiles"] == {"dn": 2, "reflectance": 1}


def test_a_negative_seed_is_refused_before_any_work(tmp_path, monkeypatch):
    """(The degradation refuses it too, but only once the tiles are being read.)"""
    from data_builders import build
    from data_builders.build import build_dataset

    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    monkeypatch.setattr(build, "discover_tiles", lambda *args, **kwargs: pytest.fail("the tiles were read"))
    with pytest.raises(ValueError, match=r"^seed must be >= 0, got -1$"):
        build_dataset(data, tmp_path / "out" / "ds", seed=-1)
    assert not (tmp_path / "out").exists()


def test_month_zero_is_no_acquisition_date():
    from data_builders.bigearthnet import month_from_patch_name

    assert month_from_patch_name("S2A_MSIL2A_20171201T101031_1_1") == 12
    assert month_from_patch_name("S2A_MSIL2A_20170131T101031_1_1") == 1
    with pytest.raises(ValueError, match="no acquisition date"):
        month_from_patch_name("S2A_MSIL2A_20170013T101031_1_1")


def test_max_patches_counts_written_tiles_not_skipped_patches(tmp_path):
    import pyarrow.parquet as pq
    from test_data_bigearthnet import _metadata, _patches_lmdb

    from data_builders.bigearthnet import ingest_bigearthnet

    lmdb_dir, metadata = _patches_lmdb(tmp_path, count=3)
    rows = pq.read_table(metadata).to_pylist()
    rows[0]["contains_cloud_or_shadow"] = True
    _metadata(metadata, rows)
    summary = ingest_bigearthnet(lmdb_dir, metadata, tmp_path / "tiles", max_patches=2)
    assert summary["written"] == {"train": 2} and summary["skipped"] == {"cloudy or snowy": 1}
    assert sorted(p.stem for p in (tmp_path / "tiles" / "train").glob("*.npz")) == [
        "S2A_MSIL2A_20180101T100000_0_1", "S2A_MSIL2A_20180101T100000_0_2"]

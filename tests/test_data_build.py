"""Tiles -> Arrow DatasetDict: round trip of the real sample, build record, bad input, atomicity."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from _data_helpers import copy_sample_subset, folder_digest, make_tile_dir, tile_arrays, write_tile

import datasets
from data_builders import build as build_module
from data_builders.build import BUILD_INFO_FILE, REJECTED_FILE, SCRATCH_MARKER, build_dataset, main, read_build_info
from data_builders.degrade import DEGRADATION_PRESETS, DegradationConfig, mixture_choice, synthesize_opt_v1
from data_builders.tiles import BAND_KEYS, BAND_NAMES, TileError

datasets.disable_progress_bars()


def _rejected(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / REJECTED_FILE).read_text().splitlines()]


def _scratch_dirs(output_dir: Path) -> list[Path]:
    return list(output_dir.parent.glob(f".{output_dir.name}{SCRATCH_MARKER}*"))


# ----------------------------------------------------------------------------- the real sample
def test_round_trip_of_the_bundled_sample(sample_dataset_dir, sample_tiles_dir):
    ds = datasets.load_from_disk(str(sample_dataset_dir))
    assert list(ds) == ["train", "val", "test"]
    assert {split: len(ds[split]) for split in ds} == {"train": 18, "val": 18, "test": 18}
    for split in ds:
        rows = ds[split].with_format("numpy")[:]
        files = sorted((sample_tiles_dir / split).glob("*.npz"))
        assert list(rows["tile_id"]) == [f.stem for f in files]
        for i, path in enumerate(files):
            raw = np.load(path, allow_pickle=False)
            expected = (np.stack([raw[k] for k in BAND_KEYS]).astype(np.float64) * 1e-4).astype(np.float32)
            np.testing.assert_array_equal(rows["target"][i], expected)  # exact, in float32
            np.testing.assert_array_equal(rows["s1"][i], np.stack([raw["s1_vv"], raw["s1_vh"]]))
            assert rows["month"][i] == raw["month"] and rows["biome"][i] == raw["biome_code"]
            assert rows["valid_mask"][i].all()
            sidecar = json.loads(path.with_suffix(".json").read_text())
            assert rows["source"][i] == sidecar["source"]
            assert list(rows["labels"][i]) == sidecar["labels"]
        opt_v1 = rows["opt_v1"]
        assert opt_v1.dtype == np.float32 and np.isfinite(opt_v1).all()
        assert opt_v1.min() >= 0.0 and opt_v1.max() <= 1.0
        assert np.abs(opt_v1 - rows["target"]).mean() > 0.005  # degraded, not a copy


def test_features_are_typed(sample_dataset_dir):
    features = datasets.load_from_disk(str(sample_dataset_dir))["train"].features
    assert features["target"] == datasets.Array3D((4, 120, 120), "float32")
    assert features["opt_v1"] == datasets.Array3D((4, 120, 120), "float32")
    assert features["s1"] == datasets.Array3D((2, 120, 120), "float32")
    assert features["valid_mask"] == datasets.Array2D((120, 120), "bool")
    assert features["month"] == datasets.Value("int64") and features["biome"] == datasets.Value("int64")
    assert features["tile_id"] == datasets.Value("string")
    assert features["labels"] == datasets.List(datasets.Value("string"))
    assert features["seasonal_snow"] == datasets.Value("bool")  # None for the v1 tiles


def test_build_record_in_dataset_info(sample_dataset_dir, sample_tiles_dir):
    ds = datasets.load_from_disk(str(sample_dataset_dir))
    info = read_build_info(ds)
    assert info == read_build_info(ds["test"]) == json.loads((sample_dataset_dir / BUILD_INFO_FILE).read_text())
    assert info["source"]["sources"] == {"BigEarthNet v1": 30, "BigEarthNet v2": 24}
    assert info["source"]["tiles"] == {"train": 18, "val": 18, "test": 18}
    assert info["input_scale"]["tiles"] == {"dn": 54} and "scaling" not in info
    assert info["opt_v1"]["mode"] == "synthetic" and info["opt_v1"]["seed"] == 0
    assert info["opt_v1"]["degradation"] == DegradationConfig().to_dict()
    assert info["opt_v1"]["preset"] == "mild" and "preset 'mild'" in info["opt_v1"]["description"]
    assert (sample_dataset_dir / REJECTED_FILE).read_text() == ""

    targets = np.stack(ds["train"].with_format("numpy")["target"])  # (18, 4, 120, 120), all valid
    stats = info["statistics"]
    assert stats["split"] == "train" and stats["valid_pixels"] == 18 * 120 * 120
    assert list(stats["target"]) == list(BAND_NAMES)
    for i, band in enumerate(BAND_NAMES):
        values = targets[:, i].astype(np.float64)
        assert stats["target"][band]["mean"] == pytest.approx(values.mean(), rel=1e-9)
        assert stats["target"][band]["std"] == pytest.approx(values.std(), rel=1e-6)
        assert stats["target"][band]["min"] == pytest.approx(values.min())
        assert stats["target"][band]["max"] == pytest.approx(values.max())
    # the systematic NIR under-estimate of the default degradation shows in the statistics
    assert stats["opt_v1"]["B08"]["mean"] < stats["target"]["B08"]["mean"]


def test_opt_v1_is_reproducible_from_the_build_record(sample_dataset_dir):
    ds = datasets.load_from_disk(str(sample_dataset_dir))
    info = read_build_info(ds)
    rows = ds["val"].with_format("numpy")[:3]
    config = DegradationConfig.from_dict(info["opt_v1"]["degradation"])
    for i in range(3):
        again = synthesize_opt_v1(rows["target"][i], str(rows["tile_id"][i]), info["opt_v1"]["seed"], config,
                                  rows["valid_mask"][i])
        np.testing.assert_array_equal(again, rows["opt_v1"][i])


# ----------------------------------------------------------------------------- modes and options
def test_identity_mode_and_seed(tmp_path):
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    ds = build_dataset(data, tmp_path / "identity", input_mode="identity")
    row = ds["train"].with_format("numpy")[0]
    np.testing.assert_array_equal(row["opt_v1"], row["target"])
    assert read_build_info(ds)["opt_v1"]["mode"] == "identity"

    a = build_dataset(data, tmp_path / "seed1", seed=1)["train"].with_format("numpy")[0]["opt_v1"]
    b = build_dataset(data, tmp_path / "seed2", seed=2)["train"].with_format("numpy")[0]["opt_v1"]
    assert not np.array_equal(a, b)


def test_stage1_mode(tmp_path):
    data = make_tile_dir(tmp_path / "tiles", per_split=2, s1=False)
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    rng = np.random.default_rng(3)
    expected = {}
    for split in ("train", "val"):
        for i in range(2):
            expected[f"{split}_{i}"] = rng.random((4, 120, 120), dtype=np.float32)
            np.savez(stage1 / f"{split}_{i}.npz", opt_v1=expected[f"{split}_{i}"])
    np.savez(stage1 / "test_0.npz", opt_v1=np.zeros((4, 60, 60), np.float32))  # wrong shape; test_1 missing

    ds = build_dataset(data, tmp_path / "out", stage1_dir=stage1)  # stage1 is the default mode then
    assert list(ds) == ["train", "val"]  # every test tile was rejected
    for split in ("train", "val"):
        for row in ds[split].with_format("numpy"):
            np.testing.assert_array_equal(row["opt_v1"], expected[str(row["tile_id"])])
    info = read_build_info(ds)
    assert info["opt_v1"]["mode"] == "stage1" and info["s1"].startswith("not carried")
    problems = {Path(r["file"]).name: (r["key"], r["problem"]) for r in _rejected(tmp_path / "out")}
    assert problems["test_0.npz"][0] == "opt_v1" and "expected (4, 120, 120)" in problems["test_0.npz"][1]
    assert problems["test_1.npz"] == ("opt_v1", "Stage 1 file missing: every tile needs STAGE1_DIR/<tile_id>.npz")


def test_stage1_opt_v1_is_zero_where_the_target_is_invalid(tmp_path):
    arrays = tile_arrays(s1=False)
    bands = {key: arrays[key].astype(np.float32) * np.float32(1e-4) for key in BAND_KEYS}
    bands["s2_b4"][:30, :] = np.nan  # a nodata strip
    write_tile(tmp_path / "tiles" / "train", "t0", arrays=arrays | bands)
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    np.savez(stage1 / "t0.npz", opt_v1=np.full((4, 120, 120), 0.5, np.float32))  # a generator fills nodata too

    ds = build_dataset(tmp_path / "tiles", tmp_path / "out", stage1_dir=stage1)
    row = ds["train"].with_format("numpy")[0]
    assert not row["valid_mask"][:30].any() and row["valid_mask"][30:].all()
    assert (row["opt_v1"][:, :30] == 0).all() and (row["opt_v1"][:, 30:] == 0.5).all()
    stats = read_build_info(ds)["statistics"]["opt_v1"]["B02"]
    assert stats["mean"] == pytest.approx(0.5) and stats["min"] == stats["max"] == 0.5


def test_argument_errors(tmp_path):
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    with pytest.raises(ValueError, match="needs stage1_dir"):
        build_dataset(data, tmp_path / "o", input_mode="stage1")
    with pytest.raises(ValueError, match="only read with input_mode='stage1'"):
        build_dataset(data, tmp_path / "o", stage1_dir=tmp_path, input_mode="identity")
    with pytest.raises(ValueError, match="input_mode must be one of"):
        build_dataset(data, tmp_path / "o", input_mode="magic")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no split folder"):
        build_dataset(tmp_path / "empty", tmp_path / "o2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(tmp_path / "absent", tmp_path / "o")
    with pytest.raises(ValueError, match="contains --data_dir"):
        build_dataset(data, tmp_path)
    with pytest.raises(ValueError, match="contains --data_dir"):
        build_dataset(data, data)
    with pytest.raises(ValueError, match="unknown degradation parameters"):
        build_dataset(data, tmp_path / "o", degradation={"blur": 2})
    not_a_dataset = tmp_path / "precious"
    not_a_dataset.mkdir()
    (not_a_dataset / "thesis.tex").write_text("do not delete")
    with pytest.raises(FileExistsError, match="not a dataset written by stage2-build-dataset"):
        build_dataset(data, not_a_dataset)
    assert (not_a_dataset / "thesis.tex").read_text() == "do not delete"


def test_max_samples_and_sidecar_split(tmp_path):
    data = make_tile_dir(tmp_path / "tiles", per_split=3)
    # a sidecar's split wins over its folder
    write_tile(data / "train", "moved", sidecar={"split": "validation", "source": "synthetic"})
    ds = build_dataset(data, tmp_path / "all")
    assert "moved" in ds["val"]["tile_id"] and "moved" not in ds["train"]["tile_id"]
    small = build_dataset(data, tmp_path / "small", max_samples=2)
    assert {split: len(small[split]) for split in small} == {"train": 2, "val": 2, "test": 2}
    assert small["train"]["tile_id"] == ["train_0", "train_1"]


def test_num_proc_does_not_change_the_rows(tmp_path, sample_tiles_dir, monkeypatch):
    data = copy_sample_subset(sample_tiles_dir, tmp_path / "tiles", per_split=5)
    monkeypatch.setattr(build_module, "CHUNK_SIZE", 2)  # several chunks, so two workers share them
    one = build_dataset(data, tmp_path / "one", num_proc=1)
    two = build_dataset(data, tmp_path / "two", num_proc=2)
    for split in one:
        a, b = one[split].with_format("numpy")[:], two[split].with_format("numpy")[:]
        assert list(a["tile_id"]) == list(b["tile_id"]) == sorted(a["tile_id"])
        for column in ("target", "opt_v1", "valid_mask", "s1", "month", "biome"):
            np.testing.assert_array_equal(a[column], b[column])
    assert read_build_info(one)["statistics"] == read_build_info(two)["statistics"]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_progress_bar_counts_every_tile(tmp_path, sample_tiles_dir, monkeypatch, capsys, num_proc):
    data = copy_sample_subset(sample_tiles_dir, tmp_path / "tiles", per_split=5)
    (data / "train" / sorted(p.name for p in (data / "train").glob("*.npz"))[0]).write_bytes(b"broken")
    monkeypatch.setattr(build_module, "CHUNK_SIZE", 2)
    datasets.enable_progress_bars()
    build_dataset(data, tmp_path / "out", num_proc=num_proc)
    err = capsys.readouterr().err
    assert "Building the dataset" in err and "15/15" in err  # rejected tiles count as done
    datasets.disable_progress_bars()
    try:
        build_dataset(data, tmp_path / "quiet", num_proc=num_proc)
    finally:
        datasets.enable_progress_bars()
    assert "Building the dataset" not in capsys.readouterr().err


def test_metadata_columns_keep_sidecar_types(tmp_path):
    data = tmp_path / "tiles"
    write_tile(data / "train", "a", sidecar={"cloud": 0.5, "count": 3, "extra": {"k": [1, 2]}, "month": "June"})
    write_tile(data / "train", "b", sidecar={"cloud": 1, "tags": [], "month": "July"})
    write_tile(data / "train", "c")  # no sidecar
    ds = build_dataset(data, tmp_path / "out")["train"]
    assert ds.features["cloud"] == datasets.Value("float64")
    assert ds.features["count"] == datasets.Value("int64")
    assert ds.features["extra"] == datasets.Value("string")  # nested -> JSON text
    assert ds.features["sidecar_month"] == datasets.Value("string")  # clashes with the month column
    assert ds["cloud"] == [0.5, 1.0, None]
    assert json.loads(ds[0]["extra"]) == {"k": [1, 2]}
    assert ds["sidecar_month"] == ["June", "July", None] and ds["month"] == [6, 6, 6]


def test_sidecar_values_arrow_cannot_type_are_kept_exactly(tmp_path):
    data = tmp_path / "tiles"
    big = 10**23  # beyond int64
    write_tile(data / "train", "a", sidecar={"n": big, "ids": [1, big], "month": "June", "sidecar_month": 4})
    write_tile(data / "train", "b", sidecar={"n": 7, "ids": [2], "month": "July"})
    ds = build_dataset(data, tmp_path / "out")["train"]
    assert ds.features["n"] == ds.features["ids"] == datasets.Value("string")  # JSON text, as nested values
    assert [json.loads(v) for v in ds["n"]] == [big, 7] and [json.loads(v) for v in ds["ids"]] == [[1, big], [2]]
    # `month` clashes with the core column, and its prefixed name with another key: neither is lost
    assert ds["sidecar_sidecar_month"] == ["June", "July"] and ds["sidecar_month"] == [4, None]
    assert ds["month"] == [6, 6]


def test_sidecar_empty_list_beside_a_scalar_is_json_text(tmp_path):
    """An empty list in one sidecar and a scalar in another are mixed values (JSON text); the build used to stop
    with pyarrow's 'cannot mix list and non-list, non-null values'."""
    data = tmp_path / "tiles"
    write_tile(data / "train", "a", sidecar={"tags": [], "n": []})
    write_tile(data / "train", "b", sidecar={"tags": "x", "n": 3})
    ds = build_dataset(data, tmp_path / "out")["train"]
    assert ds.features["tags"] == ds.features["n"] == datasets.Value("string")
    assert ds["tags"] == ["[]", '"x"'] and ds["n"] == ["[]", "3"]


def test_sidecar_nesting_too_deep_to_read_rejects_the_tile(tmp_path):
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    deep = data / "train" / "train_0.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TileError, match="nests too deeply") as caught:
        build_dataset(data, tmp_path / "out", strict=True)
    assert caught.value.path == str(deep)


def test_s1_column_needs_every_tile(tmp_path):
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    write_tile(data / "test", "no_s1", s1=False)
    ds = build_dataset(data, tmp_path / "out")
    assert "s1" not in ds["train"].features and len(ds["test"]) == 2
    assert read_build_info(ds)["s1"].startswith("not carried")


def test_nan_pixels_are_masked_and_zeroed(tmp_path):
    arrays = tile_arrays(s1=False)
    for key in BAND_KEYS:
        arrays[key] = arrays[key].astype(np.float32) * np.float32(1e-4)
    arrays["s2_b4"][10:20, 30:40] = np.nan
    write_tile(tmp_path / "tiles" / "train", "holes", arrays)
    row = build_dataset(tmp_path / "tiles", tmp_path / "out")["train"].with_format("numpy")[0]
    assert row["valid_mask"].sum() == 120 * 120 - 100 and not row["valid_mask"][10:20, 30:40].any()
    assert (row["target"][:, 10:20, 30:40] == 0).all() and (row["opt_v1"][:, 10:20, 30:40] == 0).all()
    assert np.isfinite(row["target"]).all()


def test_arrow_files_are_moved_not_copied(tmp_path, monkeypatch):
    data = make_tile_dir(tmp_path / "tiles", per_split=2)

    def no_copy(*args, **kwargs):
        raise AssertionError("save_to_disk copies every byte; the builder moves the generator's files")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", no_copy)
    monkeypatch.setattr(build_module, "CHUNK_SIZE", 1)
    ds = build_dataset(data, tmp_path / "out", num_proc=2)  # two Arrow files per split
    assert sorted(p.name for p in (tmp_path / "out" / "train").glob("*.arrow")) == [
        "data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert ds["train"]["tile_id"] == ["train_0", "train_1"]
    assert all(Path(f["filename"]).parent == tmp_path / "out" / "train" for f in ds["train"].cache_files)


def test_save_split_falls_back_to_save_to_disk(tmp_path):
    ds = build_dataset(make_tile_dir(tmp_path / "tiles", per_split=2), tmp_path / "out")
    subset = ds["train"].select([1])  # an indices mapping: its files cannot simply be moved
    build_module._save_split(subset, tmp_path / "copy", "fingerprint")
    again = datasets.load_from_disk(str(tmp_path / "copy"))
    assert again["tile_id"] == ["train_1"]
    np.testing.assert_array_equal(again.with_format("numpy")[0]["target"], subset.with_format("numpy")[0]["target"])


def test_fast_arrow_encoding_writes_what_from_generator_writes(tmp_path, sample_tiles_dir):
    """The builder encodes image columns from numpy buffers (`arrow_tensor_column`); the Arrow file
    must be the one `Dataset.from_generator` writes from the same rows through Python lists."""
    from datasets.arrow_writer import ArrowWriter, OptimizedTypedSequence
    from datasets.features.features import get_nested_type

    paths = sorted(sample_tiles_dir.glob("*/*.npz"))[:21]
    columns = {"source": ("source", "str"), "labels": ("labels", "list[str]")}
    features = build_module.dataset_features(True, columns)
    rows = []
    for i, path in enumerate(paths):
        tile = build_module.read_tile(path)
        mask = tile.valid_mask.copy()
        mask[i : i + 7, 3 * i : 3 * i + 5] = False  # masks that are not all True
        rows.append({"tile_id": tile.tile_id, "target": tile.target, "opt_v1": tile.target * np.float32(0.5),
                     "valid_mask": mask, "month": tile.month, "biome": tile.biome, "s1": tile.s1,
                     "source": tile.metadata["source"], "labels": tile.metadata["labels"]})

    for name in ("target", "valid_mask", "s1"):
        pa_type = get_nested_type(features[name])
        fast = build_module.arrow_tensor_column([row[name] for row in rows], pa_type)
        generic = pa.array(OptimizedTypedSequence([row[name] for row in rows], type=features[name], col=name))
        assert fast.type == generic.type and fast.equals(generic), name

    generated = datasets.Dataset.from_generator(lambda: iter(rows), features=features,
                                                cache_dir=str(tmp_path / "cache"),
                                                writer_batch_size=build_module.WRITER_BATCH_SIZE)
    writer = ArrowWriter(features=features, path=str(tmp_path / "fast.arrow"),
                         writer_batch_size=build_module.WRITER_BATCH_SIZE)
    for start in range(0, len(rows), build_module.WRITER_BATCH_SIZE):  # 16 + 5 rows
        writer.write_batch(build_module._encode_rows(rows[start : start + build_module.WRITER_BATCH_SIZE], features))
    assert writer.finalize()[0] == len(rows)
    writer.close()
    (generated_file,) = [Path(f["filename"]) for f in generated.cache_files]
    assert (tmp_path / "fast.arrow").read_bytes() == generated_file.read_bytes()
    fast = datasets.Dataset.from_file(str(tmp_path / "fast.arrow"))
    assert fast.features == features and fast.data.table.equals(generated.data.table)


# ----------------------------------------------------------------------------- bad input
def _write_bad_tiles(data: Path) -> dict[str, tuple]:
    """Bad tiles beside good ones; {file name: (key, problem fragment)} of what must be rejected."""
    def changed(**updates):
        arrays = tile_arrays(seed=7)
        for key, value in updates.items():
            if value is None:
                arrays.pop(key)
            else:
                arrays[key] = value
        return arrays

    write_tile(data / "train", "missing_band", changed(s2_b8=None))
    write_tile(data / "train", "month13", changed(month=np.int64(13)))
    write_tile(data / "val", "biome17", changed(biome_code=np.int64(17)))
    write_tile(data / "val", "wrong_shape", changed(s2_b2=np.zeros((100, 100), np.uint16)))
    write_tile(data / "test", "all_nan", changed(**{k: np.full((120, 120), np.nan, np.float32) for k in BAND_KEYS}))
    np.savez(data / "test" / "pickled.npz", **changed(s2_b3=np.array([None, {}], dtype=object)))
    (data / "test" / "corrupt.npz").write_bytes(b"\x00" * 300)
    write_tile(data / "train", "twice")
    write_tile(data / "test", "twice")
    write_tile(data / "val", "bad_sidecar")
    (data / "val" / "bad_sidecar.json").write_text("{oops")
    return {
        "missing_band.npz": ("s2_b8", "missing key"),
        "month13.npz": ("month", "outside 1..12"),
        "biome17.npz": ("biome_code", "outside 0..16"),
        "wrong_shape.npz": ("s2_b2", "expected (120, 120)"),
        "all_nan.npz": ("s2_b2", "entirely NaN"),
        "pickled.npz": ("s2_b3", "object array"),
        "corrupt.npz": (None, "not an NPZ archive (no zip signature at the start)"),
        "twice.npz": (None, "appears more than once"),
        "bad_sidecar.json": (None, "not valid JSON"),
    }


def test_bad_tiles_are_skipped_and_listed(tmp_path, caplog):
    data = make_tile_dir(tmp_path / "tiles", per_split=2)
    expected = _write_bad_tiles(data)
    with caplog.at_level(logging.INFO, logger="data_builders.build"):
        ds = build_dataset(data, tmp_path / "out")
    assert {split: sorted(ds[split]["tile_id"]) for split in ds} == {
        "train": ["train_0", "train_1"], "val": ["val_0", "val_1"], "test": ["test_0", "test_1"]}
    records = _rejected(tmp_path / "out")
    assert len(records) == len(expected) + 1  # "twice" is rejected in both splits
    for record in records:
        key, problem = expected[Path(record["file"]).name]
        assert record["key"] == key and problem in record["problem"], record
        assert Path(record["file"]).exists()
    assert {r["split"] for r in records if Path(r["file"]).name == "twice.npz"} == {"train", "test"}
    assert read_build_info(ds)["source"]["rejected"] == len(records)
    assert f"rejected {len(records)} (reasons in {tmp_path / 'out' / REJECTED_FILE})" in caplog.text


def test_a_zip_directory_zipfile_cannot_open_rejects_only_that_tile(tmp_path):
    """One damaged byte (the 'version needed to extract' of the zip directory) made zipfile raise
    NotImplementedError while the build listed the tiles' keys: the whole build ended in a traceback (exit 1)."""
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    damaged = write_tile(data / "train", "damaged")
    raw = bytearray(damaged.read_bytes())
    entry = raw.index(b"PK\x01\x02")  # the first central directory entry
    raw[entry + 6 : entry + 8] = (255).to_bytes(2, "little")  # "needs zip version 25.5"
    damaged.write_bytes(bytes(raw))
    done = subprocess.run([sys.executable, "-m", "data_builders.build", "--data_dir", str(data),
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    [record] = _rejected(tmp_path / "out")
    assert record["file"] == str(damaged) and "corrupt or truncated file" in record["problem"]
    assert datasets.load_from_disk(str(tmp_path / "out"))["train"]["tile_id"] == ["train_0"]


def test_strict_stops_at_the_first_bad_tile(tmp_path, capsys):
    data = make_tile_dir(tmp_path / "tiles", per_split=2)
    write_tile(data / "val", "month13", tile_arrays() | {"month": np.int64(13)})
    with pytest.raises(TileError) as caught:
        build_dataset(data, tmp_path / "out", strict=True)
    assert caught.value.path == str(data / "val" / "month13.npz") and caught.value.key == "month"
    assert not (tmp_path / "out").exists() and not _scratch_dirs(tmp_path / "out")

    code = main(["--data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--strict"])
    assert code == 2  # bad input: nothing written
    assert "month13.npz: 'month': value 13 outside 1..12" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # without --strict the same folder builds, minus the bad tile: a partial success, exit status 1
    assert main(["--data_dir", str(data), "--output_dir", str(tmp_path / "out")]) == 1
    assert len(_rejected(tmp_path / "out")) == 1


def test_strict_failure_inside_a_worker_process(tmp_path, monkeypatch):
    data = make_tile_dir(tmp_path / "tiles", per_split=3)
    write_tile(data / "train", "train_zz", tile_arrays() | {"biome_code": np.int64(40)})
    monkeypatch.setattr(build_module, "CHUNK_SIZE", 1)
    with pytest.raises(TileError, match="train_zz.npz: 'biome_code': value 40 outside 0..16"):
        build_dataset(data, tmp_path / "out", strict=True, num_proc=2)
    assert not (tmp_path / "out").exists() and not _scratch_dirs(tmp_path / "out")


def test_every_tile_rejected_is_an_error(tmp_path):
    data = tmp_path / "tiles"
    write_tile(data / "train", "bad", tile_arrays() | {"month": np.int64(0)})
    with pytest.raises(ValueError, match=r"(?s)every tile under .* was rejected.*bad.npz: month: value 0 outside"):
        build_dataset(data, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # into folders that did not exist: the build made new/deeper/ and left it behind, empty
    with pytest.raises(ValueError, match="every tile under"):
        build_dataset(data, tmp_path / "new" / "deeper" / "out")
    assert not (tmp_path / "new").exists()
    (tmp_path / "runs" / "other").mkdir(parents=True)  # a folder that was there stays, and what it holds
    with pytest.raises(ValueError, match="every tile under"):
        build_dataset(data, tmp_path / "runs" / "a" / "out")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["other"]


def test_every_tile_rejected_is_one_line_naming_the_first_files(tmp_path):
    """The CLI's error (exit 2) listed the first rejections on lines of their own under the error line."""
    data = tmp_path / "tiles"
    for name in ("bad0", "bad1"):
        write_tile(data / "train", name, tile_arrays() | {"month": np.int64(0)})
    with pytest.raises(ValueError) as caught:
        build_dataset(data, tmp_path / "out")
    reason = "month: value 0 outside 1..12 (use -1 for unknown)"
    assert str(caught.value) == (f"every tile under {data} was rejected; 2 rejected, e.g. "
                                 f"{data / 'train' / 'bad0.npz'}: {reason}; {data / 'train' / 'bad1.npz'}: {reason}")


# ----------------------------------------------------------------------------- atomic output
@pytest.fixture()
def existing_dataset(tmp_path):
    out = tmp_path / "out"
    build_dataset(make_tile_dir(tmp_path / "old_tiles", per_split=1), out)
    return out, folder_digest(out)


def test_exception_mid_build_keeps_the_old_dataset(tmp_path, existing_dataset, monkeypatch):
    out, before = existing_dataset
    data = make_tile_dir(tmp_path / "new_tiles", per_split=3)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("disk on fire")
        return synthesize_opt_v1(*args, **kwargs)

    monkeypatch.setattr(build_module, "synthesize_opt_v1", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_dataset(data, out)
    assert folder_digest(out) == before
    assert not _scratch_dirs(out)
    assert len(datasets.load_from_disk(str(out))["train"]) == 1

    monkeypatch.undo()
    assert len(build_dataset(data, out)["train"]) == 3  # a complete build replaces it


@pytest.mark.parametrize(("error", "status"), [
    (OSError(28, "No space left on device"), 1),  # ENOSPC: the machine failed
    (PermissionError(13, "Permission denied"), 2),  # what the user can mend, as for stage2-convert-prithvi
])
def test_an_os_error_mid_build_exits_1_for_the_system_and_2_for_the_user(tmp_path, existing_dataset, monkeypatch,
                                                                         capsys, error, status):
    """The build gave 1 for any OSError, stage2-convert-prithvi and stage2-evaluate 1 only for a failure of the
    machine (`is_system_failure`): one rule for every command now."""
    out, before = existing_dataset
    data = make_tile_dir(tmp_path / "new_tiles", per_split=1)

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(build_module, "synthesize_opt_v1", failing)
    assert main(["--data_dir", str(data), "--output_dir", str(out)]) == status
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # the progress bar aside
    assert errors == [f"stage2-build-dataset: error: {error}"]
    assert folder_digest(out) == before and not _scratch_dirs(out)


KILLED_BUILD = textwrap.dedent(
    """
    import pathlib, sys, time
    import data_builders.build as build

    real_read_tile = build.read_tile
    calls = []

    def slow_read_tile(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # mid-way: tiles are being written into the scratch folder
            pathlib.Path(sys.argv[1]).write_text("mid-build")
            for _ in range(3000):  # short sleeps: a signal that reaches torch's own thread wakes no long sleep
                time.sleep(0.1)
        return real_read_tile(*args, **kwargs)

    build.read_tile = slow_read_tile
    sys.exit(build.main(sys.argv[2:]))
    """
)


def test_sigkill_mid_build_keeps_the_old_dataset(tmp_path, existing_dataset):
    out, before = existing_dataset
    data = make_tile_dir(tmp_path / "new_tiles", per_split=3)
    script, signal_file = tmp_path / "killed_build.py", tmp_path / "mid-build"
    script.write_text(KILLED_BUILD)
    process = subprocess.Popen(
        [sys.executable, str(script), str(signal_file), "--data_dir", str(data), "--output_dir", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not signal_file.exists():
            assert process.poll() is None, "the build ended before it was killed"
            assert time.monotonic() < deadline, "the build never reached the middle"
            time.sleep(0.05)
        assert _scratch_dirs(out), "the build should be writing into a scratch folder"
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert folder_digest(out) == before
    assert datasets.load_from_disk(str(out))["train"]["tile_id"] == ["train_0"]
    # the next build removes the dead build's scratch folder and replaces the dataset
    assert build_dataset(data, out)["train"]["tile_id"] == ["train_0", "train_1", "train_2"]
    assert not _scratch_dirs(out)


KILLED_BETWEEN_RENAMES = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import data_builders.build as build

    output_dir, real_replace = Path(sys.argv[1]), os.replace

    def replace(source, destination):
        if Path(destination) == output_dir and Path(source).name == "dataset":  # the old one is set aside by now
            os._exit(9)  # as SIGKILL would: no handler, no finally
        real_replace(source, destination)

    os.replace = replace
    sys.exit(build.main(["--data_dir", sys.argv[2], "--output_dir", sys.argv[1]]))
    """
)


def _all_rejected_tiles(root: Path) -> Path:
    write_tile(root / "train", "bad", tile_arrays() | {"month": np.int64(0)})
    return root


def test_build_killed_between_the_final_renames_keeps_the_old_dataset(tmp_path, existing_dataset):
    out, before = existing_dataset
    data = make_tile_dir(tmp_path / "new_tiles", per_split=2)
    script = tmp_path / "killed_swap.py"
    script.write_text(KILLED_BETWEEN_RENAMES)
    killed = subprocess.run([sys.executable, str(script), str(out), str(data)], capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == 9, killed.stderr[-3000:]
    assert not out.exists()
    kept = [info.parent for info in tmp_path.rglob(BUILD_INFO_FILE) if folder_digest(info.parent) == before]
    assert len(kept) == 1, "the old dataset must still be on disk"

    # the next build puts it back first, so a build that then fails leaves it in place
    with pytest.raises(ValueError, match="every tile under"):
        build_dataset(_all_rejected_tiles(tmp_path / "bad_tiles"), out)
    assert folder_digest(out) == before
    assert not _scratch_dirs(out) and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert build_dataset(data, out)["train"]["tile_id"] == ["train_0", "train_1"]


def test_dataset_left_in_the_scratch_folder_of_an_older_build_is_restored(tmp_path, existing_dataset):
    # builds before the shared replace_folder set the old dataset aside inside their scratch folder
    out, before = existing_dataset
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    scratch = out.parent / f".{out.name}{SCRATCH_MARKER}{dead}-0123abcd"
    scratch.mkdir()
    os.replace(out, scratch / "previous")
    with pytest.raises(ValueError, match="every tile under"):
        build_dataset(_all_rejected_tiles(tmp_path / "bad_tiles"), out)
    assert folder_digest(out) == before and not _scratch_dirs(out)


WORKERS_OF_A_KILLED_BUILD = textwrap.dedent(
    """
    import os, pathlib, sys, time
    import data_builders.build as build

    def stuck_read_tile(*args, **kwargs):  # in a worker process: say which one, then hang as on a slow disk
        (pathlib.Path(sys.argv[1]) / str(os.getpid())).write_text("reading")
        time.sleep(300)

    build.read_tile = stuck_read_tile
    sys.exit(build.main(sys.argv[2:]))
    """
)


def _process_gone(pid: int) -> bool:
    """No process `pid`, or only its exit status left (a zombie that its new parent has not reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_an_output_dir_that_is_a_link_is_kept_and_the_folder_it_names_replaced(tmp_path):
    """A link to a dataset on another disk was replaced by a folder of its own (the dataset written beside the link,
    the folder it named left with the old one), and the link was set aside as a hidden link that nothing removed."""
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    (tmp_path / "big").mkdir()
    (tmp_path / "small").mkdir()
    build_dataset(data, tmp_path / "big" / "arrow", seed=0)
    link = tmp_path / "small" / "arrow"
    link.symlink_to(tmp_path / "big" / "arrow", target_is_directory=True)
    build_dataset(data, link, seed=1)
    assert [p.name for p in (tmp_path / "small").iterdir()] == ["arrow"] and link.is_symlink()
    assert [p.name for p in (tmp_path / "big").iterdir()] == ["arrow"]
    assert read_build_info(datasets.load_from_disk(str(tmp_path / "big" / "arrow")))["opt_v1"]["seed"] == 1


def test_a_stale_scratch_folder_is_found_by_the_exact_output_name(tmp_path):
    """The scratch folders of killed builds were found with the output's name as a glob pattern: those of `ds[1]` were
    never removed, and a build of `ds[1]` took `ds1`'s for its own."""
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()  # a pid whose process has ended: the build that left these was killed
    own = tmp_path / f".ds[1]{SCRATCH_MARKER}{gone.pid}-deadbeef"
    other = tmp_path / f".ds1{SCRATCH_MARKER}{gone.pid}-cafecafe"
    for scratch in (own, other):
        (scratch / "cache").mkdir(parents=True)
        (scratch / "cache" / "train-00000-of-00001.arrow").write_bytes(b"left by a killed build")
    build_dataset(data, tmp_path / "ds[1]")
    assert not own.exists()
    assert (other / "cache" / "train-00000-of-00001.arrow").read_bytes() == b"left by a killed build"  # ds1's


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc")
def test_build_workers_die_with_a_killed_parent(tmp_path):
    data = make_tile_dir(tmp_path / "tiles", per_split=1)  # 3 splits: 3 jobs for 2 workers
    pids = tmp_path / "worker_pids"
    pids.mkdir()
    script = tmp_path / "killed_parent.py"
    script.write_text(WORKERS_OF_A_KILLED_BUILD)
    process = subprocess.Popen([sys.executable, str(script), str(pids), "--data_dir", str(data), "--output_dir",
                                str(tmp_path / "out"), "--num_proc", "2"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        workers = _wait_for_two_workers(process, pids)
        assert process.pid not in workers
        process.kill()
        assert process.wait(timeout=30) == -signal.SIGKILL
        assert _still_running(workers) == [], "workers outlived their parent"
    finally:
        _kill_all(process, workers)


def _wait_for_two_workers(process: subprocess.Popen, pids: Path) -> list[int]:
    """The PIDs of the two build workers, once both have started reading tiles (`WORKERS_OF_A_KILLED_BUILD`)."""
    deadline, workers = time.monotonic() + 120, []
    while len(workers) < 2:
        assert process.poll() is None, "the build ended before its workers started"
        assert time.monotonic() < deadline, "the two workers never started reading tiles"
        time.sleep(0.05)
        workers = [int(p.name) for p in pids.iterdir()]
    return workers


def _still_running(pids: list[int], within: float = 3) -> list[int]:
    deadline = time.monotonic() + within
    while not all(_process_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if not _process_gone(pid)]


def _kill_all(process: subprocess.Popen, workers: list[int]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
    for pid in workers:
        if not _process_gone(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc")
def test_a_worker_killed_mid_build_stops_the_build_in_one_line(tmp_path, existing_dataset):
    """A worker the OOM killer ends: the pool started another one and the build waited forever for the dead one's
    jobs. Now: one line naming it, exit status 1 (a failure of the system), the old dataset kept, no worker left."""
    out, before = existing_dataset
    data = make_tile_dir(tmp_path / "tiles", per_split=1)  # 3 splits: 3 jobs for 2 workers
    pids = tmp_path / "worker_pids"
    pids.mkdir()
    script = tmp_path / "stuck_workers.py"
    script.write_text(WORKERS_OF_A_KILLED_BUILD)
    process = subprocess.Popen([sys.executable, str(script), str(pids), "--data_dir", str(data), "--output_dir",
                                str(out), "--num_proc", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    workers: list[int] = []
    try:
        workers = _wait_for_two_workers(process, pids)
        os.kill(workers[0], signal.SIGKILL)
        assert process.wait(timeout=60) == 1
        stderr = process.stderr.read()
        assert "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines()[-1] == (
            f"stage2-build-dataset: error: a build worker process (pid {workers[0]}) died (killed by SIGKILL; out of "
            "memory? try a smaller --num_proc); nothing was written")
        assert _still_running(workers) == []
        assert folder_digest(out) == before and not _scratch_dirs(out)
    finally:
        _kill_all(process, workers)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc")
def test_ctrl_c_to_a_build_with_workers_is_one_line(tmp_path):
    """Ctrl-C reaches the whole process group, workers included: the build says "interrupted", no worker prints a
    traceback, and no worker is left."""
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    pids = tmp_path / "worker_pids"
    pids.mkdir()
    script = tmp_path / "stuck_workers.py"
    script.write_text(WORKERS_OF_A_KILLED_BUILD)

    def as_a_terminal_would():  # in the child: its own process group, Ctrl-C not ignored (CI's shell ignores it)
        os.setpgrp()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = subprocess.Popen([sys.executable, str(script), str(pids), "--data_dir", str(data), "--output_dir",
                                str(tmp_path / "out"), "--num_proc", "2"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=as_a_terminal_would)
    try:
        deadline = time.monotonic() + 120
        while len(list(pids.iterdir())) < 2:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the two workers never started reading tiles"
            time.sleep(0.05)
        workers = [int(p.name) for p in pids.iterdir()]
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 128 + signal.SIGINT
        stderr = process.stderr.read()
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
        assert stderr.strip().splitlines()[-1] == "interrupted"
        deadline = time.monotonic() + 3
        while not all(_process_gone(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_process_gone(pid) for pid in workers)
        assert not (tmp_path / "out").exists()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# ----------------------------------------------------------------------------- degradation presets
def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "data_builders.build", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_presets_in_python_and_the_build_record(tmp_path, sample_tiles_dir):
    data = copy_sample_subset(sample_tiles_dir, tmp_path / "tiles", per_split=2)
    mild = build_dataset(data, tmp_path / "mild", degradation="mild")["val"].with_format("numpy")[:]
    default = build_dataset(data, tmp_path / "default")["val"].with_format("numpy")[:]
    assert mild["opt_v1"].tobytes() == default["opt_v1"].tobytes()

    ds = build_dataset(data, tmp_path / "mixture", degradation="mixture", seed=4)
    info = read_build_info(ds)["opt_v1"]
    assert info["preset"] == "mixture" and info["degradation"] is None and info["degradation_version"] == 1
    assert info["mixture_presets"] == {name: DEGRADATION_PRESETS[name].to_dict() for name in ("mild", "strong")}
    assert "mixture_choice(seed, tile_id)" in info["description"]
    rows = ds["val"].with_format("numpy")[:]
    for target, tile_id, mask, opt_v1 in zip(rows["target"], rows["tile_id"], rows["valid_mask"], rows["opt_v1"]):
        config = DEGRADATION_PRESETS[mixture_choice(4, str(tile_id))]
        np.testing.assert_array_equal(synthesize_opt_v1(target, str(tile_id), 4, config, mask), opt_v1)

    overridden = build_dataset(data, tmp_path / "over", degradation="strong", degradation_overrides={"noise_std": 0})
    info = read_build_info(overridden)["opt_v1"]
    assert info["preset"] == "strong+overrides" and info["degradation"]["noise_std"] == 0
    assert info["degradation"]["crosstalk"] == DEGRADATION_PRESETS["strong"].crosstalk
    with pytest.raises(ValueError, match="unknown degradation preset 'bogus'"):
        build_dataset(data, tmp_path / "bad", degradation="bogus")
    with pytest.raises(ValueError, match="cannot be combined with the 'mixture' preset"):
        build_dataset(data, tmp_path / "bad", degradation="mixture", degradation_overrides={"noise_std": 0})


def test_cli_degradation_flag(tmp_path):
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    done = _run_cli("--data_dir", data, "--output_dir", tmp_path / "strong", "--degradation", "strong")
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / "strong" / BUILD_INFO_FILE).read_text())["opt_v1"]
    assert info["preset"] == "strong" and info["degradation"] == DEGRADATION_PRESETS["strong"].to_dict()

    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"noise_std": 0.01}))
    assert main(["--data_dir", str(data), "--output_dir", str(tmp_path / "over"), "--degradation", "strong",
                 "--degradation_config", str(overrides)]) == 0
    info = json.loads((tmp_path / "over" / BUILD_INFO_FILE).read_text())["opt_v1"]
    assert info["preset"] == "strong+overrides" and info["degradation"]["noise_std"] == 0.01

    bad = _run_cli("--data_dir", data, "--output_dir", tmp_path / "bad", "--degradation", "bogus")
    assert bad.returncode == 2 and not (tmp_path / "bad").exists()
    assert bad.stderr.strip() == ("stage2-build-dataset: error: --degradation: unknown preset 'bogus' "
                                  "(choose from mild, strong, mixture)")
    conflict = _run_cli("--data_dir", data, "--output_dir", tmp_path / "bad", "--degradation", "mixture",
                        "--degradation_config", overrides)
    assert conflict.returncode == 2 and len(conflict.stderr.strip().splitlines()) == 1
    assert "--degradation_config cannot be combined with --degradation mixture" in conflict.stderr


def test_cli_degradation_flags_without_a_synthetic_opt_v1_are_refused(tmp_path, capsys):
    """`--degradation` and `--degradation_config` did nothing with Stage 1 outputs or input_mode identity, silently."""
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"noise_std": 0.01}))
    cases = ((["--stage1_dir", str(stage1), "--degradation", "strong"], "--degradation", "stage1"),
             (["--input_mode", "identity", "--degradation", "mild", "--degradation_config", str(overrides)],
              "--degradation, --degradation_config", "identity"))
    for flags, named, mode in cases:
        assert main(["--data_dir", str(data), "--output_dir", str(tmp_path / "out"), *flags]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"stage2-build-dataset: error: {named}: for a synthetic opt_v1 only; this build's opt_v1 is input_mode "
            f"{mode!r}"]
    assert not (tmp_path / "out").exists()
    assert main(["--data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--input_mode", "identity"]) == 0


BAD_DEGRADATION_CONFIGS = {
    '{"noise_std": "a"}': "noise_std must be a finite number, got 'a'",
    '{"noise_std": null}': "noise_std must be a finite number, got None",
    '{"noise_std": NaN}': "noise_std must be a finite number, got nan",
    '{"blur_sigma": 5}': "blur_sigma must be a list of finite numbers, got 5",
    '{"low_freq_grid": 2.5}': "low_freq_grid must be an integer, got 2.5",
    '{"noise_std": 0.01,}': "Expecting property name enclosed in double quotes",
    "[1]": "expected a JSON object of DegradationConfig fields, got list",
}


@pytest.mark.parametrize("text", list(BAD_DEGRADATION_CONFIGS))
def test_cli_bad_degradation_config_is_one_line_naming_file_and_field(tmp_path, text):
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    config = tmp_path / "degradation.json"
    config.write_text(text)
    done = _run_cli("--data_dir", data, "--output_dir", tmp_path / "out", "--degradation", "strong",
                    "--degradation_config", config)
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"stage2-build-dataset: error: --degradation_config {config}: ")
    assert BAD_DEGRADATION_CONFIGS[text] in line


def test_cli_degradation_config_that_is_a_folder_is_a_user_error(tmp_path):
    """It used to exit 1 (a system failure) with "[Errno 21] Is a directory", not naming the flag."""
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    folder = tmp_path / "configs"
    folder.mkdir()
    done = _run_cli("--data_dir", data, "--output_dir", tmp_path / "out", "--degradation_config", folder)
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    assert done.stderr.strip().splitlines() == [
        f"stage2-build-dataset: error: --degradation_config {folder}: cannot read it (Is a directory)"]


def test_cli_output_dir_holding_other_files_is_a_user_error(tmp_path):
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    done = _run_cli("--data_dir", data, "--output_dir", other)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert str(other) in done.stderr and sorted(p.name for p in other.iterdir()) == ["keep.txt"]
    assert "exit code 2 at the first bad tile" in " ".join(_run_cli("--help").stdout.split())


def test_cli_dataset_seed_flag_and_its_deprecated_name(tmp_path, capsys):
    """The seed of the synthetic opt_v1 is --dataset_seed, as in stage2-train and stage2-evaluate; --seed, its name
    before, works for one more release with a warning."""
    data = make_tile_dir(tmp_path / "tiles", per_split=1)

    def seed_of(name):
        return json.loads((tmp_path / name / BUILD_INFO_FILE).read_text())["opt_v1"]["seed"]

    assert main(["--data_dir", str(data), "--output_dir", str(tmp_path / "default")]) == 0
    assert seed_of("default") == 0 and "deprecated" not in capsys.readouterr().err
    assert main(["--data_dir", str(data), "--output_dir", str(tmp_path / "new"), "--dataset_seed", "3"]) == 0
    assert seed_of("new") == 3 and "deprecated" not in capsys.readouterr().err
    assert main(["--data_dir", str(data), "--output_dir", str(tmp_path / "old"), "--seed", "3"]) == 0
    assert seed_of("old") == 3
    assert capsys.readouterr().err.strip().splitlines()[0] == (
        "stage2-build-dataset: warning: --seed is deprecated and will be removed in a future release; use "
        "--dataset_seed, as stage2-train and stage2-evaluate do")
    both = tmp_path / "both"  # the console script's exit status, as a subprocess
    conflict = _run_cli("--data_dir", data, "--output_dir", both, "--seed", "3", "--dataset_seed", "4")
    assert conflict.returncode == 2 and conflict.stderr.strip().splitlines() == [
        "stage2-build-dataset: error: --seed 3 and --dataset_seed 4 name the same seed; give --dataset_seed only"]
    assert not both.exists()
    assert main(["--data_dir", str(data), "--output_dir", str(both), "--seed", "4", "--dataset_seed", "4"]) == 0
    assert seed_of("both") == 4
    help_text = _run_cli("--help").stdout
    assert "--dataset_seed" in help_text and "--seed " not in help_text


def test_training_config_and_cache_key_know_the_preset(tmp_path):
    from training.args import Stage2DataArguments
    from data_builders.cache import dataset_cache_key

    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    keys = {name: dataset_cache_key(data, None, None, 0, degradation=name) for name in ("mild", "strong", "mixture")}
    assert len(set(keys.values())) == 3
    assert keys["mild"] == dataset_cache_key(data, None, None, 0)  # the key existing caches were built under
    with pytest.raises(ValueError, match="degradation must be one of"):
        dataset_cache_key(data, degradation="bogus")
    assert Stage2DataArguments().degradation == "mild"
    assert Stage2DataArguments(degradation="strong").degradation == "strong"
    with pytest.raises(ValueError, match="degradation must be one of .*'bogus'"):
        Stage2DataArguments(degradation="bogus")


def test_cache_key_reads_symlinked_split_folders(tmp_path):
    """The build reads a symlinked train/ (a common way to assemble splits): the cache key must see its tiles too,
    where it used to find none (FileNotFoundError) or miss their changes (a stale conversion)."""
    from data_builders.cache import dataset_cache_key

    real = make_tile_dir(tmp_path / "real", per_split=1)
    data = tmp_path / "linked"
    (data / "val").mkdir(parents=True)
    (data / "train").symlink_to(real / "train", target_is_directory=True)
    key = dataset_cache_key(data)
    write_tile(real / "train", "train_0", seed=99)
    os.utime(real / "train" / "train_0.npz", ns=(1, 1))
    assert dataset_cache_key(data) != key


def test_cache_key_ignores_what_the_build_does_not_read(tmp_path):
    """A run kept inside the data folder (its cache, its JSON records) used to change the key at every conversion:
    each run and resume converted the tiles again, into a new cache folder."""
    from data_builders.cache import dataset_cache_key

    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    key = dataset_cache_key(data)
    build_dataset(data, data / "run" / "_dataset" / key)
    (data / "notes.json").write_text("{}")
    # hidden files the discovery skips: an interrupted write's partial tile, a macOS AppleDouble file and its sidecar
    np.savez(data / "train" / ".train_0.npz.partial-1.npz", a=np.zeros(1))
    (data / "train" / "._train_0.npz").write_bytes(b"\x00\x05\x16\x07")
    (data / "train" / "._train_0.json").write_text("{}")
    assert dataset_cache_key(data) == key
    write_tile(data / "val", "val_1", seed=5)  # a new tile is a new key
    assert dataset_cache_key(data) != key


def test_cache_key_follows_the_tiles_a_build_rejects_unread(tmp_path):
    """An NPZ in a folder nested in a split folder, or directly in the data folder, is rejected by name without being
    read: the conversion's rejected.jsonl lists it, so adding or removing one is a new key (a cached list would go
    stale: a tile removed still reported, one added never reported), and a folder without any keeps its old key."""
    from data_builders.cache import dataset_cache_key

    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    clean = dataset_cache_key(data)
    nested = write_tile(data / "val" / "2019", "extra")
    with_nested = dataset_cache_key(data)
    assert with_nested != clean
    root = write_tile(data, "root")
    assert dataset_cache_key(data) not in (clean, with_nested)
    root.unlink()
    root.with_suffix(".json").unlink(missing_ok=True)
    assert dataset_cache_key(data) == with_nested
    nested.unlink()
    assert dataset_cache_key(data) == clean


def test_training_yaml_selects_the_preset(tmp_path):
    from training.train import ensure_arrow_dataset, parse_args

    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    config = tmp_path / "config.yaml"
    config.write_text("degradation: strong\n")
    _, data_args, settings = parse_args(["--config", str(config), "--data_dir", str(data),
                                         "--output_dir", str(tmp_path / "run")])
    assert data_args.degradation == "strong" and settings["degradation"] == "strong"
    built = ensure_arrow_dataset(data_args, tmp_path / "run")
    assert json.loads((built / BUILD_INFO_FILE).read_text())["opt_v1"]["preset"] == "strong"
    data_args.degradation = "mild"
    assert ensure_arrow_dataset(data_args, tmp_path / "run") != built  # never the strong cache entry


def test_what_a_build_record_says_opt_v1_is():
    from data_builders.build import opt_v1_settings

    assert opt_v1_settings({"opt_v1": {"mode": "synthetic", "preset": "strong", "seed": 5}}) == {
        "input_mode": "synthetic", "degradation": "strong", "dataset_seed": 5}
    assert opt_v1_settings({"opt_v1": {"mode": "synthetic", "seed": 0}}) == {  # built before presets had names
        "input_mode": "synthetic", "degradation": None, "dataset_seed": 0}
    assert opt_v1_settings({"opt_v1": {"mode": "stage1", "stage1_dir": "/s"}}) == {
        "input_mode": "stage1", "degradation": None, "dataset_seed": None}
    assert opt_v1_settings({}) == {"input_mode": None, "degradation": None, "dataset_seed": None}


def test_a_run_is_recorded_with_the_opt_v1_of_its_arrow_dataset(tmp_path, caplog):
    """An Arrow --data_dir holds its own opt_v1, whatever the flags say: the training record (training_config.json,
    the model card) names the dataset's input_mode, preset and seed, and a run says which flags it did not use."""
    from training.args import Stage2DataArguments
    from data_builders.build import saved_opt_v1_problem
    from training.train import training_opt_v1

    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    strong_dir = tmp_path / "strong"
    strong = build_dataset(data, strong_dir, degradation="strong", seed=5)
    flags = Stage2DataArguments(data_dir=str(strong_dir))  # the defaults: mild, dataset seed 0
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert training_opt_v1(strong, flags) == {"input_mode": "synthetic", "degradation": "strong",
                                                  "dataset_seed": 5}
        assert training_opt_v1(strong, flags, warn=False)["degradation"] == "strong"  # other processes are quiet
    assert [record.getMessage() for record in caplog.records] == [
        f"--degradation mild is not used: --data_dir {strong_dir} is an Arrow dataset whose opt_v1 was synthesised "
        "with degradation 'strong' (stage2-build-dataset --degradation); the run is recorded with the dataset's.",
        f"--dataset_seed 0 is not used: --data_dir {strong_dir} is an Arrow dataset whose opt_v1 was synthesised "
        "with dataset_seed 5 (stage2-build-dataset --dataset_seed); the run is recorded with the dataset's."]

    caplog.clear()
    same = Stage2DataArguments(data_dir=str(strong_dir), input_mode="synthetic", degradation="strong", dataset_seed=5)
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert training_opt_v1(strong, same)["dataset_seed"] == 5
        assert saved_opt_v1_problem(strong_dir, input_mode="synthetic") is None  # the dataset's own is accepted
        identity = build_dataset(data, tmp_path / "identity", input_mode="identity")
        assert training_opt_v1(identity, flags) == {"input_mode": "identity", "degradation": None,
                                                    "dataset_seed": None}
    assert not caplog.records
    # a DatasetDict made another way has no build record: the flags are all there is to record
    unrecorded = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"tile_id": ["a"]})})
    assert training_opt_v1(unrecorded, Stage2DataArguments(data_dir="d", input_mode="identity")) == {
        "input_mode": "identity"}

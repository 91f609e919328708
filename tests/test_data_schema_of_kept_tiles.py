"""The dataset's columns are those of the tiles it keeps: a tile rejected while its pixels are read (after the
columns were decided from every discovered tile) must not shape them. A folder with a bad tile builds the dataset
the same folder gives without it, apart from rejected.jsonl and the build record's rejected count."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import tile_arrays, write_tile

import datasets
from data_builders import build as build_module
from data_builders.build import REJECTED_FILE, build_dataset, read_build_info

datasets.disable_progress_bars()

GOOD = {"train": ["t0", "t1", "t2"], "val": ["v0"]}


def _folder(root: Path, bad_arrays: dict | None = None, bad_sidecar: dict | None = None) -> Path:
    """Good tiles (Sentinel-1, sidecar country "Austria") and, when given, a bad tile `train/a_bad` (sorted first)."""
    for split, ids in GOOD.items():
        for i, tile_id in enumerate(ids):
            write_tile(root / split, tile_id, seed=i, sidecar={"country": "Austria", "index": i})
    if bad_arrays is not None:
        write_tile(root / "train", "a_bad", arrays=bad_arrays, sidecar=bad_sidecar)
    return root


def _remove_bad(root: Path) -> None:
    for name in ("a_bad.npz", "a_bad.json"):
        (root / "train" / name).unlink(missing_ok=True)


def _assert_same_dataset(built, clean) -> None:
    assert list(built) == list(clean)
    for split in clean:
        assert list(built[split].features.items()) == list(clean[split].features.items())  # columns, in order
        assert built[split].data.table.equals(clean[split].data.table)
    info, clean_info = read_build_info(built), read_build_info(clean)
    for key in ("s1", "metadata_columns", "statistics", "input_scale"):
        assert info[key] == clean_info[key], key
    assert info["source"]["tiles"] == clean_info["source"]["tiles"]


def _rejected_files(output_dir: Path) -> list[str]:
    return [Path(json.loads(line)["file"]).name for line in (output_dir / REJECTED_FILE).read_text().splitlines()]


def test_a_rejected_tile_without_s1_does_not_drop_s1(tmp_path):
    data = _folder(tmp_path / "tiles", tile_arrays(seed=9, s1=False, month=13))
    built = build_dataset(data, tmp_path / "out")
    assert "s1" in built["train"].features and built["train"]["tile_id"] == GOOD["train"]
    assert read_build_info(built)["s1"].startswith("carried")
    assert _rejected_files(tmp_path / "out") == ["a_bad.npz"]  # listed once, though the kept tiles were written twice

    _remove_bad(data)
    _assert_same_dataset(built, build_dataset(data, tmp_path / "clean"))


def test_a_rejected_tiles_sidecar_does_not_change_the_sidecar_columns(tmp_path):
    # keys in another order, a value of another type, a key no kept tile has
    sidecar = {"only_bad": [1, {"x": 2}], "index": 1.5, "country": 5}
    data = _folder(tmp_path / "tiles", tile_arrays(seed=9, month=13), sidecar)
    built = build_dataset(data, tmp_path / "out")
    train = built["train"]
    assert train.features["country"] == datasets.Value("string") and train["country"] == ["Austria"] * 3
    assert train.features["index"] == datasets.Value("int64") and train["index"] == [0, 1, 2]
    assert "only_bad" not in train.features
    assert read_build_info(built)["metadata_columns"] == {
        "country": {"sidecar_key": "country", "kind": "str"}, "index": {"sidecar_key": "index", "kind": "int"}}

    _remove_bad(data)
    _assert_same_dataset(built, build_dataset(data, tmp_path / "clean"))


def test_num_proc_2_gives_the_dataset_of_num_proc_1(tmp_path, monkeypatch):
    data = _folder(tmp_path / "tiles", tile_arrays(seed=9, s1=False, month=13), {"country": 5})
    monkeypatch.setattr(build_module, "CHUNK_SIZE", 1)  # several chunks, so two workers share them
    one = build_dataset(data, tmp_path / "one", num_proc=1)
    two = build_dataset(data, tmp_path / "two", num_proc=2)
    assert "s1" in one["train"].features and one["train"].features["country"] == datasets.Value("string")
    _assert_same_dataset(two, one)
    assert _rejected_files(tmp_path / "one") == _rejected_files(tmp_path / "two") == ["a_bad.npz"]


def test_a_tile_rejected_for_its_stage1_file_does_not_drop_s1(tmp_path):
    """The rejection names the Stage 1 file, not the tile: the tile is still the one left out."""
    data = _folder(tmp_path / "tiles", tile_arrays(seed=9, s1=False))
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    rng = np.random.default_rng(0)
    for tile_id in [tile_id for ids in GOOD.values() for tile_id in ids]:
        np.savez(stage1 / f"{tile_id}.npz", opt_v1=rng.uniform(0, 0.5, (4, 120, 120)).astype(np.float32))
    built = build_dataset(data, tmp_path / "out", stage1_dir=stage1)  # a_bad has no Stage 1 file
    assert "s1" in built["train"].features and built["train"]["tile_id"] == GOOD["train"]
    assert _rejected_files(tmp_path / "out") == ["a_bad.npz"]


@pytest.mark.parametrize("bad_sidecar", [{"country": "Austria", "index": 7}, None])
def test_a_rejected_tile_that_changes_no_column_is_read_once(tmp_path, monkeypatch, bad_sidecar):
    data = _folder(tmp_path / "tiles", tile_arrays(seed=9, month=13), bad_sidecar)
    reads = []
    read_tile = build_module.read_tile
    monkeypatch.setattr(build_module, "read_tile", lambda path, **kw: reads.append(path) or read_tile(path, **kw))
    built = build_dataset(data, tmp_path / "out")
    assert len(reads) == 5 and "s1" in built["train"].features
    assert _rejected_files(tmp_path / "out") == ["a_bad.npz"]

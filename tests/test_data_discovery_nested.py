"""Tiles the build's discovery does not read: NPZ files in folders nested in a split folder or directly in the data
folder (rejected by name: they were left out without a word), hidden files and folders (never read, never
reported), and a saved dataset given as the data folder (refused in one line)."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from _data_helpers import make_tile_dir, write_tile

import datasets
from data_builders.build import REJECTED_FILE, SAVED_DATASET_PROBLEM, build_dataset, main
from data_builders.cache import ARROW_MARKER, dataset_cache_key
from data_builders.discovery import NESTED_TILE_PROBLEM, ROOT_TILE_PROBLEM, discover_tiles
from data_builders.tiles import TileError
from modeling_stage2._files import partial_path

datasets.disable_progress_bars()


def _nested(path, folder) -> dict:
    """The rejection record of the nested tile `path` under the split folder `folder`."""
    split = "val" if folder.name == "validation" else folder.name
    problem = NESTED_TILE_PROBLEM.format(split_folder=folder.name, folder=folder)
    return {"file": str(path), "key": None, "problem": problem, "split": split}


def _at_root(path, data, split=None) -> dict:
    """The rejection record of the tile `path` directly in the data folder `data`: in the split its sidecar names."""
    return {"file": str(path), "key": None, "problem": ROOT_TILE_PROBLEM.format(data_dir=data), "split": split}


def test_a_tile_in_a_folder_nested_in_a_split_folder_is_rejected_by_name(tmp_path, caplog, capsys):
    """DATA_DIR/train/2019/x.npz was left out of the dataset without a word, and a build of nothing but nested tiles
    said only 'no usable tile'."""
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    nested = write_tile(data / "train" / "2019", "nested_0")
    deep = write_tile(data / "val" / "a" / "b", "deep_0")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="data_builders.build"):
        assert main(["--data_dir", str(data), "--output_dir", str(out)]) == 1  # a partial success, as for a bad tile
    records = [json.loads(line) for line in (out / REJECTED_FILE).read_text().splitlines()]
    assert records == [_nested(nested, data / "train"), _nested(deep, data / "val")]
    assert f"rejected 2 (reasons in {out / REJECTED_FILE})" in caplog.text
    built = datasets.load_from_disk(str(out))  # the top-level tiles build as before; the nested ones are not read
    assert {split: built[split]["tile_id"] for split in built} == {"train": ["train_0"], "val": ["val_0"],
                                                                   "test": ["test_0"]}
    capsys.readouterr()
    assert main(["--data_dir", str(data), "--output_dir", str(tmp_path / "strict"), "--strict"]) == 2
    strict_line = capsys.readouterr().err.splitlines()[-1]
    assert strict_line == f"stage2-build-dataset: error: {nested}: {_nested(nested, data / 'train')['problem']}"
    # nothing but nested tiles: the one-line error names them rather than saying only that no tile was found
    only_nested = tmp_path / "only_nested"
    shutil.copytree(data / "train" / "2019", only_nested / "train" / "2019")
    assert main(["--data_dir", str(only_nested), "--output_dir", str(tmp_path / "none")]) == 2
    moved = only_nested / "train" / "2019" / nested.name
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"stage2-build-dataset: error: no usable tile under {only_nested}; 1 rejected, e.g. {moved}: -: "
        f"{_nested(moved, only_nested / 'train')['problem']}")


def test_hidden_files_and_folders_are_neither_tiles_nor_reported(tmp_path):
    """Jupyter's checkpoints, an interrupted write's partial file and macOS AppleDouble files, at the top of a split
    folder or in a folder nested in it, are never read: only the visible nested tile is reported."""
    data = make_tile_dir(tmp_path, per_split=1)
    train = data / "train"
    for hidden in (train / ".ipynb_checkpoints", data / "val" / ".cache" / "deeper"):  # copies of the tiles
        hidden.mkdir(parents=True)
        shutil.copy(train / "train_0.npz", hidden / "train_0.npz")
    nested = write_tile(train / "2019", "nested_0")
    for folder in (train, train / "2019"):
        partial_path(folder / "train_1.npz").write_bytes(nested.read_bytes()[:3000])
        (folder / "._train_0.npz").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble: not a zip archive
    splits, rejected = discover_tiles(data)
    assert {split: [spec.tile_id for spec in specs] for split, specs in splits.items()} == {
        "train": ["train_0"], "val": ["val_0"], "test": ["test_0"]}
    assert rejected == [_nested(nested, train)]


def test_nested_tiles_are_found_through_linked_folders_each_once(tmp_path):
    """The discovery reads a linked split folder; so it searches linked subfolders, each real folder once: a link
    loop ends, and a link to a split folder leaves its tiles to that split (they are not nested tiles)."""
    real = make_tile_dir(tmp_path / "real", per_split=1)
    nested = write_tile(real / "train" / "2019", "nested_0")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train").symlink_to(real / "train", target_is_directory=True)
    (data / "validation").symlink_to(real / "val", target_is_directory=True)
    (real / "train" / "2019" / "loop").symlink_to(real / "train" / "2019", target_is_directory=True)
    (real / "train" / "2020").mkdir()
    (real / "train" / "2020" / "up").symlink_to(real / "train", target_is_directory=True)
    (real / "val" / "other").symlink_to(real / "test", target_is_directory=True)  # a folder of no split of data
    splits, rejected = discover_tiles(data)
    assert sorted(splits) == ["train", "val"] and [spec.tile_id for spec in splits["train"]] == ["train_0"]
    linked = data / "train" / "2019" / nested.name
    other = data / "validation" / "other" / "test_0.npz"
    assert rejected == [_nested(linked, data / "train"), _nested(other, data / "validation")]
    with pytest.raises(TileError) as caught:
        discover_tiles(data, strict=True)
    assert (caught.value.path, caught.value.key) == (str(linked), None)


def test_stage2_refine_skips_hidden_files_of_a_folder_of_tiles(tmp_path):
    """stage2-refine's search of a folder reads no hidden file either (the one rule, `is_hidden`): a partial file
    and an AppleDouble file beside the tiles, in the folder or in a subfolder, are no tiles to refine."""
    from inference_stage2.tiles import tile_inputs

    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    for folder in (data / "train", data / "val" / "2019"):
        folder.mkdir(exist_ok=True)
        partial_path(folder / "x.npz").write_bytes(b"PK")
        (folder / "._train_0.npz").write_bytes(b"\x00\x05\x16\x07")
    found = [str(relative) for _, relative in tile_inputs(data, tmp_path / "out")]
    assert found == ["test/test_0.npz", "train/train_0.npz", "val/val_0.npz"]


def test_a_stage1_folder_kept_inside_a_split_folder_holds_no_nested_tiles(tmp_path):
    """`--stage1_dir DATA/train/stage1`: its `opt_v1` files are Stage 1 outputs, not tiles left out."""
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    stage1 = data / "train" / "stage1"
    stage1.mkdir()
    for tile_id in ("train_0", "val_0", "test_0"):
        np.savez(stage1 / f"{tile_id}.npz", opt_v1=np.full((4, 120, 120), 0.1, np.float32))
    stray = write_tile(data / "train" / "2019", "nested_0")
    _, rejected = discover_tiles(data, stage1_dir=stage1)
    assert rejected == [_nested(stray, data / "train")]  # the Stage 1 folder is skipped, the stray tile is not
    assert len(discover_tiles(data)[1]) == 4
    out = tmp_path / "out"
    shutil.rmtree(stray.parent)
    assert main(["--data_dir", str(data), "--output_dir", str(out), "--stage1_dir", str(stage1)]) == 0
    assert not (out / REJECTED_FILE).exists() or (out / REJECTED_FILE).read_text() == ""


def test_a_tile_directly_in_the_data_folder_is_rejected_by_name(tmp_path, caplog, capsys):
    """DATA_DIR/root_tile.npz, beside the split folders, was left out without a word, even with a sidecar naming its
    split: it is rejected by name as a nested tile is. DATA_DIR's other folders (Stage 1 outputs, a run) and hidden
    files are not searched. The tile changes the cache key (a cached conversion's list of rejected tiles would go
    stale), the files not searched do not."""
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    clean = dataset_cache_key(data)
    root = write_tile(data, "root_tile", sidecar={"split": "train"})
    key = dataset_cache_key(data)
    assert key != clean
    partial_path(data / "root_1.npz").write_bytes(root.read_bytes()[:3000])
    (data / "._root_tile.npz").write_bytes(b"\x00\x05\x16\x07")
    for folder in ("stage1", "run"):  # folders of the data folder that are no split folder: not searched
        (data / folder).mkdir()
        shutil.copy(root, data / folder / "train_0.npz")
    assert dataset_cache_key(data) == key
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="data_builders.build"):
        assert main(["--data_dir", str(data), "--output_dir", str(out)]) == 1  # a partial success, as for a bad tile
    assert [json.loads(line) for line in (out / REJECTED_FILE).read_text().splitlines()] == [
        _at_root(root, data, "train")]
    assert f"rejected 1 (reasons in {out / REJECTED_FILE})" in caplog.text
    built = datasets.load_from_disk(str(out))
    assert {split: built[split]["tile_id"] for split in built} == {"train": ["train_0"], "val": ["val_0"],
                                                                   "test": ["test_0"]}
    capsys.readouterr()
    assert main(["--data_dir", str(data), "--output_dir", str(tmp_path / "strict"), "--strict"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"stage2-build-dataset: error: {root}: {_at_root(root, data)['problem']}")
    # with a nested tile too, both are named; Stage 1 outputs kept at the top of the data folder are no tiles
    nested = write_tile(data / "val" / "2019", "nested_0")
    assert discover_tiles(data)[1] == [_nested(nested, data / "val"), _at_root(root, data, "train")]
    assert discover_tiles(data, stage1_dir=data)[1] == [_nested(nested, data / "val")]
    bare = write_tile(data, "bare")  # no sidecar: no split
    assert _at_root(bare, data) in discover_tiles(data)[1]


def test_a_saved_dataset_given_as_the_data_folder_is_refused_in_one_line(tmp_path, capsys):
    """`stage2-build-dataset --data_dir ds1` on a dataset built already said only 'no usable tile under ds1': it says
    that ds1 is a saved dataset, which stage2-train and stage2-evaluate read as it is, before any work."""
    saved = tmp_path / "ds1"
    build_dataset(make_tile_dir(tmp_path / "tiles", per_split=1), saved)
    assert (saved / ARROW_MARKER).is_file()
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["--data_dir", str(saved), "--output_dir", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"stage2-build-dataset: error: --data_dir {saved} {SAVED_DATASET_PROBLEM}"]
    assert "stage2-train --data_dir" in SAVED_DATASET_PROBLEM and "stage2-evaluate --data" in SAVED_DATASET_PROBLEM
    assert not out.exists()

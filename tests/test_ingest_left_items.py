"""`stage2-ingest-bigearthnet`: what `--max_patches` takes (patches in patch_id order, so possibly one split only, a
warning when it leaves out a split `stage2-train` needs), and a Ctrl-C just before the output is complete."""
from __future__ import annotations

import json
import os
import signal

import pyarrow.parquet as pq
import pytest
import test_data_bigearthnet
from test_data_bigearthnet import _metadata, _patches_lmdb

from data_builders import bigearthnet
from data_builders.bigearthnet import SKIPPED_FILE, ingest_bigearthnet, main

_files = bigearthnet._files  # modeling_stage2._files, without importing the package

benv2 = test_data_bigearthnet.benv2  # the shared BigEarthNet v2 sample (skips where ../shared is absent)

PATCH = "S2A_MSIL2A_20180101T100000_0_{}"  # `_patches_lmdb`'s patch ids
WARNING = ("stage2-ingest-bigearthnet: warning: --max_patches {n} stopped the ingest before any {splits} tile "
           "(patches go in patch_id order); stage2-train needs 'train' and 'val'")


def _split_patches(tmp_path, splits: list[str], cloudy: tuple[int, ...] = ()):
    """`_patches_lmdb` with patch i in `splits[i]` (BigEarthNet's names), listed in the metadata in reverse order."""
    lmdb_dir, metadata = _patches_lmdb(tmp_path, count=len(splits))
    rows = pq.read_table(metadata).to_pylist()
    for i, row in enumerate(rows):
        row["split"], row["contains_cloud_or_shadow"] = splits[i], i in cloudy
    return lmdb_dir, _metadata(metadata, rows[::-1])


def _ingest(lmdb_dir, metadata, output, *flags) -> int:
    return main(["--lmdb", str(lmdb_dir), "--metadata", str(metadata), "--output_dir", str(output), *map(str, flags)])


@pytest.mark.parametrize(("max_patches", "written", "left_out"), [
    (1, {"test": 1}, ["train", "val"]),
    (2, {"test": 1, "val": 1}, ["train"]),
    (3, {"test": 1, "val": 1, "train": 1}, []),  # the fourth patch is a train patch too: no split is left out
])
def test_max_patches_takes_patches_in_patch_id_order_and_warns_when_a_training_split_is_left_out(
        tmp_path, capsys, max_patches, written, left_out):
    """`--max_patches N` stops after N tiles written in patch_id order (not the metadata's order), whatever their
    split: a small N gave a folder without the train or val split that stage2-train needs, without a word."""
    lmdb_dir, metadata = _split_patches(tmp_path, ["test", "validation", "train", "train"])
    output = tmp_path / "tiles"
    assert _ingest(lmdb_dir, metadata, output, "--max_patches", max_patches) == 0  # a warning, not a failure
    out, err = capsys.readouterr()
    per_split = ", ".join(f"{split} {n}" for split, n in sorted(written.items()))
    assert out == f"wrote {max_patches} tiles to {output} ({per_split}); skipped 0\n"
    assert sorted(p.stem for p in output.glob("*/*.npz")) == [PATCH.format(i) for i in range(max_patches)]
    assert err == (WARNING.format(n=max_patches, splits=" or ".join(map(repr, left_out))) + "\n" if left_out else "")
    summary = ingest_bigearthnet(lmdb_dir, metadata, tmp_path / "again", max_patches=max_patches)
    assert summary["written"] == written and summary["splits_left_out"] == left_out


@pytest.mark.parametrize(("splits", "cloudy", "left_out"), [
    (["test", "test"], (), []),  # the metadata has no train or val patch: nothing to warn of
    (["validation", "train", "test"], (1,), ["test"]),  # the train patch is cloudy: skipped anyway
])
def test_no_warning_for_a_split_the_ingest_would_not_have_written(tmp_path, capsys, splits, cloudy, left_out):
    lmdb_dir, metadata = _split_patches(tmp_path, splits, cloudy)
    output = tmp_path / "tiles"
    assert _ingest(lmdb_dir, metadata, output, "--max_patches", 1) == 0
    assert capsys.readouterr().err == ""
    assert ingest_bigearthnet(lmdb_dir, metadata, tmp_path / "again", max_patches=1)["splits_left_out"] == left_out


def test_max_patches_on_the_bigearthnet_sample_gives_the_test_split_only(benv2, tmp_path, capsys):
    """The sample's 18 clear v2 patches sort test (6), val (6), train (6) by patch id: 12 tiles or fewer have no
    train split."""
    lmdb_dir, metadata = benv2 / "BigEarthNet-V2-LMDB", benv2 / "metadata.parquet"
    assert _ingest(lmdb_dir, metadata, tmp_path / "tiles", "--max_patches", 4) == 0
    assert capsys.readouterr().err == WARNING.format(n=4, splits="'train' or 'val'") + "\n"
    assert {p.parent.name for p in (tmp_path / "tiles").glob("*/*.npz")} == {"test"}


def _complete_output(output) -> list[str]:
    """The output folder's files, relative; no partial file (`_files.is_hidden`) among them."""
    files = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())
    assert not [name for name in files if _files.is_hidden(output / name)], files
    return files


TILES = [f"train/{PATCH.format(i)}.{ext}" for i in range(3) for ext in ("json", "npz")]


@pytest.mark.parametrize("previous_list", ["none", "another ingest's"])
def test_a_ctrl_c_before_the_skipped_list_is_in_place_is_a_plain_interrupt(
        default_dispositions, tmp_path, capsys, monkeypatch, previous_list):
    """After the last tile but before `skipped.jsonl` is renamed into place the output is not complete: "interrupted",
    130, the tiles whole, no partial list left and the folder's previous list (if any) untouched."""
    lmdb_dir, metadata = _patches_lmdb(tmp_path)
    output = tmp_path / "tiles"
    before = json.dumps({"patch_id": PATCH.format(9), "reason": "from another ingest"}) + "\n"
    if previous_list != "none":
        output.mkdir()
        (output / SKIPPED_FILE).write_text(before)
    real_replace = os.replace

    def ctrl_c_then_replace(source, target):
        if os.path.basename(target) == SKIPPED_FILE:
            os.kill(os.getpid(), signal.SIGINT)
        real_replace(source, target)

    monkeypatch.setattr(_files.os, "replace", ctrl_c_then_replace)
    assert _ingest(lmdb_dir, metadata, output) == 130
    assert capsys.readouterr() == ("", "interrupted\n")
    assert _complete_output(output) == ([] if previous_list == "none" else [SKIPPED_FILE]) + TILES
    if previous_list != "none":
        assert (output / SKIPPED_FILE).read_text() == before

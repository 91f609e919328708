"""BigEarthNet v2 ingest: the shared LMDB gives back the bundled tiles; the biome mapping; bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_builders.bigearthnet import (
    BIOME_PRIORITY,
    CLOUD_SNOW_METADATA,
    SKIPPED_FILE,
    biome_from_labels,
    ingest_bigearthnet,
    main,
    month_from_patch_name,
    resolve_lmdb_dir,
)
from data_builders.build import build_dataset


@pytest.fixture(scope="module")
def benv2(shared_dir) -> Path:
    path = shared_dir / "data" / "bigearthnet_sample" / "benv2_lmdb"
    if not (path / "metadata.parquet").is_file():
        pytest.skip(f"{path} has no BigEarthNet v2 sample")
    return path


def test_ingest_reproduces_the_bundled_v2_tiles(benv2, sample_tiles_dir, tmp_path):
    summary = ingest_bigearthnet(benv2 / "BigEarthNet-V2-LMDB", benv2 / "metadata.parquet", tmp_path,
                                 include_cloudy_snowy=True)
    assert summary["written"] == {"train": 8, "val": 8, "test": 8} and summary["skipped"] == {}
    written = sorted(tmp_path.glob("*/*.npz"))
    assert len(written) == 24
    for path in written:
        bundled = sample_tiles_dir / path.parent.name / path.name  # same split folder
        assert bundled.is_file(), f"{path.name} is not in the bundled sample's {path.parent.name} split"
        ours, theirs = np.load(path, allow_pickle=False), np.load(bundled, allow_pickle=False)
        assert sorted(ours.files) == sorted(theirs.files)
        for key in theirs.files:
            assert ours[key].dtype == theirs[key].dtype and np.array_equal(ours[key], theirs[key]), key
        sidecar = json.loads(path.with_suffix(".json").read_text())
        bundled_sidecar = json.loads(bundled.with_suffix(".json").read_text())
        assert {k: sidecar[k] for k in bundled_sidecar} == bundled_sidecar
        assert set(sidecar) - set(bundled_sidecar) == {"s1_name"} and sidecar["s1_name"].startswith("S1")  # docs
    assert (tmp_path / SKIPPED_FILE).read_text() == ""


def test_cloudy_and_snowy_patches_are_skipped_by_default(benv2, tmp_path):
    both = [benv2 / "metadata.parquet", benv2 / CLOUD_SNOW_METADATA]
    summary = ingest_bigearthnet(benv2, both, tmp_path)  # the LMDB's parent folder is accepted
    assert summary["written"] == {"train": 6, "val": 6, "test": 6}
    assert summary["skipped"] == {"cloudy or snowy": 6}
    skipped = [json.loads(line) for line in (tmp_path / SKIPPED_FILE).read_text().splitlines()]
    assert {r["patch_id"] for r in skipped} == {
        "S2A_MSIL2A_20171101T094131_N9999_R036_T35VNJ_00_00", "S2A_MSIL2A_20171101T094131_N9999_R036_T35VNJ_13_13",
        "S2A_MSIL2A_20171101T094131_N9999_R036_T35VNJ_23_24", "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_38_87",
        "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_70_40", "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_38_58"}
    assert not list(tmp_path.glob("*/*T35VNJ*.npz"))


def test_ingested_tiles_build_into_a_dataset(benv2, tmp_path, capsys):
    code = main(["--lmdb", str(benv2 / "BigEarthNet-V2-LMDB"), "--metadata", str(benv2 / "metadata.parquet"),
                 "--output_dir", str(tmp_path / "tiles"), "--max_patches", "4"])
    assert code == 0
    assert "wrote 4 tiles to" in capsys.readouterr().out
    ds = build_dataset(tmp_path / "tiles", tmp_path / "ds")
    assert sum(len(split) for split in ds.values()) == 4
    assert "s1" in ds["test"].features and set(ds["test"]["country"]) == {"Austria"}


def test_biome_mapping_reproduces_every_bundled_tile(sample_tiles_dir):
    tiles = sorted(sample_tiles_dir.glob("*/*.npz"))
    assert len(tiles) == 54
    for path in tiles:
        labels = json.loads(path.with_suffix(".json").read_text())["labels"]
        assert biome_from_labels(labels) == int(np.load(path)["biome_code"]), (path.name, labels)


def test_biome_mapping_rules():
    assert biome_from_labels(["Urban fabric", "Inland waters"]) == 0  # water first
    assert biome_from_labels(["Coniferous forest", "Broad-leaved forest"]) == 1
    assert biome_from_labels(["Pastures", "Arable land"]) == 10
    assert biome_from_labels(["Arable land", "Complex cultivation patterns"]) == 12
    assert biome_from_labels(["Beaches, dunes, sands"]) == 16
    assert biome_from_labels(["Non-irrigated arable land"]) == 12  # 43-class name
    assert biome_from_labels([]) == -1 and biome_from_labels(["Moon dust"]) == -1
    codes = [code for code, _, _ in BIOME_PRIORITY]
    assert len(codes) == len(set(codes)) and all(0 <= c <= 16 for c in codes)
    names = [name for _, _, group in BIOME_PRIORITY for name in group]
    assert len(names) == len(set(names))


def test_month_from_patch_name():
    assert month_from_patch_name("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57") == 6
    assert month_from_patch_name("S2B_MSIL2A_20180525T94031_23_83") == 5
    assert month_from_patch_name("S1B_IW_GRDH_1SDV_20171101T154016_35VNJ_0_0") == 11
    with pytest.raises(ValueError, match="no acquisition date"):
        month_from_patch_name("patch_without_date")
    with pytest.raises(ValueError, match="no acquisition date"):
        month_from_patch_name("S2A_MSIL2A_20171301T101031_1_1")


def _tiny_lmdb(path: Path, entries: dict) -> Path:
    import lmdb
    from safetensors.numpy import save

    env = lmdb.open(str(path), map_size=64 << 20)
    with env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key.encode(), value if isinstance(value, bytes) else save(value))
    env.close()
    return path


def _metadata(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_bad_lmdb_values_are_skipped_with_reasons(tmp_path):
    s2 = {band: np.full((120, 120), 500, np.uint16) for band in ("B02", "B03", "B04", "B08")}
    s1 = {"VV": np.zeros((120, 120), np.float32), "VH": np.zeros((120, 120), np.float32)}
    lmdb_dir = _tiny_lmdb(tmp_path / "lmdb", {
        "S2A_MSIL2A_20180101T100000_0_0": s2, "S1_0": s1,
        "S2A_MSIL2A_20180201T100000_0_1": b"not safetensors", "S1_1": s1,
        "S2A_MSIL2A_20180301T100000_0_2": {**s2, "B08": np.zeros((60, 60), np.uint16)}, "S1_2": s1,
        "S2A_MSIL2A_20180401T100000_0_3": s2,
    })
    rows = [{"patch_id": f"S2A_MSIL2A_2018{m:02d}01T100000_0_{i}", "labels": ["Arable land"], "split": split,
             "s1_name": f"S1_{i}", "country": "Nowhere", "contains_seasonal_snow": False,
             "contains_cloud_or_shadow": False}
            for i, (m, split) in enumerate([(1, "train"), (2, "validation"), (3, "test"), (4, "train"), (5, "holdout")])]
    summary = ingest_bigearthnet(lmdb_dir, _metadata(tmp_path / "meta.parquet", rows), tmp_path / "tiles")
    assert summary["written"] == {"train": 1}
    reasons = {r["patch_id"][-3:]: r["reason"] for r in map(json.loads, (tmp_path / "tiles" / SKIPPED_FILE).open())}
    assert "is not a safetensors blob" in reasons["0_1"]
    assert "band B08 has shape (60, 60)" in reasons["0_2"]
    assert "Sentinel-1 patch 'S1_3' not in the LMDB" in reasons["0_3"]
    assert reasons["0_4"] == "unknown split 'holdout'"
    tile = np.load(tmp_path / "tiles" / "train" / "S2A_MSIL2A_20180101T100000_0_0.npz")
    assert int(tile["month"]) == 1 and int(tile["biome_code"]) == 12
    assert not list((tmp_path / "tiles").rglob("*.partial"))
    # patches that could not be read make it a partial failure (a cloudy or snowy one is left out by choice)
    done = subprocess.run([sys.executable, "-m", "data_builders.bigearthnet", "--lmdb", str(lmdb_dir), "--metadata",
                           str(tmp_path / "meta.parquet"), "--output_dir", str(tmp_path / "again")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "wrote 1 tiles" in done.stdout and "skipped 4" in done.stdout, done.stderr


def test_bad_paths_and_metadata(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no data.mdb"):
        resolve_lmdb_dir(tmp_path)
    bad_meta = _metadata(tmp_path / "bad.parquet", [{"patch_id": "x", "split": "train"}])
    lmdb_dir = _tiny_lmdb(tmp_path / "lmdb", {})
    with pytest.raises(ValueError, match=r"bad.parquet: missing columns \['labels', 's1_name'\]"):
        ingest_bigearthnet(lmdb_dir, bad_meta, tmp_path / "tiles")
    code = main(["--lmdb", str(lmdb_dir), "--metadata", str(tmp_path / "absent.parquet"), "--output_dir",
                 str(tmp_path / "tiles")])
    assert code == 2 and "absent.parquet does not exist" in capsys.readouterr().err



@pytest.mark.parametrize("field, value", [("labels", None), ("labels", "Arable land"), ("s1_name", None)])
def test_metadata_rows_without_labels_or_s1_name_stop_the_ingest_before_any_write(tmp_path, capsys, field, value):
    lmdb_dir = _tiny_lmdb(tmp_path / "lmdb", {})
    row = {"patch_id": "S2A_MSIL2A_20180101T100000_0_0", "labels": ["Arable land"], "split": "train",
           "s1_name": "S1_0"} | {field: value}
    metadata = _metadata(tmp_path / "meta.parquet", [row])
    output = tmp_path / "tiles"
    assert main(["--lmdb", str(lmdb_dir), "--metadata", str(metadata), "--output_dir", str(output)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"stage2-ingest-bigearthnet: error: --metadata {metadata}: {field!r} of patch {row['patch_id']!r} is "
        f"{value!r}, " + ("not a list of CORINE label names" if field == "labels" else
                          "not the name of a Sentinel-1 patch")]
    assert not output.exists()


def test_a_data_mdb_that_is_not_an_lmdb_stops_the_ingest_before_any_write(tmp_path, capsys):
    fake = tmp_path / "lmdb"
    fake.mkdir()
    (fake / "data.mdb").write_bytes(np.random.default_rng(0).bytes(5000))
    metadata = _metadata(tmp_path / "meta.parquet", [{"patch_id": "S2A_MSIL2A_20180101T100000_0_0",
                                                      "labels": ["Arable land"], "split": "train", "s1_name": "S1"}])
    output = tmp_path / "tiles"
    assert main(["--lmdb", str(fake), "--metadata", str(metadata), "--output_dir", str(output)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"stage2-ingest-bigearthnet: error: --lmdb {fake}: not a readable LMDB environment (")
    assert not output.exists()


def test_a_missing_optional_dependency_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    metadata = _metadata(tmp_path / "meta.parquet", [{"patch_id": "S2A_MSIL2A_20180101T100000_0_0",
                                                      "labels": ["Arable land"], "split": "train", "s1_name": "S1"}])
    lmdb_dir = _tiny_lmdb(tmp_path / "lmdb", {})
    monkeypatch.setitem(sys.modules, "lmdb", None)  # as if the extra were not installed: `import lmdb` fails
    assert main(["--lmdb", str(lmdb_dir), "--metadata", str(metadata), "--output_dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "stage2-ingest-bigearthnet: error: reading BigEarthNet (lmdb is missing) needs the 'bigearthnet' extra: "
        "pip install 'stage2-refiner[bigearthnet]'"]
    assert not (tmp_path / "o").exists()


BAD_PATCH_IDS = ["../../escaped_S2A_MSIL2A_20180101T100000_0_0", "{tmp}/absolute_S2A_MSIL2A_20180101T100000_0_0",
                 "sub/S2A_MSIL2A_20180101T100000_0_0", "..", ".", ".hidden_20180101T100000", "a\\b_20180101T100000",
                 "nul\x00_20180101T100000", "new\nline_20180101T100000", ""]


@pytest.mark.parametrize("patch_id", BAD_PATCH_IDS)
def test_patch_ids_that_are_not_plain_file_names_stop_the_ingest_before_any_write(tmp_path, capsys, patch_id):
    patch_id = patch_id.format(tmp=tmp_path)  # an absolute id inside tmp_path: nothing escapes the test
    s2 = {band: np.full((120, 120), 500, np.uint16) for band in ("B02", "B03", "B04", "B08")}
    s1 = {"VV": np.zeros((120, 120), np.float32), "VH": np.zeros((120, 120), np.float32)}
    good = "S2A_MSIL2A_20180101T100000_0_1"
    lmdb_dir = _tiny_lmdb(tmp_path / "lmdb", {good: s2, "S1_0": s1} | ({patch_id: s2} if patch_id else {}))
    rows = [{"patch_id": value, "labels": ["Arable land"], "split": "train", "s1_name": "S1_0", "country": "Nowhere",
             "contains_seasonal_snow": False, "contains_cloud_or_shadow": False} for value in (good, patch_id)]
    metadata = _metadata(tmp_path / "crafted.parquet", rows)
    work = tmp_path / "work"
    output = work / "a" / "b" / "tiles"
    with pytest.raises(ValueError) as caught:
        ingest_bigearthnet(lmdb_dir, metadata, output)
    message = str(caught.value)
    assert message.startswith(f"--metadata {metadata}: 'patch_id' {patch_id!r} is not a plain file name")
    assert "\n" not in message
    assert not work.exists() and not list(tmp_path.rglob("*.npz"))  # nothing written, inside or outside
    assert main(["--lmdb", str(lmdb_dir), "--metadata", str(metadata), "--output_dir", str(output)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"stage2-ingest-bigearthnet: error: {message}"]
    assert not work.exists() and not list(tmp_path.rglob("*.npz"))


def test_real_patch_ids_are_plain_file_names(tmp_path):
    from data_builders.bigearthnet import check_patch_id

    for patch_id in ("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_38_58", "S2B_MSIL2A_20180525T94031_23_83",
                     "S1B_IW_GRDH_1SDV_20171101T154016_35VNJ_0_0", "tile-1.v2"):
        check_patch_id(tmp_path / "metadata.parquet", patch_id)
    for patch_id in (7, None, "x" * 201):
        with pytest.raises(ValueError, match="is not a plain file name"):
            check_patch_id(tmp_path / "metadata.parquet", patch_id)


def test_skipped_list_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """skipped.jsonl was rewritten in place: a write failing half-way (a full disk) left a truncated list where the
    previous ingest's had been."""
    import errno

    from data_builders import bigearthnet

    lmdb_dir = _tiny_lmdb(tmp_path / "lmdb", {})  # every patch is missing: every one is skipped
    rows = [{"patch_id": f"S2A_MSIL2A_20180101T100000_0_{i}", "labels": ["Arable land"], "split": "train",
             "s1_name": f"S1_{i}"} for i in range(3)]
    metadata = _metadata(tmp_path / "meta.parquet", rows)
    ingest_bigearthnet(lmdb_dir, metadata, tmp_path / "tiles")
    skipped = tmp_path / "tiles" / SKIPPED_FILE
    before = skipped.read_text()
    assert len(before.splitlines()) == 3
    dumps = json.dumps

    def disk_full_at_the_second_record(record, *args, **kwargs):
        if isinstance(record, dict) and "reason" in record and record["patch_id"].endswith("_1"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return dumps(record, *args, **kwargs)

    monkeypatch.setattr(bigearthnet.json, "dumps", disk_full_at_the_second_record)
    with pytest.raises(OSError, match="No space left"):
        ingest_bigearthnet(lmdb_dir, metadata, tmp_path / "tiles")
    assert skipped.read_text() == before
    assert sorted(p.name for p in (tmp_path / "tiles").iterdir()) == [SKIPPED_FILE]


def _patches_lmdb(tmp_path: Path, count: int = 3) -> tuple[Path, Path]:
    """An LMDB of `count` patches (`..._0_<i>` with `S1_<i>`, the first patch's S2 value written first) and their
    metadata."""
    s2 = {band: np.full((120, 120), 500, np.uint16) for band in ("B02", "B03", "B04", "B08")}
    s1 = {"VV": np.zeros((120, 120), np.float32), "VH": np.zeros((120, 120), np.float32)}
    entries = {f"S2A_MSIL2A_20180101T100000_0_{i}": s2 for i in range(count)} | {f"S1_{i}": s1 for i in range(count)}
    rows = [{"patch_id": f"S2A_MSIL2A_20180101T100000_0_{i}", "labels": ["Arable land"], "split": "train",
             "s1_name": f"S1_{i}", "country": "Nowhere", "contains_seasonal_snow": False,
             "contains_cloud_or_shadow": False} for i in range(count)]
    return _tiny_lmdb(tmp_path / "lmdb", entries), _metadata(tmp_path / "meta.parquet", rows)


def _ingest_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_builders.bigearthnet", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_a_truncated_data_mdb_stops_the_ingest_before_any_write(tmp_path):
    """A data.mdb cut short (an interrupted copy of the 60 GB LMDB) opened fine, then the first read of a missing
    page ended the process with SIGBUS: no message, an empty output folder."""
    lmdb_dir, metadata = _patches_lmdb(tmp_path)
    data = lmdb_dir / "data.mdb"
    full = data.stat().st_size
    data.write_bytes(data.read_bytes()[: full // 2])
    output = tmp_path / "tiles"
    done = _ingest_cli("--lmdb", lmdb_dir, "--metadata", metadata, "--output_dir", output)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"stage2-ingest-bigearthnet: error: --lmdb {lmdb_dir}: data.mdb is {full // 2} bytes, shorter than the {full} "
        "bytes its header declares (a truncated copy or download?)"]
    assert not output.exists()


def test_a_damaged_lmdb_page_skips_only_its_patch(tmp_path):
    """A damaged page raised lmdb.CorruptedError out of the ingest (a traceback, skipped.jsonl never written); and a
    read transaction that has failed fails every later lookup. Now it skips that patch (a damaged value, exit 1)."""
    import struct

    import lmdb

    lmdb_dir, metadata = _patches_lmdb(tmp_path)
    with lmdb.open(str(lmdb_dir), readonly=True, lock=False) as env:
        page_size = env.stat()["psize"]
    raw = bytearray((lmdb_dir / "data.mdb").read_bytes())
    p_leaf, p_overflow = 0x02, 0x04
    first_value = next(page for page in range(2, len(raw) // page_size)  # page header: pgno, pad, flags
                       if struct.unpack_from("<QHH", raw, page * page_size) == (page, 0, p_overflow))
    struct.pack_into("<H", raw, first_value * page_size + 10, p_leaf)  # the first patch's S2 blob: wrong page type
    (lmdb_dir / "data.mdb").write_bytes(bytes(raw))

    summary = ingest_bigearthnet(lmdb_dir, metadata, tmp_path / "tiles")
    assert summary["written"] == {"train": 2}
    [(reason, count)] = summary["skipped"].items()
    assert count == 1 and reason.startswith("LMDB lookup of patch 'S2A_MSIL2A_20180101T100000_0_0' failed (")
    assert "MDB_CORRUPTED" in reason
    assert sorted(p.name for p in (tmp_path / "tiles" / "train").iterdir()) == [
        f"S2A_MSIL2A_20180101T100000_0_{i}.{ext}" for i in (1, 2) for ext in ("json", "npz")]
    done = _ingest_cli("--lmdb", lmdb_dir, "--metadata", metadata, "--output_dir", tmp_path / "again")
    assert done.returncode == 1 and "wrote 2 tiles" in done.stdout and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize(("error", "status"), [
    (OSError(28, "No space left on device"), 1),  # ENOSPC: the machine failed
    (OSError(30, "Read-only file system"), 2),  # EROFS: a folder the user can mend (it was 1, as any OSError)
])
def test_a_full_disk_is_a_failure_of_the_system_not_a_user_error(tmp_path, capsys, monkeypatch, error, status):
    """A write failing with ENOSPC exited 2 (a user error) with "[Errno 28] No space left on device" and no file.
    The status follows `is_system_failure`, as in every command."""
    from data_builders import bigearthnet

    lmdb_dir, metadata = _patches_lmdb(tmp_path)
    written = []
    real = np.savez_compressed

    def disk_full_at_the_second_tile(handle, **arrays):
        if written:
            raise error
        written.append(real(handle, **arrays))

    monkeypatch.setattr(bigearthnet.np, "savez_compressed", disk_full_at_the_second_tile)
    output = tmp_path / "tiles"
    assert main(["--lmdb", str(lmdb_dir), "--metadata", str(metadata), "--output_dir", str(output)]) == status
    assert capsys.readouterr().err.splitlines() == [f"stage2-ingest-bigearthnet: error: --output_dir {output}: {error}"]
    tiles = sorted(p.name for p in (output / "train").iterdir())
    assert tiles == ["S2A_MSIL2A_20180101T100000_0_0.json", "S2A_MSIL2A_20180101T100000_0_0.npz",
                     "S2A_MSIL2A_20180101T100000_0_1.json"]  # whole files only; a sidecar alone is no tile


def test_an_ingest_stopped_between_a_tile_and_its_sidecar_leaves_no_tile_without_it(tmp_path, monkeypatch):
    """The tile was written before its sidecar: Ctrl-C (or SIGTERM) between the two left a tile that the build read
    without its metadata (patch_id, country, labels None; source "unknown")."""
    from data_builders import bigearthnet
    from data_builders.discovery import discover_tiles

    lmdb_dir, metadata = _patches_lmdb(tmp_path)
    real, writes = bigearthnet._write_atomic, []

    def stopped_at_the_fourth_write(path, write):
        writes.append(path.name)
        if len(writes) == 4:  # the second patch's first file is written: the signal comes before its second
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(bigearthnet, "_write_atomic", stopped_at_the_fourth_write)
    output = tmp_path / "tiles"
    assert main(["--lmdb", str(lmdb_dir), "--metadata", str(metadata), "--output_dir", str(output)]) == 130
    assert len(writes) == 4
    splits, rejected = discover_tiles(output)
    assert rejected == [] and [spec.tile_id for spec in splits["train"]] == ["S2A_MSIL2A_20180101T100000_0_0"]
    for npz in output.rglob("*.npz"):
        assert npz.with_suffix(".json").is_file(), f"{npz.name} has no sidecar"
    assert splits["train"][0].sidecar["country"] == "Nowhere"


def test_an_ingest_removes_what_a_killed_one_left_half_written(benv2, tmp_path):
    """An ingest killed by SIGKILL leaves its hidden `.TILE.npz.partial-PID-...npz` (a cut zip) and sidecar partials;
    they piled up over later runs. The next ingest removes those whose process is gone, and keeps a live one's."""
    import os
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    left = [tmp_path / "test" / f".S2A_x.npz.partial-{gone.pid}-0123abcd.npz",
            tmp_path / "train" / f".S2A_y.json.partial-{gone.pid}-0123abcd.json",
            tmp_path / f".{SKIPPED_FILE}.partial-{gone.pid}-0123abcd.jsonl"]
    live = tmp_path / "val" / f".S2A_z.npz.partial-{os.getppid()}-0123abcd.npz"
    for path in (*left, live):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"PK\x03\x04 cut short")
    ingest_bigearthnet(benv2 / "BigEarthNet-V2-LMDB", benv2 / "metadata.parquet", tmp_path, max_patches=1)
    assert not any(path.exists() for path in left) and live.exists()

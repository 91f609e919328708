"""Data builders on odd inputs: LMDB bands of a dtype the tile reader refuses, stage2-inspect on a build record
written by hand, the converted-dataset cache across degradation versions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_builders import degrade
from data_builders.bigearthnet import SKIPPED_FILE, ingest_bigearthnet
from data_builders.bigearthnet import main as ingest_main
from data_builders.build import REJECTED_FILE, build_dataset
from data_builders.cache import dataset_cache_key
from data_builders.inspect import main as inspect_main

from _data_helpers import make_tile_dir


def _lmdb(path: Path, entries: dict) -> Path:
    import lmdb
    from safetensors.numpy import save

    env = lmdb.open(str(path), map_size=64 << 20)
    with env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key.encode(), save(value))
    env.close()
    return path


def test_lmdb_bands_of_a_dtype_the_tile_reader_refuses_skip_their_patch(tmp_path, capsys):
    """Sentinel-2 bands stored as floats (digital numbers), booleans, or one band unlike the others were written as
    tiles (exit 0) that every build then rejected; a boolean Sentinel-1 band became 0/1 dB. Each is skipped now, with
    its reason, and the ingest exits 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def s2(dtype, value=500):
        return {band: np.full((120, 120), value, dtype) for band in ("B02", "B03", "B04", "B08")}

    s1 = {"VV": np.full((120, 120), -12.0, np.float32), "VH": np.full((120, 120), -18.0, np.float32)}
    cases = {
        "ok": (s2(np.uint16), s1),
        "float_dn": (s2(np.float32), s1),
        "bool": (s2(np.bool_, 1), s1),
        "mixed": ({**s2(np.uint16), "B08": np.full((120, 120), 0.05, np.float32)}, s1),
        "s1_bool": (s2(np.uint16), {"VV": np.zeros((120, 120), bool), "VH": np.zeros((120, 120), bool)}),
    }
    entries, rows = {}, []
    for i, (name, (s2_bands, s1_bands)) in enumerate(cases.items()):
        patch_id = f"S2A_MSIL2A_20180301T100000_{name}_{i}"
        entries[patch_id], entries[f"S1_{i}"] = s2_bands, s1_bands
        rows.append({"patch_id": patch_id, "labels": ["Arable land"], "split": "train", "s1_name": f"S1_{i}",
                     "country": "Nowhere", "contains_seasonal_snow": False, "contains_cloud_or_shadow": False})
    lmdb_dir = _lmdb(tmp_path / "lmdb", entries)
    metadata = tmp_path / "meta.parquet"
    pq.write_table(pa.Table.from_pylist(rows), metadata)

    summary = ingest_bigearthnet(lmdb_dir, metadata, tmp_path / "tiles")
    assert summary["written"] == {"train": 1}
    assert [path.stem for path in (tmp_path / "tiles" / "train").glob("*.npz")] == ["S2A_MSIL2A_20180301T100000_ok_0"]
    skipped = (tmp_path / "tiles" / SKIPPED_FILE).read_text().splitlines()
    reasons = {int(r["patch_id"].rsplit("_", 1)[1]): r["reason"] for r in map(json.loads, skipped)}  # by case index
    assert sorted(reasons) == [1, 2, 3, 4]
    assert "band B02 has dtype float32, expected integer digital numbers (uint16)" in reasons[1]
    assert "band B02 has dtype bool" in reasons[2] and "band B08 has dtype float32" in reasons[3]
    assert reasons[4] == "LMDB value of 'S1_4': band VV has dtype bool, expected numbers (float32 dB)"

    # what the ingest wrote, a build takes whole
    build_dataset(tmp_path / "tiles", tmp_path / "ds")
    assert (tmp_path / "ds" / REJECTED_FILE).read_text() == ""
    assert ingest_main(["--lmdb", str(lmdb_dir), "--metadata", str(metadata), "--output_dir",
                        str(tmp_path / "again")]) == 1  # patches that could not be read: a partial failure
    assert "wrote 1 tiles" in capsys.readouterr().out


def _saved_dataset(path: Path, description: str) -> Path:
    from datasets import Array2D, Array3D, Dataset, DatasetDict, Features, Value

    features = Features({"tile_id": Value("string"), "target": Array3D((4, 120, 120), "float32"),
                         "opt_v1": Array3D((4, 120, 120), "float32"), "valid_mask": Array2D((120, 120), "bool"),
                         "month": Value("int64"), "biome": Value("int64")})
    image = np.full((4, 120, 120), 0.25, np.float32)
    split = Dataset.from_dict({"tile_id": ["a", "b"], "target": [image, image], "opt_v1": [image, image],
                               "valid_mask": [np.ones((120, 120), bool)] * 2, "month": [3, 4], "biome": [1, -1]},
                              features=features)
    split.info.description = description
    DatasetDict({"train": split}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("record", [
    {},  # only the format: no source, input_scale, opt_v1
    {"source": {}, "input_scale": {}, "opt_v1": {"mode": "identity"}, "statistics": None},
    {"source": {}, "input_scale": {}, "opt_v1": {"mode": "identity"},
     "statistics": {"target": {"B02": {"mean": 1.0}}, "opt_v1": None}},  # a band and numbers short
    {"source": [], "input_scale": "dn", "opt_v1": None},
], ids=["bare", "null-statistics", "partial-statistics", "blocks-not-objects"])
def test_inspect_describes_a_dataset_whose_build_record_is_incomplete(tmp_path, capsys, record):
    """A description that names the build record's format but lacks its blocks (written by hand, or edited) ended
    stage2-inspect with a KeyError or AttributeError traceback, exit 1; the dataset is described from its data."""
    path = _saved_dataset(tmp_path / "ds", json.dumps({"format": "stage2-tiles-dataset", **record}))
    assert inspect_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "Per-band statistics over valid pixels (train split, first 2 tiles; reflectance)" in out
    assert "  B02        0.2500   0.0000   0.2500   0.2500" in out


def test_the_cache_key_changes_with_the_degradation_version(tmp_path, monkeypatch):
    """The cached conversion of NPZ tiles was keyed without `DEGRADATION_VERSION`: a release whose degradation draws
    differently reused the old opt_v1 (and --redraw_degradation then asked for a rebuild the cache never made)."""
    data = make_tile_dir(tmp_path / "tiles", per_split=1)
    keys = {name: dataset_cache_key(data, degradation=name) for name in ("mild", "strong")}
    monkeypatch.setattr(degrade, "DEGRADATION_VERSION", 2)
    for name, key in keys.items():
        assert dataset_cache_key(data, degradation=name) != key
    monkeypatch.setattr(degrade, "DEGRADATION_VERSION", 1)
    assert {name: dataset_cache_key(data, degradation=name) for name in keys} == keys  # version 1 keeps its keys

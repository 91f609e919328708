"""BigEarthNet v2 (LMDB + safetensors) -> NPZ tiles of the Stage 2 layout.

    stage2-ingest-bigearthnet --lmdb L --metadata M.parquet --output_dir TILES [--include_cloudy_snowy]

BigEarthNet v2 is distributed for training as an LMDB whose keys are patch names (the Sentinel-2
patch id, and the Sentinel-1 `s1_name`) and whose values are safetensors blobs of the bands
(`B02`..`B12` uint16 digital numbers; `VV`, `VH` float32 dB), plus `metadata.parquet` (columns
`patch_id, labels, split, country, s1_name, s2v1_name, contains_seasonal_snow,
contains_cloud_or_shadow`) and `metadata_for_patches_with_snow_cloud_or_shadow.parquet`.

Each patch becomes `TILES/<split>/<patch_id>.npz` with `s2_b2`, `s2_b3`, `s2_b4`, `s2_b8` (uint16,
120 x 120, kept as digital numbers), `s1_vv`, `s1_vh` (float32 dB), `month` (from the date in the
patch name) and `biome_code` (from the CORINE labels, `BIOME_PRIORITY` below), and a
`<patch_id>.json` sidecar (patch id, split, source, country, labels, cloud/snow flags, s1 name).
A band missing, not 120 x 120, of another dtype kind (Sentinel-2: integers; Sentinel-1: numbers) or
holding NaN/Inf skips its patch: the tile reader would refuse its tile. Splits come from the metadata
(`validation` -> `val`). Patches flagged with seasonal snow or cloud/shadow are skipped unless
`--include_cloudy_snowy`, which also reads the snow/cloud parquet beside `--metadata` (without it,
and with no patch flagged in `--metadata`, the flag would add nothing: an error). A patch listed twice
must be listed the same way. Skipped patches are listed with the reason in `TILES/skipped.jsonl`.
`--max_patches N` takes the patches in `patch_id` order and stops after N written tiles (skipped patches do not count):
N small may give one split only (the ids sort by date and tile, not by split); a warning says so when it leaves out
the `train` or `val` split of the metadata, which `stage2-train` needs.

Patch ids become file names, so metadata whose `patch_id` is not a plain name (path separators,
`..`, other characters than letters, digits, `_`, `.`, `-`) stops the ingest before anything is
written. Blobs are decoded with safetensors only (no pickle). Files are written to a temporary
name and renamed, the sidecar before its tile, so an interrupted ingest leaves no truncated tile and no
tile without its sidecar. A `data.mdb` shorter than its header declares (a truncated copy) stops the
ingest before anything is written: reading its missing pages would end the process with SIGBUS.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from ._leaves import model_leaf
from .tiles import (
    BAND_KEYS, BAND_NAMES, SPLITS, TILE_SIZE, TRAIN_SPLIT, UNKNOWN_METADATA, VALIDATION_SPLIT, non_finite_count,
)

_files = model_leaf("_files")  # atomic writes
_signals = model_leaf("_signals")  # SIGTERM/SIGHUP exit cleanly
_vocabulary = model_leaf("vocabulary")  # the install hint of an extra

logger = logging.getLogger(__name__)

S2_BANDS = BAND_NAMES  # -> BAND_KEYS, in order
S1_BANDS = ("VV", "VH")  # -> s1_vv, s1_vh
S2_KINDS, S1_KINDS = "iu", "iuf"
"""Dtype kinds of the bands: Sentinel-2 digital numbers are integers (uint16), Sentinel-1 dB real numbers (float32)."""
SOURCE = "BigEarthNet v2"
CLOUD_SNOW_METADATA = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "test": "test"}
REQUIRED_COLUMNS = ("patch_id", "labels", "split", "s1_name")
SKIPPED_FILE = "skipped.jsonl"
TRAINING_SPLITS = (TRAIN_SPLIT, VALIDATION_SPLIT)
"""The splits `stage2-train` needs (with its default `--eval_split`): `--max_patches` leaving one out is warned of."""
CLOUDY_SNOWY = "cloudy or snowy"
"""The skip reason of a patch left out by choice (`--include_cloudy_snowy` keeps them); every other
reason is a patch that could not be read, and makes the ingest's exit status 1."""

# Biome codes (IGBP-like, 0..16) from CORINE land-cover labels. A patch carries several labels
# and no area fractions, so the first group below that holds one of its labels decides (water
# and urban first: they dominate a patch's reflectance; then forest types, wetland, shrub,
# grassland, cropland, mosaic, barren). Names are those of the BigEarthNet 19-class nomenclature
# and of the 43-class CORINE level-3 nomenclature of BigEarthNet v1. This reproduces the
# `biome_code` of all 54 tiles of the bundled sample (tests/test_data_bigearthnet.py).
BIOME_PRIORITY: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (0, "water", ("Inland waters", "Marine waters", "Water courses", "Water bodies", "Coastal lagoons",
                  "Estuaries", "Sea and ocean")),
    (13, "urban", ("Urban fabric", "Industrial or commercial units", "Continuous urban fabric",
                   "Discontinuous urban fabric", "Road and rail networks and associated land", "Port areas",
                   "Airports", "Mineral extraction sites", "Dump sites", "Construction sites",
                   "Green urban areas", "Sport and leisure facilities")),
    (1, "evergreen needleleaf forest", ("Coniferous forest",)),
    (4, "deciduous broadleaf forest", ("Broad-leaved forest",)),
    (5, "mixed forest", ("Mixed forest",)),
    (11, "wetland", ("Inland wetlands", "Coastal wetlands", "Inland marshes", "Peatbogs", "Salt marshes",
                     "Salines", "Intertidal flats")),
    (7, "shrubland", ("Moors, heathland and sclerophyllous vegetation", "Transitional woodland, shrub",
                      "Transitional woodland/shrub", "Moors and heathland", "Sclerophyllous vegetation")),
    (10, "grassland", ("Natural grassland and sparsely vegetated areas", "Pastures", "Natural grassland")),
    (12, "cropland", ("Arable land", "Permanent crops", "Non-irrigated arable land", "Permanently irrigated land",
                      "Rice fields", "Vineyards", "Fruit trees and berry plantations", "Olive groves",
                      "Annual crops associated with permanent crops")),
    (14, "cropland/natural vegetation mosaic", (
        "Complex cultivation patterns",
        "Land principally occupied by agriculture, with significant areas of natural vegetation",
        "Agro-forestry areas")),
    (16, "barren", ("Beaches, dunes, sands", "Bare rock", "Sparsely vegetated areas", "Burnt areas")),
)

_PATCH_DATE = re.compile(r"_(\d{4})(\d{2})(\d{2})T\d+")
_PATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
"""A patch id becomes a file name: letters, digits, `_`, `.`, `-`, starting with a letter or digit
(so no path separator, no `..`, no hidden file), at most 200 characters; e.g.
`S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_38_58`."""


def biome_from_labels(labels: Iterable[str]) -> int:
    """Biome code of a patch from its CORINE labels (`UNKNOWN_METADATA` when none is known)."""
    labels = set(labels)
    for code, _, names in BIOME_PRIORITY:
        if labels.intersection(names):
            return code
    return UNKNOWN_METADATA


def month_from_patch_name(name: str) -> int:
    """Acquisition month from a Sentinel patch name such as `S2A_MSIL2A_20170613T101031_...`."""
    match = _PATCH_DATE.search(name)
    if match is None or not 1 <= int(match.group(2)) <= 12:
        raise ValueError(f"no acquisition date (YYYYMMDDThhmmss) in patch name {name!r}")
    return int(match.group(2))


def resolve_lmdb_dir(path: str | Path) -> Path:
    """The LMDB environment folder (holding data.mdb): `path` or its only such subfolder."""
    path = Path(path)
    if (path / "data.mdb").is_file():
        return path
    candidates = [child for child in sorted(path.glob("*")) if (child / "data.mdb").is_file()] if path.is_dir() else []
    if len(candidates) == 1:
        return candidates[0]
    raise FileNotFoundError(
        f"--lmdb {path}: no data.mdb there"
        + (f" (subfolders with one: {', '.join(map(str, candidates))}; pass one of them)" if candidates else
           "; pass the BigEarthNet-V2-LMDB folder")
    )


def read_metadata(paths: Sequence[str | Path]) -> list[dict]:
    """Rows of the metadata parquet files, each with a `cloudy_snowy` flag; identical duplicates dropped (the same
    file given twice), rows of one patch that disagree refused (`_check_duplicate`)."""
    import pyarrow.parquet as pq

    rows, seen = [], {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--metadata {path} does not exist")
        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise ValueError(f"--metadata {path}: not a readable parquet file ({exc})") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"--metadata {path}: missing columns {missing}; BigEarthNet v2 metadata has "
                             f"{', '.join(REQUIRED_COLUMNS)}, ...")
        for row in table.to_pylist():
            check_patch_id(path, row["patch_id"])
            _check_row_fields(path, row)
            if row["patch_id"] in seen:
                _check_duplicate(*seen[row["patch_id"]], path, row)
                continue
            seen[row["patch_id"]] = (path, dict(row))
            row["cloudy_snowy"] = bool(row.get("contains_seasonal_snow")) or bool(row.get("contains_cloud_or_shadow"))
            rows.append(row)
    return rows


def _check_duplicate(first_path: Path, first_row: dict, path: Path, row: dict) -> None:
    """A patch listed twice must be listed the same way (columns both files have): which split, labels or Sentinel-1
    patch it has cannot be guessed."""
    differing = [column for column in first_row if column in row and first_row[column] != row[column]]
    if differing:
        where = str(path) if path == first_path else f"{first_path} and {path}"
        column = differing[0]
        raise ValueError(f"--metadata {where}: patch {row['patch_id']!r} is listed twice with different {column!r} "
                         f"({first_row[column]!r}, then {row[column]!r}); keep one row per patch_id")


def _check_row_fields(metadata_path: Path, row: dict) -> None:
    """The labels (a list of names) and the S1 name (a key of the LMDB) of a metadata row."""
    labels = row["labels"]
    if not isinstance(labels, (list, tuple)) or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"--metadata {metadata_path}: 'labels' of patch {row['patch_id']!r} is {labels!r}, "
                         "not a list of CORINE label names")
    if not isinstance(row["s1_name"], str) or not row["s1_name"]:
        raise ValueError(f"--metadata {metadata_path}: 's1_name' of patch {row['patch_id']!r} is "
                         f"{row['s1_name']!r}, not the name of a Sentinel-1 patch")


def check_patch_id(metadata_path: str | Path, patch_id) -> None:
    """Refuse a patch id that is not a plain file name: the tile is written to `<patch_id>.npz`, so
    `../x` or `/x` would land outside the output folder."""
    if not isinstance(patch_id, str) or _PATCH_ID.fullmatch(patch_id) is None:
        raise ValueError(f"--metadata {metadata_path}: 'patch_id' {patch_id!r} is not a plain file name "
                         "(letters, digits, '_', '.', '-', starting with a letter or digit, up to 200 characters)")


def _decode(blob: bytes, key: str, bands: Sequence[str], kinds: str) -> dict[str, np.ndarray]:
    """The `bands` of a safetensors blob, each (TILE_SIZE, TILE_SIZE) and of a dtype kind in `kinds` (numpy's
    letters: "iu" integers, "f" floats), float bands finite: a band the tile reader would refuse (Sentinel-2 floats,
    booleans, NaN/Inf) is refused here, with the patch skipped, rather than written as a tile that no build takes."""
    from safetensors.numpy import load

    try:
        arrays = load(bytes(blob))
    except Exception as exc:
        raise ValueError(f"LMDB value of {key!r} is not a safetensors blob ({exc})") from None
    out = {}
    for band in bands:
        if band not in arrays:
            raise ValueError(f"LMDB value of {key!r} has no band {band} (has {', '.join(sorted(arrays))})")
        if arrays[band].shape != (TILE_SIZE, TILE_SIZE):
            raise ValueError(f"LMDB value of {key!r}: band {band} has shape {arrays[band].shape}, "
                             f"expected ({TILE_SIZE}, {TILE_SIZE})")
        if arrays[band].dtype.kind not in kinds:
            expected = {"iu": "integer digital numbers (uint16)", "iuf": "numbers (float32 dB)"}[kinds]
            raise ValueError(f"LMDB value of {key!r}: band {band} has dtype {arrays[band].dtype}, expected {expected}")
        with np.errstate(over="ignore"):  # as float32, the dtype the tile stores: a float64 past its range is Inf
            bad = non_finite_count(arrays[band].astype(np.float32)) if arrays[band].dtype.kind == "f" else 0
        if bad:  # the tile reader would refuse them (the s1 column has no mask)
            raise ValueError(f"LMDB value of {key!r}: band {band} has {bad} NaN/Inf values (as float32)")
        out[band] = arrays[band]
    return out


def patch_tile(row: dict, s2: dict, s1: dict) -> tuple[dict, dict]:
    """(NPZ arrays, sidecar) of one patch."""
    arrays = {key: s2[band] for key, band in zip(BAND_KEYS, S2_BANDS)}
    arrays["s1_vv"] = s1["VV"].astype(np.float32)
    arrays["s1_vh"] = s1["VH"].astype(np.float32)
    arrays["month"] = np.int64(month_from_patch_name(row["patch_id"]))
    arrays["biome_code"] = np.int64(biome_from_labels(row["labels"]))
    sidecar = {
        "patch_id": row["patch_id"],
        "split": SPLIT_NAMES[row["split"]],
        "source": SOURCE,
        "country": row.get("country"),
        "labels": list(row["labels"]),
        "cloud_or_shadow": bool(row.get("contains_cloud_or_shadow")),
        "seasonal_snow": bool(row.get("contains_seasonal_snow")),
        "s1_name": row["s1_name"],
    }
    return arrays, sidecar


def _write_atomic(path: Path, write) -> None:
    with _files.atomic_file(path, durable=False) as partial:  # two files per patch: see `atomic_file`
        with open(partial, "wb") as handle:
            write(handle)


def write_tile(output_dir: Path, arrays: dict, sidecar: dict) -> Path:
    folder = output_dir / sidecar["split"]
    folder.mkdir(parents=True, exist_ok=True)
    npz = folder / f"{sidecar['patch_id']}.npz"
    # the sidecar first: a tile is only found by its .npz, so one interrupted between the two writes is no tile
    # (a sidecar alone is ignored), never a tile without its metadata
    _write_atomic(npz.with_suffix(".json"),
                  lambda handle: handle.write((json.dumps(sidecar, indent=1) + "\n").encode("utf-8")))
    _write_atomic(npz, lambda handle: np.savez_compressed(handle, **arrays))
    return npz


def _lookup(env, s2_name: str, s1_name: str) -> tuple:
    """The two blobs of a patch (None where a key is missing), in a read transaction of their own: a damaged page
    (MDB_CORRUPTED, MDB_PAGE_NOTFOUND) is a ValueError, a damaged value that skips this patch, and the transaction it
    leaves unusable is not the next patch's."""
    import lmdb

    try:
        with env.begin(buffers=False) as txn:
            return txn.get(s2_name.encode()), txn.get(str(s1_name).encode())
    except lmdb.Error as exc:
        raise ValueError(f"LMDB lookup of patch {s2_name!r} failed ({exc})") from None


def _check_lmdb_size(env, lmdb_dir: Path) -> None:
    """Refuse a `data.mdb` shorter than the pages its header declares (a truncated copy or download): LMDB maps the
    file, and reading a page past its end ends the process with SIGBUS, without a word."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = (lmdb_dir / "data.mdb").stat().st_size
    if size < needed:
        raise ValueError(f"--lmdb {lmdb_dir}: data.mdb is {size} bytes, shorter than the {needed} bytes its header "
                         "declares (a truncated copy or download?)")


def ingest_bigearthnet(
    lmdb_path: str | Path,
    metadata: str | Path | Sequence[str | Path],
    output_dir: str | Path,
    include_cloudy_snowy: bool = False,
    max_patches: Optional[int] = None,
) -> dict:
    """Write the patches of the metadata as NPZ tiles; returns a summary.

    Args:
        lmdb_path: the BigEarthNet v2 LMDB folder (holding data.mdb), or its parent.
        metadata: one or more metadata parquet files.
        output_dir: tile folder to fill (`<split>/<patch_id>.npz` + `.json`).
        include_cloudy_snowy: keep patches flagged with seasonal snow or cloud/shadow, and also
            read `metadata_for_patches_with_snow_cloud_or_shadow.parquet` beside the metadata.
        max_patches: stop after this many written tiles, taking the patches in `patch_id` order (skipped ones do
            not count).

    Returns:
        `{"written": {split: n}, "skipped": {reason: n}, "output_dir": str, "splits_left_out": [split, ...]}`; the
        last lists the splits of the patches `max_patches` left out of which no tile was written (in `SPLITS`
        order), empty when it left out none.
    """
    import lmdb

    if max_patches is not None and max_patches < 1:
        raise ValueError(f"max_patches must be >= 1 (or None for all patches), got {max_patches}")
    metadata_paths = [Path(metadata)] if isinstance(metadata, (str, Path)) else [Path(p) for p in metadata]
    extra = metadata_paths[0].parent / CLOUD_SNOW_METADATA
    if include_cloudy_snowy and extra.is_file() and extra not in metadata_paths:
        metadata_paths.append(extra)
    rows = sorted(read_metadata(metadata_paths), key=lambda row: row["patch_id"])
    if include_cloudy_snowy and not extra.is_file() and not any(row["cloudy_snowy"] for row in rows):
        # BigEarthNet's metadata.parquet lists no cloudy or snowy patch: without their file the flag would add none
        raise FileNotFoundError(f"--include_cloudy_snowy: {extra} does not exist and --metadata flags no patch as "
                                f"cloudy or snowy; put {CLOUD_SNOW_METADATA} beside {metadata_paths[0]} or pass it "
                                "as another --metadata")
    lmdb_dir = resolve_lmdb_dir(lmdb_path)
    try:
        env = lmdb.open(str(lmdb_dir), readonly=True, lock=False, readahead=False, max_readers=8)
    except lmdb.Error as exc:
        raise ValueError(f"--lmdb {lmdb_dir}: not a readable LMDB environment ({exc})") from None
    output_dir = Path(output_dir)
    written, skipped, left_out = collections.Counter(), [], set()
    try:
        _check_lmdb_size(env, lmdb_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        for folder in (output_dir, *(output_dir / split for split in SPLITS)):
            _files.remove_abandoned_partials_in(folder)  # hidden half-written files of an ingest killed by SIGKILL
        for index, row in enumerate(rows):
            if max_patches is not None and sum(written.values()) >= max_patches:
                left_out = {SPLIT_NAMES[other["split"]] for other in rows[index:]
                            if other["split"] in SPLIT_NAMES and (include_cloudy_snowy or not other["cloudy_snowy"])}
                break
            patch_id = row["patch_id"]
            if row["cloudy_snowy"] and not include_cloudy_snowy:
                skipped.append({"patch_id": patch_id, "reason": CLOUDY_SNOWY})
                continue
            if row["split"] not in SPLIT_NAMES:
                skipped.append({"patch_id": patch_id, "reason": f"unknown split {row['split']!r}"})
                continue
            try:
                s2_blob, s1_blob = _lookup(env, patch_id, row["s1_name"])
                if s2_blob is None:
                    raise ValueError(f"Sentinel-2 patch {patch_id!r} not in the LMDB")
                if s1_blob is None:
                    raise ValueError(f"Sentinel-1 patch {row['s1_name']!r} not in the LMDB")
                arrays, sidecar = patch_tile(row, _decode(s2_blob, patch_id, S2_BANDS, S2_KINDS),
                                             _decode(s1_blob, row["s1_name"], S1_BANDS, S1_KINDS))
            except ValueError as error:
                skipped.append({"patch_id": patch_id, "reason": str(error)})
                continue
            write_tile(output_dir, arrays, sidecar)
            written[sidecar["split"]] += 1
    finally:
        env.close()

    reasons = collections.Counter(record["reason"] for record in skipped)
    summary = {"written": dict(written), "skipped": dict(reasons), "output_dir": str(output_dir),
               "splits_left_out": [split for split in SPLITS if split in left_out and split not in written]}
    _files.write_text(output_dir / SKIPPED_FILE, "".join(json.dumps(record) + "\n" for record in skipped))
    return summary


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = _vocabulary.OneLineArgumentParser(prog="stage2-ingest-bigearthnet",
                                     description="BigEarthNet v2 (LMDB + safetensors) -> Stage 2 NPZ tiles.")
    parser.add_argument("--lmdb", required=True, help="BigEarthNet-V2-LMDB folder (holding data.mdb)")
    parser.add_argument("--metadata", required=True, action="append",
                        help="metadata.parquet (repeat the flag for several files)")
    parser.add_argument("--output_dir", required=True, help="tile folder to write: <split>/<patch_id>.npz + .json")
    parser.add_argument("--include_cloudy_snowy", action="store_true",
                        help="keep patches with seasonal snow or cloud/shadow (and read their parquet)")
    parser.add_argument("--max_patches", type=int, default=None, metavar="N",
                        help="stop after N written tiles, taking the patches in patch_id order (not by split: a "
                             "small N may give one split only)")
    args = parser.parse_args(argv)
    _vocabulary.require_at_least(parser, args, {"--max_patches": 1})
    return args


@_signals.exit_on_termination
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    problem = _files.output_path_problem(args.output_dir, folder=True)
    if problem is not None:
        print(f"stage2-ingest-bigearthnet: error: --output_dir {args.output_dir}: {problem}", file=sys.stderr)
        return 2
    try:
        summary = ingest_bigearthnet(args.lmdb, args.metadata, args.output_dir,
                                     include_cloudy_snowy=args.include_cloudy_snowy, max_patches=args.max_patches)
    except (FileNotFoundError, ValueError) as error:
        print(f"stage2-ingest-bigearthnet: error: {error}", file=sys.stderr)
        return 2  # bad input (a missing or malformed file, an unsafe patch id): a user error
    except OSError as error:  # a full disk (1) or a folder the user can mend (2): the tiles written so far are whole
        where = "" if error.filename else f"--output_dir {args.output_dir}: "  # a write to a handle names no file
        print(f"stage2-ingest-bigearthnet: error: {where}{error}", file=sys.stderr)
        return 1 if _files.is_system_failure(error) else 2
    except ImportError as error:  # lmdb, pyarrow: the optional dependencies of the ingest
        missing = (error.name or "lmdb").split(".")[0]
        hint = _vocabulary.install_hint(f"reading BigEarthNet ({missing} is missing)", "bigearthnet")
        print(f"stage2-ingest-bigearthnet: error: {hint}", file=sys.stderr)
        return 2
    print(summary_line(summary))
    left_out = [split for split in summary["splits_left_out"] if split in TRAINING_SPLITS]
    if left_out:
        print(f"stage2-ingest-bigearthnet: warning: --max_patches {args.max_patches} stopped the ingest before any "
              f"{' or '.join(map(repr, left_out))} tile (patches go in patch_id order); stage2-train needs "
              f"{' and '.join(map(repr, TRAINING_SPLITS))}", file=sys.stderr)
    return 1 if set(summary["skipped"]) - {CLOUDY_SNOWY} else 0  # some patches could not be read


def summary_line(summary: dict) -> str:
    """The line that reports an ingest: tiles written per split, patches skipped and why."""
    written = ", ".join(f"{split} {n}" for split, n in sorted(summary["written"].items())) or "none"
    skipped = sum(summary["skipped"].values())
    line = f"wrote {sum(summary['written'].values())} tiles to {summary['output_dir']} ({written}); skipped {skipped}"
    if skipped:
        reasons = "; ".join(f"{reason}: {n}" for reason, n in summary["skipped"].items())
        line += f" ({reasons}; see {SKIPPED_FILE})"
        if CLOUDY_SNOWY in summary["skipped"]:
            line += "; --include_cloudy_snowy keeps cloudy and snowy patches"
    return line


if __name__ == "__main__":
    sys.exit(main())

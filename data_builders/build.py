"""NPZ tiles (+ sidecars, + Stage 1 outputs) -> an Arrow `datasets.DatasetDict` on disk.

    stage2-build-dataset --data_dir D [--stage1_dir S] --output_dir O [--max_samples N]
                         [--strict] [--num_proc K] [--input_mode synthetic|stage1|identity]
                         [--seed 0] [--degradation_config FILE.json]

Layout read: `D/{train,val,test}/<tile_id>.npz` (a `validation` folder counts as `val`), each with
an optional `<tile_id>.json` sidecar whose `split` wins over the folder. `datasets.load_from_disk(O)`
gives the `DatasetDict`; `json.loads(ds["train"].info.description)` (or `read_build_info`) is the
build record: source, scaling, train per-band statistics, how `opt_v1` was made.

How it works, and why:
- Discovery reads only the sidecars and the zip directories of the tiles (no pixels), places each
  tile in its split and rejects tiles whose id is in two splits.
- Tiles are streamed through `Dataset.from_generator` in chunks of `CHUNK_SIZE`; worker
  processes (`num_proc`) take whole chunks, so memory stays bounded and the row order is the
  sorted tile order whatever `num_proc` is. Each chunk writes a small report (rejections,
  partial statistics) that the parent merges; nothing is computed twice.
- Everything is written into a scratch folder beside `output_dir` and moved into place only
  when complete: a failed or killed build leaves any previous dataset untouched.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .degrade import DEGRADATION_VERSION, DegradationConfig, synthesize_opt_v1
from .tiles import (
    BAND_NAMES,
    SPLIT_ALIASES,
    SPLITS,
    TILE_SIZE,
    TileError,
    npz_keys,
    read_sidecar,
    read_stage1,
    read_tile,
    S1_KEYS,
    sidecar_path,
    sidecar_split,
)

logger = logging.getLogger(__name__)

BUILD_INFO_FORMAT = "stage2-tiles-dataset"
BUILD_INFO_VERSION = 1
INPUT_MODES = ("synthetic", "stage1", "identity")
CORE_COLUMNS = ("tile_id", "target", "opt_v1", "valid_mask", "month", "biome")
RESERVED_COLUMNS = frozenset(CORE_COLUMNS) | {"s1"}
CHUNK_SIZE = 64
"""Tiles per generator call: the unit of work that worker processes share."""
WRITER_BATCH_SIZE = 16
"""Rows per Arrow record batch (~9 MB with s1): bounds the writer's memory; 8-16 rows write fastest
(the batch is concatenated in cache), 256 rows take twice the CPU time."""
REJECTED_FILE = "rejected.jsonl"
BUILD_INFO_FILE = "build_info.json"
SCRATCH_MARKER = ".stage2-build-"


# ----------------------------------------------------------------------------- discovery
@dataclass
class TileSpec:
    """A tile found on disk, before its pixels are read."""

    path: str
    tile_id: str
    split: str
    sidecar: dict = field(default_factory=dict)
    has_s1: Optional[bool] = None  # None: the archive could not be listed (read_tile will say why)


def _split_folders(data_dir: Path) -> list[tuple[str, Path]]:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data_dir {data_dir} does not exist or is not a folder")
    folders = [
        (SPLIT_ALIASES[child.name.lower()], child)
        for child in sorted(data_dir.iterdir())
        if child.is_dir() and child.name.lower() in SPLIT_ALIASES
    ]
    if not folders:
        raise FileNotFoundError(
            f"{data_dir} has no split folder: expected {data_dir}/train, {data_dir}/val and/or "
            f"{data_dir}/test holding <tile_id>.npz tiles"
        )
    return folders


def discover_tiles(data_dir: str | Path, strict: bool = False) -> tuple[dict[str, list[TileSpec]], list[dict]]:
    """Find the tiles of each split and the tiles rejected before reading pixels.

    Returns `({split: [TileSpec sorted by tile id]}, [rejection records])`.
    Raises `TileError` at the first problem when `strict`.
    """
    rejected: list[dict] = []

    def reject(error: TileError, split: Optional[str]) -> None:
        if strict:
            raise error
        rejected.append({**error.to_record(), "split": split})

    found: dict[str, list[TileSpec]] = collections.defaultdict(list)
    for folder_split, folder in _split_folders(Path(data_dir)):
        for path in sorted(folder.glob("*.npz")):
            try:
                sidecar = read_sidecar(sidecar_path(path))
                split = sidecar_split(sidecar_path(path), sidecar) or folder_split
            except TileError as error:
                reject(error, folder_split)
                continue
            sidecar = {k: v for k, v in sidecar.items() if k != "split"}
            found[path.stem].append(TileSpec(str(path), path.stem, split, sidecar))

    splits: dict[str, list[TileSpec]] = {split: [] for split in SPLITS}
    for tile_id in sorted(found):
        copies = found[tile_id]
        if len(copies) > 1:  # the same tile twice would leak between splits: keep none of them
            places = ", ".join(f"{c.path} ({c.split})" for c in copies)
            for copy in copies:
                reject(TileError(copy.path, None, f"tile id {tile_id!r} appears more than once: {places}; "
                                                  "a tile may be in one split only"), copy.split)
            continue
        splits[copies[0].split].append(copies[0])
    return {split: specs for split, specs in splits.items() if specs}, rejected


def _list_s1(specs: Sequence[TileSpec]) -> None:
    for spec in specs:
        keys = npz_keys(spec.path)
        spec.has_s1 = None if keys is None else all(key in keys for key in S1_KEYS)


# ----------------------------------------------------------------------------- sidecar columns
def _value_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        kinds = {_value_kind(item) for item in value}
        if kinds <= {"str"}:
            return "list[str]" if kinds else "list[]"
        if kinds <= {"int"}:
            return "list[int]"
        if kinds <= {"int", "float"}:
            return "list[float]"
    return "json"


def _merge_kinds(kinds: set[str]) -> str:
    kinds = set(kinds)
    if "list[]" in kinds and len(kinds) > 1:
        kinds.discard("list[]")
    if kinds == {"list[int]", "list[float]"}:
        return "list[float]"
    if kinds == {"int", "float"}:
        return "float"
    return kinds.pop() if len(kinds) == 1 else "json"


def metadata_columns(specs: Sequence[TileSpec]) -> dict[str, tuple[str, str]]:
    """{column name: (sidecar key, kind)} for every sidecar key, in first-seen order.

    Kinds map to Arrow types (bool, int64, float64, string, list of those); values of mixed or
    nested types are stored as JSON strings (kind "json"). Keys that clash with a core column
    are prefixed with `sidecar_`.
    """
    kinds: dict[str, set] = {}
    for spec in specs:
        for key, value in spec.sidecar.items():
            if value is not None:
                kinds.setdefault(key, set()).add(_value_kind(value))
            else:
                kinds.setdefault(key, set())
    columns = {}
    for key, seen in kinds.items():
        name = f"sidecar_{key}" if key in RESERVED_COLUMNS else key
        columns[name] = (key, _merge_kinds(seen) if seen else "str")
    return columns


def _metadata_feature(kind: str):
    from datasets import List, Value

    scalar = {"bool": "bool", "int": "int64", "float": "float64", "str": "string", "json": "string"}
    if kind in scalar:
        return Value(scalar[kind])
    item = {"list[str]": "string", "list[]": "string", "list[int]": "int64", "list[float]": "float64"}[kind]
    return List(Value(item))


def _metadata_row(sidecar: dict, columns: dict[str, tuple[str, str]]) -> dict:
    row = {}
    for name, (key, kind) in columns.items():
        value = sidecar.get(key)
        if value is not None and kind == "json":
            value = json.dumps(value, sort_keys=True)
        elif value is not None and kind == "list[float]":
            value = [float(v) for v in value]
        elif value is not None and kind == "float":
            value = float(value)
        row[name] = value
    return row


def dataset_features(include_s1: bool, columns: dict[str, tuple[str, str]]):
    """The typed `datasets.Features` of a built dataset."""
    from datasets import Array2D, Array3D, Features, Value

    features = {
        "tile_id": Value("string"),
        "target": Array3D((len(BAND_NAMES), TILE_SIZE, TILE_SIZE), "float32"),
        "opt_v1": Array3D((len(BAND_NAMES), TILE_SIZE, TILE_SIZE), "float32"),
        "valid_mask": Array2D((TILE_SIZE, TILE_SIZE), "bool"),
        "month": Value("int64"),
        "biome": Value("int64"),
    }
    if include_s1:
        features["s1"] = Array3D((len(S1_KEYS), TILE_SIZE, TILE_SIZE), "float32")
    for name, (_, kind) in columns.items():
        features[name] = _metadata_feature(kind)
    return Features(features)


# ----------------------------------------------------------------------------- generation
class _BandStats:
    """Per-band count, sum, sum of squares, min and max over valid pixels (float64)."""

    def __init__(self, num_bands: int = len(BAND_NAMES)):
        self.count = 0
        self.sum = np.zeros(num_bands)
        self.sumsq = np.zeros(num_bands)
        self.min = np.full(num_bands, np.inf)
        self.max = np.full(num_bands, -np.inf)

    def update(self, image: np.ndarray, valid_mask: np.ndarray) -> None:
        # invalid pixels hold 0, so whole-image sums are sums over valid pixels
        flat = image.reshape(image.shape[0], -1).astype(np.float64)
        self.count += int(valid_mask.sum())
        self.sum += flat.sum(axis=1)
        self.sumsq += np.einsum("ij,ij->i", flat, flat)
        valid = flat if valid_mask.all() else flat[:, valid_mask.ravel()]
        self.min = np.minimum(self.min, valid.min(axis=1))
        self.max = np.maximum(self.max, valid.max(axis=1))

    def to_dict(self) -> dict:
        return {"count": self.count, "sum": self.sum.tolist(), "sumsq": self.sumsq.tolist(),
                "min": self.min.tolist(), "max": self.max.tolist()}

    @classmethod
    def merge(cls, parts: Sequence[dict]) -> "_BandStats":
        total = cls()
        for part in parts:
            total.count += part["count"]
            total.sum += np.asarray(part["sum"])
            total.sumsq += np.asarray(part["sumsq"])
            total.min = np.minimum(total.min, np.asarray(part["min"]))
            total.max = np.maximum(total.max, np.asarray(part["max"]))
        return total

    def summary(self) -> dict:
        """{band name: {mean, std, min, max}} (population std over valid pixels)."""
        if self.count == 0:
            return {}
        mean = self.sum / self.count
        std = np.sqrt(np.maximum(self.sumsq / self.count - mean**2, 0.0))
        return {
            band: {"mean": float(mean[i]), "std": float(std[i]), "min": float(self.min[i]), "max": float(self.max[i])}
            for i, band in enumerate(BAND_NAMES)
        }


def _make_opt_v1(tile, settings: dict) -> np.ndarray:
    mode = settings["input_mode"]
    if mode == "identity":
        return tile.target
    if mode == "stage1":
        return read_stage1(Path(settings["stage1_dir"]) / f"{tile.tile_id}.npz")
    return synthesize_opt_v1(
        tile.target, tile.tile_id, settings["seed"], DegradationConfig.from_dict(settings["degradation"]), tile.valid_mask
    )


def _chunk_examples(chunk: dict, settings: dict) -> Iterator[dict]:
    """Rows of one chunk; its rejections and partial statistics go to a report file."""
    report = {"rejected": [], "scaling": collections.Counter(), "sources": collections.Counter(), "rows": 0}
    target_stats, opt_stats = _BandStats(), _BandStats()
    for path, metadata_row, source in chunk["tiles"]:
        try:
            tile = read_tile(path, metadata={})
            opt_v1 = _make_opt_v1(tile, settings)
            if settings["include_s1"] and tile.s1 is None:
                raise TileError(path, S1_KEYS[0], "missing key (other tiles of this dataset carry Sentinel-1)")
        except TileError as error:
            if settings["strict"]:
                _write_json(Path(settings["report_dir"]) / f"strict-{chunk['split']}-{chunk['index']:06d}.json",
                            error.to_record())
                raise
            report["rejected"].append({**error.to_record(), "split": chunk["split"]})
            continue
        example = {
            "tile_id": tile.tile_id,
            "target": tile.target,
            "opt_v1": opt_v1,
            "valid_mask": tile.valid_mask,
            "month": tile.month,
            "biome": tile.biome,
            **metadata_row,
        }
        if settings["include_s1"]:
            example["s1"] = tile.s1
        report["scaling"][tile.scaling] += 1
        report["sources"][source] += 1
        report["rows"] += 1
        target_stats.update(tile.target, tile.valid_mask)
        opt_stats.update(opt_v1, tile.valid_mask)
        yield example
    report["target_stats"] = target_stats.to_dict()
    report["opt_v1_stats"] = opt_stats.to_dict()
    _write_json(Path(settings["report_dir"]) / f"{chunk['split']}-{chunk['index']:06d}.json", report)


def _generate_examples(chunks: list, settings: dict) -> Iterator[dict]:
    # `chunks` is the list that `datasets` shares out between worker processes
    for chunk in chunks:
        yield from _chunk_examples(chunk, settings)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _chunks(split: str, specs: Sequence[TileSpec], columns: dict) -> list[dict]:
    rows = [(spec.path, _metadata_row(spec.sidecar, columns), str(spec.sidecar.get("source", "unknown")))
            for spec in specs]
    return [
        {"split": split, "index": i // CHUNK_SIZE, "tiles": rows[i : i + CHUNK_SIZE]}
        for i in range(0, len(rows), CHUNK_SIZE)
    ]


# ----------------------------------------------------------------------------- output folder
def _is_built_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() and (path / BUILD_INFO_FILE).is_file()


def _check_output_dir(output_dir: Path, inputs: dict) -> None:
    resolved_out = output_dir.resolve()
    for name, source in inputs.items():
        if source is not None and (resolved_out == Path(source).resolve() or resolved_out in Path(source).resolve().parents):
            # replacing output_dir would delete the input
            raise ValueError(f"--output_dir {output_dir} contains --{name} {source}; write the dataset elsewhere")
    if output_dir.exists():
        if not output_dir.is_dir():
            raise FileExistsError(f"--output_dir {output_dir} is a file; choose a folder path")
        if any(output_dir.iterdir()) and not _is_built_dataset(output_dir):
            raise FileExistsError(
                f"--output_dir {output_dir} exists and is not a dataset written by stage2-build-dataset; "
                "refusing to replace it: choose another --output_dir or delete it yourself"
            )


def _remove_stale_scratch(output_dir: Path) -> None:
    """Scratch folders left by builds that were killed (their process is gone)."""
    for scratch in output_dir.parent.glob(f".{output_dir.name}{SCRATCH_MARKER}*"):
        try:
            pid = int(scratch.name.rsplit(SCRATCH_MARKER, 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _process_alive(pid):
            logger.info("removing %s, left by an interrupted build", scratch)
            shutil.rmtree(scratch, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _save_split(dataset, split_dir: Path, fingerprint: str) -> None:
    """Write one split in the `save_to_disk` layout by moving the Arrow files that
    `from_generator` wrote into the scratch cache, instead of copying them.

    Copying (`save_to_disk`) would write every byte twice and need twice the dataset's size in
    free disk (~94 GB more for the design's 160k tiles). The moved layout is checked with
    `load_from_disk`; if this `datasets` version lays datasets out differently, `save_to_disk`
    is used instead (the open memory maps keep the moved files readable).
    """
    from datasets import Dataset

    files = [Path(entry["filename"]) for entry in dataset.cache_files]
    try:
        if not files or dataset._indices is not None:
            raise ValueError("not a plain generator output")
        split_dir.mkdir(parents=True)
        names = [f"data-{i:05d}-of-{len(files):05d}.arrow" for i in range(len(files))]
        for source, name in zip(files, names):
            os.replace(source, split_dir / name)
        state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": fingerprint,
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
                 "_output_all_columns": False, "_split": str(dataset.split)}
        info = dataclasses.asdict(dataset.info)
        (split_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        (split_dir / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2),
                                                     encoding="utf-8")
        loaded = Dataset.load_from_disk(str(split_dir))
        if len(loaded) != len(dataset) or loaded.features != dataset.features:
            raise ValueError("moved Arrow files do not load back as the same dataset")
        del loaded
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.debug("saving %s with save_to_disk (%s)", split_dir.name, exc)
        shutil.rmtree(split_dir, ignore_errors=True)
        dataset.save_to_disk(str(split_dir))


def _move_into_place(built: Path, output_dir: Path, scratch: Path) -> None:
    """Replace `output_dir` by `built` with two renames; the old one is restored on failure."""
    previous = None
    if output_dir.exists():
        previous = scratch / "previous"
        os.replace(output_dir, previous)
    try:
        os.replace(built, output_dir)
    except BaseException:
        if previous is not None:
            os.replace(previous, output_dir)
        raise


# ----------------------------------------------------------------------------- build
def read_build_info(dataset) -> dict:
    """The build record of a built `Dataset` or `DatasetDict` (parsed `info.description`)."""
    split = next(iter(dataset.values())) if hasattr(dataset, "values") else dataset
    try:
        info = json.loads(split.info.description)
    except (TypeError, ValueError):
        raise ValueError("this dataset was not written by stage2-build-dataset (its info holds no build record)") from None
    if not isinstance(info, dict) or info.get("format") != BUILD_INFO_FORMAT:
        raise ValueError("this dataset was not written by stage2-build-dataset (unknown build record)")
    return info


def _resolve_input_mode(input_mode: Optional[str], stage1_dir) -> str:
    mode = input_mode or ("stage1" if stage1_dir is not None else "synthetic")
    if mode not in INPUT_MODES:
        raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
    if mode == "stage1" and stage1_dir is None:
        raise ValueError("input_mode='stage1' needs stage1_dir (the folder of <tile_id>.npz files holding opt_v1)")
    if mode != "stage1" and stage1_dir is not None:
        raise ValueError(f"stage1_dir is only read with input_mode='stage1', not {mode!r}; drop one of the two")
    if mode == "stage1" and not Path(stage1_dir).is_dir():
        raise FileNotFoundError(f"--stage1_dir {stage1_dir} does not exist or is not a folder")
    return mode


def _opt_v1_record(mode: str, stage1_dir, degradation: DegradationConfig, seed: int) -> dict:
    if mode == "identity":
        return {"mode": "identity", "description": "opt_v1 is the target itself (no Stage 1, no degradation)"}
    if mode == "stage1":
        return {"mode": "stage1", "stage1_dir": str(Path(stage1_dir).resolve()),
                "description": "opt_v1 read from STAGE1_DIR/<tile_id>.npz (key opt_v1)"}
    return {
        "mode": "synthetic",
        "description": "opt_v1 synthesised from the target by data_builders.degrade.synthesize_opt_v1 "
                       "(blur + misregistration, band cross-talk, gain/offset, smooth field, noise), "
                       "seeded per tile from (seed, tile_id)",
        "seed": seed,
        "degradation": degradation.to_dict(),
        "degradation_version": DEGRADATION_VERSION,
    }


def build_dataset(
    data_dir: str | Path,
    output_dir: str | Path,
    stage1_dir: Optional[str | Path] = None,
    max_samples: Optional[int] = None,
    strict: bool = False,
    num_proc: int = 1,
    input_mode: Optional[str] = None,
    degradation: Optional[DegradationConfig | dict] = None,
    seed: int = 0,
):
    """Build the Arrow `DatasetDict` of a tile folder and save it to `output_dir`.

    Args:
        data_dir: folder with `train/`, `val/` (or `validation/`), `test/` subfolders of tiles.
        output_dir: where the dataset goes (`datasets.load_from_disk(output_dir)`); an existing
            dataset there is replaced only once the new one is complete.
        stage1_dir: folder of Stage 1 outputs `<tile_id>.npz` (key `opt_v1`, (4, 120, 120)).
        max_samples: read at most this many tiles per split (the first ones by tile id).
        strict: stop at the first bad tile with `TileError` instead of skipping it.
        num_proc: worker processes that read and write tiles.
        input_mode: how `opt_v1` is made: `"synthetic"` (degraded target; the default without
            `stage1_dir`), `"stage1"` (the default with `stage1_dir`) or `"identity"`.
        degradation: `DegradationConfig` (or its dict) for `"synthetic"`; defaults otherwise.
        seed: seed of the synthetic degradation (per tile: seed + tile id).

    Returns:
        The `DatasetDict` loaded from `output_dir`, splits `train`, `val`, `test` (those with
        tiles). Rejected tiles are listed in `output_dir/rejected.jsonl`.

    Raises:
        TileError: in strict mode, naming the first bad file, key and problem.
        FileNotFoundError, FileExistsError, ValueError: bad arguments or folders.
    """
    from datasets import load_from_disk

    data_dir, output_dir = Path(data_dir), Path(output_dir)
    mode = _resolve_input_mode(input_mode, stage1_dir)
    if isinstance(degradation, dict):
        degradation = DegradationConfig.from_dict(degradation)
    degradation = degradation or DegradationConfig()
    if int(num_proc) < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc}")
    if max_samples is not None and int(max_samples) < 1:
        raise ValueError(f"max_samples must be >= 1 (or None for all tiles), got {max_samples}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    _check_output_dir(output_dir, {"data_dir": data_dir, "stage1_dir": stage1_dir})

    splits, rejected = discover_tiles(data_dir, strict=strict)
    if max_samples is not None:
        splits = {split: specs[: int(max_samples)] for split, specs in splits.items()}
    all_specs = [spec for specs in splits.values() for spec in specs]
    if not all_specs:
        raise ValueError(f"no usable tile under {data_dir}" + _first_reasons(rejected))
    _list_s1(all_specs)
    include_s1 = all(spec.has_s1 is not False for spec in all_specs)
    columns = metadata_columns(all_specs)
    features = dataset_features(include_s1, columns)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(output_dir)
    scratch = output_dir.parent / f".{output_dir.name}{SCRATCH_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    settings = {
        "input_mode": mode,
        "stage1_dir": str(stage1_dir) if stage1_dir is not None else None,
        "seed": int(seed),
        "degradation": degradation.to_dict(),
        "include_s1": include_s1,
        "strict": bool(strict),
        "report_dir": str(scratch / "reports"),
    }
    try:
        (scratch / "reports").mkdir(parents=True)
        built, fingerprints = _generate_splits(splits, columns, features, settings, scratch, int(num_proc))
        reports = _read_reports(scratch / "reports")
        rejected += [record for report in reports for record in report["rejected"]]
        if not built:
            raise ValueError(f"every tile under {data_dir} was rejected" + _first_reasons(rejected))
        info = _build_record(data_dir, built, reports, rejected, columns, include_s1, max_samples,
                             _opt_v1_record(mode, stage1_dir, degradation, int(seed)))
        staged = _stage(built, fingerprints, info, rejected, scratch / "dataset")
        del built  # release the memory maps of the Arrow files before moving them
        _move_into_place(staged, output_dir, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    counts = ", ".join(f"{split} {n}" for split, n in info["source"]["tiles"].items())
    summary = f"built {output_dir}: {counts} tiles; rejected {len(rejected)}"
    if rejected:
        summary += f" (reasons in {output_dir / REJECTED_FILE})"
    logger.info(summary)
    return load_from_disk(str(output_dir))


def _generate_splits(splits: dict, columns: dict, features, settings: dict, scratch: Path, num_proc: int):
    """Stream each split through `Dataset.from_generator`; ({split: Dataset}, {split: fingerprint}).

    Splits whose every tile was rejected are left out (datasets refuses empty splits).
    """
    from datasets import Dataset, NamedSplit
    from datasets.exceptions import DatasetGenerationError

    report_dir = Path(settings["report_dir"])
    built, fingerprints = {}, {}
    for split, specs in splits.items():
        chunks = _chunks(split, specs, columns)
        fingerprints[split] = uuid.uuid4().hex  # given, so datasets does not hash every tile path
        try:
            built[split] = Dataset.from_generator(
                _generate_examples,
                features=features,
                gen_kwargs={"chunks": chunks, "settings": settings},
                cache_dir=str(scratch / "cache"),
                num_proc=min(num_proc, len(chunks)) if num_proc > 1 and len(chunks) > 1 else None,
                split=NamedSplit(split),
                fingerprint=fingerprints[split],
                writer_batch_size=WRITER_BATCH_SIZE,
            )
        except Exception as exc:
            _raise_strict_failure(report_dir, exc)
            if _every_tile_rejected(report_dir, split, len(chunks)):
                logger.warning("split %s: every tile was rejected", split)
                continue
            if isinstance(exc, DatasetGenerationError) and exc.__cause__ is not None:
                raise exc.__cause__  # the error itself, not datasets' wrapper
            raise
    return built, fingerprints


def _build_record(data_dir: Path, built: dict, reports: list, rejected: list, columns: dict, include_s1: bool,
                  max_samples: Optional[int], opt_v1: dict) -> dict:
    """The JSON build record stored in every split's `info.description` and in build_info.json."""
    def total(key: str) -> dict:
        return dict(sum((collections.Counter(report[key]) for report in reports), collections.Counter()))

    return {
        "format": BUILD_INFO_FORMAT,
        "version": BUILD_INFO_VERSION,
        "source": {
            "data_dir": str(data_dir.resolve()),
            "sources": total("sources"),
            "tiles": {split: len(ds) for split, ds in built.items()},
            "rejected": len(rejected),
            "max_samples": max_samples,
        },
        "bands": list(BAND_NAMES),
        "scaling": {
            "rule": "integer bands are digital numbers, multiplied by 1e-4 (float64, rounded once to float32); "
                    "float bands are reflectance, kept",
            "tiles": total("scaling"),
        },
        "opt_v1": opt_v1,
        "statistics": _train_statistics(reports),
        "s1": "carried as s1 (VV, VH, dB)" if include_s1 else "not carried (not every tile has s1_vv and s1_vh)",
        "metadata_columns": {name: {"sidecar_key": key, "kind": kind} for name, (key, kind) in columns.items()},
        "valid_mask": "True where all four target bands are finite; target and opt_v1 are 0 elsewhere",
    }


def _stage(built: dict, fingerprints: dict, info: dict, rejected: list, staged: Path) -> Path:
    """The complete output folder, in the scratch area: splits, build_info.json, rejected.jsonl."""
    for split, split_dataset in built.items():
        split_dataset.info.description = json.dumps(info, indent=1, sort_keys=True)
        _save_split(split_dataset, staged / split, fingerprints[split])
    _write_json(staged / "dataset_dict.json", {"splits": list(built)})
    _write_json(staged / BUILD_INFO_FILE, info)
    with open(staged / REJECTED_FILE, "w", encoding="utf-8") as handle:
        for record in rejected:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
    return staged


def _first_reasons(rejected: list[dict], limit: int = 3) -> str:
    if not rejected:
        return ""
    lines = [f"{r['file']}: {r['key'] or '-'}: {r['problem']}" for r in rejected[:limit]]
    return f"; {len(rejected)} rejected, e.g.\n  " + "\n  ".join(lines)


def _read_reports(report_dir: Path) -> list[dict]:
    order = {split: i for i, split in enumerate(SPLITS)}
    paths = sorted(report_dir.glob("*.json"), key=lambda p: (order.get(p.stem.split("-")[0], 9), p.stem))
    return [json.loads(path.read_text()) | {"split": path.stem.split("-")[0]}
            for path in paths if not path.name.startswith("strict-")]


def _every_tile_rejected(report_dir: Path, split: str, num_chunks: int) -> bool:
    reports = [r for r in _read_reports(report_dir) if r["split"] == split]
    return len(reports) == num_chunks and sum(r["rows"] for r in reports) == 0


def _train_statistics(reports: list[dict]) -> dict:
    train = [r for r in reports if r["split"] == "train"]
    target, opt_v1 = _BandStats.merge([r["target_stats"] for r in train]), _BandStats.merge([r["opt_v1_stats"] for r in train])
    return {
        "split": "train",
        "valid_pixels": target.count,
        "target": target.summary(),
        "opt_v1": opt_v1.summary(),
        "note": "over valid pixels of the train split; reflectance; std is the population std",
    }


def _raise_strict_failure(report_dir: Path, exc: BaseException) -> None:
    """Turn a strict-mode stop inside `datasets` (possibly in a worker) back into a TileError."""
    failures = sorted(report_dir.glob("strict-*.json"))
    if failures:
        record = json.loads(failures[0].read_text())
        raise TileError(record["file"], record["key"], record["problem"]) from exc


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="stage2-build-dataset",
        description="Turn NPZ tiles (D/{train,val,test}/<tile_id>.npz) into an Arrow DatasetDict.",
    )
    parser.add_argument("--data_dir", required=True, help="folder with train/, val/, test/ tile folders")
    parser.add_argument("--output_dir", required=True, help="where the dataset is written (load_from_disk)")
    parser.add_argument("--stage1_dir", default=None, help="Stage 1 outputs <tile_id>.npz holding opt_v1")
    parser.add_argument("--input_mode", choices=INPUT_MODES, default=None,
                        help="how opt_v1 is made (default: stage1 with --stage1_dir, else synthetic)")
    parser.add_argument("--max_samples", type=int, default=None, help="at most N tiles per split")
    parser.add_argument("--strict", action="store_true", help="stop with exit code 1 at the first bad tile")
    parser.add_argument("--num_proc", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic degradation")
    parser.add_argument("--degradation_config", default=None,
                        help="JSON file of DegradationConfig fields overriding the defaults")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        degradation = None
        if args.degradation_config:
            with open(args.degradation_config, encoding="utf-8") as handle:
                degradation = DegradationConfig.from_dict(json.load(handle))
        build_dataset(
            args.data_dir, args.output_dir, stage1_dir=args.stage1_dir, max_samples=args.max_samples,
            strict=args.strict, num_proc=args.num_proc, input_mode=args.input_mode,
            degradation=degradation, seed=args.seed,
        )
    except (TileError, OSError, ValueError) as error:
        print(f"stage2-build-dataset: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

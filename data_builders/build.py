"""NPZ tiles (+ sidecars, + Stage 1 outputs) -> an Arrow `datasets.DatasetDict` on disk.

    stage2-build-dataset --data_dir D [--stage1_dir S] --output_dir O [--max_samples N]
                         [--strict] [--num_proc K] [--input_mode synthetic|stage1|identity]
                         [--dataset_seed 0] [--degradation mild|strong|mixture] [--degradation_config FILE.json]

Layout read: `D/{train,val,test}/<tile_id>.npz` (a `validation` folder counts as `val`), each with
an optional `<tile_id>.json` sidecar whose `split` wins over the folder. `datasets.load_from_disk(O)`
gives the `DatasetDict`; `json.loads(ds["train"].info.description)` (or `read_build_info`) is the
build record: source, input_scale (dn or reflectance tiles), train per-band statistics, how `opt_v1` was made.

How it works, and why:
- Discovery reads only the sidecars and the zip directories of the tiles (no pixels), places each
  tile in its split and rejects tiles whose id is in two splits.
- Tiles are streamed in chunks of `CHUNK_SIZE` into Arrow files written with `datasets`'
  `ArrowWriter` (the files `Dataset.from_generator` would write, byte for byte): each split's
  chunks are cut into at most `num_proc` consecutive runs, one Arrow file each, and the runs of
  all splits go to one pool of worker processes, so memory stays bounded, both cores stay busy
  across split boundaries and the row order is the sorted tile order whatever `num_proc` is.
  Each chunk returns a small report (rejections, partial statistics) that the parent merges;
  nothing is computed twice, unless rejected tiles shaped the columns (`_generate_kept`).
- Per tile, the costs are the NPZ decompression (zlib, ~1 ms), the synthetic `opt_v1` (~1.2 ms)
  and the Arrow encoding: image columns are encoded as whole batches from numpy buffers
  (`arrow_tensor_column`), not row by row through Python lists.
- Everything is written into a scratch folder beside `output_dir` and moved into place only
  when complete: a failed or killed build leaves any previous dataset untouched.

The parts, one module each: `discovery` (which tile goes into which split, read from the sidecars),
`schema` (the dataset's columns and types, sidecar columns included), `encoding` (rows to Arrow
columns) and `workers` (the process pool whose workers die with the build, and the progress bar).
This module generates the rows, handles the output folder, builds the dataset and its record, and
is the CLI.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from .degrade import (
    DEGRADATION_CHOICES,
    DEGRADATION_PRESETS,
    DEGRADATION_VERSION,
    MIXTURE,
    DegradationConfig,
    DegradationSpec,
    config_for_tile,
    resolve_degradation,
    synthesize_opt_v1,
)
from ._leaves import model_leaf
from .cache import ARROW_MARKER, DATASET_STATE, is_arrow_dataset
from .discovery import TileSpec, _list_s1, discover_tiles
from .encoding import _encode_rows
from .schema import _metadata_row, dataset_features, metadata_columns
from .tiles import BAND_NAMES, TileError, read_stage1, read_tile, S1_KEYS
from .workers import _count_done, _run_jobs, tune_allocator
# the other public names of the modules split out of this one, still importable from here
from .encoding import arrow_tensor_column  # noqa: F401
from .schema import CORE_COLUMNS, RESERVED_COLUMNS  # noqa: F401
from .workers import PR_SET_PDEATHSIG  # noqa: F401

logger = logging.getLogger(__name__)

BUILD_INFO_FORMAT = "stage2-tiles-dataset"
BUILD_INFO_VERSION = 2  # 2: "input_scale" {"tiles": {"dn": N, "reflectance": M}} (1: "scaling", "dn_x1e-4"/"float")
_vocabulary = model_leaf("vocabulary")
_signals = model_leaf("_signals")
_files = model_leaf("_files")  # atomic writes and folder replacement, without the model package's imports
INPUT_MODES = _vocabulary.INPUT_MODES  # synthetic | stage1 | identity (modeling_stage2.vocabulary)
CHUNK_SIZE = 64
"""Tiles per chunk: the unit a split is cut into before its chunks are shared out between jobs,
and the unit of the rejection/statistics reports."""
WRITER_BATCH_SIZE = 16
"""Rows per Arrow record batch (~9 MB with s1): bounds the writer's memory; 8-16 rows write fastest
(the batch is stacked in cache), 256 rows take twice the CPU time."""
REJECTED_FILE = "rejected.jsonl"
BUILD_INFO_FILE = "build_info.json"
SCRATCH_MARKER = ".stage2-build-"
SAVED_DATASET_PROBLEM = (f"is a saved dataset ({ARROW_MARKER}), not a folder of NPZ tiles: stage2-train --data_dir and "
                         "stage2-evaluate --data take it as it is; there is nothing to build")
"""Why `build_dataset` refuses a `data_dir` that is a built (saved Arrow) dataset, before any work."""


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
        opt_v1 = read_stage1(Path(settings["stage1_dir"]) / f"{tile.tile_id}.npz")
        # a generator fills the target's nodata pixels too: 0 there, as in every other mode
        return opt_v1 if tile.valid_mask.all() else np.where(tile.valid_mask, opt_v1, np.float32(0))
    config = settings["degradation"]
    config = DegradationConfig.from_dict(config) if config is not None else None
    _, config = config_for_tile(settings["degradation_preset"], config, settings["seed"], tile.tile_id)
    return synthesize_opt_v1(tile.target, tile.tile_id, settings["seed"], config, tile.valid_mask)


def _chunk_rows(chunk: dict, settings: dict, report: dict) -> Iterator[dict]:
    """Rows of one chunk; its rejections and partial statistics go into `report`."""
    target_stats, opt_stats = _BandStats(), _BandStats()
    for path, metadata_row, source in chunk["tiles"]:
        try:
            tile = read_tile(path, metadata={})
            opt_v1 = _make_opt_v1(tile, settings)
            if settings["include_s1"] and tile.s1 is None:
                raise TileError(path, S1_KEYS[0], "missing key (other tiles of this dataset carry Sentinel-1)")
        except TileError as error:
            if settings["strict"]:
                raise
            report["rejected"].append({**error.to_record(), "split": chunk["split"]})
            report["left_out"].append(path)
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
        report["input_scale"][tile.input_scale] += 1
        report["sources"][source] += 1
        report["rows"] += 1
        target_stats.update(tile.target, tile.valid_mask)
        opt_stats.update(opt_v1, tile.valid_mask)
        yield example
    report["target_stats"] = target_stats.to_dict()
    report["opt_v1_stats"] = opt_stats.to_dict()


def _new_report(split: str) -> dict:
    return {"split": split, "rejected": [], "left_out": [], "input_scale": collections.Counter(),
            "sources": collections.Counter(), "rows": 0}


def _write_job(job: dict) -> dict:
    """Write the rows of consecutive chunks of one split into one Arrow file (a worker's task).

    Returns the file, its row and byte counts and one report per chunk (rejections, statistics).
    """
    from datasets.arrow_writer import ArrowWriter

    features, settings = job["features"], job["settings"]
    reports, batch = [], []
    writer = ArrowWriter(features=features, path=job["path"], writer_batch_size=WRITER_BATCH_SIZE)
    try:
        for chunk in job["chunks"]:
            reports.append(_new_report(chunk["split"]))
            for row in _chunk_rows(chunk, settings, reports[-1]):
                batch.append(row)
                if len(batch) == WRITER_BATCH_SIZE:
                    writer.write_batch(_encode_rows(batch, features))
                    batch = []
            _count_done(len(chunk["tiles"]))
        if batch:
            writer.write_batch(_encode_rows(batch, features))
        rows, num_bytes = writer.finalize()
    finally:
        writer.close()
    return {"split": job["split"], "path": job["path"], "rows": rows, "bytes": num_bytes, "reports": reports}


def _write_json(path: Path, data: Any) -> None:
    _files.write_json(path, data, indent=1, sort_keys=True)


def _chunks(split: str, specs: Sequence[TileSpec], columns: dict) -> list[dict]:
    rows = [(spec.path, _metadata_row(spec.sidecar, columns), str(spec.sidecar.get("source", "unknown")))
            for spec in specs]
    return [
        {"split": split, "index": i // CHUNK_SIZE, "tiles": rows[i : i + CHUNK_SIZE]}
        for i in range(0, len(rows), CHUNK_SIZE)
    ]


# ----------------------------------------------------------------------------- output folder
def _is_built_dataset(path: Path) -> bool:
    return (path / ARROW_MARKER).is_file() and (path / BUILD_INFO_FILE).is_file()


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
    """Undo what builds that were killed (their process is gone) left: a dataset they had set aside while
    replacing it goes back to `output_dir`, then their scratch folders are removed."""
    _files.restore_set_aside(output_dir)
    # the name escaped: `ds[1]` as a pattern would match the scratch folders of `ds1`, and never its own
    for scratch in output_dir.parent.glob(f".{glob.escape(output_dir.name)}{SCRATCH_MARKER}*"):
        try:
            pid = int(scratch.name.rsplit(SCRATCH_MARKER, 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _files.process_alive(pid):
            # builds before the shared replace_folder set the old dataset aside inside their scratch folder
            if (scratch / "previous").is_dir() and not os.path.lexists(output_dir):
                os.replace(scratch / "previous", output_dir)
                logger.warning("%s was missing: restored it from %s, left by a build killed while replacing it",
                               output_dir, scratch / "previous")
            logger.info("removing %s, left by an interrupted build", scratch)
            shutil.rmtree(scratch, ignore_errors=True)


def _save_split(dataset, split_dir: Path, fingerprint: str) -> None:
    """Write one split in the `save_to_disk` layout by moving the Arrow files that the build
    wrote into the scratch cache, instead of copying them.

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
        (split_dir / DATASET_STATE).write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
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


def _move_into_place(built: Path, output_dir: Path) -> None:
    """Replace `output_dir` by `built` (`replace_folder`: the old dataset is set aside beside it, not in the
    scratch folder, so that a build killed between the two renames leaves it for the next build to restore)."""
    _files.replace_folder(built, output_dir)


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
    return upgrade_build_info(info)


def opt_v1_settings(info: dict) -> dict:
    """What a build record (`read_build_info`) says its dataset's `opt_v1` is, under the names of the flags that
    make it: `input_mode`, and for a synthetic `opt_v1` its `degradation` preset and `dataset_seed` (None for
    other modes, and the preset for a dataset built before the presets had names)."""
    opt_v1 = info.get("opt_v1") or {}
    synthetic = opt_v1.get("mode") == "synthetic"
    return {"input_mode": opt_v1.get("mode"),
            "degradation": opt_v1.get("preset") if synthetic else None,
            "dataset_seed": opt_v1.get("seed") if synthetic else None}


def recorded_opt_v1(dataset) -> Optional[dict]:
    """`opt_v1_settings` of a built `Dataset` / `DatasetDict` (its build record); None for a dataset without one."""
    try:
        return opt_v1_settings(read_build_info(dataset))
    except ValueError:
        return None


def saved_opt_v1_problem(dataset_dir, stage1_dir=None, input_mode: Optional[str] = None, flag: str = "--data_dir"
                         ) -> Optional[str]:
    """Why the flags that make an `opt_v1` (`--stage1_dir`, `--input_mode`) cannot apply to the saved dataset
    `dataset_dir` (given as `flag`), which holds its own; None when they can (unset, or the input_mode it was built
    with)."""
    if stage1_dir is None and input_mode is None:
        return None
    from datasets import load_from_disk

    built = (recorded_opt_v1(load_from_disk(str(dataset_dir))) or {}).get("input_mode")
    holds = f"{flag} {dataset_dir} is an Arrow dataset, which holds its own opt_v1" + (
        f" (input_mode {built!r})" if built else "")
    if stage1_dir is not None:
        return (f"--stage1_dir applies to NPZ tiles; {holds}: build one from the Stage 1 outputs with "
                f"stage2-build-dataset --stage1_dir {stage1_dir}, or give the NPZ tiles.")
    if built is not None and input_mode != built:
        return (f"--input_mode {input_mode}: {holds}; drop the flag, or build the dataset again with "
                f"stage2-build-dataset --input_mode {input_mode}.")
    return None


def upgrade_build_info(info: dict) -> dict:
    """A build record in the current vocabulary. Records of version 1 (written before `input_scale` was the one
    name) carry `"scaling"` with `"dn_x1e-4"` / `"float"` counts: read for one more release, with a deprecation
    warning, as `"input_scale"` with `"dn"` / `"reflectance"`."""
    if "scaling" not in info or "input_scale" in info:
        return info
    _vocabulary.warn_deprecated('the build record key "scaling" (a dataset built by an older release)',
                                '"input_scale" (rebuild the dataset to update its record)')
    info = dict(info)
    old = info.pop("scaling")
    if isinstance(old, dict):
        tiles = {_vocabulary.DEPRECATED_VALUES.get(name, name): count for name, count in old.get("tiles", {}).items()}
        old = {**old, "tiles": tiles}
    info["input_scale"] = old
    return info


def resolve_input_mode(input_mode: Optional[str], stage1_dir) -> str:
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


def _opt_v1_record(mode: str, stage1_dir, preset: str, degradation: Optional[DegradationConfig], seed: int) -> dict:
    if mode == "identity":
        return {"mode": "identity", "description": "opt_v1 is the target itself (no Stage 1, no degradation)"}
    if mode == "stage1":
        return {"mode": "stage1", "stage1_dir": str(Path(stage1_dir).resolve()),
                "description": "opt_v1 read from STAGE1_DIR/<tile_id>.npz (key opt_v1)"}
    record = {
        "mode": "synthetic",
        "description": f"opt_v1 synthesised from the target by data_builders.degrade.synthesize_opt_v1, "
                       f"degradation preset {preset!r} "
                       "(blur + misregistration, band cross-talk, gain/offset, optional haze and tone curve, "
                       "smooth field, noise), seeded per tile from (seed, tile_id)",
        "seed": seed,
        "preset": preset,
        "degradation": degradation.to_dict() if degradation is not None else None,
        "degradation_version": DEGRADATION_VERSION,
    }
    if preset == MIXTURE:
        record["description"] += (
            "; each tile uses the preset data_builders.degrade.mixture_choice(seed, tile_id) picks "
            "(mild or strong, equal odds), whose parameters are in mixture_presets")
        record["mixture_presets"] = {name: DEGRADATION_PRESETS[name].to_dict()
                                     for name in sorted({"mild", "strong"})}
    return record


def build_dataset(
    data_dir: str | Path,
    output_dir: str | Path,
    stage1_dir: Optional[str | Path] = None,
    max_samples: Optional[int] = None,
    strict: bool = False,
    num_proc: int = 1,
    input_mode: Optional[str] = None,
    degradation: DegradationSpec = None,
    seed: int = 0,
    degradation_overrides: Optional[dict] = None,
):
    """Build the Arrow `DatasetDict` of a tile folder and save it to `output_dir`.

    Args:
        data_dir: folder with `train/`, `val/` (or `validation/`), `test/` subfolders of tiles.
        output_dir: where the dataset goes (`datasets.load_from_disk(output_dir)`); an existing
            dataset there is replaced only once the new one is complete (a link: the folder it names).
        stage1_dir: folder of Stage 1 outputs `<tile_id>.npz` (key `opt_v1`, (4, 120, 120)).
        max_samples: read at most this many tiles per split (the first ones by tile id).
        strict: stop at the first bad tile with `TileError` instead of skipping it.
        num_proc: worker processes that read and write tiles.
        input_mode: how `opt_v1` is made: `"synthetic"` (degraded target; the default without
            `stage1_dir`), `"stage1"` (the default with `stage1_dir`) or `"identity"`.
        degradation: for `"synthetic"`: a preset name (`DEGRADATION_CHOICES`: `"mild"`, the
            default, `"strong"` or `"mixture"`), a `DegradationConfig`, or a dict of its fields
            overriding the defaults (`data_builders.degrade.resolve_degradation`). The build
            record names the preset (`opt_v1.preset`).
        seed: seed of the synthetic degradation (per tile: seed + tile id).
        degradation_overrides: `DegradationConfig` fields replacing those of `degradation` (the
            record then names the preset `"<name>+overrides"`); not with `"mixture"` (ValueError).

    Returns:
        The `DatasetDict` loaded from `output_dir`, splits `train`, `val`, `test` (those with
        tiles). Rejected tiles are listed in `output_dir/rejected.jsonl`.

    Raises:
        TileError: in strict mode, naming the first bad file, key and problem.
        FileNotFoundError, FileExistsError, ValueError: bad arguments or folders.
    """
    from datasets import load_from_disk

    data_dir, output_dir = Path(data_dir), Path(output_dir)
    if output_dir.is_symlink():  # a link to a folder: the folder it names is replaced, beside itself, and the link kept
        output_dir = output_dir.resolve()
    mode = resolve_input_mode(input_mode, stage1_dir)
    preset, degradation = resolve_degradation(degradation, degradation_overrides)
    if int(num_proc) < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc}")
    if max_samples is not None and int(max_samples) < 1:
        raise ValueError(f"max_samples must be >= 1 (or None for all tiles), got {max_samples}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if is_arrow_dataset(data_dir):  # its split folders hold Arrow files: it would say only 'no usable tile'
        raise ValueError(f"--data_dir {data_dir} {SAVED_DATASET_PROBLEM}")
    _check_output_dir(output_dir, {"data_dir": data_dir, "stage1_dir": stage1_dir})

    splits, rejected = discover_tiles(data_dir, strict=strict, stage1_dir=stage1_dir)
    if max_samples is not None:
        splits = {split: specs[: int(max_samples)] for split, specs in splits.items()}
    all_specs = [spec for specs in splits.values() for spec in specs]
    if not all_specs:
        raise ValueError(f"no usable tile under {data_dir}" + _first_reasons(rejected))
    _list_s1(all_specs)

    with _files.parents_removed_on_failure(output_dir):  # a failed build leaves no empty folder it made
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_scratch(output_dir)
        scratch = output_dir.parent / f".{output_dir.name}{SCRATCH_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        settings = {
            "input_mode": mode,
            "stage1_dir": str(stage1_dir) if stage1_dir is not None else None,
            "seed": int(seed),
            "degradation_preset": preset,
            "degradation": degradation.to_dict() if degradation is not None else None,
            "strict": bool(strict),
        }
        try:
            scratch.mkdir(parents=True)
            built, fingerprints, reports, read_rejected, columns, include_s1 = _generate_kept(
                splits, settings, scratch, int(num_proc))
            rejected += read_rejected
            if not built:
                raise ValueError(f"every tile under {data_dir} was rejected" + _first_reasons(rejected))
            info = _build_record(data_dir, built, reports, rejected, columns, include_s1, max_samples,
                                 _opt_v1_record(mode, stage1_dir, preset, degradation, int(seed)))
            staged = _stage(built, fingerprints, info, rejected, scratch / "dataset")
            del built  # release the memory maps of the Arrow files before moving them
            _move_into_place(staged, output_dir)
        finally:  # a signal while the scratch's Arrow files are deleted does not leave the rest of them
            _files.remove_tree(scratch)

    counts = ", ".join(f"{split} {n}" for split, n in info["source"]["tiles"].items())
    summary = f"built {output_dir}: {counts} tiles; rejected {len(rejected)}"
    if rejected:
        summary += f" (reasons in {output_dir / REJECTED_FILE})"
    logger.info(summary)
    return load_from_disk(str(output_dir))


def _schema(specs: Sequence[TileSpec]) -> tuple[bool, dict]:
    """(include_s1, sidecar columns) of a dataset of these tiles: `s1` when every one carries it (as far as
    their zip directories tell), the columns and types of their sidecars (`metadata_columns`)."""
    return all(spec.has_s1 is not False for spec in specs), metadata_columns(specs)


def _generate_kept(splits: dict, settings: dict, scratch: Path, num_proc: int):
    """`_generate_splits` with the columns of the tiles it keeps:
    (built, fingerprints, reports, rejection records, columns, include_s1).

    The columns (`s1`, the sidecar columns and their types) are decided from the tiles before their pixels are
    read, so a tile rejected while reading them could shape them: alone without Sentinel-1, it would drop `s1`
    from every row; with an odd sidecar value, it would turn a column into JSON text. When the kept tiles give
    other columns, they are written again, alone, with theirs (rare, but then they are read twice): the dataset
    is the one the folder gives without the rejected tiles.
    """
    rejected = []
    while True:
        include_s1, columns = _schema([spec for specs in splits.values() for spec in specs])
        built, fingerprints, reports = _generate_splits(splits, columns, dataset_features(include_s1, columns),
                                                        {**settings, "include_s1": include_s1}, scratch, num_proc)
        rejected += [record for report in reports for record in report["rejected"]]
        left_out = {path for report in reports for path in report["left_out"]}
        kept = {split: [spec for spec in specs if spec.path not in left_out] for split, specs in splits.items()}
        kept = {split: specs for split, specs in kept.items() if specs}
        kept_s1, kept_columns = _schema([spec for specs in kept.values() for spec in specs])
        if not kept or (kept_s1, list(kept_columns.items())) == (include_s1, list(columns.items())):
            return built, fingerprints, reports, rejected, columns, include_s1
        logger.warning("rejected tiles (%d) shaped the dataset's columns (s1, sidecar columns): writing the %d kept "
                       "tiles again, with their own columns", len(left_out), sum(map(len, kept.values())))
        del built  # release the memory maps of the Arrow files before removing them
        shutil.rmtree(scratch / "cache")
        splits = kept


def _generate_splits(splits: dict, columns: dict, features, settings: dict, scratch: Path, num_proc: int):
    """Write every split into Arrow files; ({split: Dataset}, {split: fingerprint}, chunk reports).

    Each split's chunks are shared out in consecutive runs between at most `num_proc` jobs (one
    Arrow file each, rows in tile order); the jobs of all splits go to one pool of workers.
    Splits whose every tile was rejected are left out (a dataset split cannot be empty).
    """
    cache = scratch / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    jobs = []
    for split, specs in splits.items():
        chunks = _chunks(split, specs, columns)
        groups = _consecutive_groups(chunks, min(num_proc, len(chunks)))
        for index, group in enumerate(groups):
            jobs.append({"split": split, "chunks": group, "features": features, "settings": settings,
                         "path": str(cache / f"{split}-{index:05d}-of-{len(groups):05d}.arrow")})
    results = _run_jobs(_write_job, jobs, num_proc)

    built, fingerprints = {}, {}
    for split in splits:
        parts = [result for result in results if result["split"] == split and result["rows"]]
        if not parts:
            logger.warning("split %s: every tile was rejected", split)
            continue
        fingerprints[split] = uuid.uuid4().hex
        built[split] = _split_dataset(split, parts, features, fingerprints[split])
    reports = [report for result in results for report in result["reports"]]
    return built, fingerprints, reports


def _consecutive_groups(items: list, num_groups: int) -> list[list]:
    """`items` cut into `num_groups` consecutive runs of (nearly) equal length, order kept."""
    groups, start = [], 0
    for index in range(num_groups):
        size = len(items) // num_groups + (index < len(items) % num_groups)
        groups.append(items[start : start + size])
        start += size
    return groups


def _split_dataset(split: str, parts: list[dict], features, fingerprint: str):
    """The `Dataset` of a split's Arrow files (memory-mapped, in order), with the `DatasetInfo`
    that `Dataset.from_generator` gives."""
    from datasets import Dataset, DatasetInfo, NamedSplit, SplitDict, SplitInfo
    from datasets.table import MemoryMappedTable, concat_tables

    rows, num_bytes = sum(part["rows"] for part in parts), sum(part["bytes"] for part in parts)
    split_info = SplitInfo(name=split, num_bytes=num_bytes, num_examples=rows, dataset_name="generator",
                           shard_lengths=[part["rows"] for part in parts] if len(parts) > 1 else None)
    splits = SplitDict(dataset_name="generator")
    splits.add(split_info)
    info = DatasetInfo(features=features, builder_name="generator", dataset_name="generator",
                       config_name="default", version="0.0.0", splits=splits, download_size=0,
                       dataset_size=num_bytes, size_in_bytes=num_bytes)
    table = concat_tables([MemoryMappedTable.from_file(part["path"]) for part in parts])
    return Dataset(table, info=info, split=NamedSplit(split), fingerprint=fingerprint)


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
        "input_scale": {
            "rule": "integer bands are digital numbers (dn), multiplied by 1e-4 (float64, rounded once to float32); "
                    "float bands are reflectance, kept",
            "tiles": total("input_scale"),
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
    _write_json(staged / ARROW_MARKER, {"splits": list(built)})
    _write_json(staged / BUILD_INFO_FILE, info)
    with open(staged / REJECTED_FILE, "w", encoding="utf-8") as handle:
        for record in rejected:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
    return staged


def read_rejected(dataset_dir: str | os.PathLike) -> list[dict]:
    """The records of the tiles the conversion in `dataset_dir` left out (its `rejected.jsonl`, one JSON object a
    line: `file`, `key`, `problem`, `split`); none where the file is absent (a dataset not built from NPZ tiles)."""
    path = Path(dataset_dir) / REJECTED_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _first_reasons(rejected: list[dict], limit: int = 3) -> str:
    if not rejected:
        return ""
    lines = [f"{r['file']}: {r['key'] or '-'}: {r['problem']}" for r in rejected[:limit]]
    return f"; {len(rejected)} rejected, e.g. " + "; ".join(lines)  # one line: the CLI's error is one


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


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = _vocabulary.OneLineArgumentParser(
        prog="stage2-build-dataset",
        description="Turn NPZ tiles (D/{train,val,test}/<tile_id>.npz) into an Arrow DatasetDict.",
    )
    parser.add_argument("--data_dir", required=True, help="folder with train/, val/, test/ tile folders")
    parser.add_argument("--output_dir", required=True, help="where the dataset is written (load_from_disk)")
    parser.add_argument("--stage1_dir", default=None, help="Stage 1 outputs <tile_id>.npz holding opt_v1")
    parser.add_argument("--input_mode", choices=INPUT_MODES, default=None,
                        help="how opt_v1 is made (default: stage1 with --stage1_dir, else synthetic)")
    parser.add_argument("--max_samples", type=int, default=None, help="at most N tiles per split")
    parser.add_argument("--strict", action="store_true", help="stop with exit code 2 at the first bad tile")
    parser.add_argument("--num_proc", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--dataset_seed", type=int, default=None,
                        help="seed of the synthetic degradation (default 0; the name stage2-train and "
                             "stage2-evaluate give it)")
    parser.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)  # deprecated: --dataset_seed
    parser.add_argument("--degradation", default=None, metavar="{" + ",".join(DEGRADATION_CHOICES) + "}",
                        help="preset of the synthetic degradation (default mild; mixture: mild or strong per tile)")
    parser.add_argument("--degradation_config", default=None,
                        help="JSON file of DegradationConfig fields overriding those of the --degradation preset "
                             "(not with mixture)")
    args = parser.parse_args(argv)
    _vocabulary.require_at_least(parser, args, {"--max_samples": 1, "--num_proc": 1, "--dataset_seed": 0, "--seed": 0})
    return args


def _read_degradation_config(path: Optional[str], preset: str) -> Optional[dict]:
    """The overrides of `--degradation_config`, checked against the preset before any work
    (ValueError naming the file and the field)."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            overrides = json.load(handle)
        if not isinstance(overrides, dict):
            raise ValueError(f"expected a JSON object of DegradationConfig fields, got {type(overrides).__name__}")
        resolve_degradation(preset, overrides)
    except FileNotFoundError:
        raise FileNotFoundError(f"--degradation_config {path}: file not found") from None
    except OSError as error:  # a folder, no permission: the user's file, not a failure of the build (exit 2)
        raise ValueError(f"--degradation_config {path}: cannot read it ({error.strerror or error})") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"--degradation_config {path}: {error}") from None
    return overrides


@_signals.exit_on_termination
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tune_allocator()  # this process is the CLI's own
    if args.seed is not None:  # the flag's name before it was the one of stage2-train and stage2-evaluate
        if args.dataset_seed is not None and args.dataset_seed != args.seed:
            print(f"stage2-build-dataset: error: --seed {args.seed} and --dataset_seed {args.dataset_seed} name the "
                  "same seed; give --dataset_seed only", file=sys.stderr)
            return 2
        print("stage2-build-dataset: warning: --seed is deprecated and will be removed in a future release; use "
              "--dataset_seed, as stage2-train and stage2-evaluate do", file=sys.stderr)
        args.dataset_seed = args.seed
    if args.dataset_seed is None:
        args.dataset_seed = 0
    try:
        mode = resolve_input_mode(args.input_mode, args.stage1_dir)
    except (ValueError, FileNotFoundError) as error:
        print(f"stage2-build-dataset: error: {error}", file=sys.stderr)
        return 2
    synthetic_only = [flag for flag, given in (("--degradation", args.degradation is not None),
                                               ("--degradation_config", bool(args.degradation_config))) if given]
    if synthetic_only and mode != "synthetic":  # they would do nothing: opt_v1 is not synthesised
        print(f"stage2-build-dataset: error: {', '.join(synthetic_only)}: for a synthetic opt_v1 only; this build's "
              f"opt_v1 is input_mode {mode!r}", file=sys.stderr)
        return 2
    args.degradation = args.degradation or "mild"
    if args.degradation not in DEGRADATION_CHOICES:  # one line, not argparse's usage + error
        print(f"stage2-build-dataset: error: --degradation: unknown preset {args.degradation!r} "
              f"(choose from {', '.join(DEGRADATION_CHOICES)})", file=sys.stderr)
        return 2
    problem = _files.output_path_problem(args.output_dir, folder=True)
    if problem is not None:
        print(f"stage2-build-dataset: error: --output_dir {args.output_dir}: {problem}", file=sys.stderr)
        return 2
    if args.degradation == MIXTURE and args.degradation_config:
        print("stage2-build-dataset: error: --degradation_config cannot be combined with --degradation mixture "
              "(it would apply to both of its presets); use mild or strong", file=sys.stderr)
        return 2
    try:
        overrides = _read_degradation_config(args.degradation_config, args.degradation)
        build_dataset(
            args.data_dir, args.output_dir, stage1_dir=args.stage1_dir, max_samples=args.max_samples,
            strict=args.strict, num_proc=args.num_proc, input_mode=args.input_mode,
            degradation=args.degradation, degradation_overrides=overrides, seed=args.dataset_seed,
        )
    except (TileError, FileNotFoundError, FileExistsError, ValueError) as error:  # bad input: nothing was written
        print(f"stage2-build-dataset: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a dead worker (1) or no permission (2): the previous dataset is kept
        print(f"stage2-build-dataset: error: {error}", file=sys.stderr)
        return 1 if _files.is_system_failure(error) else 2
    return 1 if read_rejected(args.output_dir) else 0  # some tiles left out


if __name__ == "__main__":
    sys.exit(main())

"""NPZ tiles (a folder, or files one by one): the shared tile reader, per-tile metrics, outputs that mirror the input
layout."""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from data_builders.tiles import BAND_KEYS as TILE_BAND_KEYS
from data_builders.tiles import (
    PICKLED_ARRAY,
    TILE_SIZE,
    TileError,
    band_kind,
    check_reflectance_floor,
    load_npz,
    read_bands,
    read_stage1,
    valid_pixels,
)
from modeling_stage2._files import (
    atomic_file,
    is_hidden,
    output_path_problem,
    remove_abandoned_partials_in,
    write_json,
)
from modeling_stage2.adapters import METRICS_FILE
from modeling_stage2.bands import BAND_NAMES, NUM_BIOMES, NUM_MONTHS, UNKNOWN_METADATA, DigitalNumbersWarning
from modeling_stage2.vocabulary import BIOME_NPZ_KEY, OLD_INPUT_SOURCE, OUT_OF_RANGE_WEIGHT, warn_deprecated

from .predict import refine_arrays
from .values import (
    DEFAULT_BATCH_SIZE, GEOTIFF_SUFFIXES, INPUT_SCALES, InferenceInputError, check_biome, check_month,
    metadata_limits, to_reflectance,
)


@dataclass
class _Tile:
    path: Path
    relative: Path
    opt_v1: np.ndarray  # (4, H, W) float32 reflectance, the model input
    target: np.ndarray | None  # (4, H, W) float32 reflectance when opt_v1 came from Stage 1
    month: int
    biome: int


@dataclass
class TileRefinementSummary:
    """What [`refine_tiles`] did.

    Attributes:
        output_dir: where the refined tiles are.
        input_mode: how `opt_v1`, the model input, was obtained (`modeling_stage2.vocabulary.INPUT_MODES`):
            `"stage1"` (opt_v1 from STAGE1_DIR, the S2 bands are the target) or `"identity"` (the tile's own S2
            bands are opt_v1: a real image refined as it is; no metrics).
        written: relative paths of the tiles written.
        rejected: `(path, reason)` for each tile that was skipped.
        metrics: the metrics over all written tiles (pixels pooled, as `stage2-evaluate` computes them):
            `{"refined": {...}, "opt_v1": {...}, "n_tiles": N}`, also written to OUTPUT_DIR/metrics.json;
            None without Stage 1 input or without the `training` package.
        seconds: wall time.
        replaced: relative paths of outputs of an earlier run into the same folder that were overwritten.
        removed_stale: outputs of an earlier run that this run would have left looking current (a tile now
            rejected, a `metrics.json` this run did not compute): removed.
        out_of_range_fraction: with a model that reports `out_of_range_weight` (built with `out_of_range_fallback`
            or `near_black_fallback`): the fraction of the written tiles' valid pixels where `opt_v1` was kept, in
            part or entirely (weight > 0: the pixel's spectrum lies outside the training spectra, or it is
            near-black); else None.
    """

    output_dir: Path
    input_mode: str
    written: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    seconds: float = 0.0
    replaced: list[str] = field(default_factory=list)
    removed_stale: list[str] = field(default_factory=list)
    out_of_range_fraction: float | None = None

    @property
    def input_source(self) -> str:
        """Deprecated (one release): `input_mode` in the old spelling (`"stage1"` / `"s2_bands"`)."""
        warn_deprecated("TileRefinementSummary.input_source", "TileRefinementSummary.input_mode "
                        "('stage1' / 'identity'; 's2_bands' is now 'identity')")
        return OLD_INPUT_SOURCE[self.input_mode]


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez` to a temporary file beside `path`, renamed into place only when complete."""
    with atomic_file(path, durable=False) as partial:  # one per tile: see `atomic_file`
        with open(partial, "wb") as handle:
            np.savez(handle, **arrays)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an NPZ through the data builder's reader: pickles refused, and no member
    decompressed beyond what its header declares or `NPZ_MAX_BYTES` (a small zip can inflate to GBs)."""
    try:
        return load_npz(path)
    except TileError as error:
        if error.problem == PICKLED_ARRAY:
            raise InferenceInputError(
                f"{path}: key {error.key!r} holds an object array, which needs unpickling; refusing "
                "(store numeric arrays)"
            ) from None
        where = f"key {error.key!r}: " if error.key else ""
        raise InferenceInputError(f"{path}: cannot be read as an NPZ file ({where}{error.problem})") from None


def _auto_scale_is(values: Sequence[Any], input_scale: str) -> bool:
    """Whether `input_scale` is the scale `"auto"` reads `values` with anyway (integer arrays digital numbers, float
    arrays reflectance): the flag then overrides nothing, and the data builders' reader, every check of it, applies."""
    kinds = {value.dtype.kind if isinstance(value, np.ndarray) else None for value in values}
    return (input_scale == "reflectance" and kinds == {"f"}) or (
        input_scale == "dn" and bool(kinds) and kinds <= {"i", "u"})


def _tile_bands(arrays: dict[str, np.ndarray], path: Path, input_scale: str) -> np.ndarray:
    """The four bands as float32 reflectance; invalid (non-finite) pixels NaN, so that they stay unrefined."""
    if input_scale == "auto" or _auto_scale_is([arrays.get(key) for key in TILE_BAND_KEYS], input_scale):
        # the data builders' reader: the same checks, bitwise the same reflectance as training
        try:
            bands, valid, _ = read_bands(path, arrays)
        except TileError as error:
            raise InferenceInputError(str(error)) from None
        bands[:, ~valid] = np.nan
        return bands
    for key in TILE_BAND_KEYS:
        if key not in arrays:
            raise InferenceInputError(f"{path}: missing key {key!r} (a tile needs {TILE_BAND_KEYS})")
    try:  # before any shape is read: a zip member that is no .npy array comes back as bytes
        band_kind(path, [arrays[key] for key in TILE_BAND_KEYS])
    except TileError as error:
        raise InferenceInputError(str(error)) from None
    bands = []
    for key in TILE_BAND_KEYS:
        band = arrays[key]
        if band.shape != (TILE_SIZE, TILE_SIZE):
            raise InferenceInputError(
                f"{path}: key {key!r} has shape {band.shape}, expected ({TILE_SIZE}, {TILE_SIZE}); "
                "refine larger images as a GeoTIFF scene"
            )
        bands.append(band)
    try:  # the scale is the flag's; every other check is the data builders'
        reflectance = np.stack([to_reflectance(band, input_scale, f"{path}: key {key!r}")
                                for key, band in zip(TILE_BAND_KEYS, bands)])
        valid = valid_pixels(path, reflectance)
        check_reflectance_floor(path, reflectance)
    except TileError as error:
        raise InferenceInputError(str(error)) from None
    reflectance[:, ~valid] = np.nan
    return reflectance


def _tile_metadata(arrays: dict[str, np.ndarray], path: Path, limits: tuple[int, int]) -> tuple[int, int]:
    month = arrays.get("month", UNKNOWN_METADATA)
    key = BIOME_NPZ_KEY
    if key not in arrays and "biome" in arrays:  # the column's name used as an NPZ key: read for one release
        warn_deprecated("the NPZ tile key 'biome'", f"{BIOME_NPZ_KEY!r} (the tile format's key for the biome code)")
        key = "biome"
    biome = arrays.get(key, UNKNOWN_METADATA)
    return (check_month(_stored_number(month), f"{path}: key 'month'", limits[0]),
            check_biome(_stored_number(biome), f"{path}: key {key!r}", limits[1]))


def _stored_number(value):
    """A tile's month or biome code as the data builders read it (`read_scalar`): a one-element array of any shape,
    `(1,)` included, is its number."""
    array = np.asarray(value)
    return array.reshape(()) if array.size == 1 else array


def _stage1_path(stage1_dir: Path, relative: Path) -> Path:
    """`STAGE1_DIR/<tile>.npz`, or the tile's own relative path (split subfolders) when that exists."""
    nested = stage1_dir / relative
    return nested if nested.is_file() else stage1_dir / relative.name


def _builders_stage1(path: Path, arrays: dict | None = None) -> np.ndarray:
    """The data builders' Stage 1 reader (from `arrays` where the file is read already)."""
    try:
        return read_stage1(path, arrays=arrays)
    except TileError as error:
        raise InferenceInputError(str(error)) from None


def _stage1_opt_v1(path: Path, input_scale: str) -> np.ndarray:
    if input_scale == "auto":
        return _builders_stage1(path)
    if not path.is_file():
        raise InferenceInputError(f"{path}: Stage 1 file missing (expected STAGE1_DIR/<tile>.npz with 'opt_v1')")
    arrays = _load_npz(path)
    if "opt_v1" not in arrays:
        raise InferenceInputError(f"{path}: missing key 'opt_v1' (Stage 1 output, shape (4, 120, 120))")
    opt_v1 = arrays["opt_v1"]
    if not isinstance(opt_v1, np.ndarray):  # a zip member that is no .npy array comes back as bytes
        raise InferenceInputError(str(TileError(path, "opt_v1", "zip member 'opt_v1' is not a .npy array; save "
                                                                "Stage 1 outputs with np.savez")))
    if _auto_scale_is([opt_v1], input_scale):  # the flag overrides nothing: the data builders' reader
        return _builders_stage1(path, arrays)
    if opt_v1.shape != (len(BAND_NAMES), TILE_SIZE, TILE_SIZE):
        raise InferenceInputError(
            f"{path}: key 'opt_v1' has shape {opt_v1.shape}, expected (4, {TILE_SIZE}, {TILE_SIZE})"
        )
    reflectance = to_reflectance(opt_v1, input_scale, f"{path}: key 'opt_v1'")
    bad = int(reflectance.size - np.count_nonzero(np.isfinite(reflectance)))
    if bad:  # the data builders' rule (`read_stage1`), whatever the scale
        raise InferenceInputError(str(TileError(path, "opt_v1", f"{bad} NaN/Inf values; Stage 1 outputs must be "
                                                                "finite")))
    return reflectance


def _read_tile(path: Path, relative: Path, stage1_dir: Path | None, input_scale: str = "auto",
               limits: tuple[int, int] = (NUM_MONTHS, NUM_BIOMES)) -> _Tile:
    """One tile: its model input (Stage 1 opt_v1, or the S2 bands without Stage 1), target and metadata (checked
    against the model's `limits`, `metadata_limits`)."""
    arrays = _load_npz(path)
    bands = _tile_bands(arrays, path, input_scale)
    month, biome = _tile_metadata(arrays, path, limits)
    if stage1_dir is None:
        return _Tile(path, relative, bands, None, month, biome)
    opt_v1 = _stage1_opt_v1(_stage1_path(stage1_dir, relative), input_scale)
    return _Tile(path, relative, opt_v1, bands, month, biome)


def _metrics_module():
    """`training.metrics` when the training package is installed, else None.

    Imported lazily: the model package does not depend on training; metrics are an extra of the tiles
    mode with Stage 1 input.
    """
    try:
        from training import metrics
    except ImportError:
        return None
    return metrics


def _batch_metrics(metrics, refined: np.ndarray, tiles: list[_Tile]) -> dict[str, dict[str, torch.Tensor]]:
    """Per-tile statistics (`training.metrics.paired_tile_statistics`) of the refined tiles and of opt_v1
    itself against the target; pixels invalid in the target or in opt_v1 do not count."""
    target = np.stack([tile.target for tile in tiles])
    opt_v1 = np.stack([tile.opt_v1 for tile in tiles])
    valid = np.isfinite(target).all(axis=1) & np.isfinite(opt_v1).all(axis=1)
    as_tensor = lambda array: torch.from_numpy(np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0))  # noqa: E731
    return metrics.paired_tile_statistics(
        as_tensor(refined), as_tensor(target), as_tensor(opt_v1), torch.from_numpy(valid)
    )


def _tile_metrics(metrics, paired: dict[str, dict[str, torch.Tensor]], index: int) -> dict[str, dict[str, float]]:
    """The metrics of tile `index` of a batch, for the refined output and for opt_v1."""
    result = {}
    for role, stats in paired.items():
        values = metrics.metrics_from_statistics({name: value[index : index + 1] for name, value in stats.items()})
        result[role] = {name: float(values[name][0]) for name in metrics.METRIC_NAMES}
    return result


def _tile_output(refined: np.ndarray, weight: np.ndarray | None, tile: _Tile, input_mode: str,
                 metrics: dict | None) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {
        "refined": refined.astype(np.float32),
        "month": np.int64(tile.month),
        BIOME_NPZ_KEY: np.int64(tile.biome),
        "band_names": np.array(BAND_NAMES),
        "input_mode": np.array(input_mode),
    }
    if weight is not None:
        arrays[OUT_OF_RANGE_WEIGHT] = weight.astype(np.float32)
    for kind, values in (metrics or {}).items():
        for key, value in values.items():
            arrays[f"metrics_{kind}_{key}"] = np.float64(value)
    return arrays


def _find_tiles(input_dir: Path, output_dir: Path) -> list[Path]:
    """Every `*.npz` under `input_dir`, through linked folders too (a split folder may be a symlink, as the data
    builders read it), each real folder once; never in hidden folders or files (`.ipynb_checkpoints/` holds copies of
    the tiles; partial files are hidden). An output folder inside the input folder is refused: its tiles would mix
    with the inputs (a split named as it would be skipped) and a later run would read them as inputs."""
    output = output_dir.resolve()
    if input_dir.resolve() in output.parents:
        raise InferenceInputError(f"output_dir {output_dir} lies inside the input folder {input_dir}; refusing (its "
                                  "outputs would be read as tiles): choose an output folder outside it")
    seen: set[Path] = set()
    paths = []
    for folder, subfolders, files in os.walk(input_dir, followlinks=True):
        real = Path(folder).resolve()
        if real == output:  # reached through a link inside the input folder
            raise InferenceInputError(f"output_dir {output_dir} is reached from the input folder {input_dir} as "
                                      f"{folder}; refusing (its outputs would be read as tiles): choose an output "
                                      "folder outside it")
        if real in seen:  # a folder reached twice (a link loop)
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [name for name in subfolders if not is_hidden(name)]
        paths.extend(Path(folder) / name for name in files if name.endswith(".npz") and not is_hidden(name))
    return sorted(paths)


def is_npz(path: Path) -> bool:
    """An NPZ tile by its name (the suffix in any case); a GeoTIFF is a scene (`GEOTIFF_SUFFIXES`)."""
    return path.suffix.lower() == ".npz"


def _tile_files(inputs: list[Path]) -> list[tuple[Path, Path]]:
    """NPZ files given one by one -> `(path, output name)`; each output is `OUTPUT_DIR/<file name>`, so two inputs
    with the same name are refused."""
    by_name: dict[str, Path] = {}
    for path in inputs:
        if path.is_dir():
            raise InferenceInputError(
                f"input {path} is a folder among {len(inputs)} inputs; pass one folder of NPZ tiles, or NPZ files"
            )
        if not path.exists():
            raise InferenceInputError(f"input {path}: no such NPZ file")
        if not is_npz(path):
            if path.suffix.lower() in GEOTIFF_SUFFIXES:
                raise InferenceInputError(f"input {path}: a GeoTIFF is a scene, refined with refine_scene "
                                          "(stage2-refine --output FILE.tif), not among NPZ tiles")
            raise InferenceInputError(f"input {path}: not an NPZ tile (.npz)")
        earlier = by_name.get(path.name)
        if earlier is not None and earlier.samefile(path):
            also = "" if earlier == path else f" (also as {earlier})"
            raise InferenceInputError(f"input {path}: given twice{also}; give each tile once")
        if path.name in by_name:
            raise InferenceInputError(
                f"inputs {by_name[path.name]} and {path} have the same file name; both would be written to "
                f"OUTPUT_DIR/{path.name} (refine them into separate folders)"
            )
        by_name[path.name] = path
    return [(path, Path(path.name)) for path in inputs]


def tile_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike], output_dir: Path,
                stage1_dir: Path | None = None) -> list[tuple[Path, Path]]:
    """`[(tile path, output path relative to OUTPUT_DIR)]` for a folder (searched recursively, the outputs mirror its
    layout) or for NPZ files (outputs `OUTPUT_DIR/<file name>`). Every problem of a tiles run that needs no model
    raises here, so that the CLI finds it before loading one: no output may be an input, `output_dir` must be
    writable as a folder, `stage1_dir` must exist."""
    problem = output_path_problem(output_dir, folder=True)
    if problem is not None:
        raise InferenceInputError(f"output_dir {output_dir}: {problem}")
    if stage1_dir is not None and not Path(stage1_dir).is_dir():
        raise InferenceInputError(f"stage1_dir {stage1_dir}: no such folder")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = [Path(path) for path in inputs]
    if not paths:
        raise InferenceInputError("no input: pass a folder of NPZ tiles or NPZ files")
    if len(paths) == 1 and not paths[0].is_file():
        folder = paths[0]
        if not folder.is_dir():
            raise InferenceInputError(f"input {folder}: no such folder of NPZ tiles or NPZ file")
        if folder.resolve() == output_dir.resolve():
            raise InferenceInputError(f"output_dir {output_dir} is the input folder; refusing to overwrite the tiles")
        found = _find_tiles(folder, output_dir)
        if not found:
            raise InferenceInputError(f"input {folder}: no .npz tiles found (searched recursively)")
        tiles = [(path, path.relative_to(folder)) for path in found]
    else:
        tiles = _tile_files(paths)
    if stage1_dir is not None:
        _refuse_shared_stage1(tiles, Path(stage1_dir))
    _refuse_outputs_on_inputs(tiles, output_dir, None if stage1_dir is None else Path(stage1_dir))
    return tiles


def _refuse_shared_stage1(tiles: list[tuple[Path, Path]], stage1_dir: Path) -> None:
    """Two tiles of one name in different subfolders would both read `STAGE1_DIR/<tile>.npz` as their opt_v1 (at most
    one of them its own) where `STAGE1_DIR/<split>/<tile>.npz` does not tell them apart."""
    readers: dict[Path, Path] = {}
    for path, relative in tiles:
        stage1 = _stage1_path(stage1_dir, relative)
        other = readers.setdefault(stage1, path)
        if other != path:
            raise InferenceInputError(
                f"tiles {other} and {path} would both take their opt_v1 from {stage1}; give each its own Stage 1 "
                f"file as STAGE1_DIR/<subfolder>/<tile>.npz (e.g. {stage1_dir / relative})"
            )


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _refuse_outputs_on_inputs(tiles: list[tuple[Path, Path]], output_dir: Path, stage1_dir: Path | None) -> None:
    """No output may be one of the inputs, a tile or its Stage 1 file (the same file, through any spelling or link of
    its path)."""
    inputs = {_file_id(path): f"input {path}" for path, _ in tiles}
    if stage1_dir is not None:
        stage1 = (_stage1_path(stage1_dir, relative) for _, relative in tiles)
        inputs.update({_file_id(path): f"Stage 1 file {path}" for path in stage1 if path.is_file()})
    for _, relative in tiles:
        output = output_dir / relative
        same = inputs.get(_file_id(output)) if output.exists() else None
        if same is not None:
            raise InferenceInputError(
                f"output_dir {output_dir}: the output {output} would overwrite the {same}; refusing "
                "(choose another output folder)"
            )


def refine_tiles(
    model: Any,
    inputs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    output_dir: str | os.PathLike | None = None,
    stage1_dir: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    input_dir: str | os.PathLike | None = None,
    input_scale: str = "auto",
    device: str | torch.device | None = None,
    strict: bool = False,
    progress: bool = True,
) -> TileRefinementSummary:
    """Refine NPZ tiles into `output_dir`: every tile under a folder `inputs` (recursively: train/val/test
    subfolders; the outputs mirror its layout), or NPZ files `inputs` (a path or a sequence of paths; each output is
    `OUTPUT_DIR/<file name>`, so two inputs with the same name are refused before anything is written).
    `input_dir=` is the deprecated keyword spelling of `inputs`.

    Input tiles have `s2_b2`, `s2_b3`, `s2_b4`, `s2_b8` (120x120, digital numbers or reflectance), `month`
    and `biome_code` (absent = unknown). With `stage1_dir`, the model input is `opt_v1` from
    `STAGE1_DIR/<tile>.npz` and the S2 bands are the target, so per-tile metrics are computed; without
    it the S2 bands themselves are the model input (a real image refined as it is) and there is no
    target.

    Each output `OUTPUT_DIR/<relative path or file name>` holds `refined` (4, 120, 120) float32 reflectance,
    `month`, `biome_code`, `band_names`, `input_mode` (`"stage1"` or `"identity"`), with a model built with
    `out_of_range_fallback` or `near_black_fallback` `out_of_range_weight` (120, 120) float32 (each pixel's weight
    of `opt_v1` in `refined`, NaN where the input is invalid) and, with Stage 1 input, scalar
    `metrics_refined_<name>` / `metrics_opt_v1_<name>`. Files are written atomically (temp + rename).
    Bad tiles are skipped and listed in the summary's `rejected` (`strict=True`: the first one raises). No output
    may be an input: refused before any work.
    """
    start = time.perf_counter()
    if input_dir is not None:
        if inputs is not None:
            raise TypeError("refine_tiles() got both inputs and input_dir (its deprecated spelling)")
        warn_deprecated("refine_tiles(input_dir=...)", "refine_tiles(model, inputs, output_dir) (a folder or NPZ "
                        "files)")
        inputs = input_dir
    if inputs is None or output_dir is None:
        raise TypeError("refine_tiles() needs inputs (a folder of NPZ tiles or NPZ files) and output_dir")
    output_dir = Path(output_dir)
    if batch_size < 1:
        raise InferenceInputError(f"batch_size must be at least 1, got {batch_size}")
    if input_scale not in INPUT_SCALES:  # found per tile, it would reject every tile and remove their old outputs
        raise InferenceInputError(f"input_scale must be one of {INPUT_SCALES}, got {input_scale!r}")
    stage1 = Path(stage1_dir) if stage1_dir is not None else None
    paths = tile_inputs(inputs, output_dir, stage1)
    input_mode = "stage1" if stage1 is not None else "identity"
    summary = TileRefinementSummary(output_dir=output_dir, input_mode=input_mode)
    metrics = _metrics_module() if stage1 is not None else None
    if stage1 is not None and metrics is None:
        warnings.warn("the `training` package is not installed: tiles are refined without metrics", stacklevel=2)
    accumulator = metrics.MetricAccumulator() if metrics is not None else None
    limits = metadata_limits(model)
    kept_pixels = valid_pixels = 0  # out-of-range pixels, over the written tiles
    for folder in sorted({(output_dir / relative).parent for _, relative in paths} | {output_dir}):
        remove_abandoned_partials_in(folder)  # hidden half-written tiles of a run killed by SIGKILL
    earlier_metrics = None  # an earlier run's metrics.json, removed before the first tile it described is replaced

    from tqdm.auto import tqdm

    with tqdm(total=len(paths), unit="tile", desc="stage2-refine", disable=not progress) as bar:
        for chunk_start in range(0, len(paths), batch_size):
            tiles = []
            for path, relative in paths[chunk_start : chunk_start + batch_size]:
                try:
                    tiles.append(_read_tile(path, relative, stage1, input_scale, limits))
                except InferenceInputError as error:
                    if strict:
                        raise
                    summary.rejected.append((str(path), str(error)))
                    # An output of this tile from an earlier run would pass for a result of this one.
                    if _remove_stale(output_dir / relative):
                        summary.removed_stale.append(str(relative))
                    bar.update(1)
            if not tiles:
                continue
            with warnings.catch_warnings():
                # Each file's values were checked where it was read, with its name (`_tile_bands`,
                # `_stage1_opt_v1`); the stacked batch would be named `opt_v1`, the array.
                warnings.simplefilter("ignore", DigitalNumbersWarning)
                refined, weights = refine_arrays(
                    model,
                    np.stack([tile.opt_v1 for tile in tiles]),
                    [tile.month for tile in tiles],
                    [tile.biome for tile in tiles],
                    input_scale="reflectance",
                    batch_size=batch_size,
                    device=device,
                    return_out_of_range_weight=True,
                )
            if weights is not None:
                valid = np.isfinite(weights)
                kept_pixels += int((weights[valid] > 0).sum())
                valid_pixels += int(valid.sum())
            paired = _batch_metrics(metrics, refined, tiles) if accumulator is not None else None
            for index, (tile, image) in enumerate(zip(tiles, refined)):
                tile_metrics = _tile_metrics(metrics, paired, index) if paired is not None else None
                weight = None if weights is None else weights[index]
                if earlier_metrics is None:  # a run that fails later must not leave it beside its new tiles
                    earlier_metrics = _remove_stale(output_dir / METRICS_FILE)
                if (output_dir / tile.relative).exists():
                    summary.replaced.append(str(tile.relative))
                save_npz_atomic(output_dir / tile.relative, _tile_output(image, weight, tile, input_mode, tile_metrics))
                summary.written.append(str(tile.relative))
                bar.update(1)
            if paired is not None:
                accumulator.add_statistics(paired)
    if accumulator is not None and accumulator.n_tiles:
        summary.metrics = accumulator.compute()
        write_json(output_dir / METRICS_FILE, summary.metrics)
    elif earlier_metrics or _remove_stale(output_dir / METRICS_FILE):  # an earlier run's, not of these tiles
        summary.removed_stale.append(METRICS_FILE)
    if valid_pixels:
        summary.out_of_range_fraction = kept_pixels / valid_pixels
    summary.seconds = time.perf_counter() - start
    return summary


def _remove_stale(path: Path) -> bool:
    """Remove an earlier run's output file; True if there was one."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True

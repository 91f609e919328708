"""Inference with the Stage 2 refiner: numpy arrays, folders of NPZ tiles and whole GeoTIFF scenes.

Three entry points share one model call:

- [`refine_arrays`]: numpy `(4, H, W)` or `(B, 4, H, W)` in reflectance or digital numbers -> refined
  reflectance (float32).
- [`refine_tiles`]: a folder of NPZ tiles in the design's layout (searched recursively) -> one NPZ per
  tile with `refined` (and per-tile metrics when a Stage 1 `opt_v1` and the Sentinel-2 target exist).
- [`refine_scene`]: a GeoTIFF of any size (one 4-band file or four single-band files) -> a GeoTIFF with
  the same CRS, transform and nodata, refined in overlapping windows blended without seams, reading
  and writing one strip of windows at a time so that memory does not grow with the scene's height.

`stage2-refine` ([`main`]) is the command line for the last two. Bands are always
`BAND_NAMES = ("B02", "B03", "B04", "B08")`; reflectance is digital numbers x 1e-4.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from data_builders.tiles import BAND_KEYS as TILE_BAND_KEYS
from data_builders.tiles import DN_SCALE, TILE_SIZE, dn_to_reflectance

from .bands import BAND_NAMES, NUM_BIOMES, NUM_MONTHS, UNKNOWN_METADATA
from .hub import download_model_folder, is_hub_repo_id

INPUT_SCALES = ("auto", "reflectance", "dn")
OUTPUT_SCALES = ("reflectance", "dn")
DEFAULT_WINDOW = TILE_SIZE
DEFAULT_OVERLAP = 32
DEFAULT_BATCH_SIZE = 8
# Reflectance above this median is almost certainly digital numbers passed as floats.
_DN_LOOKING_MEDIAN = 2.0

__all__ = [
    "BAND_NAMES",
    "InferenceInputError",
    "SceneRefinementResult",
    "TileRefinementSummary",
    "blend_weights",
    "load_model",
    "main",
    "refine_arrays",
    "refine_scene",
    "refine_tiles",
    "to_reflectance",
    "window_starts",
]


class InferenceInputError(ValueError):
    """Bad input to inference: the message names the file (or argument), the key and the problem."""


# ----------------------------------------------------------------------------------------------
# Values: scaling, metadata, invalid pixels
# ----------------------------------------------------------------------------------------------


def resolve_input_scale(dtype: np.dtype, input_scale: str, source: str) -> str:
    """`"reflectance"` or `"dn"` for an array of `dtype`; `"auto"` means integers are digital numbers."""
    if input_scale not in INPUT_SCALES:
        raise InferenceInputError(f"input_scale must be one of {INPUT_SCALES}, got {input_scale!r}")
    dtype = np.dtype(dtype)
    if dtype.kind not in "iuf":
        raise InferenceInputError(
            f"{source}: expected numeric band values (integers = digital numbers, floats = reflectance), "
            f"got dtype {dtype}"
        )
    if input_scale == "auto":
        return "dn" if dtype.kind in "iu" else "reflectance"
    return input_scale


def to_reflectance(
    values: np.ndarray, input_scale: str = "auto", source: str = "input", *, warn: bool = True
) -> np.ndarray:
    """Band values as float32 reflectance: digital numbers are multiplied by 1e-4, reflectance is kept.

    With `input_scale="auto"` integer arrays are digital numbers and float arrays reflectance. Floats
    that look like digital numbers (median above 2) give a warning: pass `input_scale="dn"` for them.
    """
    values = np.asarray(values)
    scale = resolve_input_scale(values.dtype, input_scale, source)
    if scale == "dn":
        return dn_to_reflectance(values)
    reflectance = values.astype(np.float32, copy=True)
    if warn:
        _warn_if_looks_like_dn(reflectance, source)
    return reflectance


def _warn_if_looks_like_dn(reflectance: np.ndarray, source: str) -> None:
    flat = reflectance.ravel()
    sample = flat[:: max(1, flat.size // 65536)]
    sample = sample[np.isfinite(sample)]
    if sample.size and float(np.median(sample)) > _DN_LOOKING_MEDIAN:
        warnings.warn(
            f"{source}: float values with median {float(np.median(sample)):.1f} look like digital numbers "
            "(reflectance x 10000), not reflectance in 0..1; pass input_scale='dn' (--input_scale dn) if so",
            stacklevel=3,
        )


def check_month(month: Any, source: str = "month", num_months: int = NUM_MONTHS) -> int:
    """`month` as an int in 1..`num_months` or -1 (unknown); raises a clear error otherwise."""
    value = _as_metadata_int(month, source)
    if value != UNKNOWN_METADATA and not 1 <= value <= num_months:
        raise InferenceInputError(
            f"{source}: month {value} is out of range; use 1..{num_months}, or {UNKNOWN_METADATA} for unknown"
        )
    return value


def check_biome(biome: Any, source: str = "biome", num_biomes: int = NUM_BIOMES) -> int:
    """`biome` as an int in 0..`num_biomes - 1` or -1 (unknown); raises a clear error otherwise."""
    value = _as_metadata_int(biome, source)
    if value != UNKNOWN_METADATA and not 0 <= value < num_biomes:
        raise InferenceInputError(
            f"{source}: biome code {value} is out of range; use 0..{num_biomes - 1}, "
            f"or {UNKNOWN_METADATA} for unknown"
        )
    return value


def metadata_limits(model: Any) -> tuple[int, int]:
    """`(num_months, num_biomes)` the model was built for (its config: a refiner, its PEFT wrapper or an export
    that carries one), else the product's 12 months and 17 biomes."""
    config = getattr(model, "config", None)
    return int(getattr(config, "num_months", NUM_MONTHS)), int(getattr(config, "num_biomes", NUM_BIOMES))


def _as_metadata_int(value: Any, source: str) -> int:
    array = np.asarray(value)
    whole_float = array.dtype.kind == "f" and array.ndim == 0 and bool(np.isfinite(array)) and float(array).is_integer()
    if array.ndim != 0 or not (array.dtype.kind in "iu" or whole_float):  # bools and strings are refused
        raise InferenceInputError(f"{source}: expected one integer, got {value!r}")
    return int(array)


def _metadata_vector(values: Any, count: int, check: Callable[[Any, str], int], name: str) -> np.ndarray:
    """One value per image: a scalar is broadcast, a sequence must have `count` entries."""
    array = np.asarray(values)
    if array.ndim == 0:
        array = np.full(count, array, dtype=array.dtype)
    if array.ndim != 1 or len(array) != count:
        raise InferenceInputError(f"{name}: expected one value or {count} values, got shape {array.shape}")
    return np.array([check(v, f"{name}[{i}]") for i, v in enumerate(array)], dtype=np.int64)


def fill_invalid_pixels(reflectance: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Copy of `reflectance` (N, C, H, W) with pixels where `valid` (N, H, W) is False set to the
    mean of that image's valid pixels per band (0 where none is valid).

    The model needs finite values everywhere; a neutral fill keeps nodata from dragging neighbours
    towards an extreme value, and the filled pixels are masked again after the model.
    """
    filled = np.array(reflectance, dtype=np.float32, copy=True)
    invalid = ~valid
    if not invalid.any():
        return filled
    for image, mask in zip(filled, valid):
        if mask.all():
            continue
        for band in image:
            band[~mask] = band[mask].mean() if mask.any() else 0.0
    return filled


# ----------------------------------------------------------------------------------------------
# The model call
# ----------------------------------------------------------------------------------------------


def _first_parameter(model: Any) -> torch.Tensor | None:
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return None
    for parameter in parameters():
        if parameter.is_floating_point():
            return parameter
    return None


def _prepare_model(model: Any, device: str | torch.device | None) -> torch.device:
    """Put `model` in eval mode (moved to `device` when given) and return the device its inputs go to.

    Inputs stay float32 whatever the model's dtype: the refiner casts them itself and adds its delta to
    the float32 input, so the output keeps full precision.
    """
    if hasattr(model, "eval"):
        model.eval()
    parameter = _first_parameter(model)
    if device is not None:
        device = torch.device(device)
        if parameter is not None and not _same_device(parameter.device, device) and hasattr(model, "to"):
            model.to(device)
        return device
    return parameter.device if parameter is not None else torch.device("cpu")


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    """"cuda" matches "cuda:0" (quantized models refuse `.to()`, so never move one needlessly)."""
    return actual.type == wanted.type and (wanted.index is None or wanted.index == actual.index)


def _forward(model: Any, opt_v1: torch.Tensor, month: torch.Tensor, biome: torch.Tensor) -> torch.Tensor:
    """`model(opt_v1=..., month=..., biome=...)` -> refined tensor (a `.refined` output, a tuple's
    first element or a plain tensor, so that any callable with the model's signature works)."""
    output = model(opt_v1=opt_v1, month=month, biome=biome)
    refined = getattr(output, "refined", None)
    if refined is None:
        refined = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(refined, torch.Tensor) or refined.shape != opt_v1.shape:
        raise RuntimeError(
            f"the model returned {type(refined).__name__} of shape {getattr(refined, 'shape', None)}; "
            f"expected refined images of the input's shape {tuple(opt_v1.shape)}"
        )
    return refined


def predict_reflectance(
    model: Any,
    reflectance: np.ndarray,
    months: np.ndarray,
    biomes: np.ndarray,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Run the model on finite float32 reflectance (N, 4, H, W) in batches -> float32 (N, 4, H, W)."""
    if batch_size < 1:
        raise InferenceInputError(f"batch_size must be at least 1, got {batch_size}")
    device = _prepare_model(model, device)
    refined = np.empty_like(reflectance, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(reflectance), batch_size):
            stop = start + batch_size
            opt_v1 = torch.from_numpy(np.ascontiguousarray(reflectance[start:stop])).to(device)
            month = torch.from_numpy(months[start:stop]).to(device)
            biome = torch.from_numpy(biomes[start:stop]).to(device)
            refined[start:stop] = _forward(model, opt_v1, month, biome).float().cpu().numpy()
    return refined


def refine_arrays(
    model: Any,
    opt_v1: np.ndarray,
    month: int | Sequence[int] | np.ndarray,
    biome: int | Sequence[int] | np.ndarray,
    *,
    input_scale: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Refine numpy images with `model` and return float32 reflectance of the same shape.

    Args:
        model: a `Stage2RefinerModel` (or the PEFT model of [`load_trained_model`]); any callable
            `model(opt_v1=..., month=..., biome=...)` returning `.refined` or a tensor works. It is put in
            eval mode.
        opt_v1: `(4, H, W)` or `(B, 4, H, W)`, bands B02 B03 B04 B08; reflectance in 0..1 or digital
            numbers (reflectance x 10000).
        month: 1..12 or -1 (unknown); one value for all images or one per image.
        biome: 0..16 or -1 (unknown); one value for all images or one per image.
        input_scale: `"auto"` (integer dtype = digital numbers, float = reflectance), `"reflectance"`
            or `"dn"`.
        batch_size: images per forward pass.
        device: where to run (the model is moved there); default: where the model is.

    Non-finite input pixels (any band) are filled for the model and are NaN in every band of the output.
    """
    array = np.asarray(opt_v1)
    single = array.ndim == 3
    batch = array[None] if single else array
    if batch.ndim != 4 or batch.shape[1] != len(BAND_NAMES):
        raise InferenceInputError(
            f"opt_v1: expected shape (4, H, W) or (B, 4, H, W) with bands {BAND_NAMES}, got {array.shape}"
        )
    reflectance = to_reflectance(batch, input_scale, "opt_v1")
    num_months, num_biomes = metadata_limits(model)
    months = _metadata_vector(month, len(batch), functools.partial(check_month, num_months=num_months), "month")
    biomes = _metadata_vector(biome, len(batch), functools.partial(check_biome, num_biomes=num_biomes), "biome")
    valid = np.isfinite(reflectance).all(axis=1)
    refined = predict_reflectance(
        model, fill_invalid_pixels(reflectance, valid), months, biomes, batch_size=batch_size, device=device
    )
    refined[np.broadcast_to(~valid[:, None], refined.shape)] = np.nan
    return refined[0] if single else refined


# ----------------------------------------------------------------------------------------------
# Loading a model
# ----------------------------------------------------------------------------------------------

_MODEL_FILES = ("config.json", "adapter_config.json")


def load_model(
    model_name_or_path: str | os.PathLike,
    *,
    quantization: str = "none",
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> Any:
    """A trained refiner in eval mode from a local folder or a Hub repo id (at `revision`: a branch, tag or commit),
    or an exported one.

    The folder is either a full model (`save_pretrained`: config.json + model.safetensors) or a trained
    adapter folder written by `save_trained_model` (adapter_config.json + adapter weights); both go
    through `modeling_stage2.adapters.load_trained_model`. A name that is not a local path and looks
    like `owner/name` is downloaded from the Hub first (cached). A folder written by `stage2-export` (or its
    `model.onnx` / `model.pt2`) gives a `modeling_stage2.onnx_runtime.ExportedRefiner` with the same call contract,
    running on ONNX Runtime (or torch for `.pt2`).
    """
    name = str(model_name_or_path)
    path = Path(name).expanduser()
    from .onnx_runtime import is_exported_model

    if is_exported_model(path):  # a stage2-export folder or a .onnx / .pt2 file: same call contract
        return _load_exported(path, quantization, device)
    if path.exists():
        folder = path
    elif is_hub_repo_id(name):
        folder = _download_model(name, revision)
    else:
        raise InferenceInputError(
            f"model {name}: no such folder; pass a folder written by save_pretrained/save_trained_model "
            "or a Hub repo id (owner/name)"
        )
    if not folder.is_dir():
        raise InferenceInputError(
            f"model {folder}: is a file; pass the folder that holds config.json (a full model) or "
            "adapter_config.json (a trained adapter)"
        )
    if not any((folder / file).is_file() for file in _MODEL_FILES):
        raise InferenceInputError(
            f"model {folder}: has neither config.json (a full model) nor adapter_config.json (a trained "
            "adapter); is it the right folder (e.g. the run's best/)?"
        )
    from .adapters import load_trained_model

    try:
        model = load_trained_model(str(folder), quantization=quantization, device=device)
    except (OSError, ValueError) as error:  # missing or corrupt weight files, a foreign config
        raise InferenceInputError(f"model {folder}: could not be loaded ({type(error).__name__}: {error})") from error
    return model.eval()


def _load_exported(path: Path, quantization: str, device: str | torch.device | None) -> Any:
    """An `ExportedRefiner` (ONNX Runtime or torch.export) for a `stage2-export` folder or graph file."""
    from .onnx_runtime import load_exported

    if quantization != "none":
        raise InferenceInputError(
            f"model {path}: an exported model has its weights fixed at export; drop --quantization {quantization}"
        )
    try:
        return load_exported(path, device=device)
    except Exception as error:  # missing files, no onnxruntime, ONNX Runtime's own errors on a corrupt graph
        raise InferenceInputError(f"model {path}: could not be loaded ({type(error).__name__}: {error})") from error


def _download_model(repo_id: str, revision: str | None = None) -> Path:
    try:
        return download_model_folder(repo_id, revision=revision)
    except Exception as error:  # offline, missing repo, auth: all mean "cannot use this name"
        raise InferenceInputError(
            f"model {repo_id}: not a local folder, and downloading it from the Hub failed "
            f"({type(error).__name__}: {error})"
        ) from error


# ----------------------------------------------------------------------------------------------
# Atomic output files
# ----------------------------------------------------------------------------------------------


def _partial_path(target: Path) -> Path:
    """A temporary name beside `target`, so that the final rename stays on one file system."""
    return target.with_name(f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}{target.suffix}")


def _remove_quietly(path: Path) -> None:
    for candidate in (path, path.with_name(path.name + ".aux.xml")):
        try:
            candidate.unlink()
        except FileNotFoundError:
            pass


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez` to a temporary file beside `path`, renamed into place only when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(path)
    try:
        with open(partial, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(partial, path)
    except BaseException:
        _remove_quietly(partial)
        raise


def _save_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(path)
    try:
        partial.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(partial, path)
    except BaseException:
        _remove_quietly(partial)
        raise


# ----------------------------------------------------------------------------------------------
# Tiles
# ----------------------------------------------------------------------------------------------


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
        input_source: `"stage1"` (opt_v1 from STAGE1_DIR, S2 bands are the target) or `"s2_bands"` (the
            S2 bands themselves are the model input (refining a real image); no metrics).
        written: relative paths of the tiles written.
        rejected: `(path, reason)` for each tile that was skipped.
        metrics: the metrics over all written tiles (pixels pooled, as `stage2-evaluate` computes them):
            `{"refined": {...}, "opt_v1": {...}, "n_tiles": N}`, also written to OUTPUT_DIR/metrics.json;
            None without Stage 1 input or without the `training` package.
        seconds: wall time.
        replaced: relative paths of outputs of an earlier run into the same folder that were overwritten.
        removed_stale: outputs of an earlier run that this run would have left looking current (a tile now
            rejected, a `metrics.json` this run did not compute): removed.
    """

    output_dir: Path
    input_source: str
    written: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    seconds: float = 0.0
    replaced: list[str] = field(default_factory=list)
    removed_stale: list[str] = field(default_factory=list)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an NPZ through the data builder's reader: pickles refused, and no member
    decompressed beyond what its header declares or `NPZ_MAX_BYTES` (a small zip can inflate to GBs)."""
    from data_builders.tiles import PICKLED_ARRAY, TileError, load_npz

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


def _tile_bands(arrays: dict[str, np.ndarray], path: Path, input_scale: str) -> np.ndarray:
    bands = []
    for key in TILE_BAND_KEYS:
        if key not in arrays:
            raise InferenceInputError(f"{path}: missing key {key!r} (a tile needs {TILE_BAND_KEYS})")
        band = arrays[key]
        if band.shape != (TILE_SIZE, TILE_SIZE):
            raise InferenceInputError(
                f"{path}: key {key!r} has shape {band.shape}, expected ({TILE_SIZE}, {TILE_SIZE}); "
                "refine larger images as a GeoTIFF scene"
            )
        bands.append(to_reflectance(band, input_scale, f"{path}: key {key!r}"))
    return np.stack(bands)


def _tile_metadata(arrays: dict[str, np.ndarray], path: Path, limits: tuple[int, int]) -> tuple[int, int]:
    month = arrays.get("month", UNKNOWN_METADATA)
    biome = arrays.get("biome_code", arrays.get("biome", UNKNOWN_METADATA))
    return (check_month(month, f"{path}: key 'month'", limits[0]),
            check_biome(biome, f"{path}: key 'biome_code'", limits[1]))


def _stage1_path(stage1_dir: Path, relative: Path) -> Path:
    """`STAGE1_DIR/<tile>.npz`, or the tile's own relative path (split subfolders) when that exists."""
    nested = stage1_dir / relative
    return nested if nested.is_file() else stage1_dir / relative.name


def _stage1_opt_v1(path: Path, input_scale: str) -> np.ndarray:
    if not path.is_file():
        raise InferenceInputError(f"{path}: Stage 1 file missing (expected STAGE1_DIR/<tile>.npz with 'opt_v1')")
    arrays = _load_npz(path)
    if "opt_v1" not in arrays:
        raise InferenceInputError(f"{path}: missing key 'opt_v1' (Stage 1 output, shape (4, 120, 120))")
    opt_v1 = arrays["opt_v1"]
    if opt_v1.shape != (len(BAND_NAMES), TILE_SIZE, TILE_SIZE):
        raise InferenceInputError(
            f"{path}: key 'opt_v1' has shape {opt_v1.shape}, expected (4, {TILE_SIZE}, {TILE_SIZE})"
        )
    return to_reflectance(opt_v1, input_scale, f"{path}: key 'opt_v1'")


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


def _tile_output(refined: np.ndarray, tile: _Tile, source: str, metrics: dict | None) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {
        "refined": refined.astype(np.float32),
        "month": np.int64(tile.month),
        "biome_code": np.int64(tile.biome),
        "band_names": np.array(BAND_NAMES),
        "input_source": np.array(source),
    }
    for kind, values in (metrics or {}).items():
        for key, value in values.items():
            arrays[f"metrics_{kind}_{key}"] = np.float64(value)
    return arrays


def _find_tiles(input_dir: Path, output_dir: Path) -> list[Path]:
    output = output_dir.resolve()
    paths = []
    for path in sorted(input_dir.rglob("*.npz")):
        if output in path.resolve().parents or path.name.startswith("."):
            continue  # earlier outputs nested in the input, partial files
        paths.append(path)
    return paths


def refine_tiles(
    model: Any,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    stage1_dir: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    input_scale: str = "auto",
    device: str | torch.device | None = None,
    strict: bool = False,
    progress: bool = True,
) -> TileRefinementSummary:
    """Refine every NPZ tile under `input_dir` (recursively: train/val/test subfolders) into `output_dir`.

    Input tiles have `s2_b2`, `s2_b3`, `s2_b4`, `s2_b8` (120x120, digital numbers or reflectance), `month`
    and `biome_code` (absent = unknown). With `stage1_dir`, the model input is `opt_v1` from
    `STAGE1_DIR/<tile>.npz` and the S2 bands are the target, so per-tile metrics are computed; without
    it the S2 bands themselves are the model input (a real image refined as it is) and there is no
    target.

    Each output `OUTPUT_DIR/<relative path>.npz` holds `refined` (4, 120, 120) float32 reflectance,
    `month`, `biome_code`, `band_names`, `input_source` and, with Stage 1 input, scalar
    `metrics_refined_<name>` / `metrics_opt_v1_<name>`. Files are written atomically (temp + rename).
    Bad tiles are skipped and listed in the summary's `rejected` (`strict=True`: the first one raises).
    """
    start = time.perf_counter()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if batch_size < 1:
        raise InferenceInputError(f"batch_size must be at least 1, got {batch_size}")
    if not input_dir.is_dir():
        raise InferenceInputError(f"input {input_dir}: no such folder of NPZ tiles")
    if input_dir.resolve() == output_dir.resolve():
        raise InferenceInputError(f"output_dir {output_dir} is the input folder; refusing to overwrite the tiles")
    stage1 = Path(stage1_dir) if stage1_dir is not None else None
    if stage1 is not None and not stage1.is_dir():
        raise InferenceInputError(f"stage1_dir {stage1}: no such folder")
    paths = _find_tiles(input_dir, output_dir)
    if not paths:
        raise InferenceInputError(f"input {input_dir}: no .npz tiles found (searched recursively)")
    source = "stage1" if stage1 is not None else "s2_bands"
    summary = TileRefinementSummary(output_dir=output_dir, input_source=source)
    metrics = _metrics_module() if stage1 is not None else None
    if stage1 is not None and metrics is None:
        warnings.warn("the `training` package is not installed: tiles are refined without metrics", stacklevel=2)
    accumulator = metrics.MetricAccumulator() if metrics is not None else None
    limits = metadata_limits(model)

    from tqdm.auto import tqdm

    with tqdm(total=len(paths), unit="tile", desc="stage2-refine", disable=not progress) as bar:
        for chunk_start in range(0, len(paths), batch_size):
            tiles = []
            for path in paths[chunk_start : chunk_start + batch_size]:
                relative = path.relative_to(input_dir)
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
            refined = refine_arrays(
                model,
                np.stack([tile.opt_v1 for tile in tiles]),
                [tile.month for tile in tiles],
                [tile.biome for tile in tiles],
                input_scale="reflectance",
                batch_size=batch_size,
                device=device,
            )
            paired = _batch_metrics(metrics, refined, tiles) if accumulator is not None else None
            for index, (tile, image) in enumerate(zip(tiles, refined)):
                tile_metrics = _tile_metrics(metrics, paired, index) if paired is not None else None
                if (output_dir / tile.relative).exists():
                    summary.replaced.append(str(tile.relative))
                save_npz_atomic(output_dir / tile.relative, _tile_output(image, tile, source, tile_metrics))
                summary.written.append(str(tile.relative))
                bar.update(1)
            if paired is not None:
                accumulator.add_statistics(paired)
    if accumulator is not None and accumulator.n_tiles:
        summary.metrics = accumulator.compute()
        _save_json_atomic(output_dir / "metrics.json", summary.metrics)
    elif _remove_stale(output_dir / "metrics.json"):  # metrics of an earlier run, not of these tiles
        summary.removed_stale.append("metrics.json")
    summary.seconds = time.perf_counter() - start
    return summary


def _remove_stale(path: Path) -> bool:
    """Remove an earlier run's output file; True if there was one."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Scenes: windows, blending, strips
# ----------------------------------------------------------------------------------------------


def window_starts(size: int, window: int, overlap: int) -> list[int]:
    """Start offsets of windows of `window` px covering `size` px with at least `overlap` px overlap.

    The stride is `window - overlap`; the last window is shifted inside the scene (so it may overlap its
    neighbour by more). A scene no larger than one window gets a single window at 0 (padded later).
    """
    if size <= window:
        return [0]
    starts = list(range(0, size - window, window - overlap))
    starts.append(size - window)
    return starts


def blend_ramp(length: int, ramp: int) -> np.ndarray:
    """1-D weights: a raised-cosine rise over `ramp` px at both ends, 1 in between, > 0 everywhere.

    Weights are normalised by their sum per pixel, so a pixel seen by one window gets exactly that
    window's value and pixels in overlaps fade smoothly from one window to the next (no seams).
    """
    weights = np.ones(length, dtype=np.float64)
    ramp = min(ramp, length // 2)
    if ramp > 0:
        rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        weights[:ramp] = rise
        weights[length - ramp :] = rise[::-1]
    return weights.astype(np.float32)


def blend_weights(height: int, width: int, overlap: int) -> np.ndarray:
    """2-D separable blending weights (height, width) for one window."""
    return np.outer(blend_ramp(height, overlap), blend_ramp(width, overlap))


class StripAccumulator:
    """Weighted sums and weights for the rows that the current strip of windows can still touch.

    It holds `(bands, rows, width)` sums and `(rows, width)` weights, `rows` = the window height, whatever
    the scene's height: rows are handed out (normalised) as soon as no later window can touch them.
    """

    def __init__(self, bands: int, rows: int, width: int):
        self.top = 0
        self.sums = np.zeros((bands, rows, width), dtype=np.float32)
        self.weights = np.zeros((rows, width), dtype=np.float32)

    @property
    def nbytes(self) -> int:
        return self.sums.nbytes + self.weights.nbytes

    def add(self, row: int, col: int, values: np.ndarray, weights: np.ndarray) -> None:
        top = row - self.top
        height, width = weights.shape
        if top < 0 or top + height > self.weights.shape[0]:
            raise RuntimeError(f"window at row {row} is outside the accumulator's rows {self.top}..")
        self.sums[:, top : top + height, col : col + width] += values * weights
        self.weights[top : top + height, col : col + width] += weights

    def pop(self, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Blended values (bands, stop - top, width) and their weights for rows [top, stop); keeps the rest."""
        count = stop - self.top
        weights = self.weights[:count].copy()
        blended = self.sums[:, :count] / np.maximum(weights, np.float32(1e-12))
        keep = self.weights.shape[0] - count
        self.sums[:, :keep] = self.sums[:, count:].copy()
        self.weights[:keep] = self.weights[count:].copy()
        self.sums[:, keep:] = 0
        self.weights[keep:] = 0
        self.top = stop
        return blended, weights


@dataclass
class SceneRefinementResult:
    """What [`refine_scene`] did: sizes, windows and the memory it held.

    `accumulator_shape` / `accumulator_bytes`: the blending buffer (bands, rows, width) held during the
    whole run; `max_rows_read`: the most scene rows read at once. Both stay at the window height
    whatever the scene's height.
    """

    output_path: Path
    width: int
    height: int
    windows: int
    strips: int
    window: int
    overlap: int
    input_scale: str
    output_scale: str
    dtype: str
    nodata: float | None
    accumulator_shape: tuple[int, ...]
    accumulator_bytes: int
    max_rows_read: int
    seconds: float

    @property
    def area_km2(self) -> float:
        """Scene area at 10 m pixels."""
        return self.width * self.height * 100.0 / 1e6


def _describe(value: Any) -> str:
    """A one-line description of a raster property (an Affine transform prints as its 6 coefficients)."""
    if hasattr(value, "to_gdal"):
        return "(" + ", ".join(f"{v:.12g}" for v in tuple(value)[:6]) + ")"
    return str(value)


def _require_rasterio():
    try:
        import rasterio
    except ImportError as error:  # the optional `geo` extra
        raise ImportError(
            "scene inference needs rasterio: pip install 'stage2-refiner[geo]'"
        ) from error
    return rasterio


class SceneSource:
    """One 4-band raster or four single-band rasters (B02 B03 B04 B08), validated, read by row strips."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        rasterio = _require_rasterio()
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(path) for path in paths]
        if len(self.paths) not in (1, len(BAND_NAMES)):
            raise InferenceInputError(
                f"input: give one 4-band raster or four single-band rasters ({' '.join(BAND_NAMES)}), "
                f"got {len(self.paths)} files"
            )
        self.datasets = []
        try:
            for path in self.paths:
                if not path.is_file():
                    raise InferenceInputError(f"{path}: no such file")
                try:
                    self.datasets.append(rasterio.open(path))
                except rasterio.errors.RasterioIOError as error:
                    raise InferenceInputError(f"{path}: cannot be read as a raster ({error})") from error
            self._validate()
        except BaseException:
            self.close()
            raise
        self.max_rows_read = 0

    def _validate(self) -> None:
        expected = len(BAND_NAMES) if len(self.datasets) == 1 else 1
        for path, dataset in zip(self.paths, self.datasets):
            if dataset.count != expected:
                layout = "a 4-band raster" if expected == len(BAND_NAMES) else "one of four single-band rasters"
                raise InferenceInputError(
                    f"{path}: has {dataset.count} band(s), expected {expected} as {layout} "
                    f"(bands {' '.join(BAND_NAMES)})"
                )
            if dataset.crs is None or not dataset.crs.to_wkt():
                raise InferenceInputError(
                    f"{path}: has no coordinate reference system (CRS); the output could not be "
                    f"georeferenced. Assign one first, e.g. gdal_edit.py -a_srs EPSG:32633 {path}"
                )
            if dataset.transform.is_identity:
                raise InferenceInputError(
                    f"{path}: has no geotransform (pixel grid to map coordinates); georeference it first"
                )
        first, first_path = self.datasets[0], self.paths[0]
        for path, dataset in zip(self.paths[1:], self.datasets[1:]):
            for name in ("width", "height", "crs", "transform"):
                if getattr(dataset, name) != getattr(first, name):
                    raise InferenceInputError(
                        f"{path}: {name} {_describe(getattr(dataset, name))} differs from {first_path}'s "
                        f"{_describe(getattr(first, name))}; the four band files must share one grid"
                    )

    @property
    def width(self) -> int:
        return self.datasets[0].width

    @property
    def height(self) -> int:
        return self.datasets[0].height

    @property
    def crs(self):
        return self.datasets[0].crs

    @property
    def transform(self):
        return self.datasets[0].transform

    @property
    def dtypes(self) -> list[np.dtype]:
        return [np.dtype(dtype) for dataset in self.datasets for dtype in dataset.dtypes]

    @property
    def nodata_values(self) -> list[float | None]:
        """Nodata value of each band (None when undeclared)."""
        return [value for dataset in self.datasets for value in dataset.nodatavals]

    @property
    def nodata(self) -> float | None:
        """The declared nodata value (the first band's that has one)."""
        return next((value for value in self.nodata_values if value is not None), None)

    def resolve_input_scale(self, input_scale: str) -> str:
        pairs = zip(self._band_paths(), self.dtypes)
        scales = {resolve_input_scale(dtype, input_scale, str(path)) for path, dtype in pairs}
        if len(scales) > 1:
            raise InferenceInputError(
                f"input: band files mix integer and float values ({[str(d) for d in self.dtypes]}); "
                "say which they are with input_scale='dn' or 'reflectance'"
            )
        return scales.pop()

    def _band_paths(self) -> list[Path]:
        return self.paths * len(BAND_NAMES) if len(self.paths) == 1 else self.paths

    def read_rows(self, row: int, count: int) -> np.ndarray:
        """Bands (4, count, width) of rows [row, row + count), in the file's dtype (a windowed read)."""
        from rasterio.windows import Window

        window = Window(0, row, self.width, count)
        self.max_rows_read = max(self.max_rows_read, count)
        if len(self.datasets) == 1:
            return self.datasets[0].read(window=window)
        return np.stack([dataset.read(1, window=window) for dataset in self.datasets])

    def valid_mask(self, values: np.ndarray) -> np.ndarray:
        """(rows, width) True where every band is finite and differs from its nodata value."""
        valid = np.ones(values.shape[1:], dtype=bool)
        for band, nodata in zip(values, self.nodata_values):
            if band.dtype.kind == "f":
                valid &= np.isfinite(band)
            if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
                valid &= band != nodata
        return valid

    def close(self) -> None:
        for dataset in self.datasets:
            dataset.close()
        self.datasets = []

    def __enter__(self) -> "SceneSource":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _output_dtype(source: SceneSource, output_scale: str) -> np.dtype:
    if output_scale == "reflectance":
        return np.dtype(np.float32)
    integer = [dtype for dtype in source.dtypes if dtype.kind in "iu"]
    return integer[0] if integer else np.dtype(np.uint16)


def _output_nodata(nodata: float | None, dtype: np.dtype) -> float | None:
    if nodata is None or dtype.kind == "f":
        return nodata
    info = np.iinfo(dtype)
    if math.isnan(nodata) or not info.min <= nodata <= info.max or nodata != int(nodata):
        raise InferenceInputError(
            f"input nodata value {nodata} cannot be stored in the {dtype} digital-number output; "
            "use output_scale='reflectance' (float32)"
        )
    return nodata


def _to_output(reflectance: np.ndarray, valid: np.ndarray, dtype: np.dtype, nodata: float | None) -> np.ndarray:
    """Reflectance block -> the output dtype, with nodata (or NaN / 0 when none is declared) where invalid."""
    if dtype.kind == "f":
        block = reflectance.astype(dtype)
        fill = np.nan if nodata is None else nodata
    else:
        info = np.iinfo(dtype)
        block = np.clip(np.rint(reflectance / DN_SCALE), info.min, info.max).astype(dtype)
        fill = 0 if nodata is None else nodata
    block[:, ~valid] = fill
    return block


def _pad_to(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Mirror-pad (N, C, h, w) up to (height, width) at the bottom/right (scenes smaller than a window)."""
    pad_h, pad_w = height - images.shape[-2], width - images.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return images
    return np.pad(images, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), mode="symmetric")


def _output_profile(source: SceneSource, dtype: np.dtype, nodata: float | None) -> dict[str, Any]:
    profile = {
        "driver": "GTiff",
        "width": source.width,
        "height": source.height,
        "count": len(BAND_NAMES),
        "dtype": dtype.name,
        "crs": source.crs,
        "transform": source.transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 3 if dtype.kind == "f" else 2,
        "BIGTIFF": "IF_SAFER",
    }
    return profile


def refine_scene(
    model: Any,
    input_path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    output_path: str | os.PathLike,
    month: int,
    biome: int,
    *,
    window: int = DEFAULT_WINDOW,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = DEFAULT_BATCH_SIZE,
    input_scale: str = "auto",
    output_scale: str = "reflectance",
    device: str | torch.device | None = None,
    progress: bool = True,
) -> SceneRefinementResult:
    """Refine a GeoTIFF scene of any size in overlapping windows and write a GeoTIFF beside it.

    Args:
        model: the refiner (or any callable with its signature, see [`refine_arrays`]).
        input_path_or_paths: one 4-band raster (B02 B03 B04 B08) or four single-band rasters in that
            order, sharing one grid. A CRS and a geotransform are required.
        output_path: the GeoTIFF to write: same size, CRS, transform and nodata value; 4 bands.
        month: 1..12 or -1 (unknown). biome: 0..16 or -1 (unknown).
        window: window size in pixels (the model works on 120x120 tiles).
        overlap: pixels shared by neighbouring windows, blended with a raised-cosine ramp.
        batch_size: windows per forward pass.
        input_scale: `"auto"` (integer rasters = digital numbers, float = reflectance), `"dn"`, `"reflectance"`.
        output_scale: `"reflectance"` (float32, the default) or `"dn"` (digital numbers, reflectance x
            10000 rounded, in the input's integer dtype or uint16).
        device: where to run the model.
        progress: show a progress bar.

    Pixels where any band is nodata (the declared value, or NaN) are filled for the model and written
    as nodata in every band (NaN when no nodata value is declared and the output is float; 0 for a
    digital-number output). Memory: one strip of `window` rows (input, blending sums and weights), never
    the whole scene. The output appears only when complete (written to a temporary file beside it).
    """
    start = time.perf_counter()
    num_months, num_biomes = metadata_limits(model)
    month = check_month(month, "month", num_months)
    biome = check_biome(biome, "biome", num_biomes)
    if output_scale not in OUTPUT_SCALES:
        raise InferenceInputError(f"output_scale must be one of {OUTPUT_SCALES}, got {output_scale!r}")
    if window < 1 or not 0 <= overlap < window:
        raise InferenceInputError(f"need window >= 1 and 0 <= overlap < window, got window={window}, overlap={overlap}")
    if batch_size < 1:
        raise InferenceInputError(f"batch_size must be at least 1, got {batch_size}")
    output_path = Path(output_path)
    rasterio = _require_rasterio()

    with SceneSource(input_path_or_paths) as source:
        if any(output_path.resolve() == path.resolve() for path in source.paths):
            raise InferenceInputError(f"output {output_path} is an input file; refusing to overwrite it")
        scale = source.resolve_input_scale(input_scale)
        dtype = _output_dtype(source, output_scale)
        nodata = _output_nodata(source.nodata, dtype)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        partial = _partial_path(output_path)
        try:
            with rasterio.open(partial, "w", **_output_profile(source, dtype, nodata)) as destination:
                for index, name in enumerate(BAND_NAMES, start=1):
                    destination.set_band_description(index, name)
                destination.update_tags(
                    STAGE2_REFINED="true", MONTH=str(month), BIOME=str(biome), OUTPUT_SCALE=output_scale
                )
                counts = _refine_strips(
                    model, source, destination, month, biome, window, overlap, batch_size, scale, dtype, nodata,
                    device, progress,
                )
            os.replace(partial, output_path)
        except BaseException:
            _remove_quietly(partial)
            raise
        return SceneRefinementResult(
            output_path=output_path,
            width=source.width,
            height=source.height,
            windows=counts["windows"],
            strips=counts["strips"],
            window=window,
            overlap=overlap,
            input_scale=scale,
            output_scale=output_scale,
            dtype=dtype.name,
            nodata=nodata,
            accumulator_shape=counts["accumulator_shape"],
            accumulator_bytes=counts["accumulator_bytes"],
            max_rows_read=source.max_rows_read,
            seconds=time.perf_counter() - start,
        )


def _refine_strips(
    model, source, destination, month, biome, window, overlap, batch_size, scale, dtype, nodata, device, progress
) -> dict[str, Any]:
    """The scene loop: for each row of windows, read its strip, refine its windows, blend them into the
    strip accumulator and write the rows no later window touches."""
    from rasterio.windows import Window
    from tqdm.auto import tqdm

    height, width = source.height, source.width
    rows, cols = window_starts(height, window, overlap), window_starts(width, window, overlap)
    strip_height, window_width = min(window, height), min(window, width)
    weights = blend_weights(strip_height, window_width, overlap)
    accumulator = StripAccumulator(len(BAND_NAMES), strip_height, width)
    windows = 0
    with tqdm(total=len(rows) * len(cols), unit="window", desc="stage2-refine", disable=not progress) as bar:
        for index, row in enumerate(rows):
            raw = source.read_rows(row, strip_height)
            valid = source.valid_mask(raw)
            # Warn once (first strip) when float input looks like digital numbers.
            reflectance = to_reflectance(raw, scale, str(source.paths[0]), warn=index == 0)
            useful = [col for col in cols if valid[:, col : col + window_width].any()]
            if useful:
                images = np.stack([reflectance[:, :, col : col + window_width] for col in useful])
                image_valid = np.stack([valid[:, col : col + window_width] for col in useful])
                filled = _pad_to(fill_invalid_pixels(images, image_valid), window, window)
                count = len(useful)
                refined = predict_reflectance(
                    model, filled, np.full(count, month, dtype=np.int64), np.full(count, biome, dtype=np.int64),
                    batch_size=batch_size, device=device,
                )[:, :, :strip_height, :window_width]
                for col, image in zip(useful, refined):
                    accumulator.add(row, col, image, weights)
                windows += count
            bar.update(len(cols))
            stop = rows[index + 1] if index + 1 < len(rows) else height
            blended, _ = accumulator.pop(stop)
            block = _to_output(blended, valid[: stop - row], dtype, nodata)
            destination.write(block, window=Window(0, row, width, stop - row))
    return {
        "windows": windows,
        "strips": len(rows),
        "accumulator_shape": tuple(accumulator.sums.shape),
        "accumulator_bytes": accumulator.nbytes,
    }


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stage2-refine",
        description=(
            "Refine Stage 1 images with a trained Stage 2 model: a folder of NPZ tiles (--output_dir) or a "
            "GeoTIFF scene of any size (--output)."
        ),
    )
    parser.add_argument("--model", required=True, help="model folder (full model or trained adapter), Hub repo id, "
                        "or an exported model (a stage2-export folder, model.onnx or model.pt2)")
    parser.add_argument("--revision", default=None,
                        help="with a Hub repo id: the branch, tag or commit to download (default: main)")
    parser.add_argument(
        "--input", required=True, nargs="+",
        help="a folder of NPZ tiles, a 4-band GeoTIFF, or four single-band GeoTIFFs in the order B02 B03 B04 B08",
    )
    parser.add_argument("--output_dir", help="tiles: folder for the refined NPZ tiles (mirrors the input layout)")
    parser.add_argument("--output", help="scene: the refined GeoTIFF to write")
    parser.add_argument(
        "--stage1_dir",
        help="tiles: folder of Stage 1 outputs STAGE1_DIR/<tile>.npz with 'opt_v1'; without it the S2 bands are "
        "the model input and no metrics are computed",
    )
    parser.add_argument(
        "--strict", action="store_true", help="tiles: stop at the first bad tile instead of skipping it"
    )
    parser.add_argument("--month", type=int, help="scene: acquisition month 1..12 (-1 = unknown)")
    parser.add_argument("--biome", type=int, help="scene: biome code 0..16 (-1 = unknown)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="scene: window size in pixels (default 120)")
    parser.add_argument(
        "--overlap", type=int, default=DEFAULT_OVERLAP, help="scene: overlap of neighbouring windows (default 32)"
    )
    parser.add_argument("--input_scale", choices=INPUT_SCALES, default="auto",
                        help="auto: integer = digital numbers (x 1e-4), float = reflectance")
    parser.add_argument("--output_scale", choices=OUTPUT_SCALES, default="reflectance",
                        help="scene: float32 reflectance (default) or digital numbers (reflectance x 10000)")
    parser.add_argument(
        "--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="images per forward pass (default 8)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument(
        "--num_threads", type=int, default=None,
        help="CPU threads for torch (default: torch's choice); on a busy machine 1 can be faster than several",
    )
    parser.add_argument("--quantization", choices=("none", "8bit", "4bit"), default="none",
                        help="load the backbone quantized (bitsandbytes)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def _check_mode(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """`"tiles"` or `"scene"`, with the arguments each needs; input problems raise before the model loads."""
    inputs = [Path(path) for path in args.input]
    for path in inputs:
        if not path.exists():
            raise InferenceInputError(f"input {path}: no such file or folder")
    if len(inputs) == 1 and inputs[0].is_dir():
        if args.output_dir is None or args.output is not None:
            parser.error("a tiles folder as --input needs --output_dir (and no --output)")
        if args.month is not None or args.biome is not None:
            parser.error("--month and --biome are for a scene; each tile carries its own month and biome_code")
        return "tiles"
    if args.output is None or args.output_dir is not None:
        parser.error("a GeoTIFF scene as --input needs --output FILE.tif (and no --output_dir)")
    if args.month is None or args.biome is None:
        parser.error("a scene needs --month (1..12) and --biome (0..16); pass -1 for unknown")
    check_month(args.month, "--month")
    check_biome(args.biome, "--biome")
    if args.window < 1 or not 0 <= args.overlap < args.window:
        raise InferenceInputError(
            f"need --window >= 1 and 0 <= --overlap < --window, got {args.window}, {args.overlap}"
        )
    SceneSource(inputs).close()  # band count, CRS, grid: checked before the model is loaded
    return "scene"


def _default_device(device: str | None) -> str:
    if device is not None:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: Sequence[str] | None = None) -> int:
    """`stage2-refine`: 0 on success, 1 when some tiles were rejected or a scene held no valid pixel, 2 on bad
    input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.num_threads is not None:
        if args.num_threads < 1:
            parser.error("--num_threads must be at least 1")
        torch.set_num_threads(args.num_threads)
    try:
        mode = _check_mode(args, parser)
        model = load_model(args.model, quantization=args.quantization, device=_default_device(args.device),
                           revision=args.revision)
        if mode == "tiles":
            summary = refine_tiles(
                model, args.input[0], args.output_dir, args.stage1_dir, args.batch_size,
                input_scale=args.input_scale, device=args.device, strict=args.strict, progress=not args.no_progress,
            )
            _report_tiles(summary)
            return 1 if summary.rejected else 0
        result = refine_scene(
            model, args.input if len(args.input) > 1 else args.input[0], args.output, args.month, args.biome,
            window=args.window, overlap=args.overlap, batch_size=args.batch_size, input_scale=args.input_scale,
            output_scale=args.output_scale, device=args.device, progress=not args.no_progress,
        )
        _report_scene(result)
        return 1 if result.windows == 0 else 0
    except InferenceInputError as error:
        print(f"stage2-refine: error: {error}", file=sys.stderr)
        return 2


def _report_tiles(summary: TileRefinementSummary) -> None:
    rate = len(summary.written) / summary.seconds if summary.seconds else float("nan")
    print(
        f"refined {len(summary.written)} tiles into {summary.output_dir} ({rate:.1f} tiles/s); "
        f"model input: {'Stage 1 opt_v1' if summary.input_source == 'stage1' else 'the S2 bands (no --stage1_dir)'}"
    )
    if summary.metrics:
        from training.metrics import format_metrics_table

        print(format_metrics_table(summary.metrics))
        print(f"(also in {summary.output_dir / 'metrics.json'})")
    if summary.replaced:
        print(f"replaced {len(summary.replaced)} output(s) of an earlier run in {summary.output_dir}", file=sys.stderr)
    for relative in summary.removed_stale:
        print(f"removed {summary.output_dir / relative}: an earlier run's output, not refined this time",
              file=sys.stderr)
    for path, reason in summary.rejected:
        print(f"rejected {path}: {reason}", file=sys.stderr)
    if summary.rejected:
        print(f"{len(summary.rejected)} tile(s) rejected", file=sys.stderr)


def _report_scene(result: SceneRefinementResult) -> None:
    if result.windows == 0:
        print(f"warning: the scene has no valid pixel (all nodata); {result.output_path} is all nodata",
              file=sys.stderr)
    minutes = result.seconds / 60
    print(
        f"wrote {result.output_path}: {result.width}x{result.height} px ({result.area_km2:.2f} km^2 at 10 m), "
        f"{result.windows} windows in {result.strips} strips, {result.dtype} {result.output_scale}, "
        f"nodata {result.nodata}; {result.area_km2 / minutes if minutes else float('nan'):.1f} km^2/min"
    )


if __name__ == "__main__":
    sys.exit(main())

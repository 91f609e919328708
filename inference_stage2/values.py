"""Input values: digital numbers and reflectance, month/biome codes and the model's ranges, invalid pixels."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

from data_builders.tiles import TILE_SIZE, dn_to_reflectance
from data_builders.tiles import fill_invalid_pixels  # noqa: F401  (re-exported: its one definition is there)
from modeling_stage2.bands import (
    DN_CHECK_SAMPLE, DN_LOOKING_MEDIAN, NUM_BIOMES, NUM_MONTHS, UNKNOWN_METADATA, DigitalNumbersWarning,
)


INPUT_SCALES = ("auto", "reflectance", "dn")
OUTPUT_SCALES = ("reflectance", "dn")
DEFAULT_WINDOW = TILE_SIZE
DEFAULT_OVERLAP = 32
DEFAULT_BATCH_SIZE = 8
GEOTIFF_SUFFIXES = (".tif", ".tiff")  # a scene's files; NPZ tiles are ".npz"


class InferenceInputError(ValueError):
    """Bad input to inference: the message names the file (or argument), the key and the problem."""


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
    with np.errstate(over="ignore"):  # a finite value past float32's range becomes Inf: refused below
        reflectance = dn_to_reflectance(values) if scale == "dn" else values.astype(np.float32, copy=True)
    if values.dtype.kind == "f" and values.dtype.itemsize > 4:  # float16/32 values fit float32 in either scale
        refuse_float32_overflow(values, reflectance, scale, source)
    if scale == "dn":
        return reflectance
    if warn:
        warn_if_looks_like_dn(reflectance, source)
    return reflectance


def refuse_float32_overflow(values: np.ndarray, reflectance: np.ndarray, scale: str, source: str) -> None:
    """A finite input value that is Inf as float32 reflectance: no measurement, and no nodata either (NaN/Inf are),
    so refused rather than passed on as an invalid pixel."""
    overflow = np.isfinite(values) & ~np.isfinite(reflectance)
    if overflow.any():
        peak = float(np.abs(values[overflow]).max())
        raise InferenceInputError(
            f"{source}: {int(overflow.sum())} finite value(s) reach {peak:g}, past float32's range as reflectance; "
            f"no {'digital number' if scale == 'dn' else 'reflectance'} is that large (a wrong scale or fill value?)"
        )


def warn_if_looks_like_dn(reflectance: np.ndarray, source: str) -> None:
    flat = reflectance.ravel()
    sample = flat[:: max(1, flat.size // DN_CHECK_SAMPLE)]
    sample = sample[np.isfinite(sample)]
    if sample.size and float(np.median(sample)) > DN_LOOKING_MEDIAN:
        warnings.warn(
            f"{source}: float values with median {float(np.median(sample)):.1f} look like digital numbers "
            "(reflectance x 10000), not reflectance in 0..1; pass input_scale='dn' (--input_scale dn) if so",
            DigitalNumbersWarning,
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
        # an array by its shape: its repr spans lines (a month stored as a 120 x 120 band)
        got = f"an array of shape {array.shape}" if array.ndim else repr(value)
        raise InferenceInputError(f"{source}: expected one integer, got {got}")
    return int(array)


def metadata_vector(values: Any, count: int, check: Callable[[Any, str], int], name: str) -> np.ndarray:
    """One value per image: a scalar is checked (an error names it `name`) and broadcast, a sequence must have
    `count` entries (an error names the entry, `name[i]`)."""
    array = np.asarray(values)
    if array.ndim == 0:
        return np.full(count, check(values, name), dtype=np.int64)
    if array.ndim != 1 or len(array) != count:
        raise InferenceInputError(f"{name}: expected one value or {count} values, got shape {array.shape}")
    return np.array([check(v, f"{name}[{i}]") for i, v in enumerate(array)], dtype=np.int64)

"""Reading and validating one NPZ tile of the Stage 2 layout.

A tile is `<tile_id>.npz` holding the four Sentinel-2 bands `s2_b2`, `s2_b3`, `s2_b4`, `s2_b8`
(120 x 120 each), `month` (1..12) and `biome_code` (0..16), optionally Sentinel-1 `s1_vv` and
`s1_vh` (dB), beside an optional `<tile_id>.json` metadata sidecar. Integer bands are digital
numbers (reflectance x 10000, BigEarthNet's native format) and are scaled by 1e-4; float bands
are reflectance and are kept.

Every problem raises `TileError`, whose message names the file, the key and the problem.
Nothing is ever unpickled (`np.load(allow_pickle=False)`).
"""
from __future__ import annotations

import json
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

BAND_NAMES = ("B02", "B03", "B04", "B08")
"""Bands of the product, in storage order (blue, green, red, broad NIR)."""

BAND_KEYS = ("s2_b2", "s2_b3", "s2_b4", "s2_b8")
"""NPZ keys of `BAND_NAMES`, in the same order."""

S1_KEYS = ("s1_vv", "s1_vh")
"""Optional Sentinel-1 backscatter (dB); carried as the `s1` column (VV, VH)."""

TILE_SIZE = 120
NUM_MONTHS = 12
NUM_BIOMES = 17  # biome codes 0..16 (IGBP-like)
UNKNOWN_METADATA = -1
"""Month or biome that is not known: accepted by the builder, embedded separately by the model."""

DN_SCALE = 1e-4
"""Digital numbers (reflectance x 10000) -> reflectance."""

FLOAT_REFLECTANCE_LIMIT = 10.0
"""Float bands above this are digital numbers stored as floats, not reflectance (bright snow and
clouds reach about 1.5-2)."""

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}


class TileError(ValueError):
    """A tile (or its sidecar or Stage 1 file) that cannot be used.

    `path`, `key` and `problem` are kept separately so the builder can list them in
    `rejected.jsonl`; `str(error)` reads "<path>: '<key>': <problem>".
    """

    def __init__(self, path: str | Path, key: Optional[str], problem: str):
        self.path = str(path)
        self.key = key
        self.problem = problem
        where = f"{self.path}: {key!r}" if key else self.path
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):  # keep the fields across worker processes
        return (type(self), (self.path, self.key, self.problem))

    def to_record(self) -> dict:
        return {"file": self.path, "key": self.key, "problem": self.problem}


@dataclass
class Tile:
    """One validated tile, ready for the Arrow writer.

    Attributes:
        tile_id: file name without `.npz`.
        target: float32 (4, H, W) reflectance; pixels where any band was NaN/Inf are 0.
        valid_mask: bool (H, W), True where every band of the input was finite.
        month: 1..12, or `UNKNOWN_METADATA`.
        biome: 0..16, or `UNKNOWN_METADATA`.
        scaling: `"dn_x1e-4"` (integer bands scaled) or `"float"` (reflectance kept).
        s1: float32 (2, H, W) VV, VH in dB, or None when the tile has no Sentinel-1.
        metadata: the sidecar's fields (without `split`), {} when there is no sidecar.
    """

    tile_id: str
    target: np.ndarray
    valid_mask: np.ndarray
    month: int
    biome: int
    scaling: str
    s1: Optional[np.ndarray] = None
    metadata: dict = field(default_factory=dict)


def sidecar_path(npz_path: str | Path) -> Path:
    return Path(npz_path).with_suffix(".json")


def read_sidecar(path: str | Path) -> dict:
    """The JSON metadata sidecar as a dict ({} when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TileError(path, None, f"sidecar is not valid JSON ({exc}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise TileError(path, None, f"sidecar must hold a JSON object, got {type(data).__name__}")
    return data


def sidecar_split(path: str | Path, sidecar: dict) -> Optional[str]:
    """The sidecar's `split` ("validation" -> "val"), or None when it has none."""
    if "split" not in sidecar or sidecar["split"] is None:
        return None
    value = sidecar["split"]
    if not isinstance(value, str) or value.lower() not in SPLIT_ALIASES:
        raise TileError(path, "split", f"unknown split {value!r}; use one of {', '.join(SPLITS)} (or 'validation')")
    return SPLIT_ALIASES[value.lower()]


def npz_keys(path: str | Path) -> Optional[frozenset]:
    """Array names inside an NPZ, read from the zip directory only (None if it is not readable)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return frozenset(name[:-4] if name.endswith(".npy") else name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return None


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of the archive, decompressed; corrupt, truncated and pickled content raise.

    The common case (a zip of plain numeric `.npy` members) is read by `_read_plain_npz`, which
    decompresses each member once and parses its header without `ast`; anything it does not
    recognise, including every damaged file, goes through `_load_npz_checked` (np.load), which
    gives the same arrays and names the problem.
    """
    try:
        arrays = _read_plain_npz(path)
    except Exception:  # not the plain layout, or damaged: np.load decides and explains
        arrays = None
    return arrays if arrays is not None else _load_npz_checked(path)


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # what np.load takes for an NPZ (a zip, maybe empty)
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=][biuf][1-8])', 'fortran_order': False, 'shape': \(((?:\d+, ?)*\d*)\), \} *\n"
)
"""The header np.save writes for a C-ordered numeric array (other headers take the np.load path)."""


def _read_plain_npz(path: Path) -> Optional[dict[str, np.ndarray]]:
    """The arrays of an NPZ whose members are all C-ordered numeric `.npy`, else None.

    Same arrays (values, dtype, shape) as `np.load(path)[key]`, read-only. Damaged members raise
    (zipfile checks each member's CRC).
    """
    with open(path, "rb") as handle:
        if handle.read(4) not in _ZIP_MAGIC:
            return None
        handle.seek(0)
        with zipfile.ZipFile(handle) as archive:
            members = archive.infolist()
            names = [member.filename for member in members]
            if len(set(names)) != len(names) or not all(name.endswith(".npy") for name in names):
                return None
            arrays = {}
            for member in members:
                array = _parse_npy(archive.read(member))
                if array is None:
                    return None
                arrays[member.filename[:-4]] = array
    return arrays


def _parse_npy(data: bytes) -> Optional[np.ndarray]:
    """A `.npy` byte string -> array (a view of `data`), or None if it is not the plain layout."""
    if data[:6] != _NPY_MAGIC or data[6] not in (1, 2):
        return None
    start = 10 if data[6] == 1 else 12
    header_size = int.from_bytes(data[8:start], "little")
    match = _NPY_HEADER.fullmatch(data, start, start + header_size)
    if match is None:
        return None
    dtype = np.dtype(match.group(1).decode("ascii"))
    shape = tuple(int(size) for size in match.group(2).split(b",") if size.strip())
    offset = start + header_size
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        return None
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def _load_npz_checked(path: Path) -> dict[str, np.ndarray]:
    """`_load_npz` through np.load: every layout numpy reads, and the reason when it cannot."""
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise TileError(path, None, "file not found") from None
    except Exception as exc:  # BadZipFile, EOFError, OSError, ValueError, ... from a damaged file
        raise TileError(path, None, f"corrupt or truncated file, not a readable NPZ ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise TileError(path, None, "not an NPZ archive (np.load returned a single array); save tiles with np.savez")
    arrays = {}
    with archive:
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise TileError(path, key, "object array (pickled); store a numeric array instead") from None
                raise TileError(path, key, f"corrupt or truncated array ({exc})") from None
            except Exception as exc:  # zlib.error, BadZipFile (bad CRC), EOFError
                raise TileError(path, key, f"corrupt or truncated array ({exc})") from None
    return arrays


def _require(path: Path, arrays: dict, key: str) -> np.ndarray:
    if key not in arrays:
        present = ", ".join(sorted(arrays)) or "none"
        raise TileError(path, key, f"missing key (the archive holds: {present})")
    return arrays[key]


def _numeric_kind(path: Path, key: str, array: np.ndarray) -> str:
    if array.dtype.kind in "iu":
        return "int"
    if array.dtype.kind == "f":
        return "float"
    raise TileError(path, key, f"non-numeric array of dtype {array.dtype}; expected integers or floats")


def _check_shape(path: Path, key: str, array: np.ndarray, shape: tuple) -> None:
    if array.shape != shape:
        raise TileError(path, key, f"shape {array.shape}, expected {shape}")


def read_bands(path: Path, arrays: dict, tile_size: int = TILE_SIZE) -> tuple[np.ndarray, np.ndarray, str]:
    """(target float32 (4, H, W) with invalid pixels zeroed, valid_mask (H, W), scaling)."""
    bands = [_require(path, arrays, key) for key in BAND_KEYS]
    kinds = {_numeric_kind(path, key, band) for key, band in zip(BAND_KEYS, bands)}
    if len(kinds) > 1:
        dtypes = ", ".join(f"{key}={band.dtype}" for key, band in zip(BAND_KEYS, bands))
        raise TileError(path, None, f"bands mix integer and float dtypes ({dtypes}); store all four the same way")
    first_shape = bands[0].shape
    for key, band in zip(BAND_KEYS, bands):
        if band.ndim != 2:
            raise TileError(path, key, f"shape {band.shape}, expected a 2-D ({tile_size}, {tile_size}) band")
        if band.shape != first_shape:
            raise TileError(path, key, f"shape {band.shape} does not match {BAND_KEYS[0]} {first_shape}")
        _check_shape(path, key, band, (tile_size, tile_size))

    if kinds == {"int"}:
        # float64 product rounded once to float32: the float32 nearest to DN x 1e-4 (the ufunc
        # computes in float64 and rounds on output, without a float64 copy of the stack)
        target = np.empty((len(bands), *first_shape), dtype=np.float32)
        for band, out in zip(bands, target):
            np.multiply(band, DN_SCALE, out=out, dtype=np.float64, casting="same_kind")
        return target, np.ones(first_shape, dtype=bool), "dn_x1e-4"

    target = np.stack(bands).astype(np.float32)
    finite = np.isfinite(target)
    for key, band_finite in zip(BAND_KEYS, finite):
        if not band_finite.any():
            raise TileError(path, key, "band is entirely NaN/Inf")
    valid_mask = finite.all(axis=0)
    if not valid_mask.any():
        raise TileError(path, None, "no pixel has all four bands finite")
    if not valid_mask.all():
        target[:, ~valid_mask] = 0.0
    peak = float(np.abs(target).max())
    if peak > FLOAT_REFLECTANCE_LIMIT:
        raise TileError(
            path, None,
            f"float band values reach {peak:g}: these look like digital numbers (reflectance x 10000) "
            "stored as floats; store them as integers or divide by 10000",
        )
    return target, valid_mask, "float"


def read_scalar(path: Path, arrays: dict, key: str, low: int, high: int) -> int:
    """A month or biome code: one integral number in [low, high], or `UNKNOWN_METADATA`."""
    array = _require(path, arrays, key)
    kind = _numeric_kind(path, key, array)
    if array.size != 1:
        raise TileError(path, key, f"expected a single number, got shape {array.shape}")
    value = array.reshape(()).item()
    if kind == "float":
        if not math.isfinite(value) or value != int(value):
            raise TileError(path, key, f"expected an integer, got {value!r}")
        value = int(value)
    if value == UNKNOWN_METADATA:
        return UNKNOWN_METADATA
    if not low <= value <= high:
        raise TileError(path, key, f"value {value} outside {low}..{high} (use {UNKNOWN_METADATA} for unknown)")
    return int(value)


def read_s1(path: Path, arrays: dict, tile_size: int = TILE_SIZE) -> Optional[np.ndarray]:
    """float32 (2, H, W) VV, VH, or None when the tile carries neither."""
    present = [key for key in S1_KEYS if key in arrays]
    if not present:
        return None
    if len(present) == 1:
        missing = S1_KEYS[1 - S1_KEYS.index(present[0])]
        raise TileError(path, missing, f"missing key while {present[0]!r} is present; store both VV and VH")
    for key in S1_KEYS:
        _numeric_kind(path, key, arrays[key])
        _check_shape(path, key, arrays[key], (tile_size, tile_size))
    return np.stack([arrays[key] for key in S1_KEYS]).astype(np.float32, copy=False)


def read_tile(path: str | Path, metadata: Optional[dict] = None, tile_size: int = TILE_SIZE) -> Tile:
    """Read and validate one NPZ tile.

    Args:
        path: the `<tile_id>.npz` file.
        metadata: the sidecar's fields when the caller has read them already; by default the
            `<tile_id>.json` beside the tile is read (its `split` field is dropped here, the
            builder uses it to place the tile).
        tile_size: expected height and width.

    Raises:
        TileError: naming the file, the key and the problem.
    """
    path = Path(path)
    if metadata is None:
        metadata = {k: v for k, v in read_sidecar(sidecar_path(path)).items() if k != "split"}
    arrays = _load_npz(path)
    target, valid_mask, scaling = read_bands(path, arrays, tile_size)
    return Tile(
        tile_id=path.stem,
        target=target,
        valid_mask=valid_mask,
        month=read_scalar(path, arrays, "month", 1, NUM_MONTHS),
        biome=read_scalar(path, arrays, "biome_code", 0, NUM_BIOMES - 1),
        scaling=scaling,
        s1=read_s1(path, arrays, tile_size),
        metadata=metadata,
    )


def read_stage1(path: str | Path, tile_size: int = TILE_SIZE) -> np.ndarray:
    """A Stage 1 output `<tile_id>.npz` holding `opt_v1` (4, H, W) -> float32 reflectance.

    Integer arrays are digital numbers and are scaled by 1e-4 like the target; every value must
    be finite (a generator output has no nodata).
    """
    path = Path(path)
    if not path.is_file():
        raise TileError(path, "opt_v1", "Stage 1 file missing: every tile needs STAGE1_DIR/<tile_id>.npz")
    arrays = _load_npz(path)
    opt_v1 = _require(path, arrays, "opt_v1")
    kind = _numeric_kind(path, "opt_v1", opt_v1)
    _check_shape(path, "opt_v1", opt_v1, (len(BAND_NAMES), tile_size, tile_size))
    if kind == "int":
        return (opt_v1.astype(np.float64) * DN_SCALE).astype(np.float32)
    opt_v1 = opt_v1.astype(np.float32)
    bad = int(np.size(opt_v1) - np.count_nonzero(np.isfinite(opt_v1)))
    if bad:
        raise TileError(path, "opt_v1", f"{bad} NaN/Inf values; Stage 1 outputs must be finite")
    return opt_v1


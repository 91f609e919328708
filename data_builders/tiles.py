"""Reading and validating one NPZ tile of the Stage 2 layout.

A tile is `<tile_id>.npz` holding the four Sentinel-2 bands `s2_b2`, `s2_b3`, `s2_b4`, `s2_b8`
(120 x 120 each), `month` (1..12) and `biome_code` (0..16; read, it becomes `Tile.biome` and the `biome`
column), optionally Sentinel-1 `s1_vv` and
`s1_vh` (dB), beside an optional `<tile_id>.json` metadata sidecar. Integer bands are digital
numbers (reflectance x 10000, BigEarthNet's native format) and are scaled by 1e-4; float bands
are reflectance and are kept. Reflectance down to `REFLECTANCE_MIN` (-0.1, the floor of L2A's BOA
offset; atmospheric correction gives small negatives) is kept as it is; a band reaching lower is
rejected.

Every problem raises `TileError`, whose message names the file, the key and the problem.
Nothing is ever unpickled (`np.load(allow_pickle=False)`), and no NPZ is decompressed beyond
`NPZ_MAX_BYTES` or beyond what its members' `.npy` headers declare.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ._leaves import model_leaf

# The shared band facts (`modeling_stage2.bands`), re-exported here for the data builders.
_bands = model_leaf("bands")
BAND_NAMES = _bands.BAND_NAMES
UNKNOWN_METADATA = _bands.UNKNOWN_METADATA
NUM_MONTHS = _bands.NUM_MONTHS
NUM_BIOMES = _bands.NUM_BIOMES
_vocabulary = model_leaf("vocabulary")  # the names input_scale / input_mode / biome and their old spellings

BAND_KEYS = ("s2_b2", "s2_b3", "s2_b4", "s2_b8")
"""NPZ keys of `BAND_NAMES`, in the same order."""

S1_KEYS = ("s1_vv", "s1_vh")
"""Optional Sentinel-1 backscatter (dB); carried as the `s1` column (VV, VH)."""

TILE_SIZE = 120

DN_SCALE = 1e-4
"""Digital numbers (reflectance x 10000) -> reflectance."""


def dn_to_reflectance(values: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Digital numbers -> float32 reflectance, the float32 nearest to DN x 1e-4: the product is computed in float64
    and rounded once (the ufunc rounds on output, without a float64 copy). The one conversion of the data builders,
    training and inference, so a tile reads bitwise the same everywhere."""
    if out is None:
        out = np.empty(np.shape(values), dtype=np.float32)
    return np.multiply(values, DN_SCALE, out=out, dtype=np.float64, casting="same_kind")


FLOAT_REFLECTANCE_LIMIT = 10.0
"""Float bands above this are digital numbers stored as floats, not reflectance (bright snow and
clouds reach about 1.5-2)."""

REFLECTANCE_MIN = -0.1
"""Lowest reflectance a band may hold. Atmospheric correction leaves small negatives over dark
water and shadow, and Sentinel-2 L2A products of processing baseline 04.00 on (January 2022)
store reflectance as (DN - 1000) / 10000 (BOA_ADD_OFFSET = -1000), so they reach -0.1: such values
are kept as they are, not clipped. Anything lower cannot come from an L2A product (a wrong offset
or scale) and the tile is rejected, naming the band and its minimum."""

NPZ_MAX_BYTES = 64 * 2**20
"""Most bytes one NPZ may decompress to, all members together. A tile holding its four bands,
Sentinel-1 and a Stage 1 `opt_v1`, all in float64, is 1.4 MB: this is ~45 such tiles. Readers
refuse a member whose header implies more, or whose size differs from what its header implies
(trailing data), before decompressing it."""

PICKLED_ARRAY = "object array (pickled); store a numeric array instead"
"""The problem of a member that np.load could only read by unpickling (it never does)."""

SPLITS = ("train", "val", "test")
TRAIN_SPLIT, VALIDATION_SPLIT, TEST_SPLIT = SPLITS
"""The split a model trains on, the one `stage2-train` validates on by default (`--eval_split`), the held-out one."""
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
        input_scale: `"dn"` (integer bands: digital numbers, multiplied by 1e-4) or `"reflectance"` (float
            bands, kept).
        s1: float32 (2, H, W) VV, VH in dB, or None when the tile has no Sentinel-1.
        metadata: the sidecar's fields (without `split`), {} when there is no sidecar.
    """

    tile_id: str
    target: np.ndarray
    valid_mask: np.ndarray
    month: int
    biome: int
    input_scale: str
    s1: Optional[np.ndarray] = None
    metadata: dict = field(default_factory=dict)

    @property
    def scaling(self) -> str:
        """Deprecated (one release): `input_scale` in the old spelling (`"dn_x1e-4"` / `"float"`)."""
        _vocabulary.warn_deprecated("Tile.scaling", "Tile.input_scale ('dn' / 'reflectance')")
        return _vocabulary.OLD_SCALING[self.input_scale]


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
    except RecursionError:
        raise TileError(path, None, "sidecar nests too deeply to read; flatten it or delete the file") from None
    except ValueError as exc:  # valid JSON Python will not read: an integer of more than sys.get_int_max_str_digits()
        raise TileError(path, None, f"sidecar cannot be read ({exc}); fix or delete the file") from None
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
    except Exception:  # BadZipFile, OSError, NotImplementedError (a damaged version field), ...: read_tile says why
        return None


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an NPZ archive; corrupt, truncated, oversized and pickled content raise `TileError`.

    The common case (a zip of plain numeric `.npy` members) is read by `_read_plain_npz`, which
    decompresses each member once and parses its header without `ast`; anything it does not
    recognise goes through `_load_npz_checked` (np.load), which gives the same arrays and names the
    problem. Both check every member's header against its declared size first and decompress no
    more than `NPZ_MAX_BYTES` (a small zip can inflate to gigabytes).
    """
    path = Path(path)
    try:
        arrays = _read_plain_npz(path)
    except TileError:
        raise
    except Exception:  # not a readable zip: np.load decides and explains
        arrays = None
    return arrays if arrays is not None else _load_npz_checked(path)


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # what np.load takes for an NPZ (a zip, maybe empty)
_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 10_000  # np.load's own limit (max_header_size)
_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=][biuf][1-8])', 'fortran_order': False, 'shape': \(((?:\d+, ?)*\d*)\), \} *\n"
)
"""The header np.save writes for a C-ordered numeric array (other headers take the np.load path)."""


@dataclass(frozen=True)
class _NpyHeader:
    """What a `.npy` member's header declares."""

    dtype: np.dtype
    shape: tuple
    offset: int  # header bytes; the data follows
    size: int  # header + data bytes the member must hold (header only for object arrays: never read)
    plain: bool  # C-ordered numeric, version 1 or 2: `_read_plain_npz` reads it without np.load


def _read_npy_header(stream) -> Optional[_NpyHeader]:
    """The header of a `.npy` stream, read alone (the stream is left at the data); None when the
    stream is not a `.npy`. A header np.load would not read either raises ValueError."""
    prefix = stream.read(8)
    if prefix[:6] != _NPY_MAGIC:
        return None
    version = prefix[6]
    if version not in (1, 2, 3):
        raise ValueError(f"unsupported .npy format version {version}")
    length_bytes = stream.read(2 if version == 1 else 4)
    length = int.from_bytes(length_bytes, "little")
    if length > _NPY_MAX_HEADER:
        raise ValueError(f".npy header of {length} bytes, more than the {_NPY_MAX_HEADER} np.load reads")
    text = stream.read(length)
    if len(text) != length:
        raise EOFError("the .npy header is cut short")
    match = _NPY_HEADER.fullmatch(text)
    if match is not None:
        dtype = np.dtype(match.group(1).decode("ascii"))
        shape = tuple(int(size) for size in match.group(2).split(b",") if size.strip())
    else:  # any other header np.load accepts (numpy parses it with ast.literal_eval)
        reader = np.lib.format.read_array_header_1_0 if version == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(io.BytesIO(length_bytes + text), max_header_size=_NPY_MAX_HEADER)
        if any(size < 0 for size in shape):
            raise ValueError(f"negative dimension in shape {shape}")
    offset = 8 + len(length_bytes) + length
    data = 0 if dtype.hasobject else math.prod(shape) * dtype.itemsize
    return _NpyHeader(dtype, shape, offset, offset + data, match is not None and version in (1, 2))


@contextlib.contextmanager
def _member_errors(path: Path, key: str):
    """A damaged member (zlib.error, BadZipFile for a bad CRC, EOFError, bad header) -> TileError."""
    try:
        yield
    except TileError:
        raise
    except Exception as exc:
        raise TileError(path, key, f"corrupt or truncated array ({' '.join(str(exc).split())})") from None


_NPZ_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what np.savez and np.savez_compressed write


def _open_member(path: Path, key: str, archive: zipfile.ZipFile, member: zipfile.ZipInfo):
    """The member's stream. Other compressions are refused unopened: zipfile inflates a bzip2 or LZMA
    chunk whole however little is read (a few hundred bytes can hold gigabytes of zeros)."""
    if member.compress_type not in _NPZ_COMPRESSION:
        raise TileError(path, key, f"compressed with zip method {member.compress_type}; NPZ files are stored "
                                   "or deflated (np.savez, np.savez_compressed)")
    return archive.open(member)


def _checked_header(path: Path, key: str, member: zipfile.ZipInfo, stream, budget: int):
    """(header or None for a member that is not a `.npy`, bytes the member holds), after checking
    that its size is what the header implies and within `budget`. Only the header is decompressed."""
    header = _read_npy_header(stream)
    if header is None or header.dtype.hasobject:  # raw bytes, or a pickle np.load refuses unread
        size, what = member.file_size, f"member of {member.file_size} bytes"
    else:
        size, what = header.size, f"header declares a {header.shape} {header.dtype} array ({header.size} bytes)"
    if size > budget:
        raise TileError(path, key, f"{what}; the archive would exceed the limit of {NPZ_MAX_BYTES} bytes "
                                   "uncompressed per NPZ (NPZ_MAX_BYTES)")
    if member.file_size != size:
        problem = "trailing data" if member.file_size > size else "member shorter than its header"
        raise TileError(path, key, f"{member.file_size} bytes uncompressed where the {what}: {problem}")
    return header, size


def _read_plain_npz(path: Path) -> Optional[dict[str, np.ndarray]]:
    """The arrays of an NPZ whose members are all C-ordered numeric `.npy`, else None.

    Same arrays (values, dtype, shape) as `np.load(path)[key]`, read-only. Damaged members raise
    (zipfile checks each member's CRC), and so do sizes that `_checked_header` refuses.
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
            arrays, budget = {}, NPZ_MAX_BYTES
            for member in members:
                key = member.filename[:-4]
                with _member_errors(path, key), _open_member(path, key, archive, member) as stream:
                    header, size = _checked_header(path, key, member, stream, budget)
                    if header is None or not header.plain:
                        return None
                    data = stream.read(size - header.offset)  # zipfile inflates no more than asked
                if len(data) != size - header.offset:
                    return None
                budget -= size
                count = math.prod(header.shape)
                arrays[key] = np.frombuffer(data, dtype=header.dtype, count=count).reshape(header.shape)
    return arrays


def _check_members(path: Path, archive: zipfile.ZipFile) -> dict[str, bytes]:
    """Check every member as `_read_plain_npz` does, before np.load reads one; returns the members
    that are not `.npy` (np.load returns their bytes), read here within their bound."""
    raw, budget = {}, NPZ_MAX_BYTES
    for member in archive.infolist():
        key = member.filename[:-4] if member.filename.endswith(".npy") else member.filename
        with _member_errors(path, key):
            with _open_member(path, key, archive, member) as stream:
                header, size = _checked_header(path, key, member, stream, budget)
            if header is None:  # np.load would inflate all of it, whatever the directory says
                with _open_member(path, key, archive, member) as stream:
                    raw[key] = stream.read(size)
        budget -= size
    return raw


def _load_npz_checked(path: Path) -> dict[str, np.ndarray]:
    """`load_npz` through np.load: every layout numpy reads, and the reason when it cannot."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_NPY_MAGIC))
        single_npy = head == _NPY_MAGIC
        if not single_npy and head[:4] not in _ZIP_MAGIC:  # np.load would take it for a pickle
            raise TileError(path, None, _not_a_zip(head))
        archive = None if single_npy else np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise TileError(path, None, "file not found") from None
    except TileError:
        raise
    except Exception as exc:  # BadZipFile, EOFError, OSError, ValueError, ... from a damaged file
        raise TileError(path, None, f"corrupt or truncated file, not a readable NPZ ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):  # np.load would read a lone .npy whole
        raise TileError(path, None, "not an NPZ archive (a single .npy array); save tiles with np.savez")
    arrays = {}
    with archive:
        raw = _check_members(path, archive.zip)
        for key in archive.files:
            if key in raw:
                arrays[key] = raw[key]
                continue
            try:
                arrays[key] = archive[key]
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise TileError(path, key, PICKLED_ARRAY) from None
                raise TileError(path, key, f"corrupt or truncated array ({exc})") from None
            except Exception as exc:  # zlib.error, BadZipFile (bad CRC), EOFError
                raise TileError(path, key, f"corrupt or truncated array ({exc})") from None
    return arrays


def _not_a_zip(head: bytes) -> str:
    what = "an empty file" if not head else "no zip signature at the start"
    return f"not an NPZ archive ({what}); save tiles with np.savez or np.savez_compressed"


def _require(path: Path, arrays: dict, key: str) -> np.ndarray:
    if key not in arrays:
        present = ", ".join(sorted(arrays)) or "none"
        raise TileError(path, key, f"missing key (the archive holds: {present})")
    return arrays[key]


def _numeric_kind(path: Path, key: str, array: np.ndarray) -> str:
    if not isinstance(array, np.ndarray):  # a zip member not named .npy: np.load hands back its bytes
        raise TileError(path, key, f"zip member {key!r} is not a .npy array; save tiles with np.savez")
    if array.dtype.kind in "iu":
        return "int"
    if array.dtype.kind == "f":
        return "float"
    raise TileError(path, key, f"non-numeric array of dtype {array.dtype}; expected integers or floats")


def _check_shape(path: Path, key: str, array: np.ndarray, shape: tuple) -> None:
    if array.shape != shape:
        raise TileError(path, key, f"shape {array.shape}, expected {shape}")


def read_bands(path: Path, arrays: dict, tile_size: int = TILE_SIZE) -> tuple[np.ndarray, np.ndarray, str]:
    """(target float32 (4, H, W) with invalid pixels zeroed, valid_mask (H, W), input_scale `"dn"` or
    `"reflectance"`)."""
    bands = [_require(path, arrays, key) for key in BAND_KEYS]
    kind = band_kind(path, bands)
    first_shape = bands[0].shape
    for key, band in zip(BAND_KEYS, bands):
        if band.ndim != 2:
            raise TileError(path, key, f"shape {band.shape}, expected a 2-D ({tile_size}, {tile_size}) band")
        if band.shape != first_shape:
            raise TileError(path, key, f"shape {band.shape} does not match {BAND_KEYS[0]} {first_shape}")
        _check_shape(path, key, band, (tile_size, tile_size))

    if kind == "int":
        target = np.empty((len(bands), *first_shape), dtype=np.float32)
        for band, out in zip(bands, target):
            dn_to_reflectance(band, out=out)
        if any(band.dtype.kind == "i" for band in bands):  # unsigned digital numbers cannot be negative
            check_reflectance_floor(path, target)
        return target, np.ones(first_shape, dtype=bool), "dn"

    stacked = np.stack(bands)
    if stacked.dtype.itemsize > 4:  # finite values past float32's range would become Inf, then pass for nodata
        _refuse_float_digital_numbers(path, None, np.where(np.isfinite(stacked), stacked, 0))
    target = stacked.astype(np.float32)
    valid_mask = valid_pixels(path, target)
    _refuse_float_digital_numbers(path, None, target)
    check_reflectance_floor(path, target)
    return target, valid_mask, "reflectance"


def band_kind(path: Path, bands: Sequence[np.ndarray]) -> str:
    """`"int"` or `"float"`: the kind all four bands share (a tile mixing them is refused)."""
    kinds = {_numeric_kind(path, key, band) for key, band in zip(BAND_KEYS, bands)}
    if len(kinds) > 1:
        dtypes = ", ".join(f"{key}={band.dtype}" for key, band in zip(BAND_KEYS, bands))
        raise TileError(path, None, f"bands mix integer and float dtypes ({dtypes}); store all four the same way")
    return kinds.pop()


def valid_pixels(path: Path, reflectance: np.ndarray) -> np.ndarray:
    """The (H, W) mask of pixels whose four bands are finite; those that are not are set to 0 in place. A band
    finite nowhere, or no pixel valid, is refused."""
    finite = np.isfinite(reflectance)
    for key, band_finite in zip(BAND_KEYS, finite):
        if not band_finite.any():
            raise TileError(path, key, "band is entirely NaN/Inf")
    valid_mask = finite.all(axis=0)
    if not valid_mask.any():
        raise TileError(path, None, "no pixel has all four bands finite")
    if not valid_mask.all():
        reflectance[:, ~valid_mask] = 0.0
    return valid_mask


def fill_invalid_pixels(reflectance: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """`reflectance` (N, C, H, W) as float32 with pixels where `valid` (N, H, W) is False set to the
    mean of that image's valid pixels per band (0 where none is valid): a copy where any pixel is filled, the
    array itself (no copy) where every pixel is valid.

    The one neutral fill of invalid pixels, wherever an image with some meets a spatial filter: the synthetic
    degradation's blur (`degrade.synthesize_opt_v1`), the model in training (`training.data.TileDataset`),
    evaluation (`training.evaluate.evaluate_model`) and inference (`inference_stage2`). It keeps nodata from
    dragging neighbours towards 0 or another extreme value; the filled pixels are masked again afterwards.
    """
    if valid.all():  # nothing to fill: a copy would hold as much memory again as the images
        return np.asarray(reflectance, dtype=np.float32)
    filled = np.array(reflectance, dtype=np.float32, copy=True)
    for image, mask in zip(filled, valid):
        if mask.all():
            continue
        for band in image:
            band[~mask] = band[mask].mean() if mask.any() else 0.0
    return filled


def _refuse_float_digital_numbers(path: Path, key: str | None, reflectance: np.ndarray) -> None:
    peak = float(np.abs(reflectance).max())
    if peak > FLOAT_REFLECTANCE_LIMIT:
        raise TileError(
            path, key,
            f"float band values reach {peak:g}: these look like digital numbers (reflectance x 10000) "
            "stored as floats; store them as integers or divide by 10000",
        )


def check_reflectance_floor(path: Path, target: np.ndarray) -> None:
    """Reject a band reaching below `REFLECTANCE_MIN` (invalid pixels are already 0)."""
    below = reflectance_floor_problem(target)
    if below is not None:
        raise TileError(path, BAND_KEYS[below[0]], below[1])


def reflectance_floor_problem(reflectance: np.ndarray,
                              valid: Optional[np.ndarray] = None) -> Optional[tuple[int, str]]:
    """`(band index, problem)` of the band of `reflectance` (4, H, W) reaching lowest below `REFLECTANCE_MIN`, or
    None: the one rule of tiles and scenes. Only the `valid` pixels (H, W) count where given; NaN never does."""
    floor = np.float32(REFLECTANCE_MIN)  # float32 -0.1 itself is accepted
    flat = reflectance.reshape(len(reflectance), -1)
    lowest = np.fmin.reduce(flat, axis=1, initial=np.inf)  # NaN left out
    if valid is not None and (lowest < floor).any():  # nodata values (-9999) do not count: a second, masked pass
        kept = valid.reshape(-1)
        lowest = np.array([np.fmin.reduce(band[kept], initial=np.inf) for band in flat])
    band = int(np.argmin(lowest))
    if not lowest[band] < floor:
        return None
    return band, (f"reflectance down to {float(lowest[band]):g}, below the tolerance of {REFLECTANCE_MIN:g} "
                  "(L2A's BOA offset); a wrong offset or scale?")


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


def non_finite_count(values: np.ndarray) -> int:
    """How many values are NaN or +-Inf."""
    return int(np.size(values) - np.count_nonzero(np.isfinite(values)))


def read_s1(path: Path, arrays: dict, tile_size: int = TILE_SIZE) -> Optional[np.ndarray]:
    """float32 (2, H, W) VV, VH, or None when the tile carries neither. Every value must be finite in float32: the
    `s1` column has no mask of its own, so a NaN there would reach whoever reads it as a measurement."""
    present = [key for key in S1_KEYS if key in arrays]
    if not present:
        return None
    if len(present) == 1:
        missing = S1_KEYS[1 - S1_KEYS.index(present[0])]
        raise TileError(path, missing, f"missing key while {present[0]!r} is present; store both VV and VH")
    for key in S1_KEYS:
        _numeric_kind(path, key, arrays[key])
        _check_shape(path, key, arrays[key], (tile_size, tile_size))
    with np.errstate(over="ignore"):  # a finite float64 past float32's range becomes Inf: counted below
        s1 = np.stack([arrays[key] for key in S1_KEYS]).astype(np.float32, copy=False)
    for key, band in zip(S1_KEYS, s1):
        bad = non_finite_count(band)
        if bad:
            raise TileError(path, key, f"{bad} NaN/Inf values (as float32); Sentinel-1 backscatter must be finite dB: "
                                       "fill its nodata pixels")
    return s1


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
    arrays = load_npz(path)
    target, valid_mask, input_scale = read_bands(path, arrays, tile_size)
    return Tile(
        tile_id=path.stem,
        target=target,
        valid_mask=valid_mask,
        month=read_scalar(path, arrays, "month", 1, NUM_MONTHS),
        biome=read_scalar(path, arrays, _vocabulary.BIOME_NPZ_KEY, 0, NUM_BIOMES - 1),
        input_scale=input_scale,
        s1=read_s1(path, arrays, tile_size),
        metadata=metadata,
    )


def read_stage1(path: str | Path, tile_size: int = TILE_SIZE, arrays: dict | None = None) -> np.ndarray:
    """A Stage 1 output `<tile_id>.npz` holding `opt_v1` (4, H, W) -> float32 reflectance.

    Integer arrays are digital numbers and are scaled by 1e-4 like the target; every value must
    be finite (a generator output has no nodata), and floats above `FLOAT_REFLECTANCE_LIMIT` are refused as
    digital numbers stored as floats, as the target's are. `arrays`: the file's arrays (`load_npz`), where the
    caller has read them already.
    """
    path = Path(path)
    if arrays is None:
        if not path.is_file():
            raise TileError(path, "opt_v1", "Stage 1 file missing: every tile needs STAGE1_DIR/<tile_id>.npz")
        arrays = load_npz(path)
    opt_v1 = _require(path, arrays, "opt_v1")
    kind = _numeric_kind(path, "opt_v1", opt_v1)
    _check_shape(path, "opt_v1", opt_v1, (len(BAND_NAMES), tile_size, tile_size))
    if kind == "int":
        return dn_to_reflectance(opt_v1)
    # checked before the cast to float32: a finite float64 past its range is no NaN/Inf but digital numbers
    bad = non_finite_count(opt_v1)
    if bad:
        raise TileError(path, "opt_v1", f"{bad} NaN/Inf values; Stage 1 outputs must be finite")
    _refuse_float_digital_numbers(path, "opt_v1", opt_v1)  # the target's rule: training on them would learn nonsense
    return opt_v1.astype(np.float32)


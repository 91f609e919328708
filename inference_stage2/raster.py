"""GeoTIFF input and output (rasterio): one 4-band file or four single-band files read strip by strip, and the
output's dtype, nodata and profile."""
from __future__ import annotations

import errno
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data_builders.tiles import DN_SCALE, reflectance_floor_problem
from modeling_stage2.bands import BAND_NAMES, PIXEL_SIZE_M
from modeling_stage2.vocabulary import DECLARED_SCALE, install_hint

from .scene_bands import band_order, named_band
from .values import (InferenceInputError, refuse_float32_overflow, resolve_input_scale, to_reflectance,
                     warn_if_looks_like_dn)


def _describe(value: Any) -> str:
    """A one-line description of a raster property (an Affine transform prints as its 6 coefficients)."""
    if hasattr(value, "to_gdal"):
        return "(" + ", ".join(f"{v:.12g}" for v in tuple(value)[:6]) + ")"
    return str(value)


WGS84_SEMI_MAJOR_AXIS_M = 6_378_137.0
WGS84_ECCENTRICITY_SQUARED = 0.00669437999014
"""The WGS 84 ellipsoid, for ground distances between nearby longitudes and latitudes."""

_INPUT_SCALE_CHOICE = "input_scale='dn' or 'reflectance' (--input_scale dn or --input_scale reflectance)"
"""How a message asks for the input's scale, in the Python argument's spelling and the command line flag's."""

PIXEL_SIZE_TOLERANCE = 0.2
"""A scene whose pixels differ from `PIXEL_SIZE_M` by more than this fraction gets a `PixelSizeWarning`."""


class PixelSizeWarning(UserWarning):
    """A scene's pixels are not the 10 m of the bands the refiner was trained on."""


def ground_distance_m(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    """Distance on the WGS 84 ellipsoid, in metres, between two nearby points in degrees (a few pixels apart): the
    meridional and prime-vertical radii of curvature at their mean latitude, exact to about 1e-9 at that scale."""
    lat = math.radians((lat1 + lat2) / 2)
    w = 1 - WGS84_ECCENTRICITY_SQUARED * math.sin(lat) ** 2
    meridional = WGS84_SEMI_MAJOR_AXIS_M * (1 - WGS84_ECCENTRICITY_SQUARED) / w**1.5
    prime_vertical = WGS84_SEMI_MAJOR_AXIS_M / math.sqrt(w)
    north = meridional * math.radians(lat2 - lat1)
    east = prime_vertical * math.cos(lat) * math.radians(lon2 - lon1)
    return math.hypot(north, east)


def require_rasterio():
    try:
        import rasterio
    except ImportError as error:  # the optional `geo` extra
        raise ImportError(install_hint("scene inference (rasterio)", "geo")) from error
    return rasterio


class SceneSource:
    """One 4-band raster or four single-band rasters (B02 B03 B04 B08), validated, read by row strips."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike]):
        rasterio = require_rasterio()
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(path) for path in paths]
        self.input_paths = list(self.paths)  # as given; `paths` are put in band order
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
                same = next((other for other in self.paths[: len(self.datasets)] if other.samefile(path)), None)
                if same is not None:  # one band read as two
                    raise InferenceInputError(
                        f"{path}: given twice{'' if same == path else f' (also as {same})'}; give four different "
                        f"band files, one for each of {' '.join(BAND_NAMES)}"
                    )
                try:
                    self.datasets.append(rasterio.open(path))
                except rasterio.errors.RasterioIOError as error:
                    raise InferenceInputError(f"{path}: cannot be read as a raster ({error})") from error
            self._validate()
            self.band_order = self._read_band_names()
        except BaseException:
            self.close()
            raise
        self.max_rows_read = 0

    def _read_band_names(self) -> tuple[int, ...]:
        """Which input band holds each of `BAND_NAMES` (`scene_bands.band_order`), from the band descriptions of a
        4-band raster, or from each single-band file's description, else its name; four files are put in that
        order."""
        if len(self.datasets) == 1:
            path, descriptions = self.paths[0], self.datasets[0].descriptions
            sources = [f"{path} band {index} ({description!r})" if description else f"{path} band {index}"
                       for index, description in enumerate(descriptions, start=1)]
            return band_order([named_band(description) for description in descriptions], sources)
        names = [named_band(dataset.descriptions[0]) or named_band(path.stem)
                 for path, dataset in zip(self.paths, self.datasets)]
        order = band_order(names, [str(path) for path in self.paths])
        self.paths = [self.paths[index] for index in order]
        self.datasets = [self.datasets[index] for index in order]
        return order

    def _per_band(self, values_of) -> list:
        """`values_of(dataset)` (a value per band of that dataset) for each of `BAND_NAMES`, in that order."""
        if len(self.datasets) == 1:
            values = values_of(self.datasets[0])
            return [values[index] for index in self.band_order]
        return [values_of(dataset)[0] for dataset in self.datasets]

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
        return [np.dtype(dtype) for dtype in self._per_band(lambda dataset: dataset.dtypes)]

    @property
    def nodata_values(self) -> list[float | None]:
        """Nodata value of each band (None when undeclared)."""
        return self._per_band(lambda dataset: dataset.nodatavals)

    @property
    def nodata(self) -> float | None:
        """The declared nodata value (the first band's that has one)."""
        return next((value for value in self.nodata_values if value is not None), None)

    @property
    def nodata_path(self) -> Path:
        """The file that declares `nodata` (the first file where none does)."""
        return next((path for path, value in zip(self._band_paths(), self.nodata_values) if value is not None),
                    self.paths[0])

    @property
    def declared_scaling(self) -> list[tuple[float, float]]:
        """(scale, offset) of each band as the file declares them (GDAL's band metadata: physical value = stored
        value x scale + offset), (1, 0) where it declares none."""
        return [(float(scale), float(offset))
                for scale, offset in self._per_band(lambda dataset: list(zip(dataset.scales, dataset.offsets)))]

    @property
    def pixel_size_m(self) -> tuple[float, float]:
        """(width, height) of the scene's centre pixel on the ground, in metres, whatever the CRS (degrees, UTM,
        Web Mercator): its corners taken to longitude and latitude, and the distances between them on the WGS 84
        ellipsoid."""
        from rasterio.transform import xy
        from rasterio.warp import transform

        col, row = self.width // 2, self.height // 2
        xs, ys = xy(self.transform, [row, row, row + 1], [col, col + 1, col], offset="ul")
        try:
            lons, lats = transform(self.crs, "EPSG:4326", xs, ys)
        except Exception as error:  # GDAL's CPLE_* errors (a local or engineering CRS): no public base class
            raise InferenceInputError(
                f"{self.paths[0]}: its CRS cannot be taken to longitude and latitude ({' '.join(str(error).split())}); "
                "give the scene in a geographic or projected CRS (e.g. its UTM zone)") from None
        return (ground_distance_m(lons[0], lats[0], lons[1], lats[1]),
                ground_distance_m(lons[0], lats[0], lons[2], lats[2]))

    def warn_unless_10_m(self) -> None:
        """A `PixelSizeWarning` where the pixels are not about `PIXEL_SIZE_M` on the ground (a 20 m or 60 m product,
        or a resampled scene): the refiner would see other spatial scales than those it was trained on."""
        width, height = self.pixel_size_m
        if any(abs(size / PIXEL_SIZE_M - 1) > PIXEL_SIZE_TOLERANCE for size in (width, height)):
            warnings.warn(
                f"{self.paths[0]}: pixels are {width:.3g} x {height:.3g} m on the ground; the refiner was trained on "
                f"Sentinel-2's {PIXEL_SIZE_M:g} m bands ({' '.join(BAND_NAMES)}); resample the scene to "
                f"{PIXEL_SIZE_M:g} m first (e.g. gdalwarp -tr {PIXEL_SIZE_M:g} {PIXEL_SIZE_M:g} in a UTM CRS)",
                PixelSizeWarning, stacklevel=3,
            )

    def resolve_input_scale(self, input_scale: str) -> str:
        """`"dn"`, `"reflectance"`, or `"declared"` where the file declares a scale or an offset and `input_scale` is
        `"auto"`: Sentinel-2 L2A of processing baseline 04.00 on is stored as DN with reflectance = DN x 0.0001 -
        0.1, which x 0.0001 alone would read 0.1 too bright. An explicit `"dn"` or `"reflectance"` that contradicts
        the declared scaling is refused, naming the band."""
        pairs = zip(self._band_paths(), self.dtypes)
        scales = {resolve_input_scale(dtype, input_scale, str(path)) for path, dtype in pairs}
        declared = self.declared_scaling
        if any(scaling != (1.0, 0.0) for scaling in declared):
            if input_scale == "auto":
                undeclared = [(path, name) for path, name, scaling in zip(self._band_paths(), BAND_NAMES, declared)
                              if scaling == (1.0, 0.0)]
                if undeclared:  # its values would be taken as reflectance as they are
                    path, name = undeclared[0]
                    raise InferenceInputError(
                        f"{path}: band {name} declares no scale or offset while the other bands do; declare it "
                        f"too (gdal_edit.py -scale S -offset O {path}), or give {_INPUT_SCALE_CHOICE} for bands that "
                        "declare none"
                    )
                return DECLARED_SCALE
            implied = (DN_SCALE, 0.0) if input_scale == "dn" else (1.0, 0.0)
            for path, name, (scale, offset) in zip(self._band_paths(), BAND_NAMES, declared):
                if not math.isclose(scale, implied[0], rel_tol=1e-9) or offset != implied[1]:
                    raise InferenceInputError(
                        f"{path}: band {name} declares scale {scale:g} and offset {offset:g} (reflectance = value x "
                        f"scale + offset), which input_scale={input_scale!r} would ignore; leave input_scale at "
                        f"'auto' (--input_scale auto) to apply them, or clear them if they are wrong "
                        f"(gdal_edit.py -scale 1 -offset 0 {path})"
                    )
        if len(scales) > 1:
            raise InferenceInputError(self._mixed_dtypes_problem())
        return scales.pop()

    def _mixed_dtypes_problem(self) -> str:
        """The line for bands that mix integer (DN) and float (reflectance) values: the odd ones (the fewer; the
        float ones in a tie) first, each with its dtype, then the others'."""
        labels = [str(path) for path in self.paths] if len(self.paths) > 1 else [
            f"{self.paths[0]} band {name}" for name in BAND_NAMES]
        pairs = list(zip(labels, self.dtypes))
        floats = [(label, dtype) for label, dtype in pairs if dtype.kind == "f"]
        integers = [(label, dtype) for label, dtype in pairs if dtype.kind != "f"]
        odd, others = (integers, floats) if len(integers) < len(floats) else (floats, integers)
        kinds = ("integer", "float") if odd is integers else ("float", "integer")

        def listed(group):
            return ", ".join(f"{label} ({dtype})" for label, dtype in group)

        return (
            f"{listed(odd)}: {kinds[0]} values, while {listed(others)} hold {kinds[1]} values; say which they all are "
            f"with {_INPUT_SCALE_CHOICE}"
        )

    def to_reflectance(self, values: np.ndarray, input_scale: str, *, warn: bool = True,
                       valid: np.ndarray | None = None) -> np.ndarray:
        """Bands read by `read_rows` as float32 reflectance, under the resolved `input_scale`. With `warn`, values
        that look like digital numbers give a warning, judged on the `valid` pixels only (`valid_mask`): nodata
        values (0, -9999) would pull the median down. A band whose valid pixels reach below `REFLECTANCE_MIN` is
        refused as a tile's is (`data_builders.tiles.reflectance_floor_problem`), naming the file and the band."""
        if input_scale != DECLARED_SCALE:
            reflectance = to_reflectance(values, input_scale, str(self.paths[0]), warn=False)
            source = str(self.paths[0])
        else:
            scale, offset = (np.array(column, dtype=np.float64).reshape(-1, 1, 1)
                             for column in zip(*self.declared_scaling))
            source = f"{self.paths[0]} (its declared scale and offset applied)"
            with np.errstate(over="ignore"):  # a finite value past float32's range becomes Inf: refused below
                reflectance = (values * scale + offset).astype(np.float32)
            refuse_float32_overflow(values, reflectance, "dn", source)
        if warn and input_scale != "dn":
            warn_if_looks_like_dn(reflectance if valid is None else reflectance[:, valid], source)
        below = reflectance_floor_problem(reflectance, valid)
        if below is not None:  # all zeros once refined: a wrong offset or scale, not an L2A product
            band, problem = below
            path = self._band_paths()[band]
            declared = (f" (its declared scale {self.declared_scaling[band][0]:g} and offset "
                        f"{self.declared_scaling[band][1]:g} applied)" if input_scale == DECLARED_SCALE else "")
            raise InferenceInputError(f"{path}: band {BAND_NAMES[band]}{declared}: {problem}")
        return reflectance

    def _band_paths(self) -> list[Path]:
        return self.paths * len(BAND_NAMES) if len(self.paths) == 1 else self.paths

    def read_rows(self, row: int, count: int) -> np.ndarray:
        """Bands (4, count, width) of rows [row, row + count), in the file's dtype (a windowed read)."""
        self.max_rows_read = max(self.max_rows_read, count)
        if len(self.datasets) == 1:
            bands = [index + 1 for index in self.band_order]
            return self._read(self.datasets[0], row, count, lambda dataset, window: dataset.read(bands, window=window))
        return np.stack([self._read(dataset, row, count, lambda dataset, window: dataset.read(1, window=window))
                         for dataset in self.datasets])

    def _read(self, dataset, row: int, count: int, read) -> np.ndarray:
        """`read(dataset, window)` of rows [row, row + count), a damaged file an `InferenceInputError`."""
        from rasterio.errors import RasterioIOError
        from rasterio.windows import Window

        try:
            return read(dataset, Window(0, row, self.width, count))
        except RasterioIOError as error:  # the header opened; the pixels show a damaged or truncated file
            files = ", ".join(map(str, self.input_paths))
            raise InferenceInputError(f"{files}: rows {row}..{row + count - 1} cannot be read, the file is damaged or "
                                      f"truncated ({' '.join(str(error).split())})") from None

    def valid_mask(self, values: np.ndarray, row: int | None = None) -> np.ndarray:
        """(rows, width) True where every band is finite and differs from its nodata value; given the strip's first
        `row`, also where no file's own mask (GDAL's per-dataset mask: an internal mask or a `.msk` file, which COGs
        use in place of a nodata value) masks it."""
        valid = np.ones(values.shape[1:], dtype=bool)
        for band, nodata in zip(values, self.nodata_values):
            if band.dtype.kind == "f":
                valid &= np.isfinite(band)
            if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
                valid &= band != nodata
        if row is not None:
            for dataset in filter(has_own_mask, self.datasets):
                valid &= self._read(dataset, row, values.shape[1],
                                    lambda dataset, window: dataset.read_masks(1, window=window)) > 0
        return valid

    def close(self) -> None:
        for dataset in self.datasets:
            dataset.close()
        self.datasets = []

    def __enter__(self) -> "SceneSource":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def has_own_mask(dataset) -> bool:
    """Whether `dataset` has GDAL's per-dataset mask: not one derived from its nodata value (`valid_mask` compares
    that exactly) nor from an alpha band (a 4-band scene has none to spare)."""
    from rasterio.enums import MaskFlags

    flags = dataset.mask_flag_enums[0]
    return MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags


def output_dtype(source: SceneSource, output_scale: str) -> np.dtype:
    if output_scale == "reflectance":
        return np.dtype(np.float32)
    integer = [dtype for dtype in source.dtypes if dtype.kind in "iu"]
    return integer[0] if integer else np.dtype(np.uint16)


def output_nodata(nodata: float | None, dtype: np.dtype, source: str | os.PathLike | None = None) -> float:
    """The output's nodata value: the input's. For an input that declares none (its nodata pixels are NaN, or masked
    by its own mask), NaN in a float output, declared so that readers mask those pixels, and in a scene without a
    nodata pixel too: the output's profile is made before any pixel is read. For a digital-number output of an input
    that declares none, or declares NaN (the same: its non-finite pixels are nodata), 0 (an integer has no NaN to
    mark them with). A value the output dtype cannot hold (-9999 in uint16, float64's lowest in float32) is refused,
    naming the `source` file that declares it."""
    where = "" if source is None else f"{source}: "
    if dtype.kind == "f":
        if nodata is None:
            return math.nan
        if math.isfinite(nodata) and abs(nodata) > float(np.finfo(dtype).max):
            raise InferenceInputError(
                f"{where}input nodata value {nodata:g} cannot be stored in the {dtype} reflectance output; rewrite the "
                f"input with a nodata value {dtype} can hold (e.g. gdalwarp -ot Float32 -dstnodata nan INPUT "
                "NEW_INPUT)"
            )
        return nodata
    if nodata is None or math.isnan(nodata):
        return 0
    info = np.iinfo(dtype)
    if not info.min <= nodata <= info.max or nodata != int(nodata):
        raise InferenceInputError(
            f"{where}input nodata value {nodata} cannot be stored in the {dtype} digital-number output; "
            "use output_scale='reflectance' (float32)"
        )
    return nodata


def output_scaling(source: SceneSource, input_scale: str, dtype: np.dtype) -> list[tuple[float, float]] | None:
    """(scale, offset) per band that a digital-number output declares: the input's, where they were applied to read
    it (so the output decodes as the input did); else None (reflectance, or digital numbers = reflectance x 10000)."""
    if dtype.kind in "iu" and input_scale == DECLARED_SCALE:
        return source.declared_scaling
    return None


def to_output(reflectance: np.ndarray, valid: np.ndarray, dtype: np.dtype, nodata: float | None,
              scaling: Sequence[tuple[float, float]] | None = None) -> np.ndarray:
    """Reflectance block -> the output dtype, with `nodata` where invalid (NaN for a float output without one).
    Digital numbers are reflectance / 0.0001, or (reflectance - offset) / scale per band under `scaling`.

    A valid pixel never reads as nodata: where its value equals the nodata value (a refined reflectance clamped at
    0 in a scene whose nodata is 0, the Sentinel-2 convention) it is written as the nearest value beside it, the
    next float32 or 1 digital number (0.0001 reflectance, the rounding step) inwards; a float within GDAL's
    tolerance of a non-zero nodata value, just outside twice that tolerance (`_move_off_nodata`).
    """
    if dtype.kind == "f":
        block = reflectance.astype(dtype)
        fill = np.nan if nodata is None else nodata
    else:
        info = np.iinfo(dtype)
        if scaling is None:
            numbers = reflectance / DN_SCALE
        else:
            scale, offset = (np.array(column, dtype=np.float64).reshape(-1, 1, 1) for column in zip(*scaling))
            numbers = (reflectance - offset) / scale
        block = np.clip(np.rint(numbers), info.min, info.max).astype(dtype)
        fill = nodata
    if nodata is not None and not math.isnan(nodata):
        _move_off_nodata(block, valid, nodata, dtype)
    block[:, ~valid] = fill
    return block


# GDAL (`read_masks`, rasterio's masked reads) takes a float within about 4 machine epsilons (relative) of a non-zero
# nodata value for nodata (GDAL 3.10: up to 7 float32 steps away from 0.5, 4 from -9999); 0 it compares exactly.
_NODATA_MARGIN_EPS = 8  # valid pixels are kept twice that far away


def _move_off_nodata(block: np.ndarray, valid: np.ndarray, nodata: float, dtype: np.dtype) -> None:
    """Valid pixels of `block` (in place) that a reader would take for `nodata`: an integer or a float equal to a
    nodata of 0 goes to the value beside it (`_beside`); a float near a non-zero one, out to the margin on its side."""
    if dtype.kind != "f" or nodata == 0:
        block[(block == nodata) & valid] = _beside(nodata, dtype)
        return
    margin = _NODATA_MARGIN_EPS * float(np.finfo(dtype).eps) * abs(nodata)
    near = (np.abs(block.astype(np.float64) - nodata) <= margin) & valid
    if not near.any():
        return
    largest = float(np.finfo(dtype).max)
    room_above, room_below = nodata + margin <= largest, nodata - margin >= -largest
    goes_up = (block >= nodata) if room_above and room_below else np.full(block.shape, room_above)
    block[near & goes_up] = np.nextafter(dtype.type(nodata + margin), dtype.type(np.inf)) if room_above else 0
    block[near & ~goes_up] = np.nextafter(dtype.type(nodata - margin), dtype.type(-np.inf)) if room_below else 0


def _beside(nodata: float, dtype: np.dtype):
    """The value of `dtype` next to `nodata`, towards the inside of the dtype's range."""
    if dtype.kind == "f":
        value = dtype.type(nodata)
        return np.nextafter(value, dtype.type(-np.inf if value == np.finfo(dtype).max else np.inf))
    return dtype.type(nodata + 1 if nodata < np.iinfo(dtype).max else nodata - 1)


def output_profile(source: SceneSource, dtype: np.dtype, nodata: float | None,
                   count: int = len(BAND_NAMES)) -> dict[str, Any]:
    profile = {
        "driver": "GTiff",
        "width": source.width,
        "height": source.height,
        "count": count,
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


def check_written_whole(path: str | os.PathLike, name: str | os.PathLike) -> None:
    """Read every block of the GeoTIFF just written at `path` (a partial file, later renamed to `name`) back, or raise
    an `OSError` (EIO) naming `name`. GDAL flushes its block cache as the file closes, and a block it cannot write
    there (a full disk, a quota) is only reported to GDAL's error handler: the file closes as if complete, cut short.
    Reading it back costs a fraction of refining it, and nothing else tells."""
    rasterio = require_rasterio()
    try:
        with rasterio.open(path) as written:
            for _, window in written.block_windows(1):
                written.read(window=window)
    except (rasterio.errors.RasterioError, OSError) as error:
        reason = " ".join(str(error).split())
        raise OSError(errno.EIO, f"the GeoTIFF could not be written whole (reading it back: {reason}); is the disk "
                                 "full? Nothing was replaced", os.fspath(name)) from error

"""Which Sentinel-2 band each band of a scene's input holds, from what the files say of themselves.

A 4-band GeoTIFF stacked red, green, blue, NIR, or four files globbed as `blue.tif green.tif nir.tif red.tif` (the
STAC asset names of Earth Search, sorted), would otherwise be refined as the wrong bands without a word. Where a
band's description (GDAL's) or a single-band file's name names a Sentinel-2 band, by id (`B04`, `B4`) or by its STAC
common name (`red`), that name decides; where none does, the documented order (B02 B03 B04 B08) holds.
"""
from __future__ import annotations

import re
from typing import Sequence

from modeling_stage2.bands import BAND_NAMES

from .values import InferenceInputError

COMMON_NAMES: dict[str, str] = {
    "coastal": "B01", "blue": "B02", "green": "B03", "red": "B04", "rededge1": "B05", "rededge2": "B06",
    "rededge3": "B07", "nir": "B08", "nir08": "B8A", "nir09": "B09", "cirrus": "B10", "swir16": "B11",
    "swir22": "B12",
}
"""STAC `eo:common_name` (and Earth Search asset name) -> Sentinel-2 band."""

_BAND_ID = re.compile(r"b0?(1[0-2]|[1-9]|8a)", re.IGNORECASE)


def named_band(text: str | None) -> str | None:
    """The Sentinel-2 band that a description or a file name names (`"B04"`, `"B4, central wavelength 665 nm"`,
    `"red"`, `"T33UUP_20220613T101031_B04_10m"`), or None where it names none, or more than one."""
    found = set()
    for token in re.split(r"[^0-9A-Za-z]+", text or ""):
        match = _BAND_ID.fullmatch(token)
        if match:
            number = match.group(1).upper()
            found.add("B" + (number if len(number) == 2 else "0" + number))
        elif token.lower() in COMMON_NAMES:
            found.add(COMMON_NAMES[token.lower()])
    return found.pop() if len(found) == 1 else None


def band_order(names: Sequence[str | None], sources: Sequence[str]) -> tuple[int, ...]:
    """Which input band to read for each of `BAND_NAMES`, given the band each input band names (None: it names
    none) and how to call each input band in a message. All four named: read by name, in any order. Otherwise
    the documented order, which a named band must then agree with. A band the refiner does not take, or a band
    named twice, is refused."""
    for source, name in zip(sources, names):
        if name is not None and name not in BAND_NAMES:
            raise InferenceInputError(
                f"{source} is Sentinel-2 {name} by its name; the refiner takes {' '.join(BAND_NAMES)}"
            )
    named = [name for name in names if name is not None]
    for name in set(named):
        if named.count(name) > 1:
            twice = " and ".join(source for source, other in zip(sources, names) if other == name)
            raise InferenceInputError(f"{twice} are both {name} by their names; give each band once")
    if len(named) == len(BAND_NAMES):
        return tuple(names.index(name) for name in BAND_NAMES)
    for position, (source, name) in enumerate(zip(sources, names)):
        if name is not None and name != BAND_NAMES[position]:
            raise InferenceInputError(
                f"{source} is {name} by its name but would be read as {BAND_NAMES[position]}: unless all four "
                f"bands are named, they are taken in the order {' '.join(BAND_NAMES)}; give them in that order, "
                "or name all four"
            )
    return tuple(range(len(BAND_NAMES)))

"""The product's bands and metadata codes: the facts the model, the data builders, training and inference share.

A leaf module (no imports), so that `data_builders` can use it without loading the model, and `trust_remote_code`
copies of the configuration carry it along.
"""

BAND_NAMES: tuple[str, ...] = ("B02", "B03", "B04", "B08")
"""Bands of the product, in storage order (blue, green, red, broad NIR); values are reflectance 0..1."""

BLUE, GREEN, RED, NIR = (BAND_NAMES.index(name) for name in ("B02", "B03", "B04", "B08"))
"""Positions of blue (B02), green (B03), red (B04) and broad NIR (B08) in `BAND_NAMES`: what NDVI, EVI and the
true-colour views read."""

TRUE_COLOUR_BANDS: tuple[int, int, int] = (RED, GREEN, BLUE)
"""Positions of the red, green and blue channels of a true-colour view, in that order."""

PIXEL_SIZE_M: float = 10.0
"""Ground size of a pixel, in metres: B02 B03 B04 B08 are Sentinel-2's 10 m bands (a 120 px tile is 1.2 km)."""

UNKNOWN_METADATA: int = -1
"""Month or biome code of a tile without that metadata; it selects the learned "unknown" embedding."""

NUM_MONTHS: int = 12
"""Months are coded 1..12 (the refiner's default `num_months`)."""

NUM_BIOMES: int = 17
"""Biomes are coded 0..16, IGBP-like (the refiner's default `num_biomes`)."""

DN_LOOKING_MEDIAN: float = 2.0
"""Reflectance whose median is above this is almost certainly digital numbers (reflectance x 10000) passed as floats."""

DN_CHECK_SAMPLE: int = 65536
"""How many values (an even stride through the image) the digital-number check takes the median of."""


class DigitalNumbersWarning(UserWarning):
    """Float band values look like digital numbers (reflectance x 10000) where reflectance 0..1 is expected."""

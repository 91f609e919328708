"""The project's names for how `opt_v1` is obtained and what scale input values are in, and the old spellings
that still work for one release.

A leaf module (standard library only), so that the data builders can load it without the model package
(`data_builders._leaves.model_leaf`). Every package takes these names from here:

- `input_mode`: how `opt_v1` is obtained, one of `INPUT_MODES`: `"synthetic"` (a degraded copy of the target),
  `"stage1"` (Stage 1's output), `"identity"` (the tile's own S2 bands are used as `opt_v1`).
- `input_scale`: what band values are, one of `INPUT_SCALES`: `"dn"` (digital numbers, reflectance x 10000,
  multiplied by 1e-4 when read) or `"reflectance"` (0..1, kept); inference also takes `"auto"` (by dtype:
  integers are digital numbers, floats reflectance), which for a GeoTIFF declaring its bands' scale and offset
  resolves to `DECLARED_SCALE` (`"declared"`: value x scale + offset).
- `quantization`: how the frozen backbone is loaded, one of `QUANTIZATIONS`.
- `biome`: the biome code 0..16 as an Arrow column and a model argument. NPZ tiles (the on-disk format) store it
  under the key `BIOME_NPZ_KEY` (`"biome_code"`), which becomes the `biome` column/argument when read.
- `out_of_range_weight` (`OUT_OF_RANGE_WEIGHT`): where a refiner built with `out_of_range_fallback` or
  `near_black_fallback` kept `opt_v1` (outside the training spectra, or near-black).
"""
from __future__ import annotations

import argparse
import contextlib
import warnings

INPUT_MODES: tuple[str, ...] = ("synthetic", "stage1", "identity")
"""How `opt_v1` is obtained (`input_mode`)."""

INPUT_SCALES: tuple[str, ...] = ("dn", "reflectance")
"""What band values are (`input_scale`)."""

DECLARED_SCALE = "declared"
"""The `input_scale` of a GeoTIFF read with the scale and offset it declares for its bands (`"auto"` resolves to it)."""

QUANTIZATIONS: tuple[str, ...] = ("8bit", "4bit", "none")
"""How the frozen backbone's linear layers are loaded (`quantization`): 8-bit, 4-bit NF4, or full precision."""

BIOME_NPZ_KEY = "biome_code"
"""The NPZ tile key of the biome code; read, it becomes the `biome` column / model argument."""

OUT_OF_RANGE_WEIGHT = "out_of_range_weight"
"""Each pixel's weight of `opt_v1` in `refined` (a refiner built with `out_of_range_fallback` or `near_black_fallback`,
`Stage2RefinerConfig.keeps_opt_v1`), under one name as the field of `Stage2RefinerOutput`, the second output of an
exported graph, the key of refined NPZ tiles and the band description of the map `stage2-refine --out_of_range_output`
writes."""

DEPRECATED_NAMES: dict[str, str] = {
    "input_source": "input_mode",  # inference's name for input_mode (TileRefinementSummary, refined NPZ tiles)
    "scaling": "input_scale",  # the data builders' name for input_scale (Tile, the build record)
}
"""Old name -> name, for one release."""

DEPRECATED_VALUES: dict[str, str] = {
    "s2_bands": "identity",  # input_mode: the tile's own S2 bands are opt_v1
    "dn_x1e-4": "dn",  # input_scale
    "float": "reflectance",  # input_scale
}
"""Old value -> value, for one release."""

OLD_INPUT_SOURCE = {"stage1": "stage1", "identity": "s2_bands"}
"""input_mode -> the old `input_source` value (what the deprecated `input_source` attributes return)."""

OLD_SCALING = {"dn": "dn_x1e-4", "reflectance": "float"}
"""input_scale -> the old `scaling` value (what the deprecated `scaling` attributes return)."""


DISTRIBUTION = "stage2-refiner"
"""The package's name on PyPI (setup.cfg), whose extras hold the optional dependencies."""


def install_hint(what: str, extra: str) -> str:
    """One wording for a missing optional dependency: `<what> needs the '<extra>' extra: pip install
    'stage2-refiner[<extra>]'`."""
    return f"{what} needs the {extra!r} extra: pip install '{DISTRIBUTION}[{extra}]'"


def warn_deprecated(old: str, new: str, where: str = "", stacklevel: int = 3) -> None:
    """A one-line `FutureWarning`: `old` still works for this release; `new` is the spelling to use."""
    prefix = f"{where}: " if where else ""
    warnings.warn(f"{prefix}{old} is deprecated and will be removed in the next release; use {new}",
                  FutureWarning, stacklevel=stacklevel)


class OneLineArgumentParser(argparse.ArgumentParser):
    """The console scripts' parser: a bad argument is one line, `PROG: error: MESSAGE`, exit 2, with no usage block
    above it (`--help` shows that)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def require_at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, minimums: dict[str, int]) -> None:
    """`parser.error` naming the flag (not the Python argument it becomes) when an integer flag that was given is
    below its minimum, e.g. `{"--num_proc": 1}`."""
    for flag, least in minimums.items():
        value = getattr(args, flag.lstrip("-"))
        if value is not None and value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")


@contextlib.contextmanager
def one_line_warnings(prog: str):
    """Within the block, warnings print as one line `PROG: FutureWarning: message` (no source line): for the
    console scripts."""
    original = warnings.formatwarning

    def format_one_line(message, category, filename, lineno, line=None):
        return f"{prog}: {category.__name__}: {message}\n"

    warnings.formatwarning = format_one_line
    try:
        yield
    finally:
        warnings.formatwarning = original

"""Inference with the Stage 2 refiner: numpy arrays, folders of NPZ tiles and whole GeoTIFF scenes.

Three entry points share one model call (`predict`):

- `refine_arrays` (`predict`): numpy `(4, H, W)` or `(B, 4, H, W)` in reflectance or digital numbers -> refined
  reflectance (float32).
- `refine_tiles` (`tiles`): a folder of NPZ tiles in the design's layout (searched recursively) or NPZ files, read
  with the data builders' tile reader -> one NPZ per tile with `refined` (and per-tile metrics, `training.metrics`,
  when a Stage 1 `opt_v1` and the Sentinel-2 target exist).
- `refine_scene` (`scenes`): a GeoTIFF of any size (one 4-band file or four single-band files, `raster`; bands
  read by the names the files give them, `scene_bands`, and with the scale and offset they declare) -> a GeoTIFF
  with the same CRS, transform and nodata, refined in overlapping windows blended without seams (`windows`),
  reading and writing one strip of windows at a time so that memory does not grow with the scene.

`stage2-refine` (`cli.main`) is the command line for the last two; `load_model` (`loading`) reads a model folder, a
Hub repo id or a `stage2-export` output. Bands are always `BAND_NAMES = ("B02", "B03", "B04", "B08")`; reflectance
is digital numbers x 1e-4. The package depends on `modeling_stage2` and `data_builders`, never the other way round.
"""
from __future__ import annotations

import importlib

from modeling_stage2.bands import BAND_NAMES  # noqa: F401  (re-exported)


_EXPORTS = {
    "InferenceInputError": "values",
    "to_reflectance": "values",
    "refine_arrays": "predict",
    "load_model": "loading",
    "TileRefinementSummary": "tiles",
    "refine_tiles": "tiles",
    "SceneRefinementResult": "scenes",
    "PixelSizeWarning": "raster",
    "refine_scene": "scenes",
    "blend_weights": "windows",
    "window_starts": "windows",
    "main": "cli",
}

__all__ = sorted([*_EXPORTS, "BAND_NAMES"])


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'inference_stage2' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return __all__

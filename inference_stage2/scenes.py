"""Whole GeoTIFF scenes of any size: overlapping windows blended without seams, one strip in memory."""
from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from data_builders.tiles import fill_invalid_pixels
from modeling_stage2._files import (
    fsync_folder, fsync_tree, output_path_problem, parents_removed_on_failure, partial_path, remove_abandoned_partials,
)
from modeling_stage2.bands import BAND_NAMES, PIXEL_SIZE_M
from modeling_stage2.vocabulary import OUT_OF_RANGE_WEIGHT

from .predict import predict, reports_out_of_range_weight
from .raster import (
    SceneSource, check_written_whole, output_dtype, output_nodata, output_profile, output_scaling, require_rasterio,
    to_output,
)
from .values import (
    DEFAULT_BATCH_SIZE, DEFAULT_OVERLAP, DEFAULT_WINDOW, GEOTIFF_SUFFIXES, InferenceInputError, OUTPUT_SCALES,
    check_biome, check_month, metadata_limits,
)
from .windows import StripAccumulator, blend_weights, window_starts


def remove_quietly(path: Path) -> None:
    """Remove a partial GeoTIFF and the `.aux.xml` sidecar GDAL may have written beside it."""
    for candidate in (path, path.with_name(path.name + ".aux.xml")):
        candidate.unlink(missing_ok=True)


@dataclass
class SceneRefinementResult:
    """What [`refine_scene`] did: sizes, windows and the memory it held.

    `accumulator_shape` / `accumulator_bytes`: the blending buffer (bands, rows, width) held during the
    whole run; `max_rows_read`: the most scene rows read at once. Both stay at the window height
    whatever the scene's height. `out_of_range_path`: the weight map written (`out_of_range_output`), and
    `out_of_range_fraction` the fraction of valid pixels where the model's `out_of_range_weight` is above 0, written
    or not (None for a model that reports no weight, or a scene without a valid pixel). `nodata`: the value the output
    declares for nodata pixels, always one (`raster.output_nodata`: NaN in a float output of an input that declares
    none).
    `input_scale`: how the input was read, `"dn"`, `"reflectance"` or `"declared"` (its bands' declared scale and
    offset applied). `band_order`: which input band (of a 4-band raster) or file (of four) was read as each of
    B02 B03 B04 B08, 0-based: `(0, 1, 2, 3)` unless the bands' descriptions or the files' names put them otherwise.
    """

    input_paths: tuple[Path, ...]
    output_path: Path
    out_of_range_path: Path | None
    out_of_range_fraction: float | None
    width: int
    height: int
    windows: int
    strips: int
    window: int
    overlap: int
    input_scale: str
    band_order: tuple[int, ...]
    output_scale: str
    dtype: str
    nodata: float
    accumulator_shape: tuple[int, ...]
    accumulator_bytes: int
    max_rows_read: int
    seconds: float

    pixel_size_m: tuple[float, float] = (PIXEL_SIZE_M, PIXEL_SIZE_M)

    @property
    def area_km2(self) -> float:
        """Scene area on the ground, from its centre pixel's size (`pixel_size_m`)."""
        return self.width * self.height * self.pixel_size_m[0] * self.pixel_size_m[1] / 1e6


def written_path(path: str | os.PathLike) -> Path:
    """Where writing `path` lands: a link's target, replaced beside itself, so that the link names the new scene
    (renaming over the link would leave its target, where the link's readers look, with the old one), as
    `staged_folder` does for a linked folder."""
    path = Path(path)
    return path.resolve() if path.is_symlink() else path


def geotiff_name_problem(path: str | os.PathLike) -> str | None:
    """Why a scene output (the refined scene, the weight map) may not be written at `path`, or None: it is written as
    a GeoTIFF, so it must be named as one (`GEOTIFF_SUFFIXES`, in any case), not `out.png`."""
    if Path(path).suffix.lower() in GEOTIFF_SUFFIXES:
        return None
    return "a scene is written as a GeoTIFF; name it " + " or ".join(f"FILE{suffix}" for suffix in GEOTIFF_SUFFIXES)


def scene_output_problem(path: str | os.PathLike) -> str | None:
    """Why a scene output cannot be written at `path`, or None: a name that is not a GeoTIFF's
    (`geotiff_name_problem`), a folder already there, a file where a parent folder must be, a folder nothing can be
    written in (`output_path_problem`). Checked before the input is opened, so that a whole scene is not refined for
    a last rename that must fail."""
    return geotiff_name_problem(path) or output_path_problem(path)


def _check_window_fits(model: Any, window: int) -> None:
    """Every window reaches the model `window` px square (smaller scenes are padded up to it): an exported graph takes
    only the sides it was exported for, found here rather than at the first window, with the output half made."""
    low, high = getattr(model, "side_range", (1, None))
    if window < low or (high is not None and window > high):
        raise InferenceInputError(f"window {window}: the exported graph {model.graph_file.name} takes windows of "
                                  f"{low}..{high} px; pass a window in that range, or use the eager model")


def _pad_to(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Mirror-pad (N, C, h, w) up to (height, width) at the bottom/right (scenes smaller than a window)."""
    pad_h, pad_w = height - images.shape[-2], width - images.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return images
    return np.pad(images, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), mode="symmetric")


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
    out_of_range_output: str | os.PathLike | None = None,
) -> SceneRefinementResult:
    """Refine a GeoTIFF scene of any size in overlapping windows and write a GeoTIFF beside it.

    Args:
        model: the refiner (or any callable with its signature, see [`refine_arrays`]).
        input_path_or_paths: one 4-band raster (B02 B03 B04 B08) or four single-band rasters in that
            order, sharing one grid. A CRS and a geotransform are required. Bands whose descriptions (or single-band
            files whose names) name all four bands, by id (`B04`) or common name (`red`), are read by name.
        output_path: the GeoTIFF to write, named `.tif` or `.tiff`: same size, CRS, transform and nodata value (NaN
            for a float output of an input that declares none); 4 bands.
        month: 1..12 or -1 (unknown). biome: 0..16 or -1 (unknown).
        window: window size in pixels (the model works on 120x120 tiles).
        overlap: pixels shared by neighbouring windows, blended with a raised-cosine ramp.
        batch_size: windows per forward pass.
        input_scale: `"auto"` (a scale or offset the file declares for its bands is applied, as Sentinel-2 L2A
            of processing baseline 04.00 on needs: reflectance = DN x 0.0001 - 0.1; without one, integer rasters
            are digital numbers, float ones reflectance), `"dn"`, `"reflectance"` (refused where they contradict
            a declared scale or offset).
        output_scale: `"reflectance"` (float32, the default) or `"dn"` (digital numbers, reflectance x
            10000 rounded, in the input's integer dtype or uint16; for an input read with its declared scale and
            offset, the digital numbers of that scale and offset, declared on the output too).
        device: where to run the model.
        progress: show a progress bar.
        out_of_range_output: with a model built with `out_of_range_fallback` or `near_black_fallback`, also write
            each pixel's weight of `opt_v1` in the output to this single-band float32 GeoTIFF (same grid; 0 where the
            refiner worked, 1 where `opt_v1` was kept: the pixel's spectrum lies so far outside the training spectra,
            or it is near-black; blended across windows like the bands; NaN where the input is nodata), named `.tif`
            or `.tiff`.

    Pixels where any band is nodata (the declared value, or NaN) are filled for the model and written
    as nodata in every band (NaN when no nodata value is declared and the output is float, declared NaN; 0, then
    declared, for a digital-number output). A valid pixel is never written as nodata: a band value equal to it (a
    refined 0 with nodata 0) is written as the value beside it (`raster.to_output`). Memory: one strip of `window`
    rows (input, blending sums and weights), never the whole scene. The output appears only when complete (written
    to a temporary file beside it).
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
    _check_window_fits(model, window)
    output_path = Path(output_path)
    weight_path = None if out_of_range_output is None else Path(out_of_range_output)
    for key, path in (("output", output_path), ("out_of_range_output", weight_path)):
        problem = None if path is None else scene_output_problem(path)
        if problem is not None:
            raise InferenceInputError(f"{key} {path}: {problem}")
    if weight_path is not None and not reports_out_of_range_weight(model):
        raise InferenceInputError(
            f"out_of_range_output {weight_path}: the model reports no out_of_range_weight (it needs a refiner built "
            "with out_of_range_fallback or near_black_fallback; export a graph of such a refiner again if it was "
            "exported without the weight)"
        )
    rasterio = require_rasterio()

    with SceneSource(input_path_or_paths) as source, contextlib.ExitStack() as made_folders:
        scale, dtype, nodata, scaling = scene_output_settings(source, input_scale, output_scale,
                                                              (output_path, weight_path))
        target = written_path(output_path)
        made_folders.enter_context(parents_removed_on_failure(target))  # a failure leaves no folder it made
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_partials(target)  # a killed run's partial scene, perhaps gigabytes
        partial = partial_path(target)
        weight_partial = None
        written = False  # both files complete and closed
        try:
            with contextlib.ExitStack() as files:
                destination = files.enter_context(rasterio.open(partial, "w", **output_profile(source, dtype, nodata)))
                for index, name in enumerate(BAND_NAMES, start=1):
                    destination.set_band_description(index, name)
                destination.update_tags(
                    STAGE2_REFINED="true", MONTH=str(month), BIOME=str(biome), OUTPUT_SCALE=output_scale
                )
                if scaling is not None:
                    destination.scales, destination.offsets = (list(column) for column in zip(*scaling))
                weight_destination = None
                if weight_path is not None:
                    weight_target = written_path(weight_path)
                    made_folders.enter_context(parents_removed_on_failure(weight_target))
                    weight_target.parent.mkdir(parents=True, exist_ok=True)
                    remove_abandoned_partials(weight_target)
                    weight_partial = partial_path(weight_target)
                    weight_destination = files.enter_context(rasterio.open(
                        weight_partial, "w", **output_profile(source, np.dtype(np.float32), np.nan, count=1)))
                    weight_destination.set_band_description(1, OUT_OF_RANGE_WEIGHT)
                try:
                    counts = _refine_strips(
                        model, source, destination, month, biome, window, overlap, batch_size, scale, dtype, nodata,
                        scaling, device, progress, reports_out_of_range_weight(model), weight_destination,
                    )
                except rasterio.errors.RasterioIOError as error:  # a write: a failed read is an InferenceInputError
                    # blocks past GDAL's cache (5 % of the memory) are written as the scene is refined: a full disk
                    # fails there (no errno), and is the machine's failure as one found as the file closes is
                    reason = " ".join(str(error).split())
                    raise OSError(errno.EIO, f"the GeoTIFF could not be written ({reason}); is the disk full? Nothing "
                                             "was replaced", os.fspath(target)) from error
            for path, name in ((partial, target), (weight_partial, weight_path)):
                if path is not None:
                    check_written_whole(path, name)
            written = True
            for path in (weight_partial, partial):  # one flush a scene, on the disk before a name vouches for it
                if path is not None:
                    fsync_tree(path)
            if weight_partial is not None:
                os.replace(weight_partial, weight_target)
            os.replace(partial, target)
            for folder in {target.parent} | ({weight_target.parent} if weight_partial is not None else set()):
                fsync_folder(folder)
        except BaseException:
            if written and weight_partial is not None and not os.path.lexists(weight_partial) \
                    and os.path.lexists(partial):  # a signal between the renames: the scene joins its weight map
                os.replace(partial, target)
            for path in (partial, weight_partial):
                if path is not None:
                    remove_quietly(path)
            raise
        return SceneRefinementResult(
            input_paths=tuple(source.input_paths),
            output_path=output_path,
            out_of_range_path=weight_path,
            out_of_range_fraction=counts["out_of_range_fraction"],
            width=source.width,
            height=source.height,
            windows=counts["windows"],
            strips=counts["strips"],
            window=window,
            overlap=overlap,
            input_scale=scale,
            band_order=source.band_order,
            output_scale=output_scale,
            dtype=dtype.name,
            nodata=nodata,
            accumulator_shape=counts["accumulator_shape"],
            accumulator_bytes=counts["accumulator_bytes"],
            max_rows_read=source.max_rows_read,
            seconds=time.perf_counter() - start,
            pixel_size_m=source.pixel_size_m,
        )


def scene_output_settings(source: SceneSource, input_scale: str, output_scale: str,
                          outputs: Sequence[Path | None], *, warn: bool = True) -> tuple[str, np.dtype, Any, Any]:
    """`(input scale, output dtype, output nodata, output scale and offset)` of refining `source` into `outputs`
    (the scene and the optional weight GeoTIFF), or the `InferenceInputError` that stops it: an output that is an
    input, a scale that contradicts the declared one, a CRS that does not map to the ground, a nodata value the
    output cannot hold. `stage2-refine` asks before loading the model (`warn=False`: the pixel-size warning comes
    once, with the run)."""
    for path in outputs:
        if path is not None and any(Path(path).resolve() == source_path.resolve() for source_path in source.paths):
            raise InferenceInputError(f"output {path} is an input file; refusing to overwrite it")
    output_path, weight_path = outputs
    if weight_path is not None and Path(weight_path).resolve() == Path(output_path).resolve():
        raise InferenceInputError(f"out_of_range_output {weight_path} is the output file; give another path")
    scale = source.resolve_input_scale(input_scale)
    if warn:
        source.warn_unless_10_m()
    else:
        source.pixel_size_m  # the CRS maps to the ground
    dtype = output_dtype(source, output_scale)
    nodata = output_nodata(source.nodata, dtype, source.nodata_path)
    return scale, dtype, nodata, output_scaling(source, scale, dtype)


def _refine_strips(
    model, source, destination, month, biome, window, overlap, batch_size, scale, dtype, nodata, scaling, device,
    progress, with_weight=False, weight_destination=None,
) -> dict[str, Any]:
    """The scene loop: for each row of windows, read its strip, refine its windows, blend them into the
    strip accumulator and write the rows no later window touches. `with_weight`: the model's `out_of_range_weight`
    is blended as one more band, its share of valid pixels above 0 counted, and written to `weight_destination`
    when one is given."""
    from rasterio.windows import Window
    from tqdm.auto import tqdm

    height, width = source.height, source.width
    rows, cols = window_starts(height, window, overlap), window_starts(width, window, overlap)
    strip_height, window_width = min(window, height), min(window, width)
    weights = blend_weights(strip_height, window_width, overlap)
    accumulator = StripAccumulator(len(BAND_NAMES) + with_weight, strip_height, width)
    windows = kept_pixels = valid_pixels = 0
    checked = False  # whether float input was checked for digital numbers (once, on the first valid pixels)
    with tqdm(total=len(rows) * len(cols), unit="window", desc="stage2-refine", disable=not progress) as bar:
        for index, row in enumerate(rows):
            raw = source.read_rows(row, strip_height)
            valid = source.valid_mask(raw, row)
            warn = not checked and bool(valid.any())
            checked |= warn
            reflectance = source.to_reflectance(raw, scale, warn=warn, valid=valid)
            useful = [col for col in cols if valid[:, col : col + window_width].any()]
            if useful:
                images = np.stack([reflectance[:, :, col : col + window_width] for col in useful])
                image_valid = np.stack([valid[:, col : col + window_width] for col in useful])
                filled = _pad_to(fill_invalid_pixels(images, image_valid), window, window)
                count = len(useful)
                prediction = predict(
                    model, filled, np.full(count, month, dtype=np.int64), np.full(count, biome, dtype=np.int64),
                    batch_size=batch_size, device=device,
                )
                values = prediction.refined
                if with_weight:
                    values = np.concatenate([values, prediction.out_of_range_weight[:, None]], axis=1)
                for col, image in zip(useful, values[:, :, :strip_height, :window_width]):
                    accumulator.add(row, col, image, weights)
                windows += count
            bar.update(len(cols))
            stop = rows[index + 1] if index + 1 < len(rows) else height
            blended, _ = accumulator.pop(stop)
            strip_valid = valid[: stop - row]
            block = to_output(blended[: len(BAND_NAMES)], strip_valid, dtype, nodata, scaling)
            destination.write(block, window=Window(0, row, width, stop - row))
            if with_weight:
                weight = to_output(blended[len(BAND_NAMES) :], strip_valid, np.dtype(np.float32), np.nan)
                if weight_destination is not None:
                    weight_destination.write(weight, window=Window(0, row, width, stop - row))
                kept_pixels += int((weight[0][strip_valid] > 0).sum())
                valid_pixels += int(strip_valid.sum())
    return {
        "windows": windows,
        "strips": len(rows),
        "accumulator_shape": tuple(accumulator.sums.shape),
        "accumulator_bytes": accumulator.nbytes,
        "out_of_range_fraction": kept_pixels / valid_pixels if valid_pixels else None,
    }

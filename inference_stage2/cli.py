"""`stage2-refine`: the command line of NPZ tiles (a folder or files) and scenes."""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Sequence

import torch

from modeling_stage2._files import is_system_failure
from modeling_stage2._quiet import no_loading_progress_bars
from modeling_stage2._signals import exit_on_termination
from modeling_stage2.bands import BAND_NAMES
from modeling_stage2.hub import HubUnavailableError, local_revision_problem
from modeling_stage2.vocabulary import DECLARED_SCALE, OneLineArgumentParser, one_line_warnings

from .loading import load_model
from .raster import SceneSource
from .scenes import SceneRefinementResult, refine_scene, scene_output_problem, scene_output_settings
from .tiles import TileRefinementSummary, is_npz, refine_tiles, tile_inputs
from .values import (
    DEFAULT_BATCH_SIZE, DEFAULT_OVERLAP, DEFAULT_WINDOW, INPUT_SCALES, InferenceInputError, OUTPUT_SCALES,
    check_biome, check_month,
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="stage2-refine",
        description=(
            "Refine Stage 1 images with a trained Stage 2 model: NPZ tiles, a folder of them or .npz files "
            "(--output_dir), or a GeoTIFF scene of any size (--output)."
        ),
    )
    parser.add_argument("--model", required=True, help="model folder (full model or trained adapter), Hub repo id, "
                        "or an exported model (a stage2-export folder, model.onnx or model.pt2)")
    parser.add_argument("--revision", default=None,
                        help="with a Hub repo id: the branch, tag or commit to download (default: main)")
    parser.add_argument(
        "--input", required=True, nargs="+",
        help="tiles: a folder of NPZ tiles (searched recursively) or one or more .npz files; scene: a 4-band "
        "GeoTIFF, or four single-band GeoTIFFs in the order B02 B03 B04 B08",
    )
    parser.add_argument("--output_dir", help="tiles: folder for the refined NPZ tiles (mirrors an input folder's "
                        "layout; .npz files given one by one go to OUTPUT_DIR/<file name>)")
    parser.add_argument("--output", help="scene: the refined GeoTIFF to write")
    parser.add_argument(
        "--out_of_range_output",
        help="scene: also write each pixel's weight of opt_v1 in the output (0 refined .. 1 opt_v1 kept, outside the "
        "training spectra, or near-black) to this single-band GeoTIFF; needs a model built with out_of_range_fallback "
        "or near_black_fallback (tiles get it as the NPZ key out_of_range_weight without asking)",
    )
    parser.add_argument(
        "--stage1_dir",
        help="tiles: folder of Stage 1 outputs STAGE1_DIR/<tile file name> with 'opt_v1' (input_mode stage1); "
        "without it the tile's own S2 bands are opt_v1 (input_mode identity) and no metrics are computed",
    )
    parser.add_argument(
        "--strict", action="store_true", help="tiles: stop at the first bad tile instead of skipping it"
    )
    parser.add_argument("--month", type=int, help="scene: acquisition month 1..12 (-1 = unknown)")
    parser.add_argument("--biome", type=int, help="scene: biome code 0..16 (-1 = unknown)")
    # Scene-only options default to None, so that one given with tiles can be refused rather than ignored
    parser.add_argument("--window", type=int, help=f"scene: window size in pixels (default {DEFAULT_WINDOW})")
    parser.add_argument("--overlap", type=int,
                        help=f"scene: overlap of neighbouring windows (default {DEFAULT_OVERLAP})")
    parser.add_argument("--input_scale", choices=INPUT_SCALES, default="auto",
                        help="auto: a GeoTIFF's declared scale and offset, else integer = digital numbers "
                             "(x 1e-4), float = reflectance")
    parser.add_argument("--output_scale", choices=OUTPUT_SCALES,
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
    parser.add_argument("--no_progress", action="store_true",
                        help="no progress bar (of the refinement, nor of the model's download and loading)")
    return parser


def _check_mode(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """`"tiles"` or `"scene"`, with the arguments each needs; input problems raise before the model loads."""
    inputs = [Path(path) for path in args.input]
    for path in inputs:
        if not path.exists():
            raise InferenceInputError(f"input {path}: no such file or folder")
    if any(path.is_dir() or is_npz(path) for path in inputs):  # a mix with anything else: `tile_inputs` says so
        if args.output_dir is None or args.output is not None:
            parser.error("NPZ tiles (a folder or .npz files) as --input need --output_dir FOLDER (and no --output, "
                         "which is for a GeoTIFF scene)")
        if args.month is not None or args.biome is not None:
            parser.error("--month and --biome are for a scene; each tile carries its own month and biome_code")
        if args.out_of_range_output is not None:
            parser.error("--out_of_range_output is for a scene; refined tiles carry the key out_of_range_weight")
        scene_only = [flag for flag in ("window", "overlap", "output_scale") if getattr(args, flag) is not None]
        if scene_only:
            parser.error(f"{', '.join('--' + flag for flag in scene_only)}: for a scene only; tiles are refined whole "
                         "and written as float32 reflectance")
        tile_inputs(inputs, Path(args.output_dir), args.stage1_dir)  # everything that needs no model
        _refuse_the_model_folder(args.model, Path(args.output_dir))
        return "tiles"
    if args.output is None or args.output_dir is not None:
        parser.error("a GeoTIFF scene as --input (anything but a folder or .npz files) needs --output FILE.tif "
                     "(and no --output_dir, which is for NPZ tiles)")
    tiles_only = [flag for flag, given in (("--stage1_dir", args.stage1_dir is not None), ("--strict", args.strict))
                  if given]
    if tiles_only:
        parser.error(f"{', '.join(tiles_only)}: for NPZ tiles only; a scene's bands are its opt_v1")
    args.window = DEFAULT_WINDOW if args.window is None else args.window
    args.overlap = DEFAULT_OVERLAP if args.overlap is None else args.overlap
    args.output_scale = args.output_scale or "reflectance"
    for flag, path in (("--output", args.output), ("--out_of_range_output", args.out_of_range_output)):
        # refine_scene's own check, made here before the model loads, in the flag's name
        problem = None if path is None else scene_output_problem(path)
        if problem is not None:
            parser.error(f"{flag} {path}: {problem}")
    if args.month is None or args.biome is None:
        parser.error("a scene needs --month (1..12) and --biome (0..16); pass -1 for unknown")
    check_month(args.month, "--month")
    check_biome(args.biome, "--biome")
    if args.window < 1 or not 0 <= args.overlap < args.window:
        raise InferenceInputError(
            f"need --window >= 1 and 0 <= --overlap < --window, got {args.window}, {args.overlap}"
        )
    outputs = [Path(path) if path is not None else None for path in (args.output, args.out_of_range_output)]
    with SceneSource(inputs) as source:  # band count, CRS, grid, scales, nodata: checked before the model is loaded
        scene_output_settings(source, args.input_scale, args.output_scale, outputs, warn=False)
    return "scene"


def _refuse_the_model_folder(model: str, output_dir: Path) -> None:
    """The model's folder (or an exported graph's) is an input too: tiles written into it would mix with its files,
    and its own `metrics.json`, its evaluation, would be replaced by the tiles' or removed as an earlier run's."""
    folder = Path(model).expanduser()
    if folder.is_file():  # an exported graph: its folder holds its config.json and records
        folder = folder.parent
    if folder.is_dir() and output_dir.is_dir() and folder.samefile(output_dir):
        raise InferenceInputError(
            f"output_dir {output_dir} is the model folder {model}; refusing to write tiles among its files (its "
            "metrics.json would be replaced or removed): choose another output folder"
        )


def _default_device(device: str | None) -> str:
    if device is not None:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


@exit_on_termination
def main(argv: Sequence[str] | None = None) -> int:
    """`stage2-refine`: 0 on success, 1 when some tiles were rejected (the others written), a scene held no valid pixel
    or the Hub could not be reached, 2 on bad input (every tile rejected included)."""
    with one_line_warnings("stage2-refine"):
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.num_threads is not None:
        if args.num_threads < 1:
            parser.error("--num_threads must be at least 1")
        torch.set_num_threads(args.num_threads)
    problem = local_revision_problem(args.model, args.revision)
    if problem is not None:  # it would be ignored
        parser.error(f"--revision {args.revision}: {problem}")
    try:
        mode = _check_mode(args, parser)
        with no_loading_progress_bars() if args.no_progress else contextlib.nullcontext():
            model = load_model(args.model, quantization=args.quantization, device=_default_device(args.device),
                               revision=args.revision)
        if args.batch_size > (getattr(model, "max_batch", None) or args.batch_size):
            parser.error(f"--batch_size {args.batch_size}: the exported graph {args.model} takes at most "
                         f"{model.max_batch} images per call")
        if mode == "tiles":
            summary = refine_tiles(
                model, args.input, args.output_dir, args.stage1_dir, args.batch_size,
                input_scale=args.input_scale, device=args.device, strict=args.strict, progress=not args.no_progress,
            )
            _report_tiles(summary)
            if summary.rejected and not summary.written:  # bad input only: nothing to call a partial success
                print("stage2-refine: error: every tile was rejected (above); nothing was refined", file=sys.stderr)
                return 2
            return 1 if summary.rejected else 0
        result = refine_scene(
            model, args.input if len(args.input) > 1 else args.input[0], args.output, args.month, args.biome,
            window=args.window, overlap=args.overlap, batch_size=args.batch_size, input_scale=args.input_scale,
            output_scale=args.output_scale, device=args.device, progress=not args.no_progress,
            out_of_range_output=args.out_of_range_output,
        )
        _report_scene(result)
        return 1 if result.windows == 0 else 0
    except InferenceInputError as error:
        print(f"stage2-refine: error: {error}", file=sys.stderr)
        return 2
    except HubUnavailableError as error:  # the Hub out of reach or failing, nothing cached: not the input's fault
        print(f"stage2-refine: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a full disk (1), a folder the user can mend (2): the outputs written are whole
        output = f"--output {args.output}" if args.output is not None else f"--output_dir {args.output_dir}"
        where = "" if error.filename else f"{output}: "  # a write to a handle names no file
        print(f"stage2-refine: error: {where}{error}", file=sys.stderr)
        return 1 if is_system_failure(error) else 2


def _report_tiles(summary: TileRefinementSummary) -> None:
    rate = len(summary.written) / summary.seconds if summary.seconds else float("nan")
    if summary.written or not summary.rejected:  # every tile rejected: the error line says it, not "refined 0"
        print(
            f"refined {len(summary.written)} tiles into {summary.output_dir} ({rate:.1f} tiles/s); "
            f"input_mode {summary.input_mode}: "
            f"{'Stage 1 opt_v1' if summary.input_mode == 'stage1' else 'the S2 bands are opt_v1 (no --stage1_dir)'}"
        )
    if summary.out_of_range_fraction is not None:
        print(_kept_line(summary.out_of_range_fraction) + " (NPZ key out_of_range_weight)")
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
        print(rejection_line(path, reason), file=sys.stderr)
    if summary.rejected:
        print(f"{len(summary.rejected)} tile(s) rejected", file=sys.stderr)


def _report_scene(result: SceneRefinementResult) -> None:
    if result.windows == 0:
        print(f"warning: the scene has no valid pixel (all nodata); {result.output_path} is all nodata",
              file=sys.stderr)
    minutes = result.seconds / 60
    print(
        f"wrote {result.output_path}: {result.width}x{result.height} px of {result.pixel_size_m[0]:.3g} m "
        f"({result.area_km2:.2f} km^2), "
        f"{result.windows} windows in {result.strips} strips, {result.dtype} {result.output_scale}, "
        f"nodata {result.nodata}; {result.area_km2 / minutes if minutes else float('nan'):.1f} km^2/min"
    )
    if result.band_order != tuple(range(len(BAND_NAMES))):
        what = "band" if len(result.input_paths) == 1 else "file"
        print("read the bands by their names: " + ", ".join(
            f"{name} from input {what} {index + 1}" for name, index in zip(BAND_NAMES, result.band_order)))
    if result.input_scale == DECLARED_SCALE:
        print("read with the scale and offset the input declares for its bands (reflectance = value x scale + offset)")
    if result.out_of_range_path is not None:
        print(_kept_line(result.out_of_range_fraction) + f"; weight map {result.out_of_range_path}")
    elif result.out_of_range_fraction is not None:  # a model that keeps opt_v1 somewhere, no weight map asked for
        print(_kept_line(result.out_of_range_fraction))


def rejection_line(path: str, reason: str) -> str:
    """The line naming a rejected tile, `rejected: ` then the tile: a reason names the file it is about, most often
    the tile itself, and is then printed alone; one about another file (its Stage 1 output, whose path may hold the
    tile's) follows the tile."""
    return f"rejected: {reason}" if reason.startswith(f"{path}: ") else f"rejected: {path}: {reason}"


def _kept_line(fraction: float | None) -> str:
    share = "no valid pixel" if fraction is None else f"{100 * fraction:.1f} % of valid pixels"
    return f"opt_v1 kept, in part or entirely (outside the training spectra, or near-black): {share}"

"""Look at a built dataset: features, split sizes, statistics, histograms, a preview grid, and one tile
(`plot_sample`, for notebooks).

    stage2-inspect PATH [--plot FILE.png] [--split train] [--num_tiles 4]

PATH is a folder written by `stage2-build-dataset` (or any `save_to_disk` dataset with the same
columns). The plot shows, per tile, the target and `opt_v1` in true colour (B04, B03, B02 with
one 2-98 % percentile stretch taken from the target and applied to both) and their NDVI.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ._leaves import model_leaf
from .build import opt_v1_settings, read_build_info
from .cache import saved_dataset_problem
from .schema import CORE_COLUMNS
from .tiles import BAND_NAMES, NUM_BIOMES, NUM_MONTHS, UNKNOWN_METADATA

_vocabulary = model_leaf("vocabulary")
_files = model_leaf("_files")
_signals = model_leaf("_signals")

_bands = model_leaf("bands")
RGB_BANDS = _bands.TRUE_COLOUR_BANDS  # B04, B03, B02
RED, NIR = _bands.RED, _bands.NIR
STRETCH_PERCENTILES = (2.0, 98.0)
STATS_MAX_TILES = 2000
DEFAULT_PLOT_TILES = 4


def load_splits(path: str | Path) -> dict:
    """{split: Dataset} of a saved DatasetDict (or of a single saved Dataset)."""
    from datasets import Dataset, load_from_disk

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a folder written by stage2-build-dataset")
    problem = saved_dataset_problem(path)  # before loading: a file cut short at a record batch loads, rows missing
    if problem is not None:
        raise ValueError(problem)
    try:
        loaded = load_from_disk(str(path))
    except Exception as exc:
        raise ValueError(f"{path} is not a saved dataset ({exc}); pass a folder written by stage2-build-dataset"
                         ) from None
    splits = {str(loaded.split or "data"): loaded} if isinstance(loaded, Dataset) else dict(loaded)
    if not splits:  # a DatasetDict saved without a split: nothing to describe (and no first split to read)
        raise ValueError(f"{path} is a saved DatasetDict without any split; pass a folder written by "
                         "stage2-build-dataset")
    for split, dataset in splits.items():  # the report and the plot read them: one line here, not a KeyError later
        missing = [column for column in CORE_COLUMNS if column not in dataset.column_names]
        if missing:
            raise ValueError(f"{path}: split {split!r} lacks the column(s) {', '.join(map(repr, missing))}; pass a "
                             f"dataset written by stage2-build-dataset (columns {', '.join(CORE_COLUMNS)})")
    return splits


_RECORD_BLOCKS = ("source", "input_scale", "opt_v1")
"""The blocks of a build record the report prints: each a JSON object."""


def _build_info(splits: dict) -> Optional[dict]:
    """The build record (`read_build_info`), or None where the description holds none (other text, other JSON) or
    one whose blocks the report prints are not JSON objects (a record written by hand)."""
    try:
        info = read_build_info(splits)
    except (ValueError, StopIteration):
        return None
    return info if all(isinstance(info.get(block), dict) for block in _RECORD_BLOCKS) else None


def _recorded_statistics(info: Optional[dict]) -> tuple[Optional[dict], Optional[dict]]:
    """(target, opt_v1) per-band statistics of the build record, each None where it lacks a band or a number."""
    def complete(block, fields: Sequence[str]) -> bool:
        return isinstance(block, dict) and all(
            isinstance(block.get(band), dict) and all(isinstance(block[band].get(name), (int, float))
                                                      for name in fields) for band in BAND_NAMES)

    statistics = info.get("statistics") if info else None
    if not isinstance(statistics, dict) or not complete(statistics.get("target"), ("mean", "std", "min", "max")):
        return None, None
    opt_v1 = statistics.get("opt_v1")
    return statistics["target"], opt_v1 if complete(opt_v1, ("mean", "std")) else None


def _feature_line(name: str, feature) -> str:
    from datasets import List, Value

    if getattr(feature, "shape", None) is not None:  # Array2D / Array3D
        text = f"{feature.dtype} {tuple(feature.shape)}"
    elif isinstance(feature, Value):
        text = feature.dtype
    elif isinstance(feature, List) and isinstance(feature.feature, Value):
        text = f"list of {feature.feature.dtype}"
    else:
        text = str(feature)
    return f"  {name:16s} {text}"


def histogram(values: np.ndarray, num_classes: int, first: int) -> tuple[list[int], int]:
    """(counts of first..first+num_classes-1, count of anything else, e.g. unknown = -1)."""
    counts = np.bincount(values[(values >= first) & (values < first + num_classes)] - first, minlength=num_classes)
    return counts.tolist(), int(len(values) - counts.sum())


def _integer_column(path, split: str, dataset, column: str) -> np.ndarray:
    """A month or biome column as int64. A value that is not an integer (text, a fraction, a missing value) is a
    ValueError naming the split, the column and the row: counted as an integer, it would be cut or cast silently."""
    values = dataset.data.column(column).to_numpy(zero_copy_only=False)  # an integer column with nulls: float, NaN
    if values.dtype.kind in "iu":
        return values.astype(np.int64, copy=False)
    if values.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(values) | (values != np.round(values))
    else:  # text, booleans, nested values
        bad = np.ones(len(values), dtype=bool)
    if bad.any():
        row = int(np.argmax(bad))
        value = dataset.data.column(column)[row].as_py()
        raise ValueError(f"{path}: split {split!r}, column {column!r}, row {row}: {value!r} is not an integer (month "
                         f"and biome are integer codes, {UNKNOWN_METADATA} for unknown); pass a dataset written by "
                         "stage2-build-dataset")
    return values.astype(np.int64)


def _histogram_table(path, title: str, splits: dict, column: str, num_classes: int, first: int) -> list[str]:
    labels = [str(first + i) for i in range(num_classes)] + ["other"]
    width = max(5, max(len(s) for s in splits) + 1)
    lines = [f"{title} histogram:", " " * width + "".join(f"{label:>6s}" for label in labels)]
    for split, dataset in splits.items():
        values = _integer_column(path, split, dataset, column)
        counts, other = histogram(values, num_classes, first)
        lines.append(f"{split:<{width}s}" + "".join(f"{c:>6d}" for c in counts + [other]))
    return lines


def _computed_statistics(dataset, max_tiles: int = STATS_MAX_TILES) -> dict:
    """Per-band mean/std/min/max over valid pixels of the first `max_tiles` tiles; {} when there is none (as
    `_BandStats.summary`): the min of no pixel is inf, and a mean of 0 no measurement."""
    count, total, total_sq = 0, np.zeros(len(BAND_NAMES)), np.zeros(len(BAND_NAMES))
    low, high = np.full(len(BAND_NAMES), np.inf), np.full(len(BAND_NAMES), -np.inf)
    numpy_view = dataset.with_format("numpy", columns=["target", "valid_mask"])
    for start in range(0, min(len(dataset), max_tiles), 64):
        batch = numpy_view[start : min(start + 64, len(dataset), max_tiles)]
        pixels = batch["target"].transpose(1, 0, 2, 3)[:, batch["valid_mask"]].astype(np.float64)
        count += pixels.shape[1]
        total += pixels.sum(axis=1)
        total_sq += (pixels**2).sum(axis=1)
        if pixels.shape[1]:
            low, high = np.minimum(low, pixels.min(axis=1)), np.maximum(high, pixels.max(axis=1))
    if count == 0:
        return {}
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0))
    return {band: {"mean": mean[i], "std": std[i], "min": low[i], "max": high[i]} for i, band in enumerate(BAND_NAMES)}


def _synthesis_text(info: dict) -> str:
    """How the synthetic opt_v1 of a build record was made (seed, degradation preset and version); empty for other
    input modes. Datasets built before the presets had names record none."""
    settings = opt_v1_settings(info)
    if settings["input_mode"] != "synthetic":
        return ""
    preset = f" {settings['degradation']!r}" if settings["degradation"] else ""
    return f", seed {settings['dataset_seed']}, degradation{preset} v{info['opt_v1'].get('degradation_version')}"


def describe_dataset(path: str | Path) -> str:
    """The text report printed by `stage2-inspect`."""
    splits = load_splits(path)
    first = next(iter(splits.values()))
    info = _build_info(splits)
    lines = [f"Dataset: {path}", "Features:"]
    lines += [_feature_line(name, feature) for name, feature in first.features.items()]
    sizes = " | ".join(f"{split} {len(ds)}" for split, ds in splits.items())
    lines += ["", f"Splits: {sizes} (total {sum(len(ds) for ds in splits.values())})"]

    if info:  # the build record, whatever splits the dataset has
        lines += [
            f"Source: {info['source'].get('data_dir')} {json.dumps(info['source'].get('sources', {}))}; "
            f"rejected {info['source'].get('rejected', 0)}",
            f"Input scale: {json.dumps(info['input_scale'].get('tiles', {}))} ({info['input_scale'].get('rule')})",
            f"opt_v1: {info['opt_v1'].get('mode')}{_synthesis_text(info)}",
        ]
    target_stats, opt_stats = _recorded_statistics(info)
    if target_stats:
        stats_source = "train split, recorded at build time"
    else:
        split = "train" if "train" in splits else next(iter(splits))
        stats_source = f"{split} split, first {min(len(splits[split]), STATS_MAX_TILES)} tiles"
        target_stats = _computed_statistics(splits[split])
    if not target_stats:
        lines += ["", f"Per-band statistics over valid pixels ({stats_source}): none, no valid pixel"]
    else:
        lines += _statistics_table(stats_source, target_stats, opt_stats)
    lines += [""] + _histogram_table(path, "Month", splits, "month", NUM_MONTHS, 1)
    lines += [""] + _histogram_table(path, "Biome", splits, "biome", NUM_BIOMES, 0)
    lines.append(f"('other' counts values outside the range, i.e. unknown = {UNKNOWN_METADATA})")
    return "\n".join(lines)


def _statistics_table(stats_source: str, target_stats: dict, opt_stats: Optional[dict]) -> list[str]:
    lines = ["", f"Per-band statistics over valid pixels ({stats_source}; reflectance):",
             f"  {'band':5s} {'target mean':>11s} {'std':>8s} {'min':>8s} {'max':>8s}"
             + (f" | {'opt_v1 mean':>11s} {'std':>8s}" if opt_stats else "")]
    for band in BAND_NAMES:
        t = target_stats[band]
        row = f"  {band:5s} {t['mean']:11.4f} {t['std']:8.4f} {t['min']:8.4f} {t['max']:8.4f}"
        if opt_stats:
            row += f" | {opt_stats[band]['mean']:11.4f} {opt_stats[band]['std']:8.4f}"
        lines.append(row)
    return lines


# ----------------------------------------------------------------------------- plot
def stretch_limits(image: np.ndarray, valid_mask: np.ndarray) -> tuple[float, float]:
    """Joint 2-98 % percentiles of the RGB bands over valid pixels (keeps the colour balance)."""
    pixels = image[list(RGB_BANDS)][:, valid_mask]
    if pixels.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(pixels, STRETCH_PERCENTILES)
    return float(low), float(max(high, low + 1e-6))


def true_colour(image: np.ndarray, limits: tuple[float, float]) -> np.ndarray:
    """(H, W, 3) RGB in 0..1 with the given stretch."""
    low, high = limits
    return np.clip((image[list(RGB_BANDS)].transpose(1, 2, 0) - low) / (high - low), 0.0, 1.0)


def ndvi(image: np.ndarray) -> np.ndarray:
    nir, red = image[NIR].astype(np.float64), image[RED].astype(np.float64)
    return np.clip((nir - red) / np.maximum(nir + red, 1e-4), -1.0, 1.0)


def _check_split(splits: dict, split: str, path) -> None:
    if split not in splits:
        raise ValueError(f"no split {split!r} in {path}; splits: {', '.join(splits)}")


def plot_tiles(path: str | Path, output_png: str | Path, split: Optional[str] = None,
               num_tiles: int = DEFAULT_PLOT_TILES) -> Path:
    """Draw `num_tiles` tiles (spread over the split) as rows: target RGB, opt_v1 RGB, NDVIs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    splits = load_splits(path)
    split = split or ("train" if "train" in splits else next(iter(splits)))
    _check_split(splits, split, path)
    dataset = splits[split]
    if num_tiles < 1:
        raise ValueError(f"num_tiles must be >= 1, got {num_tiles}")
    indices = np.unique(np.linspace(0, len(dataset) - 1, min(num_tiles, len(dataset))).round().astype(int)).tolist()
    columns = ["tile_id", "target", "opt_v1", "valid_mask", "month", "biome"]
    rows = dataset.with_format("numpy", columns=columns)[indices]

    figure = Figure(figsize=(11, 0.6 + 2.6 * len(indices)), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(indices), 4, squeeze=False)
    for row, axes_row in enumerate(axes):
        images = {"target": rows["target"][row], "opt_v1": rows["opt_v1"][row]}
        for axis, (title, panel) in zip(axes_row, _panels(images, rows["valid_mask"][row])):
            image = _show_panel(axis, title, panel, rows["valid_mask"][row], title_it=row == 0)
        tile_id = str(rows["tile_id"][row])
        axes_row[0].set_ylabel(
            f"{tile_id[:22]}\n{tile_id[22:44]}\nmonth {rows['month'][row]}, biome {rows['biome'][row]}", fontsize=7)
    figure.suptitle(f"{Path(path).name} / {split}: {len(indices)} of {len(dataset)} tiles", fontsize=10)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=min(0.9, 0.5 + 0.1 * len(indices)), label="NDVI")
    output_png = Path(output_png)
    _check_plot_path(output_png)
    with _files.atomic_file(output_png) as partial:
        figure.savefig(partial, format=output_png.suffix[1:].lower())
    return output_png


def _panels(images: dict, valid_mask: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(title, panel) of each image of `images` in true colour, then of each its NDVI. One stretch for all, the
    target's (the first image's without a target), so that their colours compare."""
    reference = images.get("target", next(iter(images.values())))
    limits = stretch_limits(reference, valid_mask)
    return ([(f"{name} (true colour)", true_colour(image, limits)) for name, image in images.items()]
            + [(f"{name} NDVI", ndvi(image)) for name, image in images.items()])


def _show_panel(axis, title: str, panel: np.ndarray, valid_mask: np.ndarray, title_it: bool = True):
    """Draw a true-colour (H, W, 3) or NDVI (H, W) panel without ticks; returns the image drawn."""
    if panel.ndim == 3:
        image = axis.imshow(panel, interpolation="nearest")
    else:
        image = axis.imshow(np.ma.masked_where(~valid_mask, panel), cmap="RdYlGn", vmin=-1, vmax=1,
                            interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])
    if title_it:
        axis.set_title(title, fontsize=9)
    return image


def _as_array(value) -> np.ndarray:
    """A list, numpy array or torch tensor (without importing torch here) as a numpy array."""
    return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)


def _sample_image(value, name: str) -> np.ndarray:
    """A sample's (4, H, W) image as float numpy, from a list, array or tensor (a batch of one is taken as the
    tile); a clear error naming `name` otherwise."""
    image = _as_array(value).astype(np.float32)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] != len(BAND_NAMES):
        raise ValueError(f"plot_sample: {name} must be one ({len(BAND_NAMES)}, height, width) image with the bands "
                         f"{BAND_NAMES}, got shape {image.shape}")
    return image


def plot_sample(sample, refined=None, suptitle: Optional[str] = None):
    """One tile as a matplotlib `Figure`, as torchgeo's `plot(sample)`: `opt_v1`, the refined output (when given, or
    when the sample holds `"refined"`) and the target in true colour (B04, B03, B02, one 2-98 % stretch, the
    target's), with their NDVI underneath (invalid pixels blank).

        ds = datasets.load_from_disk("data/arrow")
        figure = plot_sample(ds["test"][0])                    # a row as datasets gives it (lists, numpy, torch)
        figure = plot_sample(row, refined=model(...).refined)  # (4, H, W) or a batch of one
        figure.savefig("tile.png")

    A sample without `"target"` (inference input) shows what it has. Nothing is drawn on screen: display the figure
    in a notebook, or save it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not hasattr(sample, "get") or "opt_v1" not in sample:
        raise ValueError("plot_sample: expected a dataset row (a mapping) with 'opt_v1' (and 'target', "
                         "'valid_mask'), e.g. datasets.load_from_disk(path)['test'][0]")
    refined = refined if refined is not None else sample.get("refined")
    images = {"opt_v1": _sample_image(sample["opt_v1"], "opt_v1")}
    if refined is not None:
        images["refined"] = _sample_image(refined, "refined")
    if sample.get("target") is not None:
        images["target"] = _sample_image(sample["target"], "target")
    shape = images["opt_v1"].shape[1:]
    for name, image in images.items():
        if image.shape[1:] != shape:
            raise ValueError(f"plot_sample: {name} is {image.shape[1]}x{image.shape[2]} pixels, opt_v1 "
                             f"{shape[0]}x{shape[1]}")
    mask = sample.get("valid_mask")
    mask = np.ones(shape, dtype=bool) if mask is None else _sample_mask(mask, shape)

    figure = Figure(figsize=(3.2 * len(images), 6.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, len(images), squeeze=False)
    for axis, (title, panel) in zip(axes.ravel(), _panels(images, mask)):
        image = _show_panel(axis, title, panel, mask)
    figure.colorbar(image, ax=axes[1].tolist(), shrink=0.8, label="NDVI")
    if suptitle is None and sample.get("tile_id") is not None:
        month, biome = (_plain(sample.get(key)) for key in ("month", "biome"))
        suptitle = f"{_plain(sample['tile_id'])}: month {month}, biome {biome}"
    if suptitle:
        figure.suptitle(str(suptitle), fontsize=10)
    return figure


def _plain(value):
    """A numpy or torch scalar as the Python value it holds (printed as `6`, not `tensor(6)`)."""
    return value.item() if hasattr(value, "item") else value


def _sample_mask(value, shape) -> np.ndarray:
    mask = _as_array(value).astype(bool)
    if mask.shape != tuple(shape):
        raise ValueError(f"plot_sample: valid_mask must be {shape[0]}x{shape[1]} like opt_v1, got shape {mask.shape}")
    return mask


def _check_plot_path(path: Path) -> None:
    """A preview is written in the format its suffix names (matplotlib's own list), and only where it can be."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise ValueError(f"--plot {path}: name the preview FILE.png (or .{', .'.join(sorted(formats))})")
    problem = _files.output_path_problem(path)
    if problem is not None:
        raise ValueError(f"--plot {path}: {problem}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = _vocabulary.OneLineArgumentParser(prog="stage2-inspect", description="Describe a built Stage 2 dataset.")
    parser.add_argument("path", help="dataset folder written by stage2-build-dataset")
    parser.add_argument("--plot", default=None,
                        help="write a preview grid to this image (.png, .pdf, .svg, ...: the suffix names the format)")
    parser.add_argument("--split", default=None, help="with --plot: the split to plot (default: train)")
    parser.add_argument("--num_tiles", type=int, default=None,
                        help=f"with --plot: tiles in the preview grid (default {DEFAULT_PLOT_TILES})")
    args = parser.parse_args(argv)
    if args.plot is None and (args.split is not None or args.num_tiles is not None):
        parser.error("--split and --num_tiles choose the tiles of the preview; add --plot FILE.png")
    if args.num_tiles is None:
        args.num_tiles = DEFAULT_PLOT_TILES
    _vocabulary.require_at_least(parser, args, {"--num_tiles": 1})
    if args.plot is not None:
        try:
            _check_plot_path(Path(args.plot))
        except ValueError as error:
            parser.error(str(error))
        except ImportError as error:  # matplotlib: the plot's optional dependency
            missing = (error.name or "matplotlib").split(".")[0]
            parser.error(_vocabulary.install_hint(f"--plot ({missing} is missing)", "viz"))
    return args


@_signals.exit_on_termination
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        with _vocabulary.one_line_warnings("stage2-inspect"):
            if args.plot and args.split is not None:  # a wrong split is an error before anything is printed
                _check_split(load_splits(args.path), args.split, args.path)
            print(describe_dataset(args.path))
            if args.plot:
                print(f"\nwrote {plot_tiles(args.path, args.plot, split=args.split, num_tiles=args.num_tiles)}")
    except (OSError, ValueError) as error:
        print(f"stage2-inspect: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Trainer callbacks of the Stage 2 refiner: `training_log.jsonl`, TensorBoard previews, per-epoch logging.

Also the preview rendering (true-colour RGB and NDVI of opt_v1 / refined / target side by side, column labels and
an NDVI colour bar) shared by the TensorBoard images and the `preview.png` written at the end of training.
"""
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import IntervalStrategy

from modeling_stage2.bands import NIR, RED, TRUE_COLOUR_BANDS

logger = logging.getLogger(__name__)

TRAINING_LOG_NAME = "training_log.jsonl"
TENSORBOARD_DIR_NAME = "runs"
PREVIEW_COLUMNS = ("opt_v1", "refined", "target")
_EVAL_PREFIX = "eval_"
_BASELINE_PREFIX = "opt_v1_"
_REFINED_PREFIX = "refined_"
_N_TILES = "n_tiles"  # in the logs of every evaluation


# ------------------------------------------------------------------------------------------- previews
def true_colour(tiles: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """(N, 4, H, W) reflectance -> (N, H, W, 3) uint8 with a 2-98 percentile stretch per tile.

    The stretch comes from `reference` (the target) when given, so that opt_v1, refined and target of a tile
    share one colour scale and their differences stay visible.
    """
    rgb = np.asarray(tiles, dtype=np.float32)[:, TRUE_COLOUR_BANDS]
    ref = rgb if reference is None else np.asarray(reference, dtype=np.float32)[:, TRUE_COLOUR_BANDS]
    out = np.empty((rgb.shape[0], rgb.shape[2], rgb.shape[3], 3), dtype=np.uint8)
    for i in range(rgb.shape[0]):
        finite = ref[i][np.isfinite(ref[i])]
        low, high = (np.percentile(finite, (2, 98)) if finite.size else (0.0, 1.0))
        scale = max(float(high - low), 1e-6)
        stretched = np.clip((np.nan_to_num(rgb[i]) - low) / scale, 0.0, 1.0)
        out[i] = (stretched.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
    return out


def ndvi_colour(tiles: np.ndarray) -> np.ndarray:
    """(N, 4, H, W) reflectance -> (N, H, W, 3) uint8: NDVI -0.2..1 on a brown-yellow-green ramp."""
    tiles = np.asarray(tiles, dtype=np.float32)
    red, nir = tiles[:, RED], tiles[:, NIR]
    denominator = nir + red
    ndvi = np.where(np.abs(denominator) > 1e-6, (nir - red) / np.where(denominator == 0, 1, denominator), 0.0)
    position = np.clip((np.nan_to_num(ndvi) + 0.2) / 1.2, 0.0, 1.0)
    stops = np.array([0.0, 0.35, 0.6, 1.0])
    colours = np.array([[120, 80, 40], [230, 210, 120], [140, 200, 80], [0, 100, 30]], dtype=np.float32)
    channels = [np.interp(position, stops, colours[:, c]) for c in range(3)]
    return (np.stack(channels, axis=-1) + 0.5).astype(np.uint8)


def render_preview(opt_v1: np.ndarray, refined: np.ndarray, target: np.ndarray, max_tiles: int = 4,
                   gap: int = 4) -> dict[str, np.ndarray]:
    """Grids of up to `max_tiles` tiles (rows) x (opt_v1, refined, target) (columns), as (H, W, 3) uint8.

    Each grid has a header naming its columns; the NDVI grid has a colour bar with its range underneath.
    Returns `{"rgb": ..., "ndvi": ..., "combined": ...}`; `combined` puts the NDVI grid right of the RGB grid.
    """
    count = min(max_tiles, len(target))
    if count == 0:
        raise ValueError("render_preview needs at least one tile.")
    opt_v1, refined, target = (np.asarray(a[:count], dtype=np.float32) for a in (opt_v1, refined, target))
    tile_width = target.shape[-1]
    rgb = [true_colour(tiles, reference=target) for tiles in (opt_v1, refined, target)]
    ndvi = [ndvi_colour(tiles) for tiles in (opt_v1, refined, target)]
    grids = {
        "rgb": _with_header(_grid(rgb, gap), [f"{name} RGB" for name in PREVIEW_COLUMNS], tile_width, gap),
        "ndvi": _with_colour_bar(_with_header(_grid(ndvi, gap), [f"{name} NDVI" for name in PREVIEW_COLUMNS],
                                              tile_width, gap)),
    }
    rgb_grid = _pad_bottom(grids["rgb"], grids["ndvi"].shape[0])
    spacer = np.full((rgb_grid.shape[0], 3 * gap, 3), 255, dtype=np.uint8)
    grids["combined"] = np.concatenate([rgb_grid, spacer, grids["ndvi"]], axis=1)
    return grids


LABEL_HEIGHT = 14  # px of the header row and of the colour bar's tick labels (Pillow's default 10-px font)
COLOUR_BAR_HEIGHT = 8
NDVI_PREVIEW_RANGE = (-0.2, 1.0)  # what ndvi_colour's ramp spans


def _grid(columns: list[np.ndarray], gap: int) -> np.ndarray:
    count, height, width, _ = columns[0].shape
    grid = np.full((count * height + (count - 1) * gap, len(columns) * width + (len(columns) - 1) * gap, 3), 255,
                   dtype=np.uint8)
    for col, tiles in enumerate(columns):
        for row in range(count):
            top, left = row * (height + gap), col * (width + gap)
            grid[top:top + height, left:left + width] = tiles[row]
    return grid


def _text_band(width: int, texts: list[tuple[int, str]]) -> np.ndarray:
    """A white (LABEL_HEIGHT, width, 3) band with each text drawn in black at its x offset."""
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (width, LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(band)
    for left, text in texts:
        draw.text((left, 1), text, fill="black")
    return np.asarray(band, dtype=np.uint8)


def _with_header(grid: np.ndarray, labels: list[str], tile_width: int, gap: int) -> np.ndarray:
    header = _text_band(grid.shape[1], [(index * (tile_width + gap) + 2, label) for index, label in enumerate(labels)])
    return np.concatenate([header, grid], axis=0)


def _with_colour_bar(grid: np.ndarray) -> np.ndarray:
    """The NDVI ramp of `ndvi_colour` across the grid's width, with its ends and 0 labelled."""
    width = grid.shape[1]
    low, high = NDVI_PREVIEW_RANGE
    values = np.linspace(low, high, width, dtype=np.float32)
    ramp = ndvi_colour(_tiles_with_ndvi(values))[0]  # (1, width, 3)
    bar = np.repeat(ramp, COLOUR_BAR_HEIGHT, axis=0)
    zero = int(round((0 - low) / (high - low) * (width - 1)))
    ticks = _text_band(width, [(0, f"NDVI {low:g}"), (zero, "0"), (width - 22, f"{high:g}")])
    spacer = np.full((2, width, 3), 255, dtype=np.uint8)
    return np.concatenate([grid, spacer, bar, ticks], axis=0)


def _tiles_with_ndvi(values: np.ndarray) -> np.ndarray:
    """(1, 4, 1, W) reflectance whose NDVI is `values` (red 1 - v, NIR 1 + v)."""
    tiles = np.zeros((1, 4, 1, values.size), dtype=np.float32)
    tiles[0, RED, 0], tiles[0, NIR, 0] = 1 - values, 1 + values
    return tiles


def _pad_bottom(image: np.ndarray, height: int) -> np.ndarray:
    padding = np.full((height - image.shape[0], image.shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([image, padding], axis=0)


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 image as PNG with Pillow, atomically (temporary name, then rename)."""
    from PIL import Image

    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"write_png expects an (H, W, 3) uint8 image, got shape {image.shape}.")
    from modeling_stage2._files import atomic_file

    with atomic_file(path) as partial:
        Image.fromarray(image, mode="RGB").save(partial, format="PNG")
    return Path(path)


# ------------------------------------------------------------------------------------------- JSONL log
def split_eval_metrics(logs: dict, prefix: str = _EVAL_PREFIX) -> dict:
    """`{"eval_refined_ndvi_rmse": ..., "eval_opt_v1_ndvi_rmse": ..., "eval_loss": ...}` ->
    `{"ndvi_rmse": ..., "opt_v1": {"ndvi_rmse": ...}, "loss": ...}` (the refined metrics at the top); `prefix`: the
    evaluation's `metric_key_prefix` and its underscore."""
    val: dict = {}
    baseline: dict = {}
    for key, value in logs.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.startswith(_BASELINE_PREFIX):
            baseline[name[len(_BASELINE_PREFIX):]] = value
        elif name.startswith(_REFINED_PREFIX):
            val[name[len(_REFINED_PREFIX):]] = value
        else:
            val[name] = value
    if baseline:
        val["opt_v1"] = baseline
    return val


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class JsonlLoggerCallback(TrainerCallback):
    """Writes `training_log.jsonl` in the output folder: one JSON object per line, per logging step and per
    evaluation, so that `jq` can query it:

        {"event": "train", "epoch": 1.0, "step": 8, "lr": 9.8e-05, "loss": 0.41, "grad_norm": 0.9, "ndvi_rmse": ...}
        {"event": "eval", "epoch": 5.0, "step": 40, "lr": 9e-05, "val": {"ndvi_rmse": ..., "opt_v1": {...}}}

    `jq 'select(.val) | [.epoch, .val.ndvi_rmse, .val.opt_v1.ndvi_rmse]' training_log.jsonl`.
    On a resumed run, lines after the resumed step (written by the interrupted run after its last complete
    checkpoint) and a torn last line are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)
        self._step_lr = None  # the learning rate of the last optimizer step

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # After the step, before the scheduler's: the rate the step used, as the Trainer logs it on `train` lines.
        if optimizer is not None:
            self._step_lr = float(optimizer.param_groups[0]["lr"])

    def _resolve(self, args) -> Path:
        if self.path is None:
            self.path = Path(args.output_dir) / TRAINING_LOG_NAME
        return self.path

    def on_train_begin(self, args, state, control, **kwargs):
        self._step_lr = None
        if not state.is_world_process_zero:
            return
        path = self._resolve(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            self._truncate_after(path, state.global_step)

    @staticmethod
    def _truncate_after(path: Path, step: int) -> None:
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a killed process
            if step > 0 and isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)  # a resumed run's own past; a run starting anew keeps none of an earlier run's
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = self.make_record(logs, state, kwargs.get("lr_scheduler"), self._step_lr)
        with open(self._resolve(args), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=_json_value) + "\n")
            handle.flush()

    @staticmethod
    def make_record(logs: dict, state, lr_scheduler=None, step_lr: float | None = None) -> dict:
        """`step_lr`: the learning rate of the last optimizer step, an evaluation's `lr` (that of the `train` line of
        its step, not the next step's); before the first step, the scheduler's (the first step's)."""
        logs = {key: _json_value(value) for key, value in logs.items()}
        record = {"epoch": logs.pop("epoch", state.epoch), "step": state.global_step}
        prefix = _evaluation_prefix(logs)
        if prefix is not None:  # validation under "val"; evaluate(metric_key_prefix="test") under "test"
            record["event"] = "eval"
            record["lr"] = step_lr if step_lr is not None else _current_lr(lr_scheduler)
            record["val" if prefix == _EVAL_PREFIX else prefix[:-1]] = split_eval_metrics(logs, prefix)
            return record
        if "loss" in logs:
            record["event"] = "train"
            record["lr"] = logs.pop("learning_rate", _current_lr(lr_scheduler))
        else:
            record["event"] = "summary"
        record.update(logs)
        return record


def _evaluation_prefix(logs: dict) -> str | None:
    """The `metric_key_prefix` and underscore of an evaluation's logs (`eval_`; `test_` for
    `evaluate(metric_key_prefix="test")`: `Stage2Trainer.evaluation_loop` logs `<prefix>_n_tiles`), or None for a
    training log or a summary."""
    prefix = next((key[:-len(_N_TILES)] for key in logs if key.endswith(f"_{_N_TILES}")), None)
    return prefix if prefix is not None else _EVAL_PREFIX if any(key.startswith(_EVAL_PREFIX) for key in logs) else None


def _current_lr(lr_scheduler) -> float | None:
    if lr_scheduler is None:
        return None
    try:
        return float(lr_scheduler.get_last_lr()[0])
    except (AttributeError, IndexError, TypeError):
        return None


# ------------------------------------------------------------------------------------------- TensorBoard
class Stage2TensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoard scalars (in `OUTPUT_DIR/runs`) plus, at each evaluation, preview images:
    `preview/rgb` and `preview/ndvi`, rows of validation tiles with columns opt_v1 | refined | target.

    `preview_source` is a callable returning `{"opt_v1", "refined", "target"}` arrays (N, 4, H, W) of the last
    evaluation, or None.
    """

    def __init__(self, preview_source=None, tb_writer=None, max_tiles: int = 4):
        super().__init__(tb_writer=tb_writer)
        self.preview_source = preview_source
        self.max_tiles = max_tiles
        self._purge_step = None

    def _init_summary_writer(self, args):
        if self._SummaryWriter is not None:
            # The purge is for the first writer of a resumed run only: a later one (an evaluation after `train`,
            # whose writer `on_train_end` closed) would hide everything this run logged since it resumed.
            purge_step, self._purge_step = self._purge_step, None
            self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=purge_step)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.logging_dir is None and self.tb_writer is None:
            # One folder for the whole run, resumed runs included (TensorBoard merges the event files).
            self.logging_dir = os.path.join(args.output_dir, TENSORBOARD_DIR_NAME)
        # A resumed run hides what the interrupted run logged after its checkpoint.
        self._purge_step = state.global_step + 1 if state.global_step > 0 else None
        super().on_train_begin(args, state, control, **kwargs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or self.preview_source is None:
            return
        preview = self.preview_source()
        if not preview:
            return
        if self.tb_writer is None:
            self.logging_dir = self.logging_dir or os.path.join(args.output_dir, TENSORBOARD_DIR_NAME)
            self._init_summary_writer(args)
        grids = render_preview(preview["opt_v1"], preview["refined"], preview["target"], self.max_tiles)
        for name in ("rgb", "ndvi"):
            self.tb_writer.add_image(f"preview/{name}", grids[name], state.global_step, dataformats="HWC")
        self.tb_writer.flush()


# ------------------------------------------------------------------------------------------- flow
class EpochLoggingCallback(TrainerCallback):
    """Log at the end of every epoch too (the trainer adds `cpu_fallback_count` and the skipped-step count to
    every training log, so they are reported per epoch whatever `logging_steps` is)."""

    def on_epoch_end(self, args, state, control, **kwargs):
        if args.logging_strategy != IntervalStrategy.NO:
            control.should_log = True
        return control

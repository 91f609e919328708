"""Deployment export of a trained refiner: `torch.export` (`.pt2`) and ONNX (the dynamo exporter).

    stage2-export runs/x/best runs/x/onnx                       # model.onnx + config.json + export.json + README.md
    stage2-export runs/x/best runs/x/pt2 --format torch_export  # model.pt2 instead

The trained folder (an adapter folder from `save_trained_model`, a full refiner folder or a Hub repo id) is loaded in
full precision, its LoRA adapters are merged into the base weights (`merge_and_unload`) and the merged refiner is
traced once with a dynamic batch, height and width. The graph has three inputs and one output, two for a refiner
built with `out_of_range_fallback` or `near_black_fallback`:

    opt_v1  float32 (batch, 4, height, width)  reflectance 0..1, bands B02 B03 B04 B08
    month   int64   (batch,)                   1..num_months, -1 = unknown
    biome   int64   (batch,)                   0..num_biomes-1, -1 = unknown
    refined float32 (batch, 4, height, width)  reflectance
    out_of_range_weight float32 (batch, 1, height, width)  weight of opt_v1 in refined, 0..1 (those refiners only)

The padding of height and width to a multiple of the patch (reflect, or replicate when the image is too small to
mirror, as the eager model does) happens inside the graph, so any size works. The input checks of the eager model
(band count, finite values, month/biome range) cannot live in a graph; `modeling_stage2.onnx_runtime.ExportedRefiner`
runs them before the session.

Tracing needs a few parts of the eager forward to be written without Python decisions on the input's size or
values; `export_friendly` swaps those in on one model instance for the time of the export (see its docstring). The
result is checked against the eager model on random tiles before the folder is written.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ._files import output_path_problem, staged_folder
from ._signals import exit_on_termination
from .configuration_stage2 import UNKNOWN_METADATA, Stage2RefinerConfig
from .hub import (
    HubUnavailableError, download_failure, hub_download_errors, hub_failure_is_users, hub_failure_line,
    hub_snapshot_paths_named,
)
from .vocabulary import OUT_OF_RANGE_WEIGHT, OneLineArgumentParser

FORMATS = ("onnx", "torch_export")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
GRAPH_FILES = {"onnx": "model.onnx", "torch_export": "model.pt2"}
EXPORT_INFO_FILE = "export.json"
EXPORT_FORMAT_VERSION = 1
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 18, 23
INPUT_NAMES = ("opt_v1", "month", "biome")
# The dynamic axes of each input, by name: the `Dim`s of the trace and the symbolic dimensions of the ONNX graph.
DYNAMIC_AXES = {"opt_v1": {0: "batch", 2: "height", 3: "width"}, "month": {0: "batch"}, "biome": {0: "batch"}}
# The graph's outputs, in this order; a refiner that never keeps `opt_v1` (`config.keeps_opt_v1`) has the first only
# (`graph_output_names`). The names are those of `Stage2RefinerOutput`'s fields.
OUTPUT_NAMES = ("refined", OUT_OF_RANGE_WEIGHT)
# Largest height/width the graph is declared for; the eager model has no limit, memory sets one in practice.
MAX_SIDE = 32768
MAX_BATCH = 4096
# Example input of the trace: a batch of 2 (batch 1 would be specialised) and a size that is not a multiple of the
# patch in either direction, different in height and width so that the two stay independent.
_EXAMPLE_SHAPE = (2, 120, 134)
# Sizes checked against the eager model after the export (batch, height, width).
_CHECK_SHAPES = ((1, 120, 120), (3, 23, 41))
# The largest difference to the eager model (reflectance) the post-export check accepts, per weights dtype. float32
# graphs agree within ~3e-7 (the 600M refiner, bench/results/export.md), float16 ones within ~2e-3 of the float16 eager
# model; what the check must catch (a wrong padding, crop or branch, NaN) differs by 1e-2 or more.
CHECK_TOLERANCE = {"float32": 1e-4, "float16": 5e-2}

__all__ = [
    "CHECK_TOLERANCE",
    "DTYPES",
    "EXPORT_FILES",
    "EXPORT_INFO_FILE",
    "FORMATS",
    "ExportCheckError",
    "ExportError",
    "ExportResult",
    "export_friendly",
    "export_refiner",
    "graph_output_names",
    "main",
    "merged_refiner",
]


class ExportError(ValueError):
    """Bad input to the export (a missing model, a wrong flag, an output folder that holds other files)."""


class ExportCheckError(RuntimeError):
    """The exported graph does not compute what the eager model computes (`CHECK_TOLERANCE`); nothing was written."""


@dataclass
class ExportResult:
    output_dir: Path
    graph_file: Path
    format: str
    seconds: float
    size_bytes: int
    max_abs_difference: float


# ---------------------------------------------------------------------------------------------- the model


def merged_refiner(model_or_path: Any, *, device: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A plain full-precision `Stage2RefinerModel` in eval mode and what it was made from.

    `model_or_path` is a trained folder / Hub repo id (loaded with `load_trained_model(..., quantization="none")`:
    a quantized training base is rebuilt in full precision), a `peft.PeftModel` of a refiner (merged here; a
    quantized one is refused) or a `Stage2RefinerModel` (returned as it is, unchanged: the caller's mode and
    `requires_grad` flags are left alone). A PeftModel is deep-copied before `merge_and_unload`, so the caller's
    model is not changed either.
    """
    from .modeling_stage2 import Stage2RefinerModel

    info: dict[str, Any] = {"source": None, "adapters_merged": False, "trained_quantization": None}
    if isinstance(model_or_path, (str, Path)):
        from .adapters import BASE_SOURCE_FILE, load_trained_model

        info["source"] = str(model_or_path)
        base_file = Path(model_or_path) / BASE_SOURCE_FILE
        if base_file.is_file():
            try:
                info["trained_quantization"] = json.loads(base_file.read_text()).get("trained_quantization")
            except ValueError:
                pass
        model = load_trained_model(str(model_or_path), quantization="none", device=device)
    else:
        model = model_or_path
    if hasattr(model, "merge_and_unload"):
        base = model.get_base_model()
        if any(getattr(base, flag, False) for flag in ("is_quantized", "is_loaded_in_8bit", "is_loaded_in_4bit")):
            raise ExportError(
                "the model's base is quantized (bitsandbytes), which no exporter can trace; load the trained folder "
                "in full precision (load_trained_model(path, quantization='none')) or pass the folder itself"
            )
        source = getattr(model, "stage2_base_source", None)  # the quantization it was trained with, not loaded with
        info["trained_quantization"] = info["trained_quantization"] or getattr(source, "trained_quantization", None)
        model = copy.deepcopy(model).merge_and_unload()
        info["adapters_merged"] = True
    if not isinstance(model, Stage2RefinerModel):
        raise ExportError(f"expected a Stage 2 refiner, got {type(model).__name__}")
    if getattr(model, "is_quantized", False):
        raise ExportError("the refiner is quantized; export a full-precision one")
    if model is model_or_path:
        return model, info
    model.requires_grad_(False)
    return model.eval(), info


def graph_output_names(config: Stage2RefinerConfig) -> tuple[str, ...]:
    """The outputs of the graph exported from a refiner with `config`: `refined`, and `out_of_range_weight` where the
    refiner keeps `opt_v1` at some pixels (`config.keeps_opt_v1`: outside its training spectra, or near-black)."""
    return OUTPUT_NAMES if config.keeps_opt_v1 else OUTPUT_NAMES[:1]


class _GraphSignature(nn.Module):
    """`(opt_v1, month, biome) -> refined` or `(refined, out_of_range_weight)` (`graph_output_names`): the graph's
    signature."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.output_names = graph_output_names(model.config)

    def forward(self, opt_v1: torch.Tensor, month: torch.Tensor, biome: torch.Tensor):
        output = self.model(opt_v1, month, biome, output_hidden_states=False, return_dict=True)
        outputs = tuple(output[name] for name in self.output_names)
        return outputs if len(outputs) > 1 else outputs[0]


# ------------------------------------------------------------------------------------ export-friendly parts


def _mirror_index(size, before: int, total, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source rows of a padded axis: (reflect index, replicate index, reflect impossible).

    `size` rows padded by `before` in front to `total` rows. Reflect (mirror without repeating the edge, as
    `F.pad(mode="reflect")`) needs each pad < size; where it does not hold the eager model switches to replicate.
    """
    offset = torch.arange(total, device=device) - before
    last = size - 1
    reflect = offset.abs()
    reflect = torch.where(reflect > last, 2 * last - reflect, reflect)
    impossible = ((offset < -last) | (offset > 2 * last)).any()
    replicate = offset.clamp(min=0).clamp(max=last)
    return reflect.clamp(min=0).clamp(max=last), replicate, impossible


def _pad_to_patch_multiple(self, hidden: torch.Tensor):
    """Export-friendly `Stage2RefinerModel._pad_to_patch_multiple`: the same padding as row/column gathers whose
    indices are computed from the (symbolic) size, so the graph pads any height and width; the reflect-to-replicate
    switch for images smaller than the pad is a `where` in the graph, not a Python branch."""
    height, width = hidden.shape[-2:]
    patch_h, patch_w = self.config.patch_size
    # Written as "the next multiple minus the size", so the tracer sees the padded size as patch * k (k >= 1),
    # which lets it prove the head's stage sizes without guards.
    pad_h = (height + patch_h - 1) // patch_h * patch_h - height
    pad_w = (width + patch_w - 1) // patch_w * patch_w - width
    top, left = pad_h // 2, pad_w // 2
    padding = (top, pad_h - top, left, pad_w - left)
    rows_reflect, rows_replicate, rows_bad = _mirror_index(
        height, top, (height + patch_h - 1) // patch_h * patch_h, hidden.device
    )
    cols_reflect, cols_replicate, cols_bad = _mirror_index(
        width, left, (width + patch_w - 1) // patch_w * patch_w, hidden.device
    )
    if self.config.padding_mode == "reflect":
        too_small = rows_bad | cols_bad  # the eager model falls back for both axes at once
        rows = torch.where(too_small, rows_replicate, rows_reflect)
        cols = torch.where(too_small, cols_replicate, cols_reflect)
    else:
        rows, cols = rows_replicate, cols_replicate
    padded = hidden.index_select(-2, rows).index_select(-1, cols)
    # The forward crops the head's output with `delta[:, :, top : top + height, left : left + width]`; the tracer
    # cannot prove those bounds (nor the slice's layout) for every size. `_run_head` below crops with a gather
    # instead and the forward is told the padding starts at 0, so its slice covers the whole, already cropped tensor.
    self.__dict__["_export_crop"] = (top, left, height, width)
    return padded, (0, padding[0] + padding[1], 0, padding[2] + padding[3])


def _run_head(self, features, full_resolution_input):
    """Export-friendly `Stage2RefinerModel._run_head`: the head (no CPU fallback: a graph has one device), its output
    cropped to the input size by a gather (see `_pad_to_patch_multiple`)."""
    top, left, height, width = self.__dict__["_export_crop"]
    delta = self.head(features, full_resolution_input)
    rows = torch.arange(height, device=delta.device) + top
    cols = torch.arange(width, device=delta.device) + left
    return delta.index_select(-2, rows).index_select(-1, cols)


def _grid_size(self, sample_shape):
    """Export-friendly `PrithviEncoder._grid_size`: the patch grid from symbolic sizes (no `int()`, which fixes the
    size of the example input into the graph). The refiner always passes a padded, single-frame input."""
    frames, height, width = sample_shape
    patch_t, patch_h, patch_w = self.config.patch_size
    return frames // patch_t, height // patch_h, width // patch_w


def _unchecked_metadata(values, name, low, high, batch_size):
    return values.long()


def _unchecked_opt_v1(opt_v1):
    return None


@contextlib.contextmanager
def export_friendly(model: nn.Module) -> Iterator[nn.Module]:
    """Swap five methods of this refiner instance (and its backbone) for traceable versions while the block runs.

    - `_check_opt_v1`, `_check_metadata`: the checks branch on the input's values (`if not isfinite(...).all()`),
      which a graph cannot do; they are skipped in the graph and run by `ExportedRefiner` before the session.
    - `_pad_to_patch_multiple`: `if pad == 0` and the reflect/replicate choice are Python branches on the size;
      replaced by index gathers that give the same values for every size.
    - `_run_head`: crops the head's output to the input size itself (a gather), because the tracer cannot prove
      the bounds of the forward's crop slice for every size; the forward's slice then covers the whole tensor.
    - `backbone._grid_size` (`int(size)`) fixes the example's size into the graph; replaced by a size-agnostic
      version.

    The position table and the head's stage sizes trace as they are (an unconditional resize, integer ceiling
    division).

    Only this instance is changed, and only inside the block; the class and other models are untouched.
    """
    patches = {
        model: {
            "_check_opt_v1": _unchecked_opt_v1,
            "_check_metadata": _unchecked_metadata,
            "_pad_to_patch_multiple": types.MethodType(_pad_to_patch_multiple, model),
            "_run_head": types.MethodType(_run_head, model),
        },
        model.backbone: {
            "_grid_size": types.MethodType(_grid_size, model.backbone),
        },
    }
    for owner, methods in patches.items():
        for name in methods:
            if not callable(getattr(type(owner), name, None)):
                raise ExportError(
                    f"{type(owner).__name__}.{name} no longer exists; the refiner's forward changed, so "
                    "modeling_stage2.export.export_friendly must be updated with it"
                )
    try:
        for owner, methods in patches.items():
            for name, method in methods.items():
                setattr(owner, name, method)
        yield model
    finally:
        for owner, methods in patches.items():
            for name in methods:
                owner.__dict__.pop(name, None)
        model.__dict__.pop("_export_crop", None)


# --------------------------------------------------------------------------------------------- exporting


def _example_inputs(config: Stage2RefinerConfig, batch: int, height: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    opt_v1 = torch.rand(batch, len(config.bands), height, width, generator=generator) * 0.4
    month = torch.arange(batch) % (config.num_months + 1)  # 0 is replaced by "unknown"
    month = torch.where(month == 0, torch.full_like(month, UNKNOWN_METADATA), month)
    biome = torch.arange(batch) % (config.num_biomes + 1) - 1
    return opt_v1, month, biome


def min_side(patch: int) -> int:
    """The smallest side (px) a graph takes along an axis with this patch: a grid of two patches after padding.

    15 px for the 14-px patch of the 600M and tiny backbones, 17 for the 16-px one of the 300M/100M. A one-patch grid
    (a side <= patch) is cut off by torch's own size-1 specialisation (conv output layout and contiguity checks), which
    no model code can avoid; the eager model handles such tiny images.
    """
    return int(patch) + 1


def side_limits(config: Stage2RefinerConfig) -> dict[str, list[int]]:
    """{"height": [min, max], "width": [min, max]} of the graph exported from a refiner with `config`."""
    patch_h, patch_w = config.patch_size
    return {"height": [min_side(patch_h), MAX_SIDE], "width": [min_side(patch_w), MAX_SIDE]}


def _dynamic_shapes(config: Stage2RefinerConfig, strict: bool = True) -> dict[str, dict[int, Any]]:
    if strict:  # named ranges: the export fails if any size would be fixed or restricted further
        limits = side_limits(config)
        dims = {"batch": torch.export.Dim("batch", min=1, max=MAX_BATCH),
                "height": torch.export.Dim("height", min=limits["height"][0], max=MAX_SIDE),
                "width": torch.export.Dim("width", min=limits["width"][0], max=MAX_SIDE)}
    else:  # torch decides; guards it cannot prove for every size stay as run-time checks of the .pt2
        dims = dict.fromkeys(("batch", "height", "width"), torch.export.Dim.DYNAMIC)
    return {name: {axis: dims[dim] for axis, dim in axes.items()} for name, axes in DYNAMIC_AXES.items()}


def trace(model: nn.Module) -> torch.export.ExportedProgram:
    """`torch.export.export` of `(opt_v1, month, biome) -> refined` (and `out_of_range_weight`,
    `graph_output_names`) with dynamic batch, height and width.

    float32 weights are traced with named size ranges (batch 1.., height and width `min_side(patch)`..), which
    makes the export fail rather than fix a size. float16 weights on the CPU bring guards from torch's own
    half-precision kernels that hold for every size but that the tracer cannot prove; they are traced with
    `Dim.DYNAMIC`.
    """
    example = _example_inputs(model.config, *_EXAMPLE_SHAPE)
    wrapper = _GraphSignature(model).eval()
    strict = model.dtype == torch.float32
    with export_friendly(model), torch.no_grad():
        shapes = _dynamic_shapes(model.config, strict)
        return torch.export.export(wrapper, example, dynamic_shapes=shapes, strict=False)


def _eager_outputs(model: nn.Module, opt_v1, month, biome) -> dict[str, torch.Tensor]:
    """The eager model's outputs that the graph has (`graph_output_names`)."""
    with torch.no_grad():
        output = model(opt_v1, month, biome, return_dict=True)
    return {name: output[name] for name in graph_output_names(model.config)}


def export_refiner(
    model_or_path: Any,
    output_dir: str | Path,
    *,
    format: str = "onnx",
    opset: int | None = None,
    dtype: str = "float32",
    check: bool = True,
    source_info: dict[str, Any] | None = None,
) -> ExportResult:
    """Export a trained refiner to `output_dir` (written atomically: it appears complete or not at all).

    The folder holds the graph (`model.onnx`, plus `model.onnx.data` when the weights exceed 1.5 GB: protobuf
    stops at 2 GB; or `model.pt2`), `config.json` (the refiner's config), `export.json` (the input/output contract) and
    `README.md` (a model-card section). With `check`, the graph is run on random tiles of two sizes (one of
    them not a multiple of the patch) and compared with the eager model; the largest difference is recorded, and one
    above `CHECK_TOLERANCE` raises `ExportCheckError` (nothing is written, an earlier export is kept).
    """
    start = time.perf_counter()
    _check_options(format, opset, dtype)
    output_dir = Path(output_dir)
    _refuse_foreign_folder(output_dir)
    model, info = merged_refiner(model_or_path)
    if source_info:
        info = {**info, **{key: value for key, value in source_info.items() if value is not None}}
    if model is model_or_path and model.dtype != DTYPES[dtype]:
        model = copy.deepcopy(model)  # the caller's model keeps its dtype (a bfloat16 one exported as float32 too)
    model = model.to(DTYPES[dtype])
    was_training = model.training
    model.eval()
    try:
        return _export_to_folder(model, output_dir, format, opset, dtype, check, info, start)
    finally:
        model.train(was_training)


def _export_to_folder(model, output_dir: Path, format, opset, dtype, check, info, start) -> ExportResult:
    program = trace(model)
    with staged_folder(output_dir) as staging:
        graph_file = staging / GRAPH_FILES[format]
        if format == "torch_export":
            torch.export.save(program, str(graph_file))
        else:
            _save_onnx(program, graph_file, opset or DEFAULT_OPSET, graph_output_names(model.config))
        difference = _check_against_eager(model, graph_file, format) if check else float("nan")
        if check and not difference <= CHECK_TOLERANCE[dtype]:
            raise ExportCheckError(
                f"{graph_file.name}: the exported graph differs from the eager model by {difference:.2e} on random "
                f"tiles (more than the {CHECK_TOLERANCE[dtype]:g} a {dtype} graph may); nothing was written"
            )
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = ""
        config.to_json_file(str(staging / "config.json"))
        export_info = describe(
            config, format=format, dtype=dtype, opset=(opset or DEFAULT_OPSET) if format == "onnx" else None,
            source=info, max_abs_difference=difference,
        )
        (staging / EXPORT_INFO_FILE).write_text(json.dumps(export_info, indent=2) + "\n")
        (staging / "README.md").write_text(model_card_section(export_info))
        size = sum(path.stat().st_size for path in staging.iterdir() if path.name.startswith("model."))
    return ExportResult(
        output_dir=output_dir,
        graph_file=output_dir / GRAPH_FILES[format],
        format=format,
        seconds=time.perf_counter() - start,
        size_bytes=size,
        max_abs_difference=difference,
    )


def _save_onnx(program: torch.export.ExportedProgram, path: Path, opset: int, output_names: Sequence[str]) -> None:
    onnx_program = torch.onnx.export(
        program,
        dynamo=True,
        input_names=list(INPUT_NAMES),
        output_names=list(output_names),
        opset_version=opset,
        optimize=True,
        verbose=False,
    )
    onnx_program.rename_axes(_axis_names(onnx_program.model.graph.inputs))
    onnx_program.save(str(path))


def _axis_names(graph_inputs) -> dict[str, str]:
    """{torch's symbol of a dynamic axis (`s22`, ...): its name in `DYNAMIC_AXES`}, for the ONNX graph's inputs and
    outputs (onnxruntime's `get_inputs()` and `get_outputs()` show the names)."""
    shapes = {value.name: value.shape for value in graph_inputs}
    names = {}
    for input_name, axes in DYNAMIC_AXES.items():
        for axis, name in axes.items():
            symbol = getattr(shapes[input_name][axis], "value", None)  # None for a fixed size
            if isinstance(symbol, str):
                names[symbol] = name
    return names


def _check_against_eager(model: nn.Module, graph_file: Path, format: str) -> float:
    from .onnx_runtime import ExportedRefiner

    exported = ExportedRefiner(graph_file, config=model.config, format=format)
    if exported.output_names != graph_output_names(model.config):
        raise ExportError(f"{graph_file.name}: the graph's outputs are {exported.output_names}, expected "
                          f"{graph_output_names(model.config)}")
    worst = 0.0
    for shape in _CHECK_SHAPES:
        inputs = _example_inputs(model.config, *shape, seed=1)
        actual = exported(*inputs)
        for name, expected in _eager_outputs(model, *inputs).items():
            got, expected = actual[name].float(), expected.float()
            both_nan = torch.isnan(got) & torch.isnan(expected)
            # NaN on one side only is the largest difference there is (`max` would skip it: nan > x is False)
            difference = torch.where(both_nan, 0.0, (got - expected).abs()).nan_to_num(nan=float("inf"))
            worst = max(worst, float(difference.max()))
    return worst


# ---------------------------------------------------------------------------------------- the contract


_OUTPUT_DESCRIPTIONS = {
    "refined": lambda bands: {
        "name": "refined",
        "dtype": "float32",
        "shape": ["batch", len(bands), "height", "width"],
        "dynamic_axes": {"0": "batch", "2": "height", "3": "width"},
        "bands": bands,
        "description": "refined surface reflectance, same size as opt_v1 (clamped at 0 when the refiner's "
                       "nonnegative_output is on, as training sets it; never at 1)",
    },
    OUT_OF_RANGE_WEIGHT: lambda bands: {
        "name": OUT_OF_RANGE_WEIGHT,
        "dtype": "float32",
        "shape": ["batch", 1, "height", "width"],
        "dynamic_axes": {"0": "batch", "2": "height", "3": "width"},
        "value_range": [0.0, 1.0],
        "description": (
            "each pixel's weight of opt_v1 in refined: 0 where the refiner worked, 1 where opt_v1 was kept: the "
            "pixel's spectrum lies so far outside the training spectra (out_of_range_fallback), or it is near-black "
            "(near_black_fallback)"
        ),
    },
}


def describe(
    config: Stage2RefinerConfig,
    *,
    format: str,
    dtype: str,
    opset: int | None,
    source: dict[str, Any] | None = None,
    max_abs_difference: float | None = None,
) -> dict[str, Any]:
    """The `export.json` of an exported refiner: what goes in, what comes out, how it was made."""
    patch_h, patch_w = config.patch_size
    bands = list(config.bands)
    limits = side_limits(config)
    (low_h, _), (low_w, _) = limits["height"], limits["width"]
    sides = f"{low_h}..{MAX_SIDE} px" if low_h == low_w else f"{low_h}.. and {low_w}..{MAX_SIDE} px"
    return {
        "export_format_version": EXPORT_FORMAT_VERSION,
        "format": format,
        "graph_file": GRAPH_FILES[format],
        "opset": opset,
        "weights_dtype": dtype,
        "torch_version": torch.__version__.split("+")[0],
        "inputs": [
            {
                "name": "opt_v1",
                "dtype": "float32",
                "shape": ["batch", len(bands), "height", "width"],
                "dynamic_axes": {"0": "batch", "2": "height", "3": "width"},
                "bands": bands,
                "value_range": [0.0, 1.0],
                "description": "Stage 1 image, surface reflectance (digital numbers x 1e-4), finite values only",
            },
            {
                "name": "month",
                "dtype": "int64",
                "shape": ["batch"],
                "dynamic_axes": {"0": "batch"},
                "value_range": [1, config.num_months],
                "unknown": UNKNOWN_METADATA,
                "description": f"acquisition month 1..{config.num_months}; {UNKNOWN_METADATA} = unknown",
            },
            {
                "name": "biome",
                "dtype": "int64",
                "shape": ["batch"],
                "dynamic_axes": {"0": "batch"},
                "value_range": [0, config.num_biomes - 1],
                "unknown": UNKNOWN_METADATA,
                "description": f"biome code 0..{config.num_biomes - 1} (IGBP-like); {UNKNOWN_METADATA} = unknown",
            },
        ],
        "outputs": [_OUTPUT_DESCRIPTIONS[name](bands) for name in graph_output_names(config)],
        "shape_limits": {"batch": [1, MAX_BATCH], **limits},
        "padding": {
            "inside_graph": True,
            "multiple_of": [patch_h, patch_w],
            "mode": config.padding_mode,
            "rule": (
                f"height and width ({sides}) are padded up to a multiple of the patch "
                f"({patch_h}x{patch_w}), split between both "
                f"sides (the smaller half first), with '{config.padding_mode}' padding ('replicate' when the image is "
                "smaller than the pad); the output is cropped back to the input size"
            ),
        },
        "validation_outside_graph": (
            "the graph does not check its input: the band count, finite values, month and biome ranges are checked "
            "by modeling_stage2.onnx_runtime.ExportedRefiner (callers of the raw graph must check them)"
        ),
        "spectral_correction": config.spectral_correction,
        "source": source or {},
        "max_abs_difference_vs_eager": max_abs_difference,
    }


def model_card_section(info: dict[str, Any]) -> str:
    """A README.md section for an exported refiner (also fit for a model card)."""
    inputs = {entry["name"]: entry for entry in info["inputs"]}
    outputs = {entry["name"]: entry for entry in info["outputs"]}
    source = info.get("source") or {}
    runtime = "ONNX Runtime" if info["format"] == "onnx" else "torch (torch.export.load)"
    merged = "LoRA adapters merged into the base weights" if source.get("adapters_merged") else "no adapters"
    trained_q = source.get("trained_quantization")
    quant_line = (
        f"- Trained on a {trained_q} base; the export uses the full-precision base with the adapters merged, so its "
        "outputs differ from the quantized model's by the base's quantization error.\n"
        if trained_q not in (None, "none") else ""
    )
    difference = info.get("max_abs_difference_vs_eager")
    check = (
        f"- Checked against the eager model after export: largest difference {difference:.2e} (reflectance).\n"
        if isinstance(difference, float) and difference == difference else ""
    )
    return (
        "## Exported Stage 2 refiner\n\n"
        f"`{info['graph_file']}` ({info['format']}"
        + (f", opset {info['opset']}" if info.get("opset") else "")
        + f", {info['weights_dtype']} weights, torch {info['torch_version']}) for {runtime}; "
        f"{merged}; spectral correction: {info['spectral_correction']}.\n\n"
        "| input / output | dtype | shape | values |\n| --- | --- | --- | --- |\n"
        f"| `opt_v1` | float32 | (batch, {len(inputs['opt_v1']['bands'])}, height, width) | reflectance 0..1, bands "
        f"{' '.join(inputs['opt_v1']['bands'])} |\n"
        f"| `month` | int64 | (batch,) | 1..{inputs['month']['value_range'][1]}, -1 unknown |\n"
        f"| `biome` | int64 | (batch,) | 0..{inputs['biome']['value_range'][1]}, -1 unknown |\n"
        "| `refined` | float32 | (batch, 4, height, width) | reflectance |\n"
        + ("| `out_of_range_weight` | float32 | (batch, 1, height, width) | weight of `opt_v1` in `refined`: 0 where "
           "the refiner worked, 1 where it kept `opt_v1` (outside its training spectra, or near-black) |\n"
           if OUT_OF_RANGE_WEIGHT in outputs else "")
        + "\n"
        f"- Padding inside the graph: {info['padding']['rule']}.\n"
        "- The graph does not validate its input: use `modeling_stage2.onnx_runtime.ExportedRefiner` (or "
        "`stage2-refine --model THIS_FOLDER`), which checks it first, or check band count, finite values and the "
        "month/biome ranges yourself.\n"
        f"{quant_line}{check}"
        "- Inference only: the graph cannot be trained further; keep the trained folder for that.\n\n"
        "```python\nfrom modeling_stage2.onnx_runtime import ExportedRefiner\n"
        "model = ExportedRefiner(\"THIS_FOLDER\")\nrefined = model(opt_v1, month, biome).refined\n```\n"
    )


# --------------------------------------------------------------------------------------------- helpers


EXPORT_FILES = {*GRAPH_FILES.values(), "model.onnx.data", "config.json", EXPORT_INFO_FILE, "README.md"}
"""What an export writes into its folder (`_export_to_folder`): the graph (and ONNX's external data), the config,
`export.json` and the card. A folder holding anything else is never replaced; `stage2-push` uploads these of an export
subfolder."""


def _refuse_foreign_folder(output_dir: Path, name: str = "output_dir") -> None:
    """Replace a folder only when it is empty or holds an earlier export and nothing else. `name`: the folder's in
    the messages (`export_refiner`'s argument; `stage2-export`'s `OUTPUT`)."""
    problem = output_path_problem(output_dir, folder=True)
    if problem is not None:
        raise ExportError(f"{name} {output_dir}: {problem}")
    if not output_dir.exists():
        return
    entries = sorted(path.name for path in output_dir.iterdir())
    if entries and not (output_dir / EXPORT_INFO_FILE).is_file():
        raise ExportError(
            f"{name} {output_dir}: holds other files (no {EXPORT_INFO_FILE}); choose a new or empty folder"
        )
    others = [name for name in entries if name not in EXPORT_FILES]
    if others:  # replacing the folder would delete them
        raise ExportError(
            f"{name} {output_dir}: holds an earlier export and other files ({', '.join(others[:5])}"
            f"{' ...' if len(others) > 5 else ''}); move them away or choose a new or empty folder"
        )


def _check_options(format: str, opset: int | None, dtype: str, named: Callable[[str], str] = str) -> None:
    """Refuse options the export cannot take, each named by `named(argument)`: `export_refiner`'s argument names, or
    `stage2-export`'s flags."""
    if format not in FORMATS:
        raise ExportError(f"{named('format')} must be one of {FORMATS}, got {format!r}")
    if dtype not in DTYPES:
        raise ExportError(f"{named('dtype')} must be one of {tuple(DTYPES)}, got {dtype!r}")
    if opset is not None and format != "onnx":
        raise ExportError(f"{named('opset')} applies to {named('format')} onnx only")
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"{named('opset')} must be {MIN_OPSET}..{MAX_OPSET} (what the dynamo exporter emits), got {opset}"
        )


def _check_model_argument(model: str) -> None:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"MODEL {model}: is a file; pass the trained folder (e.g. the run's best/)")
        if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise ExportError(
                f"MODEL {model}: has neither config.json (a full refiner) nor adapter_config.json (a trained adapter)"
            )
        if (path / EXPORT_INFO_FILE).is_file():
            raise ExportError(f"MODEL {model}: is already an exported model; pass the trained folder")
        return
    parts = model.split("/")
    if len(parts) != 2 or not all(parts) or model.startswith((".", "/", "~")):
        raise ExportError(f"MODEL {model}: no such folder, and not a Hub repo id (owner/name)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="stage2-export",
        description=(
            "Export a trained Stage 2 refiner (adapters merged into a full-precision base) to ONNX or torch.export, "
            "with dynamic batch, height and width, for inference without the training stack."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="trained folder (save_trained_model, e.g. the run's best/), "
                        "full refiner folder, or Hub repo id")
    parser.add_argument("output", metavar="OUTPUT", help="folder to write (model.onnx or model.pt2, config.json, "
                        "export.json, README.md); replaced atomically if it holds an earlier export")
    parser.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (default) or torch_export (.pt2)")
    parser.add_argument("--opset", type=int, default=None,
                        help=f"ONNX opset (default {DEFAULT_OPSET}; {MIN_OPSET}..{MAX_OPSET})")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="weights dtype (float16 is meant for GPU runtimes; inputs and outputs stay float32)")
    parser.add_argument("--no_check", action="store_true", help="skip the comparison with the eager model")
    return parser


@exit_on_termination
def main(argv: Sequence[str] | None = None) -> int:
    """`stage2-export`: 0 on success, 2 on bad input, 1 when the graph fails the check against the eager model or
    the Hub is out of reach (a Hub `MODEL`, or a trained adapter's base on the Hub, with nothing cached)."""
    args = build_parser().parse_args(argv)
    try:
        _check_model_argument(args.model)
        _check_options(args.format, args.opset, args.dtype, named=lambda argument: f"--{argument}")
        _refuse_foreign_folder(Path(args.output), "OUTPUT")
        try:
            model, info = merged_refiner(args.model)
        except hub_download_errors() as error:  # the model, or a trained adapter's base, from the Hub
            message = f"MODEL {args.model}: {download_failure(args.model)} ({hub_failure_line(error)})"
            if hub_failure_is_users(error):  # no such repo, revision or file, or no access: exit 2
                raise ExportError(message) from error
            raise HubUnavailableError(message) from error  # the Hub out of reach, nothing cached: exit 1
        except (OSError, ValueError) as error:  # missing or corrupt weights, a foreign config, no such Hub repo
            reason = " ".join(str(error).split())  # the Hub's errors span lines; the message is one
            reason = hub_snapshot_paths_named(reason, args.model)  # a Hub model's files by its repo id, not the cache
            raise ExportError(f"MODEL {args.model}: could not be loaded ({type(error).__name__}: {reason})") from error
        result = export_refiner(
            model, args.output, format=args.format, opset=args.opset, dtype=args.dtype, check=not args.no_check,
            source_info=info,
        )
    except ExportError as error:
        print(f"stage2-export: error: {error}", file=sys.stderr)
        return 2
    except (ExportCheckError, HubUnavailableError) as error:  # not the input's fault: exit 1
        print(f"stage2-export: error: {error}", file=sys.stderr)
        return 1
    check = (
        f"; largest difference to the eager model {result.max_abs_difference:.2e}"
        if result.max_abs_difference == result.max_abs_difference else ""
    )
    print(
        f"wrote {result.graph_file} ({result.size_bytes / 2**20:.1f} MiB, {result.format}) in "
        f"{result.seconds:.1f} s{check}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

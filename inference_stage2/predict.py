"""The one model call of every entry point: batches of reflectance in, refined reflectance (and where the refiner
kept `opt_v1`, for a model that says so) out."""
from __future__ import annotations

import functools
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from data_builders.tiles import fill_invalid_pixels
from modeling_stage2.bands import BAND_NAMES, UNKNOWN_METADATA, DigitalNumbersWarning
from modeling_stage2.vocabulary import OUT_OF_RANGE_WEIGHT

from .values import (
    DEFAULT_BATCH_SIZE, InferenceInputError, metadata_vector, check_biome, check_month, metadata_limits,
    resolve_input_scale, to_reflectance, warn_if_looks_like_dn,
)


def _first_parameter(model: Any) -> torch.Tensor | None:
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return None
    for parameter in parameters():
        if parameter.is_floating_point():
            return parameter
    return None


def _training_modes(model: Any) -> list[tuple[Any, bool]]:
    """(module, its `training` flag) for `model` and every submodule, so that `predict` can leave each as it was."""
    modules = getattr(model, "modules", None)
    return [(module, module.training) for module in modules()] if callable(modules) else []


def _prepare_model(model: Any, device: str | torch.device | None) -> torch.device:
    """Put `model` in eval mode (moved to `device` when given) and return the device its inputs go to.

    Inputs stay float32 whatever the model's dtype: the refiner casts them itself and adds its delta to
    the float32 input, so the output keeps full precision.
    """
    if hasattr(model, "eval"):
        model.eval()
    parameter = _first_parameter(model)
    if device is not None:
        device = torch.device(device)
        if parameter is not None and _same_device(parameter.device, device):
            return parameter.device  # "cuda" for a model on cuda:1: its inputs go to cuda:1, not the current cuda:0
        if parameter is not None and hasattr(model, "to"):
            model.to(device)
        return device
    return parameter.device if parameter is not None else torch.device("cpu")


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    """"cuda" matches "cuda:0" (quantized models refuse `.to()`, so never move one needlessly)."""
    return actual.type == wanted.type and (wanted.index is None or wanted.index == actual.index)


def _forward(
    model: Any, opt_v1: torch.Tensor, month: torch.Tensor, biome: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`model(opt_v1=..., month=..., biome=...)` -> (refined, out_of_range_weight or None).

    The refined tensor is a `.refined` output, a tuple's first element or a plain tensor, so that any callable with
    the model's signature works; the weight (B, H, W) is the output's `out_of_range_weight` where it has one (a
    refiner that keeps `opt_v1` somewhere, `config.keeps_opt_v1`).
    """
    with warnings.catch_warnings():
        # The band values were checked where they were read, with the file's name (`values.to_reflectance`).
        warnings.simplefilter("ignore", DigitalNumbersWarning)
        output = model(opt_v1=opt_v1, month=month, biome=biome)
    refined = getattr(output, "refined", None)
    if refined is None:
        refined = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(refined, torch.Tensor) or refined.shape != opt_v1.shape:
        raise RuntimeError(
            f"the model returned {type(refined).__name__} of shape {getattr(refined, 'shape', None)}; "
            f"expected refined images of the input's shape {tuple(opt_v1.shape)}"
        )
    weight = getattr(output, OUT_OF_RANGE_WEIGHT, None)
    return refined, None if weight is None else weight[:, 0]


def reports_out_of_range_weight(model: Any) -> bool:
    """Whether `model`'s output carries `out_of_range_weight`: a PyTorch refiner (or its PEFT wrapper) built with
    `out_of_range_fallback` or `near_black_fallback` (`config.keeps_opt_v1`), or an exported graph with that output
    (`ExportedRefiner.output_names`; one exported before the weight became an output has `refined` only, whatever
    its config)."""
    from modeling_stage2.onnx_runtime import ExportedRefiner

    if isinstance(model, ExportedRefiner):
        return model.reports_out_of_range_weight
    config = getattr(model, "config", None)
    return bool(getattr(config, "keeps_opt_v1", False))


@dataclass
class Prediction:
    """The model's outputs for a stack of images.

    Attributes:
        refined: float32 `(N, 4, H, W)` reflectance.
        out_of_range_weight: float32 `(N, H, W)`, each pixel's weight of `opt_v1` in `refined` (0 where the refiner
            worked, 1 where the pixel's spectrum lies so far outside the training spectra that `opt_v1` was kept);
            None when the model reports none (`reports_out_of_range_weight`).
    """

    refined: np.ndarray
    out_of_range_weight: np.ndarray | None = None


def predict(
    model: Any,
    reflectance: np.ndarray,
    months: np.ndarray,
    biomes: np.ndarray,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
) -> Prediction:
    """Run the model on finite float32 reflectance (N, 4, H, W) in batches -> its [`Prediction`].

    The model runs in eval mode; it (and each of its modules) is left in the mode it was in. Its input is finite
    everywhere (invalid pixels filled), so a NaN or Inf in its output is the model's: an `InferenceInputError` naming
    the model and the count (`non_finite_output_problem`), never an output of NaN or nodata.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise InferenceInputError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    batch_size = int(batch_size)
    modes = _training_modes(model)
    device = _prepare_model(model, device)
    refined = np.empty_like(reflectance, dtype=np.float32)
    weights = []
    try:
        with torch.inference_mode():
            for start in range(0, len(reflectance), batch_size):
                stop = start + batch_size
                opt_v1 = torch.from_numpy(np.ascontiguousarray(reflectance[start:stop])).to(device)
                month = torch.from_numpy(months[start:stop]).to(device)
                biome = torch.from_numpy(biomes[start:stop]).to(device)
                batch, weight = _forward(model, opt_v1, month, biome)
                refined[start:stop] = batch.float().cpu().numpy()
                weights.append(None if weight is None else weight.float().cpu().numpy())
    finally:
        for module, training in modes:
            module.training = training
    problem = non_finite_output_problem(model, refined, weights)
    if problem is not None:
        raise InferenceInputError(problem)
    if not weights:  # no image: the model never ran; the weight is there, empty, where the model reports one
        shape = (0, *reflectance.shape[2:])
        return Prediction(refined, np.empty(shape, np.float32) if reports_out_of_range_weight(model) else None)
    if all(weight is None for weight in weights):
        return Prediction(refined)
    if any(weight is None for weight in weights):
        raise RuntimeError("the model returned out_of_range_weight for some batches only")
    return Prediction(refined, np.concatenate(weights))


def model_name(model: Any) -> str:
    """How a message names `model`: the folder or file it was loaded from where it says so (a trained adapter's
    `stage2_folder`, an exported graph's `graph_file`, a full model's `name_or_path`), else its class."""
    for attribute in ("stage2_folder", "graph_file", "name_or_path"):
        where = getattr(model, attribute, None)
        if isinstance(where, (str, os.PathLike)) and str(where):
            return f"model {where}"
    return f"the model ({type(model).__name__})"


def non_finite_output_problem(model: Any, refined: np.ndarray,
                              weights: Sequence[np.ndarray | None] = ()) -> str | None:
    """Why the outputs of `model` for finite input cannot be used, or None: NaN or Inf values (weights that are, a
    training that diverged), which would be written as NaN, or as nodata in a scene. One `np.isfinite` pass."""
    outputs = [("refined", refined)] + [(OUT_OF_RANGE_WEIGHT, weight) for weight in weights if weight is not None]
    counts = [(name, values.size - int(np.count_nonzero(np.isfinite(values))), values.size)
              for name, values in outputs]
    bad = [f"{count} of {size} {name} values" for name, count, size in counts if count]
    if not bad:
        return None
    return (f"{model_name(model)} returned NaN/Inf for finite input ({', '.join(bad)}): its weights are not finite "
            "(a training that diverged?) or overflow; nothing is written from them")


def _as_numpy(values: Any) -> np.ndarray:
    """A numpy array of `values`; a torch tensor is detached and copied to the CPU (bfloat16, which numpy lacks, as
    float32)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        return (values.float() if values.dtype == torch.bfloat16 else values).numpy()
    return np.asarray(values)


def _metadata(values: Any) -> Any:
    """Month or biome as `metadata_vector` takes it: None is unknown for every image (as in the model), a tensor a
    numpy array."""
    if values is None:
        return UNKNOWN_METADATA
    return _as_numpy(values) if isinstance(values, torch.Tensor) else values


def refine_arrays(
    model: Any,
    opt_v1: np.ndarray,
    month: int | Sequence[int] | np.ndarray = UNKNOWN_METADATA,
    biome: int | Sequence[int] | np.ndarray = UNKNOWN_METADATA,
    *,
    input_scale: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    return_out_of_range_weight: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray | None]:
    """Refine numpy images with `model` and return float32 reflectance of the same shape.

    Args:
        model: a `Stage2RefinerModel` (or the PEFT model of [`load_trained_model`]); any callable
            `model(opt_v1=..., month=..., biome=...)` returning `.refined` or a tensor works. It runs in eval
            mode and is left in the mode it was in (eval or train), its parameters unchanged.
        opt_v1: `(4, H, W)` or `(B, 4, H, W)`, bands B02 B03 B04 B08; reflectance in 0..1 or digital
            numbers (reflectance x 10000); a numpy array (any strides) or a torch tensor on any device.
        month: 1..12 or -1 (unknown, the default, as is None); one value for all images or one per image.
        biome: 0..16 or -1 (unknown, the default, as is None); one value for all images or one per image.
        input_scale: `"auto"` (integer dtype = digital numbers, float = reflectance), `"reflectance"`
            or `"dn"`.
        batch_size: images per forward pass.
        device: where to run (the model is moved there); default: where the model is.
        return_out_of_range_weight: also return each pixel's weight of `opt_v1` in the output, float32 `(H, W)` or
            `(B, H, W)` (see [`Prediction`]), or None when the model reports none: `(refined, weight)`.

    Non-finite input pixels (any band) are filled for the model and are NaN in every band of the output (and in
    the weight).
    """
    array = _as_numpy(opt_v1)
    single = array.ndim == 3
    batch = array[None] if single else array
    if batch.ndim != 4 or batch.shape[1] != len(BAND_NAMES):
        raise InferenceInputError(
            f"opt_v1: expected shape (4, H, W) or (B, 4, H, W) with bands {BAND_NAMES}, got {array.shape}"
        )
    if 0 in batch.shape[2:]:  # the model would fail on it deep inside, or return nothing
        raise InferenceInputError(
            f"opt_v1: shape {array.shape} has an image side of 0 pixels; pass images of at least 1 x 1 pixel"
        )
    reflectance = to_reflectance(batch, input_scale, "opt_v1", warn=False)
    if resolve_input_scale(batch.dtype, input_scale, "opt_v1") == "reflectance":
        warn_if_looks_like_dn(reflectance, "opt_v1")  # from here, so that the warning names the caller's line
    num_months, num_biomes = metadata_limits(model)
    months = metadata_vector(_metadata(month), len(batch), functools.partial(check_month, num_months=num_months),
                             "month")
    biomes = metadata_vector(_metadata(biome), len(batch), functools.partial(check_biome, num_biomes=num_biomes),
                             "biome")
    valid = np.isfinite(reflectance).all(axis=1)
    prediction = predict(
        model, fill_invalid_pixels(reflectance, valid), months, biomes, batch_size=batch_size, device=device
    )
    refined, weight = prediction.refined, prediction.out_of_range_weight
    refined[np.broadcast_to(~valid[:, None], refined.shape)] = np.nan
    if weight is not None:
        weight[~valid] = np.nan
    if single:
        refined, weight = refined[0], None if weight is None else weight[0]
    return (refined, weight) if return_out_of_range_weight else refined

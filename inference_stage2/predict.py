"""The one model call of every entry point: batches of reflectance in, refined reflectance out."""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch

from modeling_stage2.bands import BAND_NAMES

from .values import (
    DEFAULT_BATCH_SIZE, InferenceInputError, metadata_vector, check_biome, check_month, fill_invalid_pixels,
    metadata_limits, to_reflectance,
)


def _first_parameter(model: Any) -> torch.Tensor | None:
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return None
    for parameter in parameters():
        if parameter.is_floating_point():
            return parameter
    return None


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
        if parameter is not None and not _same_device(parameter.device, device) and hasattr(model, "to"):
            model.to(device)
        return device
    return parameter.device if parameter is not None else torch.device("cpu")


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    """"cuda" matches "cuda:0" (quantized models refuse `.to()`, so never move one needlessly)."""
    return actual.type == wanted.type and (wanted.index is None or wanted.index == actual.index)


def _forward(model: Any, opt_v1: torch.Tensor, month: torch.Tensor, biome: torch.Tensor) -> torch.Tensor:
    """`model(opt_v1=..., month=..., biome=...)` -> refined tensor (a `.refined` output, a tuple's
    first element or a plain tensor, so that any callable with the model's signature works)."""
    output = model(opt_v1=opt_v1, month=month, biome=biome)
    refined = getattr(output, "refined", None)
    if refined is None:
        refined = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(refined, torch.Tensor) or refined.shape != opt_v1.shape:
        raise RuntimeError(
            f"the model returned {type(refined).__name__} of shape {getattr(refined, 'shape', None)}; "
            f"expected refined images of the input's shape {tuple(opt_v1.shape)}"
        )
    return refined


def predict_reflectance(
    model: Any,
    reflectance: np.ndarray,
    months: np.ndarray,
    biomes: np.ndarray,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Run the model on finite float32 reflectance (N, 4, H, W) in batches -> float32 (N, 4, H, W)."""
    if batch_size < 1:
        raise InferenceInputError(f"batch_size must be at least 1, got {batch_size}")
    device = _prepare_model(model, device)
    refined = np.empty_like(reflectance, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(reflectance), batch_size):
            stop = start + batch_size
            opt_v1 = torch.from_numpy(np.ascontiguousarray(reflectance[start:stop])).to(device)
            month = torch.from_numpy(months[start:stop]).to(device)
            biome = torch.from_numpy(biomes[start:stop]).to(device)
            refined[start:stop] = _forward(model, opt_v1, month, biome).float().cpu().numpy()
    return refined


def refine_arrays(
    model: Any,
    opt_v1: np.ndarray,
    month: int | Sequence[int] | np.ndarray,
    biome: int | Sequence[int] | np.ndarray,
    *,
    input_scale: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Refine numpy images with `model` and return float32 reflectance of the same shape.

    Args:
        model: a `Stage2RefinerModel` (or the PEFT model of [`load_trained_model`]); any callable
            `model(opt_v1=..., month=..., biome=...)` returning `.refined` or a tensor works. It is put in
            eval mode.
        opt_v1: `(4, H, W)` or `(B, 4, H, W)`, bands B02 B03 B04 B08; reflectance in 0..1 or digital
            numbers (reflectance x 10000).
        month: 1..12 or -1 (unknown); one value for all images or one per image.
        biome: 0..16 or -1 (unknown); one value for all images or one per image.
        input_scale: `"auto"` (integer dtype = digital numbers, float = reflectance), `"reflectance"`
            or `"dn"`.
        batch_size: images per forward pass.
        device: where to run (the model is moved there); default: where the model is.

    Non-finite input pixels (any band) are filled for the model and are NaN in every band of the output.
    """
    array = np.asarray(opt_v1)
    single = array.ndim == 3
    batch = array[None] if single else array
    if batch.ndim != 4 or batch.shape[1] != len(BAND_NAMES):
        raise InferenceInputError(
            f"opt_v1: expected shape (4, H, W) or (B, 4, H, W) with bands {BAND_NAMES}, got {array.shape}"
        )
    reflectance = to_reflectance(batch, input_scale, "opt_v1")
    num_months, num_biomes = metadata_limits(model)
    months = metadata_vector(month, len(batch), functools.partial(check_month, num_months=num_months), "month")
    biomes = metadata_vector(biome, len(batch), functools.partial(check_biome, num_biomes=num_biomes), "biome")
    valid = np.isfinite(reflectance).all(axis=1)
    refined = predict_reflectance(
        model, fill_invalid_pixels(reflectance, valid), months, biomes, batch_size=batch_size, device=device
    )
    refined[np.broadcast_to(~valid[:, None], refined.shape)] = np.nan
    return refined[0] if single else refined

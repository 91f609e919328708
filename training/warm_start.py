"""What a refiner fits on its training split before the optimiser starts.

- The shared spectral correction (`spectral_correction_init`): the least-squares colour fit (`"linear_fit"`), or by
  default that fit refined under the objective's terms against the target (`Stage2Loss.target_terms`: the spectral
  loss, and the reconstruction L1 when it has a weight) with the spectral MLP fitted on top (`"spectral_fit"`).
- With `out_of_range_fallback`: the range of the training spectra, beyond which the refiner keeps `opt_v1`.

`Stage2Trainer.train` runs both once, before its first step, unless it resumes (the checkpoint holds what was fitted),
so a trainer built in Python starts where `stage2-train` starts.
"""
from __future__ import annotations

import logging

from .linear_fit import (
    LinearColorFit,
    fit_spectral_correction,
    set_shared_spectral_correction,
    spectral_corrections,
    spectral_mlps,
)
from .spectral_range import fit_spectral_range_of_dataset, set_spectral_range, spectral_ranges

logger = logging.getLogger(__name__)

# The keys under which the training record (`training_config.json`, the model card) says what was fitted.
SPECTRAL_CORRECTION_RECORD = "spectral_correction_init"
SPECTRAL_RANGE_RECORD = "out_of_range_fallback"
FITTED_MODULE_RECORDS = (SPECTRAL_CORRECTION_RECORD, SPECTRAL_RANGE_RECORD)


def _resumes(training_args, resuming: bool | None) -> bool:
    if resuming is not None:
        return resuming
    from .trainer import resolve_resume_checkpoint

    return resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir,
                                     warn=False) is not None


def start_spectral_correction(model, train_split, training_args, redraw=None, resuming: bool | None = None
                              ) -> str | None:
    """Start the refiner's shared spectral correction as `spectral_correction_init` says; returns what it did
    ("spectral_fit of N tiles", "linear_fit of N tiles", "identity"), or None for a refiner without the branch or
    a resumed run. `resuming` defaults to whether `training_args.resume_from_checkpoint` names a checkpoint."""
    from .trainer import build_loss

    init = training_args.spectral_correction_init
    if not spectral_corrections(model):
        return None
    if _resumes(training_args, resuming):
        return None  # the checkpoint holds the correction reached so far
    if init == "identity":
        return "identity"
    if init == "spectral_fit":
        nonnegative = bool(getattr(model.config, "nonnegative_output", False))
        mlps = spectral_mlps(model)  # fitted with the correction: pixel-level, every training pixel teaches it
        fit = fit_spectral_correction(train_split, loss=build_loss(training_args).target_terms,
                                      nonnegative=nonnegative, seed=training_args.seed,
                                      spectral_mlp=mlps[0] if mlps else None, redraw=redraw)
    else:
        fit = LinearColorFit.from_dataset(train_split)
    set_shared_spectral_correction(model, fit)
    fitted_mlp = " and the spectral MLP fitted on top of it" if init == "spectral_fit" and spectral_mlps(model) else ""
    logger.info(f"The spectral correction starts at the {init} colour correction of {fit.tiles} training tiles "
                f"({fit.pixels:,} valid pixels){fitted_mlp}.")
    return f"{init} of {fit.tiles} training tiles"


def start_spectral_range(model, train_split, training_args, resuming: bool | None = None) -> str | None:
    """Fit the range of the training spectra of a refiner with `out_of_range_fallback` on the training split;
    returns what it did, or None for a refiner without it or a resumed run (the checkpoint has it)."""
    modules = spectral_ranges(model)
    if not modules:
        return None
    if _resumes(training_args, resuming):
        return None
    fit = fit_spectral_range_of_dataset(train_split, modules[0].log_offset, training_args.out_of_range_quantile)
    set_spectral_range(model, fit)
    logger.info(f"Outside the spectra of {fit.tiles} training tiles ({fit.pixels:,} valid pixels; Mahalanobis "
                f"distance of the log spectrum beyond {fit.threshold:.3f}, their {100 * fit.quantile:g}th "
                f"percentile) the refiner keeps opt_v1.")
    return f"{100 * fit.quantile:g}th percentile of {fit.tiles} training tiles"


def needs_training_split(model, training_args) -> bool:
    """Whether starting `model` reads the training split (a spectral correction not started at the identity, or a
    range of the training spectra)."""
    return bool(spectral_ranges(model)) or (
        bool(spectral_corrections(model)) and training_args.spectral_correction_init != "identity")


def start_fitted_modules(model, train_dataset, training_args, resuming: bool) -> dict[str, str | None]:
    """Both starts on `train_dataset` (a `training.data.TileDataset`, or a `datasets.Dataset` split with `opt_v1`,
    `target` and `valid_mask`), as the training record's entries."""
    from .data import TileDataset

    # Only a TileDataset's rows are its `.dataset`'s; a `torch.utils.data.Subset` holds a few rows of its `.dataset`,
    # and a fit of that whole dataset would read tiles that are not training tiles.
    split = train_dataset.dataset if isinstance(train_dataset, TileDataset) else train_dataset
    if not resuming and needs_training_split(model, training_args) and not hasattr(split, "column_names"):
        raise ValueError(
            f"The refiner starts from a fit of its training split (spectral_correction_init="
            f"{training_args.spectral_correction_init!r}, out_of_range_fallback), which needs the split's columns; "
            f"got a {type(train_dataset).__name__}. Pass train_dataset=training.data.TileDataset(split, transform) "
            "or a datasets.Dataset, or set spectral_correction_init='identity' and out_of_range_fallback=False."
        )
    return {
        SPECTRAL_CORRECTION_RECORD: start_spectral_correction(model, split, training_args,
                                                              redraw=getattr(train_dataset, "redraw", None),
                                                              resuming=resuming),
        SPECTRAL_RANGE_RECORD: start_spectral_range(model, split, training_args, resuming=resuming),
    }


__all__ = [
    "FITTED_MODULE_RECORDS",
    "needs_training_split",
    "start_fitted_modules",
    "start_spectral_correction",
    "start_spectral_range",
]

"""Data builders: NPZ tiles (+ sidecars, + Stage 1 outputs) -> Arrow `datasets.DatasetDict`."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "BAND_NAMES": "tiles",
    "TileError": "tiles",
    "read_tile": "tiles",
    "DegradationConfig": "degrade",
    "DEGRADATION_CHOICES": "degrade",
    "DEGRADATION_PRESETS": "degrade",
    "DegradationRedraw": "degrade",
    "resolve_degradation": "degrade",
    "mixture_choice": "degrade",
    "synthesize_opt_v1": "degrade",
    "build_dataset": "build",
    "make_train_transform": "augment",
    "make_eval_transform": "augment",
    "plot_sample": "inspect",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data_builders' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return __all__

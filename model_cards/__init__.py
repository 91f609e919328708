"""Model and dataset cards, and pushing trained adapters and datasets to the Hugging Face Hub."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_model_card": "cards",
    "write_model_card": "cards",
    "build_dataset_card": "cards",
    "push_trained_model": "push",
    "push_dataset": "push",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model_cards' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return __all__

"""Stage 2 refiner: the Prithvi-EO-2.0 encoder port and the refinement model.

Most names are imported lazily; the model modules themselves are imported here so that
`import modeling_stage2` registers `stage2_refiner` and `prithvi_eo_v2` with `AutoConfig` and
`AutoModel` (then `AutoModel.from_pretrained(folder)` works without `trust_remote_code`).
"""
from __future__ import annotations

import importlib

from . import _quiet

_quiet.drop_known_messages()  # before anything imports bitsandbytes


_EXPORTS = {
    "PrithviConfig": "configuration_prithvi",
    "PRITHVI_PRESETS": "configuration_prithvi",
    "PRETRAINED_BANDS": "configuration_prithvi",
    "PrithviEncoder": "modeling_prithvi",
    "PrithviPreTrainedModel": "modeling_prithvi",
    "PrithviEncoderOutput": "modeling_prithvi",
    "load_official_encoder": "convert_prithvi",
    "convert_official_checkpoint": "convert_prithvi",
    "load_prithvi_from_hub": "convert_prithvi",
    "Stage2RefinerConfig": "configuration_stage2",
    "UNKNOWN_METADATA": "configuration_stage2",
    "BAND_NAMES": "configuration_stage2",
    "Stage2RefinerModel": "modeling_stage2",
    "Stage2PreTrainedModel": "modeling_stage2",
    "Stage2RefinerOutput": "modeling_stage2",
    "build_trainable_model": "adapters",
    "save_trained_model": "adapters",
    "load_trained_model": "adapters",
    "export_merged_model": "adapters",
}

__all__ = sorted(_EXPORTS)


from . import modeling_prithvi as _modeling_prithvi  # noqa: E402,F401  (Auto-class registration)
from . import modeling_stage2 as _modeling_stage2  # noqa: E402,F401


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'modeling_stage2' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    return getattr(module, name)


def __dir__():
    return __all__

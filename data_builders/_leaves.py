"""Leaf modules of `modeling_stage2` (standard library imports only: `bands`, `_files`, `vocabulary`, `_signals`)
for the data builders.

They are loaded from their file, without running `modeling_stage2/__init__.py`, which imports torch and transformers
to register the Auto classes (about 4 s more for every data command and build worker). The module is registered
under its own name, so a later `import modeling_stage2` uses the same module object.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PACKAGE = "modeling_stage2"


def model_leaf(name: str) -> ModuleType:
    """`modeling_stage2.<name>`, imported without the package's `__init__`."""
    full_name = f"{_PACKAGE}.{name}"
    if full_name in sys.modules:
        return sys.modules[full_name]
    package = importlib.util.find_spec(_PACKAGE)  # locates the package without importing it
    location = Path(next(iter(package.submodule_search_locations))) / f"{name}.py"
    spec = importlib.util.spec_from_file_location(full_name, location)
    module = importlib.util.module_from_spec(spec)
    sys.modules[full_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[full_name]
        raise
    return module

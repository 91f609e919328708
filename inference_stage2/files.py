"""Output files that appear only when complete (a temporary name beside them, then a rename)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from modeling_stage2._files import atomic_file, partial_path, write_json

__all__ = ["partial_path", "remove_quietly", "save_json_atomic", "save_npz_atomic"]


def remove_quietly(path: Path) -> None:
    for candidate in (path, path.with_name(path.name + ".aux.xml")):
        try:
            candidate.unlink()
        except FileNotFoundError:
            pass


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez` to a temporary file beside `path`, renamed into place only when complete."""
    with atomic_file(path) as partial:
        with open(partial, "wb") as handle:
            np.savez(handle, **arrays)


def save_json_atomic(path: Path, payload: Any) -> None:
    write_json(path, payload)

"""Output files that appear only when complete (a temporary name beside them, then a rename)."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np


def partial_path(target: Path) -> Path:
    """A temporary name beside `target`, so that the final rename stays on one file system."""
    return target.with_name(f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}{target.suffix}")


def remove_quietly(path: Path) -> None:
    for candidate in (path, path.with_name(path.name + ".aux.xml")):
        try:
            candidate.unlink()
        except FileNotFoundError:
            pass


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez` to a temporary file beside `path`, renamed into place only when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        with open(partial, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(partial, path)
    except BaseException:
        remove_quietly(partial)
        raise


def save_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        partial.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(partial, path)
    except BaseException:
        remove_quietly(partial)
        raise

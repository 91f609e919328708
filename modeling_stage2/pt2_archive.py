"""What a `.pt2` file must hold before `torch.export.load` reads it: tensors and JSON, nothing that unpickles.

`torch.export.load` (torch 2.13) runs `torch.load(..., weights_only=False)` on parts of an archive: weights and
constants marked `use_pickle`, the legacy `.pt` weight and constant files, custom and opaque objects, the archive
layout of torch 2.7, and the sample inputs when `weights_only=True` fails on them. Any of these runs code a file
chooses. `stage2-export` writes none of them (plain tensors only; its sample inputs load with `weights_only=True`),
so a graph file is accepted only when every entry is one this package reads without unpickling anything:

    check_pt2_archive("runs/x/pt2/model.pt2")   # ValueError naming the file and the entry, before any load
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import torch

__all__ = ["check_pt2_archive"]

_PLAIN_FILES = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_EXPORT_AGAIN = "export the refiner again with stage2-export"


def check_pt2_archive(path: str | Path) -> None:
    """Raises `ValueError` (one line naming `path` and the entry) unless `path` is a torch.export archive whose loading
    unpickles nothing beyond what `torch.load(weights_only=True)` allows."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            _check_entries(path, archive)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path}: not a torch.export archive ({error}); {_EXPORT_AGAIN}.") from None


def _check_entries(path: Path, archive: zipfile.ZipFile) -> None:
    from torch.export.pt2_archive.constants import (
        ARCHIVE_FORMAT_PATH, ARCHIVE_FORMAT_VALUE, CONSTANTS_DIR, EXTRA_DIR, MODELS_DIR, SAMPLE_INPUTS_DIR,
        TENSOR_CONSTANT_FILENAME_PREFIX, WEIGHT_FILENAME_PREFIX, WEIGHTS_DIR,
    )

    names = archive.namelist()
    roots = {name[: -len(ARCHIVE_FORMAT_PATH)] for name in names if name.endswith(f"/{ARCHIVE_FORMAT_PATH}")}
    if len(roots) != 1 or archive.read(f"{next(iter(roots))}{ARCHIVE_FORMAT_PATH}").decode(errors="replace").strip() \
            != ARCHIVE_FORMAT_VALUE:
        raise ValueError(f"{path}: not a torch.export archive of the current layout (no single "
                         f"'{ARCHIVE_FORMAT_PATH}' saying {ARCHIVE_FORMAT_VALUE}); {_EXPORT_AGAIN}.")
    root = roots.pop()
    prefixes = {WEIGHTS_DIR: WEIGHT_FILENAME_PREFIX, CONSTANTS_DIR: TENSOR_CONSTANT_FILENAME_PREFIX}
    for name in names:
        inner = name[len(root):] if name.startswith(root) else None
        if inner is None:
            problem = "lies outside the archive's folder"
        elif inner in _PLAIN_FILES or inner.endswith("/") or inner.startswith((MODELS_DIR, EXTRA_DIR)):
            continue  # JSON graphs and text
        elif inner.startswith(SAMPLE_INPUTS_DIR):
            problem = _sample_inputs_problem(archive.read(name))
        elif inner.startswith(tuple(prefixes)):
            directory = next(folder for folder in prefixes if inner.startswith(folder))
            problem = _payload_problem(inner[len(directory):], archive.read(name), prefixes[directory])
        else:
            problem = "is not part of an archive torch.export.save writes for a plain model"
        if problem is not None:
            raise ValueError(f"{path}: entry {name!r} {problem}; refusing to load it (it could run code); "
                             f"{_EXPORT_AGAIN}.")


def _is_tensor_file(file_name: str, tensor_prefix: str) -> bool:
    """`weight_N` / `tensor_N` exactly, as torch.export.save names raw tensor files. A prefix alone is not enough: a
    model named `weight_9` makes torch read `weight_9.pt` as the legacy pickled weights of that model."""
    return re.fullmatch(re.escape(tensor_prefix) + r"[0-9]+", file_name) is not None


def _payload_problem(file_name: str, data: bytes, tensor_prefix: str) -> str | None:
    """A weight or constant file: raw tensor bytes (`weight_N`, `tensor_N`), or the JSON config that lists them, with
    no entry to unpickle."""
    if _is_tensor_file(file_name, tensor_prefix):
        return None
    if not file_name.endswith(".json"):
        return "is neither raw tensor data nor a JSON config (a legacy pickled file, or an object to unpickle)"
    try:
        config = json.loads(data).get("config", {})
        entries = list(config.items())
    except (ValueError, AttributeError):
        return "is not a JSON payload config"
    for fqn, entry in entries:
        if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
            return f"stores {fqn!r} pickled"
        if not _is_tensor_file(str(entry.get("path_name", "")), tensor_prefix):
            return f"stores {fqn!r} as an object to unpickle ({entry.get('path_name')!r})"
    return None


def _sample_inputs_problem(data: bytes) -> str | None:
    """torch reads the sample inputs with `weights_only=True` and, when that fails, with `weights_only=False`: they
    must load the first way, so that the second never runs."""
    if not data:
        return None
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as error:  # any failure sends torch to the unsafe load
        return f"holds sample inputs that do not load with weights_only=True ({type(error).__name__})"
    return None

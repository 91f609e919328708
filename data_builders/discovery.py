"""Tile discovery: which NPZ tiles of a data folder go into which split, before any pixel is read.

`discover_tiles(data_dir)` reads only the sidecars (`<tile_id>.json`, whose `split` wins over the
folder) and places each tile of `data_dir/{train,val,test}` (a `validation` folder counts as `val`)
in its split, sorted by tile id; a tile id found in two places is rejected everywhere (it would leak
between splits). Hidden files and folders (`_files.is_hidden`: the partial file an interrupted ingest leaves)
are no tiles. A tile in a folder nested in a split folder (`train/2019/x.npz`) is not read either, but rejected
by name: the build reads the split folders only, and would otherwise leave it out without a word. So is a tile
directly in `data_dir` (`data_dir/x.npz`, whatever its sidecar's split says); `data_dir`'s other folders are not
searched (a Stage 1 folder, runs, caches).
`_list_s1` reads the zip directories of the tiles to tell which carry Sentinel-1.
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ._leaves import model_leaf
from .tiles import (
    SPLIT_ALIASES,
    SPLITS,
    TileError,
    npz_keys,
    read_sidecar,
    S1_KEYS,
    sidecar_path,
    sidecar_split,
)

_files = model_leaf("_files")  # `is_hidden`, the one rule of which names are never read

NESTED_TILE_PROBLEM = ("in a folder nested in the split folder {split_folder}/, which the build does not read: tiles "
                       "go directly in {folder}/ (move it up)")
"""Why an NPZ in a folder under a split folder (`train/2019/x.npz`) is rejected (`discover_tiles`)."""

ROOT_TILE_PROBLEM = ("directly in the data folder {data_dir}/, which the build does not read: tiles go in "
                     "{data_dir}/train/, {data_dir}/val/ or {data_dir}/test/ (a sidecar's split picks the split among "
                     "those only)")
"""Why an NPZ directly in the data folder (`DATA_DIR/x.npz`) is rejected (`discover_tiles`)."""


@dataclass
class TileSpec:
    """A tile found on disk, before its pixels are read."""

    path: str
    tile_id: str
    split: str
    sidecar: dict = field(default_factory=dict)
    has_s1: Optional[bool] = None  # None: the archive could not be listed (read_tile will say why)


def split_folder_problem(data_dir: str | os.PathLike, flag: str = "--data_dir") -> Optional[str]:
    """Why `data_dir` is no data folder when it is itself a split folder (`train/`, `val/`, `validation/` ..., `.`
    inside one): one line naming the folder above it, which holds the split folders the commands read. None where
    `data_dir` is not named as a split."""
    given = os.path.normpath(data_dir)
    if os.path.basename(os.path.abspath(given)).lower() not in SPLIT_ALIASES:
        return None
    above = f"{os.path.dirname(given) or os.path.relpath(os.path.dirname(os.path.abspath(given)))}{os.sep}"
    return (f"{flag} {data_dir}: a split folder; give the folder above it ({above}), which holds "
            f"{', '.join(f'{split}/' for split in SPLITS[:-1])} and {SPLITS[-1]}/")


def _split_folders(data_dir: Path) -> list[tuple[str, Path]]:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data_dir {data_dir} does not exist or is not a folder")
    folders = [
        (SPLIT_ALIASES[child.name.lower()], child)
        for child in sorted(data_dir.iterdir())
        if child.is_dir() and child.name.lower() in SPLIT_ALIASES
    ]
    if not folders:
        raise FileNotFoundError(split_folder_problem(data_dir) or (
            f"{data_dir} has no split folder: expected {data_dir}/train, {data_dir}/val and/or "
            f"{data_dir}/test holding <tile_id>.npz tiles"))
    return folders


def _nested_tiles(folder: Path, seen: set[Path]) -> list[Path]:
    """The NPZ files in the folders under the split folder `folder`, at any depth (not hidden, nor in a hidden folder),
    through linked folders as the split folders are read. A folder whose real path is in `seen` (the split folders,
    those searched already) is not searched again: a link loop ends, and a link to a split folder leaves its tiles to
    its split."""
    paths = []
    for parent, subfolders, files in os.walk(folder, followlinks=True):
        if Path(parent) != folder:
            paths.extend(Path(parent) / name for name in files if name.endswith(".npz") and not _files.is_hidden(name))
        kept = []
        for name in sorted(subfolders):
            real = Path(parent, name).resolve()
            if not _files.is_hidden(name) and real not in seen:
                seen.add(real)
                kept.append(name)
        subfolders[:] = kept
    return sorted(paths)


def _root_tiles(data_dir: Path, stage1_dir: str | Path | None) -> list[Path]:
    """The NPZ files directly in `data_dir` (not hidden, no folder), none where `data_dir` is the Stage 1 folder."""
    if stage1_dir is not None and Path(stage1_dir).resolve() == data_dir.resolve():
        return []
    return sorted(path for path in data_dir.glob("*.npz") if not _files.is_hidden(path) and not path.is_dir())


def _sidecar_split_or_none(path: Path) -> Optional[str]:
    """The split the sidecar of the tile `path` names; None without one, or where the sidecar cannot be read."""
    try:
        return sidecar_split(sidecar_path(path), read_sidecar(sidecar_path(path)))
    except TileError:
        return None


def discover_tiles(data_dir: str | Path, strict: bool = False,
                   stage1_dir: str | Path | None = None) -> tuple[dict[str, list[TileSpec]], list[dict]]:
    """Find the tiles of each split and the tiles rejected before reading pixels.

    `stage1_dir`: the build's Stage 1 folder, whose files are not tiles wherever it lies (inside a split folder too).

    Returns `({split: [TileSpec sorted by tile id]}, [rejection records])`.
    Raises `TileError` at the first problem when `strict`.
    """
    rejected: list[dict] = []

    def reject(error: TileError, split: Optional[str]) -> None:
        if strict:
            raise error
        rejected.append({**error.to_record(), "split": split})

    found: dict[str, list[TileSpec]] = collections.defaultdict(list)
    data_dir = Path(data_dir)
    split_folders = _split_folders(data_dir)
    for folder_split, folder in split_folders:
        for path in sorted(folder.glob("*.npz")):
            if _files.is_hidden(path):  # an interrupted write's partial file (`.x.npz.partial-*.npz`), `._x.npz`
                continue
            try:
                sidecar = read_sidecar(sidecar_path(path))
                split = sidecar_split(sidecar_path(path), sidecar) or folder_split
            except TileError as error:
                reject(error, folder_split)
                continue
            sidecar = {k: v for k, v in sidecar.items() if k != "split"}
            found[path.stem].append(TileSpec(str(path), path.stem, split, sidecar))
    searched = {folder.resolve() for _, folder in split_folders}
    if stage1_dir is not None:
        searched.add(Path(stage1_dir).resolve())
    for folder_split, folder in split_folders:
        for path in _nested_tiles(folder, searched):
            reject(TileError(path, None, NESTED_TILE_PROBLEM.format(split_folder=folder.name, folder=folder)),
                   folder_split)
    for path in _root_tiles(data_dir, stage1_dir):  # in no split folder: the split its sidecar names, if any
        reject(TileError(path, None, ROOT_TILE_PROBLEM.format(data_dir=data_dir)), _sidecar_split_or_none(path))

    splits: dict[str, list[TileSpec]] = {split: [] for split in SPLITS}
    for tile_id in sorted(found):
        copies = found[tile_id]
        if len(copies) > 1:  # the same tile twice would leak between splits: keep none of them
            places = ", ".join(f"{c.path} ({c.split})" for c in copies)
            for copy in copies:
                reject(TileError(copy.path, None, f"tile id {tile_id!r} appears more than once: {places}; "
                                                  "a tile may be in one split only"), copy.split)
            continue
        splits[copies[0].split].append(copies[0])
    return {split: specs for split, specs in splits.items() if specs}, rejected


def _list_s1(specs: Sequence[TileSpec]) -> None:
    for spec in specs:
        keys = npz_keys(spec.path)
        spec.has_s1 = None if keys is None else all(key in keys for key in S1_KEYS)

"""Tile discovery: which NPZ tiles of a data folder go into which split, before any pixel is read.

`discover_tiles(data_dir)` reads only the sidecars (`<tile_id>.json`, whose `split` wins over the
folder) and places each tile of `data_dir/{train,val,test}` (a `validation` folder counts as `val`)
in its split, sorted by tile id; a tile id found in two places is rejected everywhere (it would leak
between splits). Hidden files (`.name.npz`: the partial file an interrupted ingest leaves) are no tiles.
`_list_s1` reads the zip directories of the tiles to tell which carry Sentinel-1.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

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


@dataclass
class TileSpec:
    """A tile found on disk, before its pixels are read."""

    path: str
    tile_id: str
    split: str
    sidecar: dict = field(default_factory=dict)
    has_s1: Optional[bool] = None  # None: the archive could not be listed (read_tile will say why)


def _split_folders(data_dir: Path) -> list[tuple[str, Path]]:
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data_dir {data_dir} does not exist or is not a folder")
    folders = [
        (SPLIT_ALIASES[child.name.lower()], child)
        for child in sorted(data_dir.iterdir())
        if child.is_dir() and child.name.lower() in SPLIT_ALIASES
    ]
    if not folders:
        raise FileNotFoundError(
            f"{data_dir} has no split folder: expected {data_dir}/train, {data_dir}/val and/or "
            f"{data_dir}/test holding <tile_id>.npz tiles"
        )
    return folders


def discover_tiles(data_dir: str | Path, strict: bool = False) -> tuple[dict[str, list[TileSpec]], list[dict]]:
    """Find the tiles of each split and the tiles rejected before reading pixels.

    Returns `({split: [TileSpec sorted by tile id]}, [rejection records])`.
    Raises `TileError` at the first problem when `strict`.
    """
    rejected: list[dict] = []

    def reject(error: TileError, split: Optional[str]) -> None:
        if strict:
            raise error
        rejected.append({**error.to_record(), "split": split})

    found: dict[str, list[TileSpec]] = collections.defaultdict(list)
    for folder_split, folder in _split_folders(Path(data_dir)):
        for path in sorted(folder.glob("*.npz")):
            if path.name.startswith("."):  # hidden: an interrupted write's partial file (`.x.npz.partial-*.npz`)
                continue
            try:
                sidecar = read_sidecar(sidecar_path(path))
                split = sidecar_split(sidecar_path(path), sidecar) or folder_split
            except TileError as error:
                reject(error, folder_split)
                continue
            sidecar = {k: v for k, v in sidecar.items() if k != "split"}
            found[path.stem].append(TileSpec(str(path), path.stem, split, sidecar))

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

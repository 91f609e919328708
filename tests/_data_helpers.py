"""Helpers of the data-builder tests: small synthetic tiles written in the Stage 2 layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from data_builders.tiles import BAND_KEYS, TILE_SIZE


def tile_arrays(seed: int = 0, size: int = TILE_SIZE, s1: bool = True, month: int = 6, biome: int = 12) -> dict:
    """Arrays of a plausible tile: uint16 digital numbers, float32 Sentinel-1, scalars."""
    rng = np.random.default_rng(seed)
    arrays = {key: rng.integers(100, 4000, size=(size, size), dtype=np.uint16) for key in BAND_KEYS}
    if s1:
        arrays["s1_vv"] = rng.normal(-10, 3, size=(size, size)).astype(np.float32)
        arrays["s1_vh"] = rng.normal(-17, 3, size=(size, size)).astype(np.float32)
    arrays["month"] = np.int64(month)
    arrays["biome_code"] = np.int64(biome)
    return arrays


def write_tile(folder: Path, tile_id: str, arrays: Optional[dict] = None, sidecar: Optional[dict] = None,
               **tile_kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{tile_id}.npz"
    np.savez_compressed(path, **(arrays if arrays is not None else tile_arrays(**tile_kwargs)))
    if sidecar is not None:
        (folder / f"{tile_id}.json").write_text(json.dumps(sidecar))
    return path


def make_tile_dir(root: Path, per_split: int = 2, s1: bool = True) -> Path:
    """`root/{train,val,test}/<split>_<i>.npz`, `per_split` tiles each, all valid."""
    for split_index, split in enumerate(("train", "val", "test")):
        for i in range(per_split):
            write_tile(root / split, f"{split}_{i}", seed=10 * split_index + i, s1=s1,
                       sidecar={"source": "synthetic", "index": i})
    return root


def copy_sample_subset(sample_tiles_dir: Path, root: Path, per_split: int) -> Path:
    """The first `per_split` real tiles (with sidecars) of each split of the bundled sample."""
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for npz in sorted((sample_tiles_dir / split).glob("*.npz"))[:per_split]:
            shutil.copy(npz, root / split / npz.name)
            shutil.copy(npz.with_suffix(".json"), root / split / npz.with_suffix(".json").name)
    return root


def folder_digest(path: Path) -> dict:
    """{relative file: bytes} of a folder (to prove a dataset was left untouched)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}

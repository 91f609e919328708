"""Refining NPZ tiles: which tiles a folder holds (linked split folders) and which Stage 1 file each one reads."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from _data_helpers import tile_arrays, write_tile
from data_builders.tiles import BAND_KEYS
from inference_stage2 import InferenceInputError, refine_tiles


class GainRefiner(torch.nn.Module):
    """refined = 1.1 * opt_v1: per pixel and known exactly."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(1.1))

    def forward(self, opt_v1, month, biome):
        return opt_v1 * self.gain


def test_a_linked_split_folder_is_refined_as_the_data_builders_read_it(tmp_path):
    tiles, elsewhere = tmp_path / "tiles", tmp_path / "elsewhere"
    write_tile(tiles / "val", "v0", s1=False)
    write_tile(elsewhere / "train", "t0", seed=1, s1=False)
    os.symlink(elsewhere / "train", tiles / "train")  # a split folder kept on another disk
    os.symlink(tiles, tiles / "val" / "loop")  # a link loop is walked once
    summary = refine_tiles(GainRefiner(), tiles, tmp_path / "out", progress=False)
    assert summary.written == ["train/t0.npz", "val/v0.npz"] and summary.rejected == []
    assert (tmp_path / "out" / "train" / "t0.npz").is_file()


def test_tiles_of_one_name_in_two_subfolders_do_not_share_a_stage1_file(tmp_path):
    tiles, stage1 = tmp_path / "tiles", tmp_path / "stage1"
    for split, seed in (("train", 0), ("val", 1)):
        with np.load(write_tile(tiles / split, "a", seed=seed, s1=False)) as tile:
            bands = np.stack([tile[key] for key in BAND_KEYS]).astype(np.float32) * np.float32(1e-4)
    stage1.mkdir()
    np.savez(stage1 / "a.npz", opt_v1=bands)  # one flat STAGE1_DIR/a.npz: the opt_v1 of at most one of them
    with pytest.raises(InferenceInputError, match="would both take their opt_v1 from"):
        refine_tiles(GainRefiner(), tiles, tmp_path / "out", stage1_dir=stage1, progress=False)
    assert not (tmp_path / "out").exists()
    for split in ("train", "val"):  # split subfolders tell them apart
        (stage1 / split).mkdir()
        np.savez(stage1 / split / "a.npz", opt_v1=bands)
    summary = refine_tiles(GainRefiner(), tiles, tmp_path / "out", stage1_dir=stage1, progress=False)
    assert summary.written == ["train/a.npz", "val/a.npz"] and summary.rejected == []
    assert Path(tmp_path / "out" / "metrics.json").is_file()


def test_half_written_tiles_of_a_killed_run_are_removed_by_the_next_run(tmp_path):
    """A run killed by SIGKILL leaves its hidden partial tiles in every output folder it was writing; nothing removed
    them. The next run into that folder removes those whose process is gone (one listing per output folder), and
    keeps a live process's, a link, and files that only look alike."""
    import subprocess

    tiles, out = tmp_path / "tiles", tmp_path / "out"
    write_tile(tiles / "train", "t0", s1=False)
    write_tile(tiles / "val", "v0", seed=1, s1=False)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no process has now
    live = os.getppid()
    (out / "train").mkdir(parents=True)
    (out / "val").mkdir()
    left = [out / "train" / f".t0.npz.partial-{gone.pid}-0123abcd.npz",
            out / "train" / f".older.npz.partial-{gone.pid}-89abcdef.npz",  # a tile this run does not write
            out / f".metrics.json.partial-{gone.pid}-0a1b2c3d.json"]
    kept = [out / "val" / f".v0.npz.partial-{live}-0123abcd.npz", out / "val" / f"v0.npz.partial-{gone.pid}-01.npz",
            out / "val" / ".notes.partial-x-01.txt"]
    for path in (*left, *kept):
        path.write_bytes(b"half a tile")
    linked = out / "val" / f".link.npz.partial-{gone.pid}-01.npz"
    linked.symlink_to(tiles / "val" / "v0.npz")
    summary = refine_tiles(GainRefiner(), tiles, out, progress=False)
    assert summary.written == ["train/t0.npz", "val/v0.npz"]
    assert not any(os.path.lexists(path) for path in left)
    assert all(path.is_file() for path in kept) and linked.is_symlink() and (tiles / "val" / "v0.npz").is_file()
    assert sorted(p.name for p in (out / "train").iterdir()) == ["t0.npz"]


def test_a_tile_s_invalid_pixels_stay_unrefined_and_count_in_no_metric(tmp_path):
    """A float tile with NaN in one band over a block: those pixels come out NaN in every band (identity), and
    the per-tile and pooled metrics of a Stage 1 run leave them out, as training's metrics with that mask do."""
    from training.metrics import METRIC_NAMES, evaluate_pair, per_tile_metrics

    tiles, stage1 = tmp_path / "tiles", tmp_path / "stage1"
    arrays = tile_arrays(seed=3, s1=False)
    target = np.stack([arrays[key] for key in BAND_KEYS]).astype(np.float32) * np.float32(1e-4)
    invalid = np.zeros((120, 120), bool)
    invalid[10:30, 40:70] = True
    target[2, invalid] = np.nan  # one band: the pixel is invalid in all four
    write_tile(tiles, "t", arrays={**arrays, **dict(zip(BAND_KEYS, target))})
    identity = refine_tiles(GainRefiner(), tiles, tmp_path / "identity", progress=False)
    assert identity.written == ["t.npz"]
    with np.load(tmp_path / "identity" / "t.npz") as out:
        refined = out["refined"]
    assert np.isnan(refined[:, invalid]).all()
    np.testing.assert_allclose(refined[:, ~invalid], 1.1 * target[:, ~invalid], rtol=1e-6)
    stage1.mkdir()
    opt_v1 = np.where(np.isnan(target), 0.3, target * 0.9).astype(np.float32)  # finite: only the target is invalid
    np.savez(stage1 / "t.npz", opt_v1=opt_v1)
    summary = refine_tiles(GainRefiner(), tiles, tmp_path / "out", stage1_dir=stage1, progress=False)
    with np.load(tmp_path / "out" / "t.npz") as out:
        stored = {name: float(out[f"metrics_refined_{name}"]) for name in METRIC_NAMES}
        refined = out["refined"]
    args = [torch.from_numpy(a)[None] for a in (refined, np.nan_to_num(target), opt_v1)]
    valid = torch.from_numpy(~invalid)[None]
    own = per_tile_metrics(*args, valid)
    pooled = evaluate_pair(*args, valid)
    for name in METRIC_NAMES:
        assert stored[name] == pytest.approx(float(own[name][0]), rel=1e-6), name
        assert summary.metrics["refined"][name] == pytest.approx(pooled["refined"][name], rel=1e-6), name
    # The block counted (target 0 there) would move the PSNR by far more than the tolerance above.
    counted = per_tile_metrics(*args, torch.ones_like(valid))
    assert abs(float(counted["psnr"][0]) - stored["psnr"]) > 0.01 * abs(stored["psnr"])

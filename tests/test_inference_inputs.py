"""Inputs and outputs of `stage2-refine` that must not meet: Stage 1 files, band files given twice, outputs that are one
file, and an input folder inside the output folder (which is no collision at all)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from data_builders.tiles import BAND_KEYS  # noqa: E402
from inference_stage2 import InferenceInputError, main, refine_tiles  # noqa: E402
from test_inference import (  # noqa: E402, F401 (few_tiles is a fixture)
    PixelwiseRefiner, few_tiles, files_in, load_npz, smooth_scene, write_geotiff,
)


def _stage1_files(tiles, stage1_dir):
    """A Stage 1 output (`opt_v1` = the tile's own bands) for every tile, in the tiles' layout."""
    for path in sorted(tiles.rglob("*.npz")):
        arrays = load_npz(path)
        target = stage1_dir / path.relative_to(tiles)
        target.parent.mkdir(parents=True, exist_ok=True)
        np.savez(target, opt_v1=np.stack([arrays[key] for key in BAND_KEYS]))
    return {path: path.read_bytes() for path in sorted(stage1_dir.rglob("*.npz"))}


def test_an_output_dir_holding_the_stage1_files_is_refused_before_anything_is_written(few_tiles, tmp_path, capsys):
    stage1 = tmp_path / "stage1"
    before = _stage1_files(few_tiles, stage1)
    with pytest.raises(InferenceInputError, match="would overwrite the Stage 1 file"):
        refine_tiles(PixelwiseRefiner(), few_tiles, stage1, stage1, progress=False)
    code = main(["--model", "unused", "--input", str(few_tiles), "--stage1_dir", str(stage1),
                 "--output_dir", str(stage1), "--no_progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"stage2-refine: error: output_dir {stage1}: the output ")
    assert "would overwrite the Stage 1 file" in lines[0]
    assert {path: path.read_bytes() for path in sorted(stage1.rglob("*.npz"))} == before
    assert not (stage1 / "metrics.json").exists()


def test_an_input_folder_inside_the_output_dir_is_refined(few_tiles, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(few_tiles, work / "tiles")
    summary = refine_tiles(PixelwiseRefiner(), work / "tiles", work, progress=False)
    relative = sorted(str(path.relative_to(few_tiles)) for path in few_tiles.rglob("*.npz"))
    assert sorted(summary.written) == relative and summary.rejected == []
    for name in relative:
        assert "refined" in load_npz(work / name)


def test_a_band_file_given_twice_is_refused(tmp_path, capsys):
    data = smooth_scene(130, 150)
    a, b, c, d = (write_geotiff(tmp_path / f"{name}.tif", data[i : i + 1]) for i, name in enumerate("abcd"))
    link = tmp_path / "link.tif"
    link.symlink_to(b)
    output = tmp_path / "out.tif"
    cases = (([a, a, c, d], f"{a}: given twice;"), ([a, b, link, d], f"{link}: given twice (also as {b})"))
    for inputs, expected in cases:
        code = main(["--model", "unused", "--input", *map(str, inputs), "--month", "7", "--biome", "4",
                     "--output", str(output), "--no_progress"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"stage2-refine: error: {expected}"), lines
    assert files_in(tmp_path) == ["a.tif", "b.tif", "c.tif", "d.tif", "link.tif"]


def test_a_weight_map_on_the_output_is_refused_before_the_model_loads(tmp_path, capsys):
    scene = write_geotiff(tmp_path / "scene.tif", smooth_scene(130, 150))
    code = main(["--model", "unused", "--input", str(scene), "--month", "7", "--biome", "4",
                 "--output", str(tmp_path / "out.tif"), "--out_of_range_output", str(tmp_path / "." / "out.tif"),
                 "--no_progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "is the output file" in lines[0], lines
    assert files_in(tmp_path) == ["scene.tif"]


@pytest.mark.parametrize("input_scale", ["auto", "dn", "reflectance"])
def test_a_stage1_file_with_nan_is_rejected_under_every_input_scale(few_tiles, tmp_path, input_scale):
    """`--input_scale` overrides the dtype rule and nothing else: Stage 1 outputs must be finite, as training reads
    them (`data_builders.tiles.read_stage1`)."""
    stage1 = tmp_path / "stage1"
    _stage1_files(few_tiles, stage1)
    bad = next(stage1.rglob("*.npz"))
    opt_v1 = load_npz(bad)["opt_v1"].astype(np.float32) * np.float32(1e-4 if input_scale != "dn" else 1.0)
    opt_v1[:, :5, :5] = np.nan
    np.savez(bad, opt_v1=opt_v1)
    summary = refine_tiles(PixelwiseRefiner(), few_tiles, tmp_path / "out", stage1, input_scale=input_scale,
                           progress=False)
    assert len(summary.written) == 2 and len(summary.rejected) == 1
    assert summary.rejected[0][1] == f"{bad}: 'opt_v1': 100 NaN/Inf values; Stage 1 outputs must be finite"
    assert not (tmp_path / "out" / bad.relative_to(stage1)).exists()


def test_options_of_the_other_kind_of_input_are_refused_not_ignored(few_tiles, tmp_path, capsys):
    """--window, --overlap and --output_scale do nothing to tiles, --stage1_dir and --strict nothing to a scene: given,
    they were silently ignored; now one line, exit 2, before the model loads."""
    scene = write_geotiff(tmp_path / "scene.tif", smooth_scene(130, 150))
    tiles = ["--input", str(few_tiles), "--output_dir", str(tmp_path / "out")]
    a_scene = ["--input", str(scene), "--output", str(tmp_path / "out.tif"), "--month", "7", "--biome", "4"]
    cases = (
        (tiles + ["--window", "64", "--output_scale", "dn"], "--window, --output_scale: for a scene only; tiles are "
                                                             "refined whole and written as float32 reflectance"),
        (tiles + ["--overlap", "0"], "--overlap: for a scene only"),
        (a_scene + ["--stage1_dir", str(tmp_path), "--strict"], "--stage1_dir, --strict: for NPZ tiles only; a "
                                                                "scene's bands are its opt_v1"),
        (a_scene + ["--strict"], "--strict: for NPZ tiles only"),
    )
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", "unused", *argv, "--no_progress"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and lines[-1].startswith(f"stage2-refine: error: {message}"), lines
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tif").exists()

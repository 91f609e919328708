"""Inputs and outputs of `stage2-refine` that must not meet: Stage 1 files, band files given twice, outputs that are one
file, and an input folder inside the output folder (which is no collision at all)."""
from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

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


def _npz_with_a_raw_member(path, arrays, raw_key):
    """An NPZ whose member `raw_key` is stored without `.npy`: np.load hands back its bytes, not an array."""
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            if key == raw_key:
                archive.writestr(key, b"not an array")
            else:
                buffer = io.BytesIO()
                np.save(buffer, value)
                archive.writestr(f"{key}.npy", buffer.getvalue())


@pytest.mark.parametrize("input_scale", ["auto", "dn", "reflectance"])
def test_a_zip_member_that_is_no_array_is_rejected_under_every_input_scale(few_tiles, tmp_path, input_scale):
    """Under an explicit --input_scale a band or opt_v1 stored as raw bytes was an AttributeError that stopped the
    whole run; now the tile is rejected, named, as under auto, and the others are written."""
    paths = sorted(few_tiles.rglob("*.npz"))
    _npz_with_a_raw_member(few_tiles / "val" / "raw.npz", load_npz(paths[0]), "s2_b2")
    summary = refine_tiles(PixelwiseRefiner(), few_tiles, tmp_path / "out", input_scale=input_scale, progress=False)
    assert len(summary.written) == 3
    assert [reason for _, reason in summary.rejected] == [
        f"{few_tiles / 'val' / 'raw.npz'}: 's2_b2': zip member 's2_b2' is not a .npy array; save tiles with np.savez"]
    (few_tiles / "val" / "raw.npz").unlink()
    stage1 = tmp_path / "stage1"
    _stage1_files(few_tiles, stage1)
    raw = stage1 / paths[0].relative_to(few_tiles)
    _npz_with_a_raw_member(raw, {"opt_v1": load_npz(raw)["opt_v1"]}, "opt_v1")
    summary = refine_tiles(PixelwiseRefiner(), few_tiles, tmp_path / "s1", stage1, input_scale=input_scale,
                           progress=False)
    assert len(summary.written) == 2 and len(summary.rejected) == 1
    assert summary.rejected[0][1].startswith(f"{raw}: 'opt_v1': zip member 'opt_v1' is not a .npy array; save ")


def test_an_input_scale_that_says_what_the_dtype_says_keeps_every_check_of_the_builders(few_tiles, tmp_path):
    """--input_scale reflectance on float bands (dn on integers) is the scale auto reads them with: it overrides
    nothing, so the tile is read by the data builders' reader, as under auto. Float digital numbers, and a float64
    value float32 cannot hold, were refined under reflectance (the latter as a silent NaN pixel) and refused under
    auto."""
    good = sorted(few_tiles.rglob("*.npz"))[0]
    arrays = load_npz(good)
    tiles = tmp_path / "bad"
    tiles.mkdir()
    np.savez(tiles / "float_dn.npz", **{**arrays, **{key: arrays[key].astype(np.float32) for key in BAND_KEYS}})
    huge = {key: arrays[key] * 1e-4 for key in BAND_KEYS}
    huge["s2_b3"][3, 3] = 1e300
    np.savez(tiles / "float64_huge.npz", **{**arrays, **huge})
    reasons = {}
    for input_scale in ("auto", "reflectance"):
        summary = refine_tiles(PixelwiseRefiner(), tiles, tmp_path / input_scale, input_scale=input_scale,
                               progress=False)
        assert summary.written == [] and len(summary.rejected) == 2
        reasons[input_scale] = summary.rejected
    assert reasons["reflectance"] == reasons["auto"]
    assert "float band values reach 1e+300" in reasons["auto"][0][1]
    assert "float_dn.npz: float band values reach " in reasons["auto"][1][1]
    # A Stage 1 opt_v1 of float digital numbers, the same.
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    np.savez(stage1 / good.name, opt_v1=np.stack([arrays[key] for key in BAND_KEYS]).astype(np.float32))
    for input_scale in ("auto", "reflectance"):
        summary = refine_tiles(PixelwiseRefiner(), good, tmp_path / f"s1_{input_scale}", stage1,
                               input_scale=input_scale, progress=False)
        assert summary.written == [] and len(summary.rejected) == 1
        assert summary.rejected[0][1].startswith(f"{stage1 / good.name}: 'opt_v1': float band values reach ")
    # A true override still refines: integers read as reflectance, floats as digital numbers.
    floats = tmp_path / "floats"
    floats.mkdir()
    shutil.copy(tiles / "float_dn.npz", floats)
    written = refine_tiles(PixelwiseRefiner(), floats, tmp_path / "dn", input_scale="dn", progress=False)
    assert written.written == ["float_dn.npz"] and written.rejected == []


def test_a_bad_input_scale_is_refused_before_any_tile_and_keeps_the_earlier_outputs(few_tiles, tmp_path):
    """Found per tile, a misspelt input_scale rejected every tile and removed its earlier output as stale."""
    output = tmp_path / "out"
    refine_tiles(PixelwiseRefiner(), few_tiles, output, progress=False)
    before = {path: path.read_bytes() for path in sorted(output.rglob("*.npz"))}
    assert len(before) == 3
    with pytest.raises(InferenceInputError, match=r"input_scale must be one of \('auto', 'reflectance', 'dn'\), "
                                                  r"got 'DN'"):
        refine_tiles(PixelwiseRefiner(), few_tiles, output, input_scale="DN", progress=False)
    assert {path: path.read_bytes() for path in sorted(output.rglob("*.npz"))} == before


def test_an_output_dir_that_is_the_model_folder_is_refused_before_the_model_loads(few_tiles, tmp_path, capsys):
    """The model folder is an input too: refined into it, its own metrics.json (its evaluation) was removed as an
    earlier run's (or replaced by the tiles' with Stage 1 input)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # never read: refused before the model loads
    (model / "model.onnx").write_bytes(b"")  # an exported graph: its folder holds its records too
    (model / "metrics.json").write_text(json.dumps({"refined": {"ndvi_rmse": 0.05}, "n_tiles": 18}))
    before = {path.name: path.read_bytes() for path in model.iterdir()}
    for model_argument, output_dir in ((model, model), (model / "model.onnx", tmp_path / "." / "model")):
        code = main(["--model", str(model_argument), "--input", str(few_tiles), "--output_dir", str(output_dir),
                     "--no_progress"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, lines
        assert lines[0] == (f"stage2-refine: error: output_dir {output_dir} is the model folder {model_argument}; "
                            "refusing to write tiles among its files (its metrics.json would be replaced or "
                            "removed): choose another output folder")
    assert {path.name: path.read_bytes() for path in model.iterdir()} == before


def test_a_stage1_file_is_read_once_when_the_input_scale_says_what_its_dtype_says(few_tiles, tmp_path, monkeypatch):
    """Under --input_scale reflectance a float opt_v1 goes to the data builders' reader, which read the file again."""
    from data_builders import tiles as builder_tiles
    from inference_stage2 import tiles as inference_tiles

    good = sorted(few_tiles.rglob("*.npz"))[0]
    arrays = load_npz(good)
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    opt_v1 = np.stack([arrays[key] for key in BAND_KEYS]).astype(np.float32) * np.float32(1e-4)
    np.savez(stage1 / good.name, opt_v1=opt_v1)
    reads = []

    def counting(path, *args, **kwargs):
        reads.append(Path(path))
        return load_npz(path, *args, **kwargs)

    monkeypatch.setattr(builder_tiles, "load_npz", counting)
    monkeypatch.setattr(inference_tiles, "load_npz", counting)
    summary = refine_tiles(PixelwiseRefiner(), good, tmp_path / "out", stage1, input_scale="reflectance",
                           progress=False)
    assert summary.written == [good.name] and summary.rejected == []
    assert reads.count(stage1 / good.name) == 1

"""stage2-inspect: the text report and the preview grid."""
from __future__ import annotations

import json

import numpy as np
import pytest

import datasets
from data_builders.inspect import describe_dataset, histogram, main, ndvi, stretch_limits, true_colour

datasets.disable_progress_bars()


def test_report_lists_features_splits_stats_and_histograms(sample_dataset_dir):
    report = describe_dataset(sample_dataset_dir)
    assert "  target           float32 (4, 120, 120)" in report
    assert "  valid_mask       bool (120, 120)" in report
    assert "  labels           list of string" in report
    assert "Splits: train 18 | val 18 | test 18 (total 54)" in report
    assert "opt_v1: synthetic, seed 0, degradation 'mild' v1" in report
    info = json.loads(datasets.load_from_disk(str(sample_dataset_dir))["train"].info.description)
    b08 = info["statistics"]["target"]["B08"]
    assert f"  B08   {b08['mean']:11.4f} {b08['std']:8.4f}" in report
    ds = datasets.load_from_disk(str(sample_dataset_dir))
    for split in ("train", "val", "test"):
        months = np.bincount(np.asarray(ds[split]["month"]), minlength=13)[1:]
        assert f"{split:<6s}" + "".join(f"{c:>6d}" for c in months.tolist() + [0]) in report
        biomes = np.bincount(np.asarray(ds[split]["biome"]), minlength=17)
        assert f"{split:<6s}" + "".join(f"{c:>6d}" for c in biomes.tolist() + [0]) in report


def test_report_names_the_degradation_preset(sample_tiles_dir, tmp_path):
    from data_builders import build_dataset
    from data_builders.inspect import _synthesis_text

    build_dataset(sample_tiles_dir, tmp_path / "ds", seed=3, degradation="strong", max_samples=3)
    assert "opt_v1: synthetic, seed 3, degradation 'strong' v1\n" in describe_dataset(tmp_path / "ds")
    # a dataset built before the presets had names records none; Stage 1 and identity inputs have no synthesis
    assert _synthesis_text({"opt_v1": {"mode": "synthetic", "seed": 0, "degradation_version": 1}}) == (
        ", seed 0, degradation v1")
    assert _synthesis_text({"opt_v1": {"mode": "stage1", "stage1_dir": "/s"}}) == ""


def test_a_dataset_without_a_train_split_still_reports_its_build_record(sample_tiles_dir, tmp_path):
    import shutil

    from data_builders import build_dataset

    (tmp_path / "tiles" / "test").mkdir(parents=True)
    for npz in sorted((sample_tiles_dir / "test").glob("*.npz"))[:2]:  # an evaluation set: test tiles only
        shutil.copy(npz, tmp_path / "tiles" / "test" / npz.name)
    build_dataset(tmp_path / "tiles", tmp_path / "ds", seed=3, degradation="strong")
    report = describe_dataset(tmp_path / "ds")
    assert f"Source: {tmp_path / 'tiles'} " in report and "; rejected 0\n" in report
    assert 'Input scale: {"dn": 2}' in report
    assert "opt_v1: synthetic, seed 3, degradation 'strong' v1\n" in report
    assert "(test split, first 2 tiles; reflectance)" in report


def test_cli_writes_a_png_grid(sample_dataset_dir, tmp_path, capsys):
    from matplotlib.image import imread

    png = tmp_path / "preview.png"
    assert main([str(sample_dataset_dir), "--plot", str(png), "--split", "val", "--num_tiles", "3"]) == 0
    out = capsys.readouterr().out
    assert "Month histogram:" in out and f"wrote {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(png)
    assert image.shape[:2] == (840, 1100)  # (0.6 + 2.6 * 3) x 11 inches at 100 dpi
    assert image[..., :3].std() > 0.1  # real pictures, not a blank canvas


def test_cli_errors(sample_dataset_dir, tmp_path, capsys):
    assert main([str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(sample_dataset_dir), "--plot", str(tmp_path / "x.png"), "--split", "holdout"]) == 2
    out, err = capsys.readouterr()
    assert "no split 'holdout'" in err and out == ""  # refused before the report is printed
    assert not (tmp_path / "x.png").exists()
    for flags in (["--split", "holdout"], ["--split", "val"], ["--num_tiles", "3"]):  # ignored without --plot
        with pytest.raises(SystemExit) as caught:
            main([str(sample_dataset_dir), *flags])
        assert caught.value.code == 2
        assert "add --plot FILE.png" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main([str(sample_dataset_dir), "--plot", str(tmp_path / "x.png"), "--num_tiles", "0"])
    assert caught.value.code == 2 and "--num_tiles must be at least 1, got 0" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    assert main([str(tmp_path / "junk")]) == 2
    assert "is not a saved dataset" in capsys.readouterr().err


def test_plot_without_matplotlib_is_one_line_naming_the_extra(sample_dataset_dir, tmp_path, capsys, monkeypatch):
    import sys

    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    with pytest.raises(SystemExit) as exit_info:
        main([str(sample_dataset_dir), "--plot", str(tmp_path / "p.png")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "stage2-inspect: error: --plot (matplotlib is missing) needs the 'viz' extra: pip install "
        "'stage2-refiner[viz]'")


def test_datasets_without_a_build_record_get_computed_statistics(tmp_path):
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 0.5, (3, 4, 120, 120)).astype(np.float32)
    mask = np.ones((3, 120, 120), bool)
    mask[0, :60] = False
    features = datasets.Features({
        "target": datasets.Array3D((4, 120, 120), "float32"), "opt_v1": datasets.Array3D((4, 120, 120), "float32"),
        "valid_mask": datasets.Array2D((120, 120), "bool"), "month": datasets.Value("int64"),
        "biome": datasets.Value("int64"), "tile_id": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"target": target, "opt_v1": target, "valid_mask": mask, "month": [1, 1, -1],
                                     "biome": [3, 16, 3], "tile_id": ["a", "b", "c"]}, features=features)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "plain"))
    report = describe_dataset(tmp_path / "plain")
    assert "train split, first 3 tiles" in report
    blue = target[:, 0][mask]
    assert f"  B02   {blue.mean():11.4f} {blue.std():8.4f} {blue.min():8.4f} {blue.max():8.4f}" in report
    assert "train      2" + "     0" * 11 + "     1" in report  # two January tiles, one unknown


def _dataset_with_description(path, description, columns=("tile_id", "target", "opt_v1", "valid_mask", "month",
                                                               "biome")):
    target = np.full((1, 4, 120, 120), 0.1, np.float32)
    values = {"target": target, "opt_v1": target, "valid_mask": np.ones((1, 120, 120), bool), "month": [6],
              "biome": [3], "tile_id": ["a"]}
    ds = datasets.Dataset.from_dict({name: values[name] for name in columns})
    ds.info.description = description
    datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    return path


def test_a_json_description_that_is_no_build_record_is_not_read_as_one(tmp_path, capsys):
    """A dataset described in JSON by someone else used to stop stage2-inspect with a KeyError traceback."""
    path = _dataset_with_description(tmp_path / "other", json.dumps({"note": "made by hand"}))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "train split, first 1 tiles" in out and "Source:" not in out


def test_a_dataset_without_the_stage2_columns_is_one_line(tmp_path, capsys):
    """It used to end in a traceback (KeyError: 'Field "month" does not exist in schema')."""
    path = _dataset_with_description(tmp_path / "other", "", columns=("target", "valid_mask"))
    capsys.readouterr()  # the progress bar of save_to_disk, where an earlier test turned them on
    assert main([str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [
        f"stage2-inspect: error: {path}: split 'train' lacks the column(s) 'tile_id', 'opt_v1', 'month', 'biome'; "
        "pass a dataset written by stage2-build-dataset (columns tile_id, target, opt_v1, valid_mask, month, biome)"]


def test_plot_helpers():
    image = np.zeros((4, 10, 10), np.float32)
    image[2], image[1], image[0] = 0.3, 0.2, 0.1
    image[2, 0, 0] = 5.0  # a hot pixel does not set the stretch
    mask = np.ones((10, 10), bool)
    low, high = stretch_limits(image, mask)
    assert low == pytest.approx(0.1) and high == pytest.approx(0.3)
    rgb = true_colour(image, (low, high))
    assert rgb.shape == (10, 10, 3) and rgb[5, 5].tolist() == pytest.approx([1.0, 0.5, 0.0])
    image[3] = 0.5
    assert ndvi(image)[5, 5] == pytest.approx(0.25)
    assert histogram(np.array([1, 1, 12, -1, 13]), 12, 1) == ([2] + [0] * 10 + [1], 2)


def _shown(figure) -> dict:
    """{panel title: the array it shows} of a figure's image panels (the colour bar has no title)."""
    return {axis.get_title(): axis.images[0].get_array() for axis in figure.axes if axis.get_title()}


def test_plot_sample_draws_one_row_as_datasets_gives_it(sample_dataset_dir):
    """torchgeo's `plot(sample)` for a dataset row: opt_v1, refined and target in true colour under the target's one
    stretch, their NDVI underneath with invalid pixels blank, whatever format the row comes in."""
    import torch

    from data_builders import plot_sample

    test = datasets.load_from_disk(str(sample_dataset_dir))["test"]
    row = test.with_format("numpy")[5]
    mask = row["valid_mask"].copy()
    mask[:10, :20] = False  # a corner without data
    limits = stretch_limits(row["target"], mask)
    refined = (row["opt_v1"] * 0.9 + 0.01).astype(np.float32)

    figure = plot_sample({**row, "valid_mask": mask}, refined=torch.from_numpy(refined)[None])
    shown = _shown(figure)
    assert list(shown) == ["opt_v1 (true colour)", "refined (true colour)", "target (true colour)",
                           "opt_v1 NDVI", "refined NDVI", "target NDVI"]
    for name, image in (("opt_v1", row["opt_v1"]), ("refined", refined), ("target", row["target"])):
        np.testing.assert_allclose(shown[f"{name} (true colour)"], true_colour(image, limits), atol=1e-6)
        np.testing.assert_allclose(shown[f"{name} NDVI"].filled(np.nan), np.where(mask, ndvi(image), np.nan),
                                   atol=1e-6)
    assert shown["target NDVI"].mask[:10, :20].all() and not shown["target NDVI"].mask[10:, 20:].any()
    assert figure.texts[0].get_text() == f"{row['tile_id']}: month {row['month']}, biome {row['biome']}"

    # The row as datasets gives it by default (nested lists) and as torch tensors: the same panels.
    for other in (test[5], test.with_format("torch")[5]):
        figure = plot_sample(other)
        assert figure.texts[0].get_text() == f"{row['tile_id']}: month {row['month']}, biome {row['biome']}"
        again = _shown(figure)
        assert list(again) == ["opt_v1 (true colour)", "target (true colour)", "opt_v1 NDVI", "target NDVI"]
        np.testing.assert_allclose(again["opt_v1 (true colour)"],
                                   true_colour(row["opt_v1"], stretch_limits(row["target"], row["valid_mask"])),
                                   atol=1e-6)
    # An inference input has no target: what it has, the stretch taken from opt_v1.
    alone = _shown(plot_sample({"opt_v1": row["opt_v1"]}, refined=refined, suptitle="mine"))
    assert list(alone) == ["opt_v1 (true colour)", "refined (true colour)", "opt_v1 NDVI", "refined NDVI"]
    np.testing.assert_allclose(alone["opt_v1 (true colour)"],
                               true_colour(row["opt_v1"], stretch_limits(row["opt_v1"], np.ones((120, 120), bool))),
                               atol=1e-6)


@pytest.mark.parametrize(("sample", "refined", "message"), [
    ([1, 2], None, r"expected a dataset row \(a mapping\) with 'opt_v1'"),
    ({"target": np.zeros((4, 8, 8))}, None, "with 'opt_v1'"),
    ({"opt_v1": np.zeros((3, 8, 8))}, None, r"opt_v1 must be one \(4, height, width\) image .* got shape \(3, 8, 8\)"),
    ({"opt_v1": np.zeros((2, 4, 8, 8))}, None, r"got shape \(2, 4, 8, 8\)"),
    ({"opt_v1": np.zeros((4, 8, 8))}, np.zeros((4, 8, 9)), "refined is 8x9 pixels, opt_v1 8x8"),
    ({"opt_v1": np.zeros((4, 8, 8)), "valid_mask": np.ones((8, 9))}, None, r"valid_mask must be 8x8 like opt_v1"),
])
def test_plot_sample_refuses_what_is_not_one_tile(sample, refined, message):
    from data_builders import plot_sample

    with pytest.raises(ValueError, match=f"^plot_sample: {message}" if message.startswith("expected") else message):
        plot_sample(sample, refined=refined)


def test_a_saved_dataset_dict_without_splits_is_one_line(tmp_path, capsys):
    """A DatasetDict saved with no split ended stage2-inspect in a StopIteration traceback (exit 1)."""
    path = tmp_path / "empty"
    datasets.DatasetDict({}).save_to_disk(str(path))
    capsys.readouterr()
    assert main([str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [
        f"stage2-inspect: error: {path} is a saved DatasetDict without any split; pass a folder written by "
        "stage2-build-dataset"]

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

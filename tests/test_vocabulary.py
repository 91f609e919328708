"""One vocabulary (`modeling_stage2.vocabulary`): the old spellings still work for one release, give the same
result as the new ones and say so with a one-line deprecation message."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_stage2.vocabulary import DEPRECATED_VALUES, INPUT_MODES, INPUT_SCALES


def _old_build_record(info: dict) -> dict:
    """A build record as version 1 wrote it: "scaling" with "dn_x1e-4" / "float" counts."""
    old = {key: value for key, value in info.items() if key != "input_scale"}
    renamed = {"dn": "dn_x1e-4", "reflectance": "float"}
    old["scaling"] = {**info["input_scale"],
                      "tiles": {renamed[name]: count for name, count in info["input_scale"]["tiles"].items()}}
    old["version"] = 1
    return old


def _rewrite_as_old_build(dataset_dir: Path) -> None:
    from data_builders.build import BUILD_INFO_FILE

    info = json.loads((dataset_dir / BUILD_INFO_FILE).read_text())
    old = _old_build_record(info)
    (dataset_dir / BUILD_INFO_FILE).write_text(json.dumps(old))
    for info_file in dataset_dir.glob("*/dataset_info.json"):
        split_info = json.loads(info_file.read_text())
        split_info["description"] = json.dumps(old, indent=1, sort_keys=True)
        info_file.write_text(json.dumps(split_info))


@pytest.fixture(scope="module")
def small_dataset(sample_tiles_dir, tmp_path_factory) -> Path:
    from data_builders import build_dataset

    out = tmp_path_factory.mktemp("vocabulary") / "ds"
    build_dataset(sample_tiles_dir, out, max_samples=2, seed=0)
    return out


def test_the_vocabulary_is_the_data_builders_one():
    from data_builders.build import INPUT_MODES as BUILD_INPUT_MODES
    from inference_stage2.values import INPUT_SCALES as INFERENCE_INPUT_SCALES

    assert BUILD_INPUT_MODES == INPUT_MODES == ("synthetic", "stage1", "identity")
    assert set(INFERENCE_INPUT_SCALES) == set(INPUT_SCALES) | {"auto"}
    assert set(DEPRECATED_VALUES.values()) <= set(INPUT_MODES) | set(INPUT_SCALES)


# ------------------------------------------------------------------------------------------------ input_scale


def test_tile_scaling_is_input_scale_in_the_old_spelling(sample_tiles_dir, tmp_path):
    from data_builders.tiles import BAND_KEYS, dn_to_reflectance, read_tile

    path = sorted((sample_tiles_dir / "train").glob("*.npz"))[0]
    as_float = tmp_path / "float.npz"
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    np.savez(as_float, **{**arrays, **{key: dn_to_reflectance(arrays[key]) for key in BAND_KEYS}})
    for tile_path, new, old in ((path, "dn", "dn_x1e-4"), (as_float, "reflectance", "float")):
        tile = read_tile(tile_path)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the new name warns about nothing
            assert tile.input_scale == new
        with pytest.warns(FutureWarning, match=r"Tile\.scaling is deprecated .* use Tile\.input_scale"):
            assert tile.scaling == old
        assert DEPRECATED_VALUES[old] == tile.input_scale


def test_old_build_record_scaling_is_read_as_input_scale(small_dataset, tmp_path):
    from datasets import load_from_disk

    from data_builders.build import read_build_info

    new = read_build_info(load_from_disk(str(small_dataset)))
    assert new["input_scale"]["tiles"] == {"dn": 6} and "scaling" not in new
    old_dir = tmp_path / "old"
    shutil.copytree(small_dataset, old_dir)
    _rewrite_as_old_build(old_dir)
    with pytest.warns(FutureWarning, match='build record key "scaling" .* is deprecated .* use "input_scale"'):
        upgraded = read_build_info(load_from_disk(str(old_dir)))
    assert upgraded["input_scale"] == new["input_scale"]
    assert {key: value for key, value in upgraded.items() if key != "version"} == {
        key: value for key, value in new.items() if key != "version"}


def test_stage2_inspect_reads_an_old_build_record_with_a_deprecation_line(small_dataset, tmp_path):
    old_dir = tmp_path / "old"
    shutil.copytree(small_dataset, old_dir)
    _rewrite_as_old_build(old_dir)
    runs = {}
    for name, folder in (("new", small_dataset), ("old", old_dir)):
        runs[name] = subprocess.run([sys.executable, "-m", "data_builders.inspect", str(folder)],
                                    capture_output=True, text=True, timeout=300)
        assert runs[name].returncode == 0, runs[name].stderr[-2000:]
    assert runs["new"].stderr.count("deprecated") == 0
    lines = [line for line in runs["old"].stderr.splitlines() if "deprecated" in line]
    assert len(lines) == 1 and lines[0].startswith("stage2-inspect: FutureWarning:")
    assert '"input_scale"' in lines[0] and "Traceback" not in runs["old"].stderr
    # The same report, apart from the dataset's path.
    strip = lambda text: text.replace(str(old_dir), "PATH").replace(str(small_dataset), "PATH")  # noqa: E731
    assert strip(runs["old"].stdout) == strip(runs["new"].stdout)
    assert 'Input scale: {"dn": 6}' in runs["new"].stdout


# ------------------------------------------------------------------------------------------------ input_mode


class _Identity(torch.nn.Module):
    """refined = opt_v1 + biome / 100 (so that the biome code shows in the output)."""

    def forward(self, opt_v1, month, biome):
        return opt_v1 + biome.view(-1, 1, 1, 1).to(opt_v1.dtype) / 100


@pytest.fixture
def two_tiles(sample_tiles_dir, tmp_path) -> Path:
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for path in sorted((sample_tiles_dir / "train").glob("*.npz"))[:2]:
        shutil.copy(path, tiles / path.name)
    return tiles


def test_summary_input_source_is_input_mode_in_the_old_spelling(two_tiles, tmp_path):
    from inference_stage2 import refine_tiles

    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    for path in two_tiles.glob("*.npz"):
        np.savez(stage1 / path.name, opt_v1=np.full((4, 120, 120), 0.1, dtype=np.float32))
    for stage1_dir, new, old in ((None, "identity", "s2_bands"), (stage1, "stage1", "stage1")):
        output = tmp_path / f"out_{new}"
        summary = refine_tiles(_Identity(), two_tiles, output, stage1_dir, progress=False)
        assert summary.input_mode == new
        with pytest.warns(FutureWarning, match=r"input_source is deprecated .* use TileRefinementSummary\.input_mode"):
            assert summary.input_source == old
        assert DEPRECATED_VALUES.get(old, old) == summary.input_mode
        for path in output.glob("*.npz"):  # the refined tiles carry the new name only
            with np.load(path) as out:
                assert str(out["input_mode"]) == new and "input_source" not in out.files


def _rename_biome_key(tiles: Path) -> None:
    for path in tiles.glob("*.npz"):
        with np.load(path) as archive:
            arrays = {key: archive[key] for key in archive.files}
        arrays["biome"] = arrays.pop("biome_code")
        np.savez(path, **arrays)


def test_npz_key_biome_is_read_as_biome_code_with_a_warning(two_tiles, tmp_path):
    from inference_stage2 import refine_tiles

    new = refine_tiles(_Identity(), two_tiles, tmp_path / "new", progress=False)
    old_tiles = tmp_path / "old_tiles"
    shutil.copytree(two_tiles, old_tiles)
    _rename_biome_key(old_tiles)
    with pytest.warns(FutureWarning, match="the NPZ tile key 'biome' is deprecated .* use 'biome_code'"):
        old = refine_tiles(_Identity(), old_tiles, tmp_path / "old", progress=False)
    assert old.written == new.written and not old.rejected
    for name in new.written:
        with np.load(tmp_path / "new" / name) as a, np.load(tmp_path / "old" / name) as b:
            np.testing.assert_array_equal(a["refined"], b["refined"])
            assert int(a["biome_code"]) == int(b["biome_code"])


def test_stage2_refine_reads_the_old_biome_key_with_one_deprecation_line(two_tiles, tmp_path):
    from modeling_stage2 import Stage2RefinerConfig, Stage2RefinerModel

    torch.manual_seed(0)
    model = Stage2RefinerModel(Stage2RefinerConfig(backbone_config="prithvi_eo_v2_tiny")).eval()
    torch.nn.init.normal_(model.head.output_projection.weight, std=0.005)
    model.save_pretrained(tmp_path / "model")
    old_tiles = tmp_path / "old_tiles"
    shutil.copytree(two_tiles, old_tiles)
    _rename_biome_key(old_tiles)
    runs = {}
    for name, tiles in (("new", two_tiles), ("old", old_tiles)):
        runs[name] = subprocess.run(
            [sys.executable, "-m", "inference_stage2", "--model", str(tmp_path / "model"), "--input", str(tiles),
             "--output_dir", str(tmp_path / f"out_{name}"), "--no_progress", "--device", "cpu"],
            capture_output=True, text=True, timeout=300,
        )
        assert runs[name].returncode == 0, runs[name].stderr[-2000:]
        assert "input_mode identity" in runs[name].stdout
    assert "deprecated" not in runs["new"].stderr
    lines = [line for line in runs["old"].stderr.splitlines() if "deprecated" in line]
    assert len(lines) == 1 and lines[0].startswith("stage2-refine: FutureWarning:") and "'biome_code'" in lines[0]
    for path in (tmp_path / "out_new").glob("*.npz"):
        with np.load(path) as a, np.load(tmp_path / "out_old" / path.name) as b:
            np.testing.assert_array_equal(a["refined"], b["refined"])


def _install_hint_calls() -> list[tuple[str, str, str]]:
    """(file, what, extra) of every `install_hint(...)` call in the packages, read from their source."""
    import ast

    root = Path(__file__).resolve().parents[1]
    calls = []
    for package in ("modeling_stage2", "data_builders", "training", "inference_stage2", "model_cards"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                        == "install_hint"):
                    what, extra = node.args
                    calls.append((path.name, ast.unparse(what), ast.literal_eval(extra)))
    return calls


def test_install_hints_name_the_distribution_and_extras_of_setup_cfg():
    """The hint's `pip install 'stage2-refiner[extra]'` must be a command that works: the name is setup.cfg's, and
    every extra a hint names exists there and installs the module whose absence the hint reports."""
    import configparser

    from modeling_stage2.vocabulary import DISTRIBUTION

    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    assert setup["metadata"]["name"] == DISTRIBUTION
    extras = {name: {line.split(">")[0].split("=")[0].split("<")[0].strip() for line in value.split("\n") if line}
              for name, value in setup["options.extras_require"].items()}
    calls = _install_hint_calls()
    assert {extra for _, _, extra in calls} == {"geo", "bigearthnet", "viz", "export"}
    for file, what, extra in calls:
        assert extra in extras, f"{file}: install_hint names the extra {extra!r}, which setup.cfg does not define"
    assert {"rasterio"} <= extras["geo"] and {"lmdb", "pandas", "pyarrow"} <= extras["bigearthnet"]
    assert {"matplotlib"} <= extras["viz"] and {"onnxruntime", "onnx"} <= extras["export"]

"""Items earlier reviews had left alone in the data builders and inference: a saved dataset with an empty split
(which `datasets` cannot load), finite band values past float32's range, and hidden folders among the tiles."""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from _data_helpers import tile_arrays, write_tile

import datasets
from data_builders.cache import empty_split_problem
from data_builders.discovery import discover_tiles
from data_builders.inspect import main as inspect_main
from data_builders.tiles import BAND_KEYS, dn_to_reflectance
from inference_stage2 import InferenceInputError, refine_arrays, refine_scene, refine_tiles
from inference_stage2.values import to_reflectance
from test_inference import PixelwiseRefiner, smooth_scene, write_geotiff

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------- empty splits
def _save(dataset, path):
    datasets.disable_progress_bars()  # here, not at import: a test run before may have turned them on again
    dataset.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("empty", ["train", "val"])
def test_inspect_names_the_empty_split_that_datasets_cannot_load(tmp_path, capsys, empty):
    """`load_from_disk` fails on a split saved without a row (IndexError: list index out of range), which
    stage2-inspect reported as "not a saved dataset", naming no split."""
    rows = datasets.Dataset.from_dict({"tile_id": ["a", "b"], "month": [1, 2]})
    path = _save(datasets.DatasetDict({split: rows.select([] if split == empty else [0, 1])
                                       for split in ("train", "val")}), tmp_path / "ds")
    problem = empty_split_problem(path)
    assert problem == (f"{path}: split {empty!r} is empty (no row, no data file), which datasets cannot load; save "
                       "the DatasetDict again without it")
    assert inspect_main([str(path)]) == 2
    assert capsys.readouterr().err == f"stage2-inspect: error: {problem}\n"


def test_an_empty_saved_dataset_and_healthy_ones(tmp_path, capsys):
    rows = datasets.Dataset.from_dict({"tile_id": ["a"]})
    single = _save(rows.select([]), tmp_path / "single")
    assert inspect_main([str(single)]) == 2
    assert capsys.readouterr().err == (f"stage2-inspect: error: {single}: the saved dataset is empty (no row, no data "
                                       "file), which datasets cannot load\n")
    # what loads, and what is no dataset at all, is not this problem
    assert empty_split_problem(_save(datasets.DatasetDict({"train": rows}), tmp_path / "dict")) is None
    assert empty_split_problem(_save(rows, tmp_path / "one")) is None
    assert empty_split_problem(tmp_path / "absent") is None


@pytest.mark.parametrize("command", ["stage2-train", "stage2-evaluate"])
def test_training_and_evaluation_name_the_empty_split_before_any_work(tmp_path, capsys, monkeypatch, command):
    """Both loaded the saved dataset with `load_from_disk` and died in a 40-line IndexError traceback, exit 1."""
    from _training_helpers import refuse_exec
    from training.evaluate import main as evaluate_main
    from training.train import launch_main

    refuse_exec(monkeypatch)  # stage2-train would exec its launcher once its checks pass
    rows = datasets.Dataset.from_dict({"tile_id": ["a", "b"], "month": [1, 2]})
    path = _save(datasets.DatasetDict({"train": rows, "val": rows.select([])}), tmp_path / "ds")
    output = tmp_path / "out"
    if command == "stage2-train":
        status = launch_main(["--data_dir", str(path), "--output_dir", str(output)])
    else:
        status = evaluate_main(["--model", str(tmp_path / "no-model"), "--data", str(path), "--device", "cpu",
                                "--json", str(output)])
    assert status == 2
    assert capsys.readouterr().err.splitlines() == [f"{command}: error: {empty_split_problem(path)}"]
    assert not output.exists()


# ------------------------------------------------------------------------------ values past float32's range
@pytest.mark.parametrize("input_scale", ["dn", "reflectance"])
def test_a_finite_float64_value_past_float32s_range_is_refused_naming_the_source(input_scale):
    """Under `dn` 1e300 x 1e-4 became Inf as float32 (a RuntimeWarning naming nothing), then an invalid pixel: a NaN
    in the output, exit 0."""
    values = np.full((4, 8, 8), 2000.0 if input_scale == "dn" else 0.2)
    values[2, 3, 5], values[0, 1, 1] = -1e300, 5e299
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InferenceInputError) as caught:
            to_reflectance(values, input_scale, "scene.tif")
        with pytest.raises(InferenceInputError, match="^opt_v1: 2 finite value"):
            refine_arrays(PixelwiseRefiner(), values, 6, 4, input_scale=input_scale)
    number = "digital number" if input_scale == "dn" else "reflectance"
    assert str(caught.value) == ("scene.tif: 2 finite value(s) reach 1e+300, past float32's range as reflectance; "
                                 f"no {number} is that large (a wrong scale or fill value?)")
    # NaN and Inf stay nodata, and values within range convert as before
    values[2, 3, 5], values[0, 1, 1] = np.nan, np.inf
    reflectance = to_reflectance(values, input_scale, "scene.tif", warn=False)
    expected = dn_to_reflectance(values) if input_scale == "dn" else values.astype(np.float32)
    np.testing.assert_array_equal(reflectance, expected)


def test_stage2_refine_rejects_a_float_tile_of_digital_numbers_past_float32s_range(tmp_path):
    arrays = tile_arrays(seed=3)
    for key in BAND_KEYS:
        arrays[key] = arrays[key].astype(np.float64)
    arrays["s2_b4"][5, 7] = 1e300
    bad = write_tile(tmp_path / "tiles", "bad", arrays)
    good = write_tile(tmp_path / "tiles", "good", seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = refine_tiles(PixelwiseRefiner(), tmp_path / "tiles", tmp_path / "out", input_scale="dn",
                               progress=False)
    assert summary.written == [good.name]
    assert summary.rejected == [(str(bad), f"{bad}: key 's2_b4': 1 finite value(s) reach 1e+300, past float32's "
                                           "range as reflectance; no digital number is that large (a wrong scale "
                                           "or fill value?)")]
    assert not (tmp_path / "out" / bad.name).exists()


def test_a_float_scene_of_digital_numbers_past_float32s_range_is_refused_and_leaves_no_output(tmp_path):
    """The Inf reached the model (a trained refiner's traceback: opt_v1 contains NaN or infinite values)."""
    data = smooth_scene(130, 140).astype(np.float64)
    data[1, 125, 3] = 1e300
    scene, output = write_geotiff(tmp_path / "scene.tif", data), tmp_path / "refined.tif"
    with pytest.raises(InferenceInputError, match="^" + re.escape(f"{scene}: 1 finite value(s) reach 1e+300, past")):
        refine_scene(PixelwiseRefiner(), scene, output, 6, 4, input_scale="dn", progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scene.tif"]
    # the same value under the scale and offset the file declares (read with input_scale auto) was a NaN pixel
    declared = write_geotiff(tmp_path / "declared.tif", data, scales=[1e-4] * 4, offsets=[0.0] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's overflow warning named no file
        with pytest.raises(InferenceInputError, match="^" + re.escape(
                f"{declared} (its declared scale and offset applied): 1 finite value(s) reach 1e+300, past")):
            refine_scene(PixelwiseRefiner(), declared, output, 6, 4, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["declared.tif", "scene.tif"]


# ------------------------------------------------------------------------------------------------ hidden tiles
def test_the_builders_discovery_reads_no_hidden_folder_or_appledouble_file(tmp_path):
    """Copies of a tile in `.ipynb_checkpoints/` read as tiles would reject the tile itself (one id twice)."""
    tile = write_tile(tmp_path / "train", "tile_a")
    for hidden in (tmp_path / "train" / ".ipynb_checkpoints", tmp_path / ".git" / "train", tmp_path / ".train"):
        write_tile(hidden, "tile_a")
    (tmp_path / "train" / "._tile_a.npz").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # macOS AppleDouble
    splits, rejected = discover_tiles(tmp_path, strict=True)
    assert {split: [spec.path for spec in specs] for split, specs in splits.items()} == {"train": [str(tile)]}
    assert rejected == []


# ------------------------------------------------------------------------------------- augmenting mixed rows
@pytest.mark.parametrize("second", [((4, 8, 8), np.float16), ((4, 6, 6), np.float32)], ids=["dtype", "shape"])
def test_image_rows_that_cannot_be_stacked_are_refused_not_left_unrotated(second):
    """`TileTransform` passed a spatial column whose rows differ in dtype or shape on as a list, unrotated, while the
    other image columns of the same rows were rotated: `opt_v1` no longer lined up with `target`."""
    from data_builders.augment import TileTransform

    shape, dtype = second
    rows = [{"target": np.ones((4, 8, 8), np.float32), "opt_v1": np.ones(s, d)}
            for s, d in (((4, 8, 8), np.float32), (shape, dtype))]
    kinds = ", ".join(sorted({f"{s} {np.dtype(d)}" for s, d in (((4, 8, 8), np.float32), (shape, dtype))}))
    with pytest.raises(ValueError, match=re.escape(f"column 'opt_v1': the batch's images differ in shape or dtype "
                                                   f"({kinds}), so they cannot be flipped")):
        TileTransform(augment=True).collate(rows)
    ragged = datasets.Dataset.from_dict({"target": [row["opt_v1"].astype(np.float32) for row in rows]})
    if shape != (4, 8, 8):  # ragged rows of one column reach the transform as an object array in numpy format
        with pytest.raises(ValueError, match="column 'target': the batch's images differ in shape or dtype"):
            TileTransform(augment=True)(ragged.with_format("numpy")[0:2])
    # rows that stack are rotated together, as before; without augmenting nothing is refused
    torch.manual_seed(0)
    same = [{"target": np.arange(64, dtype=np.float32).reshape(1, 8, 8), "opt_v1": np.arange(64.0).reshape(1, 8, 8)}
            for _ in range(4)]
    batch = TileTransform(augment=True).collate(same)
    torch.testing.assert_close(batch["opt_v1"].float(), batch["target"], rtol=0, atol=0)
    assert TileTransform(augment=False).collate(rows)["target"].shape == (2, 4, 8, 8)


def test_a_saved_dataset_whose_state_lists_no_data_files_key_is_not_called_empty(tmp_path):
    """A `state.json` without `_data_files` (another datasets version's, or one written by hand) says nothing about
    the split's rows: only an empty list of data files is the problem `load_from_disk` fails on."""
    import json

    from data_builders.cache import DATASET_STATE

    rows = datasets.Dataset.from_dict({"tile_id": ["a"]})
    for path, state in ((_save(rows, tmp_path / "one"), tmp_path / "one" / DATASET_STATE),
                        (_save(datasets.DatasetDict({"train": rows}), tmp_path / "dict"),
                         tmp_path / "dict" / "train" / DATASET_STATE)):
        record = json.loads(state.read_text())
        del record["_data_files"]
        state.write_text(json.dumps(record))
        assert empty_split_problem(path) is None


def test_the_saved_dataset_file_names_are_datasets_own():
    """Restated in `data_builders.cache` so that telling a saved dataset imports no datasets; the names
    `save_to_disk` writes are the ones read."""
    from data_builders.cache import ARROW_MARKER, DATASET_STATE

    assert (ARROW_MARKER, DATASET_STATE) == (datasets.config.DATASETDICT_JSON_FILENAME,
                                             datasets.config.DATASET_STATE_JSON_FILENAME)


def test_torch_formatted_image_rows_that_cannot_be_stacked_are_refused():
    """In torch format ragged rows reach the transform as a list of tensors, which was passed on unrotated."""
    from data_builders.augment import TileTransform

    ragged = datasets.Dataset.from_dict({"target": [np.ones((4, 8, 8), np.float32), np.ones((4, 6, 6), np.float32)]})
    with pytest.raises(ValueError, match=re.escape("column 'target': the batch's images differ in shape or dtype ((4, "
                                                   "6, 6) torch.float32, (4, 8, 8) torch.float32)")):
        TileTransform(augment=True)(ragged.with_format("torch")[0:2])


def test_the_splits_the_ingest_warns_of_are_the_ones_stage2_train_needs():
    """`TRAINING_SPLITS` restated ("train", "val"); it is now made of the split names `stage2-train` reads."""
    from data_builders.bigearthnet import TRAINING_SPLITS
    from data_builders.tiles import SPLITS, TRAIN_SPLIT
    from training.args import Stage2DataArguments

    assert TRAINING_SPLITS == (TRAIN_SPLIT, Stage2DataArguments().eval_split) == SPLITS[:2]

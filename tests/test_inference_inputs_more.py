"""More inputs of `stage2-refine` and `refine_arrays`: hidden folders among the tiles, an output folder inside the input
folder, warnings that name the file, images with a side of 0 pixels, no copy of images with nothing to fill, and the
names of an ONNX graph's dynamic axes."""
from __future__ import annotations

import shutil
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from inference_stage2 import InferenceInputError, main, refine_arrays, refine_tiles
from inference_stage2 import predict as predict_module
from inference_stage2.values import fill_invalid_pixels
from modeling_stage2.bands import DigitalNumbersWarning
from test_inference import PixelwiseRefiner, few_tiles, load_npz, pixelwise_expected  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _npz_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*.npz"))


# ------------------------------------------------------------------------------------------------ tile folders


def test_tiles_in_hidden_folders_are_not_refined(few_tiles, tmp_path):
    """Jupyter's `.ipynb_checkpoints/` holds copies of the tiles: they were refined as tiles of their own."""
    inputs = _npz_under(few_tiles)
    train = sorted((few_tiles / "train").glob("*.npz"))
    for hidden in (few_tiles / "train" / ".ipynb_checkpoints", few_tiles / ".cache" / "val"):
        hidden.mkdir(parents=True)
        shutil.copy(train[0], hidden / train[0].name)
    output = tmp_path / "refined"
    summary = refine_tiles(PixelwiseRefiner(), few_tiles, output, progress=False)
    assert sorted(summary.written) == inputs and summary.rejected == []
    assert _npz_under(output) == inputs
    # the input folder itself may be hidden
    hidden_root = tmp_path / ".tiles"
    shutil.copytree(few_tiles / "val", hidden_root)
    summary = refine_tiles(PixelwiseRefiner(), hidden_root, tmp_path / "from_hidden", progress=False)
    assert summary.written == _npz_under(few_tiles / "val")


@pytest.mark.parametrize("inside", ["refined", "train"])
def test_an_output_dir_inside_the_input_folder_is_refused_before_anything_is_written(few_tiles, inside, capsys):
    """`--output_dir tiles/train` skipped the train split without a word (it was taken for earlier outputs) and wrote
    the val tiles among the train tiles; `tiles/refined` was read back as tiles by a run into another folder."""
    before = {path: path.read_bytes() for path in few_tiles.rglob("*.npz")}
    output = few_tiles / inside
    code = main(["--model", "unused", "--input", str(few_tiles), "--output_dir", str(output), "--no_progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (f"stage2-refine: error: output_dir {output} lies inside the input folder {few_tiles}; refusing "
                        "(its outputs would be read as tiles): choose an output folder outside it")
    with pytest.raises(InferenceInputError, match="lies inside the input folder"):
        refine_tiles(PixelwiseRefiner(), few_tiles, output, progress=False)
    assert {path: path.read_bytes() for path in few_tiles.rglob("*.npz")} == before
    assert not (few_tiles / "refined").exists()


def test_an_output_dir_reached_through_a_link_in_the_input_folder_is_refused(few_tiles, tmp_path):
    output = tmp_path / "out"
    refine_tiles(PixelwiseRefiner(), few_tiles, output, progress=False)
    (few_tiles / "linked").symlink_to(output, target_is_directory=True)
    with pytest.raises(InferenceInputError) as error:
        refine_tiles(PixelwiseRefiner(), few_tiles, output, progress=False)
    assert str(error.value).startswith(f"output_dir {output} is reached from the input folder {few_tiles} as "
                                       f"{few_tiles / 'linked'}; refusing")


# ------------------------------------------------------------------------------------------------ warnings


def test_digital_number_warnings_of_tiles_name_the_file(few_tiles, tmp_path):
    """Integer tiles read with `input_scale="reflectance"`: each file's warning names it; the batch's warning named
    `opt_v1`, the stacked array, once more."""
    stage1 = tmp_path / "stage1"
    for path in few_tiles.rglob("*.npz"):
        arrays = load_npz(path)
        target = stage1 / path.relative_to(few_tiles)
        target.parent.mkdir(parents=True, exist_ok=True)
        np.savez(target, opt_v1=np.stack([arrays[key] for key in ("s2_b2", "s2_b3", "s2_b4", "s2_b8")]))
    for stage1_dir in (None, stage1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = refine_tiles(PixelwiseRefiner(), few_tiles, tmp_path / "out", stage1_dir,
                                   input_scale="reflectance", progress=False)
        assert len(summary.written) == 3
        messages = [str(warning.message) for warning in caught if warning.category is DigitalNumbersWarning]
        named = (str(few_tiles),) if stage1_dir is None else (str(few_tiles), str(stage1))
        assert messages and all(message.startswith(named) for message in messages), messages


# ------------------------------------------------------------------------------------------------ refine_arrays


class _Recorder(PixelwiseRefiner):
    def forward(self, opt_v1, month, biome):
        raise AssertionError("the model ran")


@pytest.mark.parametrize("shape", [(4, 0, 10), (2, 4, 10, 0), (1, 4, 0, 0)])
def test_an_image_side_of_0_pixels_is_refused_before_the_model_runs(shape):
    with pytest.raises(InferenceInputError) as error:
        refine_arrays(_Recorder(), np.zeros(shape, np.float32))
    assert str(error.value) == (f"opt_v1: shape {shape} has an image side of 0 pixels; pass images of at least 1 x 1 "
                                "pixel")


def _always_copied(reflectance, valid):
    """`fill_invalid_pixels` as it was: a filled copy, also with nothing to fill."""
    filled = np.array(reflectance, dtype=np.float32, copy=True)
    for image, mask in zip(filled, valid):
        for band in image:
            band[~mask] = band[mask].mean() if mask.any() else 0.0
    return filled


def test_images_with_nothing_to_fill_are_not_copied():
    images = np.random.default_rng(0).random((2, 4, 9, 7), dtype=np.float32)
    valid = np.ones((2, 9, 7), bool)
    assert np.shares_memory(fill_invalid_pixels(images, valid), images)
    valid[1, 3, 4] = False
    images[1, :, 3, 4] = np.nan
    filled = fill_invalid_pixels(images, valid)
    assert not np.shares_memory(filled, images) and np.isnan(images[1, :, 3, 4]).all()  # the input is left alone
    np.testing.assert_array_equal(filled, _always_copied(images, valid))
    np.testing.assert_allclose(filled[1, :, 3, 4], np.nanmean(images[1], axis=(1, 2)), rtol=1e-6)


def test_refine_arrays_holds_no_third_copy_of_the_images_and_gives_the_same_output(monkeypatch):
    """The images, their reflectance and a filled copy with nothing filled: 3.2 times the images' memory at the peak
    (numpy's allocations), 2.2 without the copy."""
    images = np.random.default_rng(1).random((4, 4, 128, 128), dtype=np.float32) * 0.3
    with_invalid = images.copy()
    with_invalid[2, 1, 5, 6] = np.nan
    tracemalloc.start()
    refined = refine_arrays(PixelwiseRefiner(), images, 7, 4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2.6 * images.nbytes, peak / images.nbytes
    partly = refine_arrays(PixelwiseRefiner(), with_invalid, 7, 4)
    np.testing.assert_allclose(refined, pixelwise_expected(images, 7, 4), rtol=1e-6, atol=1e-7)
    monkeypatch.setattr(predict_module, "fill_invalid_pixels", _always_copied)
    np.testing.assert_array_equal(refine_arrays(PixelwiseRefiner(), images, 7, 4), refined)
    np.testing.assert_array_equal(refine_arrays(PixelwiseRefiner(), with_invalid, 7, 4), partly)


# ------------------------------------------------------------------------------------------------ ONNX axes


class _SameSignature(torch.nn.Module):
    """The graph's signature, `(opt_v1, month, biome) -> (refined, out_of_range_weight)`, in two operations."""

    def forward(self, opt_v1, month, biome):
        refined = opt_v1 * 1.5 + (month + biome).view(-1, 1, 1, 1).float()
        return refined, refined[:, :1]


def _axes(path: Path) -> tuple[dict, dict]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ({value.name: value.shape for value in session.get_inputs()},
            {value.name: value.shape for value in session.get_outputs()})


def _named_axes(outputs: tuple[str, ...]):
    inputs = {"opt_v1": ["batch", 4, "height", "width"], "month": ["batch"], "biome": ["batch"]}
    shapes = {"refined": ["batch", 4, "height", "width"], "out_of_range_weight": ["batch", 1, "height", "width"]}
    return inputs, {name: shapes[name] for name in outputs}


def test_the_onnx_graph_names_its_dynamic_axes(tmp_path):
    """`_save_onnx` on a program traced with the refiner's dynamic shapes: torch's symbols (s22, ...) became named."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from _refiner_helpers import tiny_refiner_config
    from modeling_stage2.export import _dynamic_shapes, _save_onnx

    example = (torch.rand(2, 4, 120, 134), torch.tensor([3, -1]), torch.tensor([-1, 5]))
    program = torch.export.export(_SameSignature(), example, dynamic_shapes=_dynamic_shapes(tiny_refiner_config()),
                                  strict=False)
    path = tmp_path / "model.onnx"
    _save_onnx(program, path, 18, ("refined", "out_of_range_weight"))
    assert _axes(path) == _named_axes(("refined", "out_of_range_weight"))


@pytest.mark.slow
def test_the_tiny_refiners_onnx_export_names_its_dynamic_axes(tmp_path):
    """The same on the tiny refiner (about 10 s here: the trace and the ONNX conversion), checked against eager."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from _refiner_helpers import tiny_backbone_config, tiny_refiner_config
    from modeling_stage2 import Stage2RefinerModel
    from modeling_stage2.export import CHECK_TOLERANCE, export_refiner

    torch.manual_seed(0)
    model = Stage2RefinerModel(tiny_refiner_config(backbone_config=tiny_backbone_config(depth=1),
                                                   num_convnext_blocks=1, out_of_range_fallback=True))
    result = export_refiner(model, tmp_path / "onnx", format="onnx")
    assert result.max_abs_difference <= CHECK_TOLERANCE["float32"]
    assert _axes(result.graph_file) == _named_axes(("refined", "out_of_range_weight"))

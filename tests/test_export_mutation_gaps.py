"""Tests closing the gaps a mutation audit of modeling_stage2.export and modeling_stage2.onnx_runtime found: each
fails under a plausible bug that the rest of the suite let pass. One tiny `.pt2` export (no check) is shared by the
module; the rest runs on the tiny eager refiner, hand-written `export.json` files and the pure helpers."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from _refiner_helpers import tiny_refiner_config, wake_up
from modeling_stage2.export import (
    EXPORT_INFO_FILE, MAX_BATCH, MAX_SIDE, ExportError, _check_model_argument, _check_options, _refuse_foreign_folder,
    describe, export_friendly, export_refiner, model_card_section,
)
from modeling_stage2.onnx_runtime import ExportedRefiner, is_exported_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_model(seed: int = 0, **overrides):
    from modeling_stage2 import Stage2RefinerModel

    torch.manual_seed(seed)
    model = Stage2RefinerModel(tiny_refiner_config(**overrides))
    with torch.no_grad():
        wake_up(model, seed=seed + 1)
    return model


@pytest.fixture(scope="module")
def pt2_export(tmp_path_factory):
    """(the caller's model, in training mode, after its export; the `.pt2` export folder, written without the
    check)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _tiny_model(seed=3)
        model.train()
        folder = tmp_path_factory.mktemp("gaps") / "pt2"
        export_refiner(model, folder, format="torch_export", check=False)
    finally:
        torch.set_num_threads(threads)
    return model, folder


def _no_run(monkeypatch, graph):
    def must_not_run(*args):
        raise AssertionError("the graph ran")

    monkeypatch.setattr(graph, "_run", must_not_run)


# ----------------------------------------------------------------------------------------------- options


def test_every_opset_the_help_names_is_taken_and_no_other():
    """`--opset` help says 18..23: both ends are valid, their neighbours are refused with the range."""
    for opset in (18, 23):
        _check_options("onnx", opset, "float32")
    for opset in (17, 24):
        with pytest.raises(ExportError, match=rf"^opset must be 18\.\.23 .*got {opset}$"):
            _check_options("onnx", opset, "float32")


@pytest.mark.parametrize(("options", "message"), [
    ({"format": "tflite"}, "format must be one of ('onnx', 'torch_export'), got 'tflite'"),
    ({"dtype": "bfloat16"}, "dtype must be one of ('float32', 'float16'), got 'bfloat16'"),
    ({"opset": 17}, "opset must be 18..23 (what the dynamo exporter emits), got 17"),
    ({"format": "torch_export", "opset": 18}, "opset applies to format onnx only"),
])
def test_export_refiner_names_its_own_arguments_in_its_errors(options, message, tmp_path):
    """The command line's `choices` guard format and dtype; `export_refiner` callers get the same one-line
    ExportError (not a KeyError after the trace), naming the function's arguments, not `stage2-export`'s flags
    (`--opset`), before the model is looked at."""
    with pytest.raises(ExportError) as error:
        export_refiner(None, tmp_path / "export", **options)
    assert str(error.value) == message
    assert not (tmp_path / "export").exists()


def test_export_refiner_names_its_output_dir_argument_and_the_command_line_its_output(tmp_path, capsys):
    from modeling_stage2.export import main as export_main

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=f"^output_dir {folder}: holds other files"):
        export_refiner(None, folder)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert export_main([str(model), str(folder), "--format", "torch_export", "--opset", "18"]) == 2
    assert capsys.readouterr().err == "stage2-export: error: --opset applies to --format onnx only\n"
    assert export_main([str(model), str(folder)]) == 2
    assert capsys.readouterr().err.startswith(f"stage2-export: error: OUTPUT {folder}: holds other files")
    assert (folder / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("model", ["no_such_folder", "a/b/c", "./best", "owner/"])
def test_a_missing_folder_that_is_no_hub_repo_id_is_refused_by_name(model):
    with pytest.raises(ExportError, match=f"^MODEL {model}: no such folder, and not a Hub repo id"):
        _check_model_argument(model)
    _check_model_argument("owner/name")  # left to the Hub


def test_an_earlier_onnx_export_with_external_weights_may_be_replaced(tmp_path):
    """A graph over 1.5 GB keeps its weights in model.onnx.data beside model.onnx: such a folder is an earlier
    export, not a folder holding other files."""
    folder = tmp_path / "onnx"
    folder.mkdir()
    for name in ("model.onnx", "model.onnx.data", "config.json", EXPORT_INFO_FILE, "README.md"):
        (folder / name).write_text("x")
    _refuse_foreign_folder(folder)
    for index in range(6):
        (folder / f"other_{index}.txt").write_text("x")
    with pytest.raises(ExportError, match=r"other files \(other_0.txt, .*, other_4.txt \.\.\.\); move them away"):
        _refuse_foreign_folder(folder)


# --------------------------------------------------------------------------------------- export.json, README


def test_export_json_declares_the_limits_the_runtime_checks():
    info = describe(tiny_refiner_config(num_months=6, num_biomes=9), format="onnx", dtype="float32", opset=20)
    assert info["shape_limits"] == {"batch": [1, MAX_BATCH], "height": [15, MAX_SIDE], "width": [15, MAX_SIDE]}
    inputs = {entry["name"]: entry for entry in info["inputs"]}
    assert inputs["month"]["value_range"] == [1, 6] and inputs["biome"]["value_range"] == [0, 8]
    assert "acquisition month 1..6" in inputs["month"]["description"]
    assert "biome code 0..8" in inputs["biome"]["description"]
    for entry in (inputs["opt_v1"], *info["outputs"]):
        assert entry["dynamic_axes"] == {"0": "batch", "2": "height", "3": "width"}
    assert info["opset"] == 20 and info["graph_file"] == "model.onnx" and info["export_format_version"] == 1
    assert "(15..32768 px)" in info["padding"]["rule"] and "(14x14)" in info["padding"]["rule"]


def _card(**source):
    info = describe(tiny_refiner_config(), format="onnx", dtype="float32", opset=18, source=source,
                    max_abs_difference=source.pop("difference", float("nan")))
    return model_card_section(info)


def test_the_readme_says_what_the_export_was_made_from():
    """The quantization line only for a quantized training base, the check line only when the check ran, the opset
    only for ONNX, and whether adapters were merged."""
    plain = _card(adapters_merged=False, trained_quantization="none")
    assert "Trained on a" not in plain and "Checked against" not in plain and "nan" not in plain
    assert "; no adapters;" in plain and "(onnx, opset 18, float32 weights" in plain
    card = _card(adapters_merged=True, trained_quantization="4bit", difference=3.5e-7)
    assert "- Trained on a 4bit base; the export uses the full-precision base" in card
    assert "largest difference 3.50e-07 (reflectance)" in card and "LoRA adapters merged into the base weights" in card
    pt2 = model_card_section(describe(tiny_refiner_config(), format="torch_export", dtype="float16", opset=None))
    assert "(torch_export, float16 weights" in pt2 and "opset" not in pt2 and "torch.export.load" in pt2


# ----------------------------------------------------------------------------------- export-friendly parts


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate"])
def test_the_export_friendly_forward_equals_the_eager_one_at_every_size(padding_mode):
    """The swapped-in padding, crop and grid (run eagerly here, no trace) give the eager model's output at sizes
    that pad by 0 or 1 px, by an odd amount (the smaller half first) and by 13 px (a side of 15)."""
    model = _tiny_model(seed=5, padding_mode=padding_mode).eval()
    generator = torch.Generator().manual_seed(0)
    for height, width in ((15, 28), (28, 15), (23, 41), (27, 29), (42, 17)):
        opt_v1 = torch.rand(2, 4, height, width, generator=generator) * 0.4
        month, biome = torch.tensor([3, -1]), torch.tensor([-1, 5])
        with torch.no_grad():
            expected = model(opt_v1, month, biome).refined
            with export_friendly(model):
                actual = model(opt_v1, month, biome).refined
        assert actual.shape == expected.shape
        assert float((actual - expected).abs().max()) < 1e-5, (padding_mode, height, width)


def test_export_friendly_restores_the_input_checks():
    model = _tiny_model().eval()
    nan_image = torch.full((1, 4, 28, 28), float("nan"))
    with export_friendly(model), torch.no_grad():
        model(nan_image, torch.tensor([1]), torch.tensor([1]))  # unchecked while tracing
    assert not {"_check_opt_v1", "_check_metadata", "_pad_to_patch_multiple", "_run_head", "_export_crop"} & set(
        vars(model)) and "_grid_size" not in vars(model.backbone)
    with pytest.raises(ValueError, match="opt_v1 contains NaN"):
        model(nan_image)
    with pytest.raises(ValueError, match="month must be in 1..12"):
        model(torch.rand(1, 4, 28, 28) * 0.3, torch.tensor([13]))


# ----------------------------------------------------------------------------------------- the .pt2 export


def test_a_float32_model_object_is_left_as_it_was(pt2_export):
    """Exported as it is (no copy): its training mode, `requires_grad` and checks are the caller's again."""
    model, _ = pt2_export
    assert model.training and all(parameter.requires_grad for parameter in model.parameters())
    with pytest.raises(ValueError, match="opt_v1 contains NaN"):
        model(torch.full((1, 4, 28, 28), float("nan")))


def test_the_graph_file_alone_keeps_its_folders_limits(pt2_export, tmp_path, monkeypatch):
    """`model.pt2` opened as a file reads the export.json beside it; a graph without its folder (config= given) still
    refuses sizes the export declared no graph for, on either side, before it runs."""
    model, folder = pt2_export
    beside = ExportedRefiner(folder / "model.pt2")
    assert beside.max_batch == MAX_BATCH and beside.export_info["format"] == "torch_export"
    alone_dir = tmp_path / "alone"
    alone_dir.mkdir()
    shutil.copy(folder / "model.pt2", alone_dir / "graph.pt2")
    alone = ExportedRefiner(alone_dir / "graph.pt2", config=model.config)
    assert alone.max_batch is None and alone.side_range == (15, MAX_SIDE)
    _no_run(monkeypatch, alone)
    for shape, needle in (((1, 4, 14, 40), "height 14"), ((1, 4, 40, 14), "width 14")):
        with pytest.raises(ValueError, match=f"opt_v1 {needle} is outside the exported graph's range 15..32768 "
                                             r"\(graph.pt2\)"):
            alone(torch.rand(*shape) * 0.3, 1, 1)


def test_the_largest_batch_and_sides_are_taken_one_more_is_not(pt2_export):
    """`shape_limits` are inclusive, as the trace's `Dim(max=...)`: MAX_BATCH tiles and MAX_SIDE px pass the check."""
    _, folder = pt2_export
    graph = ExportedRefiner(folder)
    graph.check_inputs(torch.zeros(MAX_BATCH, 4, 15, 15), 1, 1)
    graph.check_inputs(torch.zeros(1, 4, 15, MAX_SIDE), 1, 1)
    graph.check_inputs(torch.zeros(1, 4, MAX_SIDE, 15), 1, 1)
    with pytest.raises(ValueError, match=f"opt_v1 width {MAX_SIDE + 1} is outside .* range 15..{MAX_SIDE}"):
        graph.check_inputs(torch.zeros(1, 4, 15, MAX_SIDE + 1), 1, 1)


def test_float64_input_gives_the_float32_graphs_output_in_float64(pt2_export):
    graph = ExportedRefiner(pt2_export[1])
    image = np.random.default_rng(0).random((2, 4, 30, 31)) * 0.4
    as_float64 = graph(image, [3, -1], [-1, 5]).refined
    as_float32 = graph(image.astype(np.float32), [3, -1], [-1, 5]).refined
    assert as_float64.dtype == torch.float64 and as_float32.dtype == torch.float32
    assert float((as_float64 - as_float32.double()).abs().max()) < 1e-6


def test_hidden_states_are_refused_not_silently_left_out(pt2_export):
    graph = ExportedRefiner(pt2_export[1])
    with pytest.raises(ValueError, match=r"^an exported refiner returns refined only \(no hidden states\)$"):
        graph(torch.rand(1, 4, 28, 28) * 0.3, output_hidden_states=True)


def test_the_pt2_exports_readme_and_export_json(pt2_export):
    """Written without the check: no difference claimed in either; no opset for a .pt2; nothing merged."""
    _, folder = pt2_export
    info = json.loads((folder / EXPORT_INFO_FILE).read_text())
    assert info["opset"] is None and info["graph_file"] == "model.pt2" and info["source"]["adapters_merged"] is False
    assert math.isnan(info["max_abs_difference_vs_eager"])
    card = (folder / "README.md").read_text()
    assert "Checked against" not in card and "; no adapters;" in card and "opset" not in card


# ----------------------------------------------------------------------------------- folders and export.json


def test_only_graph_files_and_export_folders_are_exported_models(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    assert is_exported_model(tmp_path / "model.onnx")
    assert not is_exported_model(tmp_path / "notes.txt") and not is_exported_model(tmp_path / "folder")
    assert not is_exported_model(tmp_path / "missing.onnx")


@pytest.mark.parametrize(("change", "error", "needle"), [
    ({"shape_limits": {"batch": [1, True]}}, ValueError, "key 'shape_limits' is {'batch': [1, True]}"),
    ({"shape_limits": {"height": [15]}}, ValueError, "key 'shape_limits' is {'height': [15]}"),
    ({"shape_limits": {"width": [15.0, 32768]}}, ValueError, "key 'shape_limits' is {'width': [15.0, 32768]}"),
    ({"graph_file": ".."}, ValueError, "key 'graph_file' is '..'"),
    ({"graph_file": "other.pt2"}, FileNotFoundError, "other.pt2: missing (named by"),
])
def test_a_damaged_export_json_is_refused_before_loading(pt2_export, tmp_path, change, error, needle):
    _, folder = pt2_export
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    info = json.loads((copy / EXPORT_INFO_FILE).read_text())
    (copy / EXPORT_INFO_FILE).write_text(json.dumps({**info, **change}))
    with pytest.raises(error) as raised:
        ExportedRefiner(copy)
    assert needle in str(raised.value) and str(copy) in str(raised.value)


def test_export_refiner_names_output_dir_in_every_refusal_of_its_folder(tmp_path):
    """Each refusal of the folder names `export_refiner`'s argument: a file given as the folder, and an earlier export
    with other files beside it (`stage2-export` says `OUTPUT`)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    with pytest.raises(ExportError, match=f"^output_dir {a_file}: is a file; give a folder path$"):
        export_refiner(None, a_file)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / EXPORT_INFO_FILE).write_text("{}")
    (earlier / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=f"^output_dir {earlier}: holds an earlier export and other files \\(notes"):
        export_refiner(None, earlier)

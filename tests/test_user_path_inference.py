"""A first-time user's path through inference and export: a Hub out of reach is exit 1 for `stage2-export` as for
`stage2-refine`; band files that mix integer and float values are named, with the flag to say which they are; an 8-bit
refinement says bitsandbytes' float16 cast once, not once per layer and batch; `--no_progress` silences the model
loading's bars too; the docs' install line keeps the pins and their size of the 8-bit base's temporary copy is the
600M refiner's."""
from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from _hub_helpers import DEFAULT_TOKEN, configure_hub_client  # noqa: E402
from _refiner_helpers import save_woken_adapter  # noqa: E402
from inference_stage2 import main, refine_arrays  # noqa: E402
from modeling_stage2 import _quiet  # noqa: E402
from modeling_stage2.bands import BAND_NAMES  # noqa: E402
from test_inference import smooth_scene, write_geotiff  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens: the connection is refused at once


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A tiny trained adapter folder on a full-precision base (what `stage2-refine --quantization 8bit` loads)."""
    folder = tmp_path_factory.mktemp("adapter") / "best"
    save_woken_adapter(folder)
    return folder


# ----------------------------------------------------------------------------- stage2-export and the Hub
def test_export_of_a_hub_model_with_the_hub_out_of_reach_exits_1_in_one_line(tmp_path, monkeypatch, capsys):
    """Not the input's fault (exit 2 is for a name that does not exist): exit 1, as stage2-refine and stage2-push."""
    from modeling_stage2 import export

    configure_hub_client(monkeypatch, CLOSED_PORT, DEFAULT_TOKEN, tmp_path / "hf")
    output = tmp_path / "onnx"
    assert export.main(["loopback-user/tiny-adapter", str(output)]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("stage2-export: error: MODEL loopback-user/tiny-adapter: not a local folder, and "
                           "downloading it from the Hub failed (LocalEntryNotFoundError: ")
    assert not output.exists()


def test_export_of_a_hub_repo_that_does_not_exist_stays_a_user_error(tmp_path, monkeypatch, capsys):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from modeling_stage2 import export

    def missing(repo_id, **kwargs):
        request = httpx2.Request("GET", f"{CLOSED_PORT}/api/models/{repo_id}")
        raise RepositoryNotFoundError("404 Client Error.\nRepository Not Found",
                                      response=httpx2.Response(404, request=request))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    assert export.main(["me/nothing", str(tmp_path / "onnx")]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("stage2-export: error: MODEL me/nothing: not a local folder, and downloading it from the "
                           "Hub failed (RepositoryNotFoundError: 404 Client Error. Repository Not Found")


# ----------------------------------------------------------------------------- band files of mixed dtypes
@pytest.mark.parametrize("float_bands", [["B08"], ["B02", "B03", "B04"], ["B03", "B08"]])
def test_band_files_that_mix_integer_and_float_values_are_named_with_the_flag_to_say_which(tmp_path, capsys,
                                                                                           float_bands):
    """The odd files (the fewer; the float ones when there are as many of each) are named with their dtype, then the
    others; the command line gets the flag's spelling beside the Python argument's. Refused before the model is read
    (there is none)."""
    from inference_stage2.raster import _INPUT_SCALE_CHOICE

    data = smooth_scene(60, 70, seed=8)
    files = [write_geotiff(tmp_path / f"{name}.tif", (band[None] / 1e4).astype(np.float32) if name in float_bands
                           else band[None], nodata=0) for name, band in zip(BAND_NAMES, data)]
    floats = [f"{path} (float32)" for path, name in zip(files, BAND_NAMES) if name in float_bands]
    integers = [f"{path} (uint16)" for path, name in zip(files, BAND_NAMES) if name not in float_bands]
    floats_first = len(floats) <= len(integers)  # 2 of each: the float ones are the odd ones
    odd, others, kinds = ((floats, integers, ("float", "integer")) if floats_first
                          else (integers, floats, ("integer", "float")))
    output = tmp_path / "out.tif"
    code = main(["--model", str(tmp_path / "no_model_here"), "--input", *map(str, files), "--month", "7",
                 "--biome", "4", "--output", str(output), "--no_progress"])
    [line] = capsys.readouterr().err.splitlines()
    assert code == 2 and not output.exists()
    assert line == (f"stage2-refine: error: {', '.join(odd)}: {kinds[0]} values, while {', '.join(others)} hold "
                    f"{kinds[1]} values; say which they all are with {_INPUT_SCALE_CHOICE}")
    assert "--input_scale dn" in line and "--input_scale reflectance" in line


# ----------------------------------------------------------------------------- 8 bit: one line, not thousands
@pytest.mark.usefixtures("one_torch_thread")
def test_an_8bit_refinement_of_several_batches_says_the_float16_cast_once(adapter_dir, tmp_path, monkeypatch, caplog):
    """bitsandbytes logs its cast on every call of each 8-bit layer (8 here, 3 batches: 24 lines). Its base is first
    written in full precision to a `stage2-base-` folder in the temporary folder (TMPDIR's), removed once loaded."""
    from inference_stage2 import load_model
    from modeling_stage2 import adapters

    monkeypatch.setattr(_quiet, "_said", set())  # as in a fresh process
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # what TMPDIR sets
    removed, remove_tree = [], adapters.remove_tree

    def recorded(folder):
        removed.append(Path(folder))
        remove_tree(folder)

    monkeypatch.setattr(adapters, "remove_tree", recorded)
    model = load_model(adapter_dir, quantization="8bit", device="cpu")
    assert [(folder.parent, folder.name.startswith("stage2-base-"), folder.exists()) for folder in removed] == [
        (tmp_path / "tmp", True, False)]
    images = np.stack([smooth_scene(120, 120, seed=seed) for seed in range(3)])
    with caplog.at_level(logging.WARNING):
        refined = refine_arrays(model, images, 7, 4, batch_size=1)
    assert refined.shape == images.shape and np.isfinite(refined).all()
    casts = [record for record in caplog.records if record.getMessage().startswith(_quiet.BNB_INT8_CAST)]
    assert len(casts) == 1


# ----------------------------------------------------------------------------- --no_progress
@pytest.mark.usefixtures("one_torch_thread")
def test_no_progress_silences_the_bars_of_the_model_s_loading_and_restores_them(adapter_dir, tmp_path, capsys):
    """An 8-bit adapter's base is saved (`Writing model shards`) and loaded (`Loading weights`) by transformers;
    --no_progress turns those bars off for the load, and leaves the settings as they were after it."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    scene = write_geotiff(tmp_path / "scene.tif", smooth_scene(60, 70, seed=9), nodata=0)
    was_on = transformers_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    transformers_logging.enable_progress_bar()
    try:
        argv = ["--model", str(adapter_dir), "--input", str(scene), "--month", "7", "--biome", "4",
                "--quantization", "8bit", "--num_threads", "1"]
        assert main([*argv, "--output", str(tmp_path / "shown.tif")]) == 0
        assert "Loading weights" in capsys.readouterr().err  # the bars this test is about are drawn here
        assert main([*argv, "--output", str(tmp_path / "quiet.tif"), "--no_progress"]) == 0
        err = capsys.readouterr().err
        assert not re.search(r"Loading weights|Writing model shards|Fetching \d+ files|it/s", err), err
        assert transformers_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    finally:
        (transformers_logging.enable_progress_bar if was_on[0] else transformers_logging.disable_progress_bar)()
        if not was_on[1]:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()


@pytest.mark.parametrize("transformers_on, hub_on", [(True, False), (False, True), (True, True), (False, False)])
def test_no_loading_progress_bars_leaves_each_library_s_setting_as_it_was(transformers_on, hub_on):
    """Off for both inside the block; after it each library's own setting is back, when the two were set apart too
    (transformers' switch turns huggingface_hub's with it)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    def settings():
        return transformers_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()

    was = settings()
    try:
        (transformers_logging.enable_progress_bar if transformers_on else transformers_logging.disable_progress_bar)()
        (enable_progress_bars if hub_on else disable_progress_bars)()
        assert settings() == (transformers_on, hub_on)
        with _quiet.no_loading_progress_bars():
            assert settings() == (False, False)
        assert settings() == (transformers_on, hub_on)
    finally:
        (transformers_logging.enable_progress_bar if was[0] else transformers_logging.disable_progress_bar)()
        (enable_progress_bars if was[1] else disable_progress_bars)()


# ----------------------------------------------------------------------------- docs/inference.md
def test_the_docs_size_of_the_8bit_base_s_temporary_copy_is_the_600m_refiner_s_in_float32():
    """docs/inference.md: the full-precision copy of a 600M base written before an 8-bit load, from its parameter
    count (built on the meta device: nothing allocated)."""
    import torch

    from modeling_stage2 import Stage2RefinerConfig, Stage2RefinerModel

    with torch.device("meta"):
        model = Stage2RefinerModel(Stage2RefinerConfig(backbone_config="prithvi_eo_v2_600m"))
    count = sum(parameter.numel() for parameter in model.parameters())
    page = " ".join((ROOT / "docs" / "inference.md").read_text().split())
    assert (f"(`stage2-base-*`, about {count * 4 / 1e9:.1f} GB for the 600M backbone: {count / 1e6:.0f}M parameters "
            "of 4 bytes)") in page
    assert "set `TMPDIR` to put it on a disk with room" in page

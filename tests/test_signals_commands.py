"""Signals at the awkward moments of `stage2-evaluate` and `stage2-refine`: what a stop leaves behind
(`modeling_stage2._signals`). A signal's handler raises `SystemExit(128 + N)` once the call it came in returns;
the tests raise it there themselves."""
from __future__ import annotations

import os
import signal
import tempfile
from argparse import Namespace

import pytest

from _data_helpers import make_tile_dir

STOPPED = 128 + signal.SIGTERM


def test_a_signal_while_the_converted_tiles_are_deleted_still_deletes_them(tmp_path, monkeypatch):
    """After the table and `--json`, the temporary folder of the converted tiles is deleted (gigabytes of Arrow: long
    enough for a Ctrl-C). A signal part-way left the rest of it in the temporary folder, for good."""
    from training import evaluate

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def _run(args, cache_dir):
        for index in range(5):
            (tmp_path / os.path.basename(cache_dir) / f"data-{index}.arrow").write_text("rows")
        return {}

    real_unlink, calls = os.unlink, []

    def unlink(path, *args, **kwargs):  # the second file deleted, then the handler raises
        real_unlink(path, *args, **kwargs)
        calls.append(path)
        if len(calls) == 2:
            raise SystemExit(STOPPED)

    monkeypatch.setattr(evaluate, "_run", _run)
    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(SystemExit) as stopped:
        evaluate.run(Namespace(cache_dir=None))
    assert stopped.value.code == STOPPED and len(calls) >= 2
    assert list(tmp_path.iterdir()) == []


def test_a_stop_while_tiles_are_converted_leaves_no_cache_dir_it_made(tmp_path, monkeypatch):
    """`--cache_dir` was made before the conversion, out of reach of the build's own cleanup: a stop (or a failure)
    during it left an empty folder."""
    import data_builders.build as build
    from training.evaluate import load_dataset_dict

    tiles = make_tile_dir(tmp_path / "tiles", per_split=1)

    def stopped(*args, **kwargs):
        raise SystemExit(STOPPED)

    monkeypatch.setattr(build, "_generate_splits", stopped)
    with pytest.raises(SystemExit):
        load_dataset_dict(str(tiles), cache_dir=str(tmp_path / "new" / "cache"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiles"]


def test_a_signal_between_the_scene_and_weight_map_renames_keeps_them_a_pair(tmp_path, monkeypatch):
    """The weight map is renamed into place, then the scene: a signal between the two left the new weight map beside
    the earlier run's scene, and stage2-refine exited 143 as if nothing had been replaced."""
    pytest.importorskip("rasterio")
    import torch

    from _refiner_helpers import tiny_refiner_config
    from inference_stage2 import refine_scene
    from modeling_stage2 import Stage2RefinerModel
    from test_inference import smooth_scene, write_geotiff

    torch.manual_seed(0)
    model = Stage2RefinerModel(tiny_refiner_config(near_black_fallback=True)).eval()
    scene = write_geotiff(tmp_path / "scene.tif", smooth_scene(64, 64), nodata=0)
    refined, weight = tmp_path / "refined.tif", tmp_path / "kept.tif"
    for path in (refined, weight):
        path.write_bytes(b"an earlier run's output")

    real_replace, calls = os.replace, []

    def replace(source, destination):
        real_replace(source, destination)
        calls.append(destination)
        if len(calls) == 1:
            raise SystemExit(STOPPED)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SystemExit):
        refine_scene(model, scene, refined, 7, 4, window=64, overlap=0, progress=False, out_of_range_output=weight)
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls[0] == weight  # the case of this test: the weight map went first
    assert refined.read_bytes() != b"an earlier run's output" and weight.read_bytes() != b"an earlier run's output"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kept.tif", "refined.tif", "scene.tif"]


def _stop_at_the_first_deletion_after(monkeypatch, module, name: str) -> list:
    """`module.name` runs, then the first file deletion is stopped by a signal (its handler raising SystemExit once
    the deletion returns); returns the files deleted after `name`."""
    real, real_unlink, armed, deleted = getattr(module, name), os.unlink, [], []

    def arm(*args, **kwargs):
        result = real(*args, **kwargs)
        armed.append(True)
        return result

    def unlink(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        if armed:
            deleted.append(path)
            if len(deleted) == 1:
                raise SystemExit(STOPPED)

    monkeypatch.setattr(module, name, arm)
    monkeypatch.setattr(os, "unlink", unlink)
    return deleted


def test_a_signal_while_the_quantized_bases_copy_is_deleted_still_deletes_it(tmp_path, monkeypatch):
    """A quantized base is loaded from a full-precision copy in a temporary folder (2.5 GB for the 600M); a signal
    while TemporaryDirectory deleted it left the rest there, for good."""
    from modeling_stage2 import adapters

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    class Saved:
        config = None

        def save_pretrained(self, folder):
            for name in ("config.json", "model.safetensors", "generation_config.json"):
                with open(os.path.join(folder, name), "w") as handle:
                    handle.write("{}")

    monkeypatch.setattr(adapters, "_from_pretrained", lambda *args, **kwargs: None)  # the quantized load
    deleted = _stop_at_the_first_deletion_after(monkeypatch, adapters, "_from_pretrained")
    with pytest.raises(SystemExit) as stopped:
        adapters._base_model(Saved, "8bit", None)
    assert stopped.value.code == STOPPED and len(deleted) >= 1
    assert list(tmp_path.iterdir()) == []


def test_a_signal_while_a_failed_builds_scratch_is_deleted_still_deletes_it(tmp_path, monkeypatch):
    """A build that fails once its Arrow files are written (a full disk while staging them) deletes its scratch folder
    beside the output (gigabytes: seconds); a Ctrl-C part-way left the rest there until the next build into the same
    folder."""
    import errno

    import data_builders.build as build

    tiles = make_tile_dir(tmp_path / "tiles", per_split=2)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build, "_stage", full_disk)
    deleted = _stop_at_the_first_deletion_after(monkeypatch, build, "_generate_kept")
    with pytest.raises(SystemExit) as stopped:
        build.build_dataset(tiles, tmp_path / "ds")
    assert stopped.value.code == STOPPED and len(deleted) >= 2  # the first deletion stopped, the rest done after it
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiles"]

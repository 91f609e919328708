"""Output paths that cannot be written (a folder where a file goes, a file where a folder goes or must be made) are
user errors found before the work, not tracebacks after it (`modeling_stage2._files.output_path_problem`)."""
from __future__ import annotations

from pathlib import Path

import pytest

from modeling_stage2._files import output_path_problem


@pytest.fixture
def paths(tmp_path) -> dict[str, Path]:
    a_file, a_folder = tmp_path / "a_file", tmp_path / "a_folder"
    a_file.write_text("x")
    a_folder.mkdir()
    return {"file": a_file, "folder": a_folder, "under a file": a_file / "deeper" / "out", "new": tmp_path / "n" / "o"}


def test_what_stops_a_path_from_being_written(paths):
    under = f"{paths['file']} is a file, so nothing can be written under it"
    assert output_path_problem(paths["file"]) is None  # replaced atomically
    assert output_path_problem(paths["new"]) is None and output_path_problem(paths["new"], folder=True) is None
    assert output_path_problem(paths["folder"], folder=True) is None
    assert output_path_problem(paths["folder"]) == "is a folder; give a file path"
    assert output_path_problem(paths["file"], folder=True) == "is a file; give a folder path"
    assert output_path_problem(paths["under a file"]) == under
    assert output_path_problem(paths["under a file"], folder=True) == under
    assert not paths["new"].parent.exists()  # checking makes nothing
    assert sorted(p.name for p in paths["file"].parent.iterdir()) == ["a_file", "a_folder"]  # nor leaves a probe


UNWRITABLE = Path("/sys")  # sysfs: no one, root included, creates a file there


def _unwritable_here() -> bool:
    return UNWRITABLE.is_dir() and output_path_problem(UNWRITABLE, folder=True) is not None


@pytest.mark.skipif(not _unwritable_here(), reason="needs a folder no one may write in (/sys)")
def test_a_folder_nothing_can_be_written_in_is_found_before_the_work(sample_tiles_dir, capsys):
    from data_builders.build import main as build
    from inference_stage2.cli import main as refine

    message = f"nothing can be written in {UNWRITABLE} ("
    assert output_path_problem(UNWRITABLE / "out", folder=True).startswith(message)
    assert output_path_problem(UNWRITABLE / "refined.tif").startswith(message)
    tile = sorted((sample_tiles_dir / "test").glob("*.npz"))[0]
    # before the model is looked for (it does not exist): nothing is loaded or refined for an output that must fail
    argv = ["--model", "/nonexistent/model", "--input", str(tile), "--output_dir", str(UNWRITABLE / "out")]
    assert _exit_status(refine, argv) == 2
    assert f"output_dir {UNWRITABLE / 'out'}: {message}" in capsys.readouterr().err
    assert build(["--data_dir", str(sample_tiles_dir), "--output_dir", str(UNWRITABLE / "ds")]) == 2
    assert f"--output_dir {UNWRITABLE / 'ds'}: {message}" in capsys.readouterr().err


def _exit_status(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's parser.error
        return exit_.code


@pytest.mark.parametrize("where", ["folder", "under a file"])
def test_stage2_evaluate_json(paths, where, capsys):
    from training.evaluate import main

    argv = ["--model", str(paths["new"]), "--data", str(paths["new"]), "--json", str(paths[where])]
    assert _exit_status(main, argv) == 2  # before the (absent) model and data are looked at
    err = capsys.readouterr().err
    assert f"--json {paths[where]}: " in err and str(paths["new"]) not in err


@pytest.mark.parametrize("flag, where", [("--output", "folder"), ("--output", "under a file"),
                                         ("--out_of_range_output", "under a file")])
def test_stage2_refine_scene_outputs(paths, tmp_path, flag, where, capsys):
    from inference_stage2.cli import main

    scene = tmp_path / "scene.tif"
    scene.write_bytes(b"checked later")
    target = paths[where].with_suffix(".tif") if where == "folder" else paths[where].with_name("x.tif")
    if where == "folder":
        target.mkdir()
    outputs = {"--output": str(tmp_path / "ok.tif"), flag: str(target)}
    argv = ["--model", str(paths["new"]), "--input", str(scene), "--month", "6", "--biome", "4"]
    argv += [item for pair in outputs.items() for item in pair]
    assert _exit_status(main, argv) == 2
    assert f"{flag} {target}: " in capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_stage2_refine_tiles_output_dir(paths, sample_tiles_dir, where, capsys):
    from inference_stage2.cli import main

    tile = sorted((sample_tiles_dir / "test").glob("*.npz"))[0]
    argv = ["--model", str(paths["new"]), "--input", str(tile), "--output_dir", str(paths[where])]
    assert _exit_status(main, argv) == 2
    assert f"stage2-refine: error: output_dir {paths[where]}: " in capsys.readouterr().err


@pytest.mark.parametrize("where, message", [
    ("folder", "name the preview FILE.png"),  # matplotlib would have written a_folder.png and said a_folder
    ("file", "name the preview FILE.png"),
    ("under a file", "is a file, so nothing can be written under it"),
])
def test_stage2_inspect_plot(paths, sample_dataset_dir, where, message, capsys):
    from data_builders.inspect import main

    plot = paths[where].with_name("p.png") if where == "under a file" else paths[where]
    assert _exit_status(main, [str(sample_dataset_dir), "--plot", str(plot)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"--plot {plot}: " in err and message in err
    assert not list(plot.parent.parent.glob("*.png"))


def test_stage2_inspect_writes_the_format_its_suffix_names(sample_dataset_dir, tmp_path, capsys):
    from data_builders.inspect import main

    assert main([str(sample_dataset_dir), "--plot", str(tmp_path / "grid.PDF"), "--num_tiles", "1"]) == 0
    assert (tmp_path / "grid.PDF").read_bytes()[:5] == b"%PDF-"
    assert [path.name for path in tmp_path.iterdir()] == ["grid.PDF"]  # atomically: no partial file left
    assert f"wrote {tmp_path / 'grid.PDF'}" in capsys.readouterr().out


def test_data_commands_output_dir(paths, sample_tiles_dir, capsys):
    from data_builders.bigearthnet import main as ingest
    from data_builders.build import main as build

    target = paths["under a file"]
    assert build(["--data_dir", str(sample_tiles_dir), "--output_dir", str(target)]) == 2
    assert f"stage2-build-dataset: error: --output_dir {target}: " in capsys.readouterr().err
    assert build(["--data_dir", str(sample_tiles_dir), "--output_dir", str(paths["file"])]) == 2
    assert "is a file; give a folder path" in capsys.readouterr().err
    argv = ["--lmdb", str(paths["new"]), "--metadata", str(paths["new"]), "--output_dir", str(target)]
    assert ingest(argv) == 2
    assert f"stage2-ingest-bigearthnet: error: --output_dir {target}: " in capsys.readouterr().err
    assert paths["file"].read_text() == "x"


def test_stage2_export_output(paths, capsys):
    pytest.importorskip("onnx")
    from modeling_stage2.export import main

    model = paths["folder"]
    (model / "config.json").write_text("{}")  # the model is looked at after the output
    assert main([str(model), str(paths["under a file"])]) == 2
    assert f"OUTPUT {paths['under a file']}: {paths['file']} is a file" in capsys.readouterr().err


@pytest.mark.parametrize("error, status", [(OSError(28, "No space left on device"), 1),
                                           (PermissionError(13, "Permission denied"), None)])
def test_stage2_evaluate_a_full_disk_is_exit_1_in_one_line(paths, monkeypatch, capsys, error, status):
    """A full disk while the evaluation wrote its results was a traceback; another OSError still is (a bug's)."""
    from training import evaluate

    def fails(args):
        raise error

    monkeypatch.setattr(evaluate, "run", fails)
    argv = ["--model", str(paths["new"]), "--data", str(paths["new"])]
    if status is None:
        with pytest.raises(PermissionError):
            evaluate.main(argv)
        return
    assert evaluate.main(argv) == status
    assert capsys.readouterr().err.splitlines() == ["stage2-evaluate: error: [Errno 28] No space left on device"]
